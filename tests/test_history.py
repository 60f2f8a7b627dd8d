"""The history repository and the snapshotter (dulwich, on a temporary directory)."""
import subprocess
import threading
from pathlib import Path
import time

import pytest
import trio
from dulwich.objects import Commit

from memfuse.history import SERVER_AUTHOR, HistoryRepo, Snapshotter, local_author
from memfuse.blockfile import render
from memfuse.model import Block, Origin
from memfuse.state import MountState
from memfuse.tree import Tree


def git(repo, *args) -> str:
    return subprocess.run(["git", f"--git-dir={repo.path}", *args], check=True,
                          capture_output=True, text=True).stdout


def make_repo(tmp_path) -> HistoryRepo:
    repo = HistoryRepo(tmp_path / "memory.git")
    repo.open()
    return repo


def test_new_repo_is_not_bare_and_heads_to_main(tmp_path):
    repo = make_repo(tmp_path)
    assert git(repo, "config", "core.bare").strip() == "false"
    assert git(repo, "symbolic-ref", "HEAD").strip() == "refs/heads/main"
    assert repo.head() is None and repo.files() == {}


def test_commit_adds_modifies_deletes_and_names_paths(tmp_path):
    repo = make_repo(tmp_path)
    first = repo.commit({"system/human.md": b"a", "notes.md": b"n"}, SERVER_AUTHOR, "Snapshot")
    assert repo.files() == {"system/human.md": b"a", "notes.md": b"n"}
    second = repo.commit({"system/human.md": b"b", "notes.md": None}, local_author(), "Local edit")
    assert repo.files() == {"system/human.md": b"b"}
    commit = repo.repo[second]
    assert isinstance(commit, Commit) and commit.parents == [first]
    assert commit.message.decode() == ("Local edit: notes.md, system/human.md\n\n"
                                       "D notes.md\nM system/human.md\n")
    assert git(repo, "show", "main:system/human.md") == "b"


def test_unchanged_content_makes_no_commit(tmp_path):
    repo = make_repo(tmp_path)
    repo.commit({"a.md": b"x"}, SERVER_AUTHOR, "Snapshot")
    assert repo.commit({"a.md": b"x", "gone.md": None}, SERVER_AUTHOR, "Again") is None


def test_a_commit_made_with_git_becomes_the_parent(tmp_path):
    repo = make_repo(tmp_path)
    repo.commit({"a.md": b"1"}, SERVER_AUTHOR, "Snapshot")
    # Someone commits with plain git in between (a new file, via a temporary index).
    blob = subprocess.run(["git", f"--git-dir={repo.path}", "hash-object", "-w", "--stdin"],
                          input=b"user", capture_output=True, check=True).stdout.strip()
    tree = subprocess.run(["git", f"--git-dir={repo.path}", "mktree"],
                          input=git(repo, "ls-tree", "main").encode()
                          + b"100644 blob " + blob + b"\tuser.md\n",
                          capture_output=True, check=True).stdout.strip()
    user_commit = subprocess.run(["git", f"--git-dir={repo.path}", "commit-tree", tree, "-p",
                                  "main", "-m", "by hand"], capture_output=True,
                                 check=True).stdout.strip()
    git(repo, "update-ref", "refs/heads/main", user_commit.decode())
    new = repo.commit({"a.md": b"2"}, local_author(), "Local edit")
    assert repo.repo[new].parents == [user_commit]
    assert repo.files() == {"a.md": b"2", "user.md": b"user"}


async def test_snapshotter_batches_a_quiet_period_and_keeps_origin_order(tmp_path):
    repo = make_repo(tmp_path)
    snapshots = Snapshotter(repo, quiet_period=0.2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(snapshots.run)
        snapshots.record("system/human.md", b"local 1", Origin.LOCAL)
        snapshots.record("system/human.md", b"local 1, 2", Origin.LOCAL)  # extends: batched
        snapshots.record("system/persona.md", b"server", Origin.SERVER)
        snapshots.record("system/human.md", b"local 3", Origin.LOCAL)
        # The clock is trio's MockClock: the quiet period passes at once; the commits run in a
        # worker thread, so wait (in real time) for the run loop to have made all three.
        deadline = time.monotonic() + 30
        while repo.head() is None or len(list(repo.repo.get_walker())) < 3:
            assert time.monotonic() < deadline, "the snapshotter did not commit"
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    log = git(repo, "log", "--format=%an|%s", "main").splitlines()
    user = local_author().decode().split(" <")[0]
    assert log == [f"{user}|Local edit: system/human.md",
                   "Letta server|Server change: system/persona.md",
                   f"{user}|Local edit: system/human.md"]
    assert repo.files() == {"system/human.md": b"local 3", "system/persona.md": b"server"}


async def test_a_version_the_next_does_not_extend_gets_a_commit_of_its_own(tmp_path):
    repo = make_repo(tmp_path)
    snapshots = Snapshotter(repo, quiet_period=0.2)
    snapshots.record("c.md", b"one\n", Origin.LOCAL)  # two writers within a quiet period
    snapshots.record("c.md", b"two\n", Origin.LOCAL)
    snapshots.record("gone.md", b"hello\n", Origin.LOCAL)  # written, then removed
    snapshots.record("gone.md", None, Origin.LOCAL)
    await snapshots.flush()
    log = git(repo, "log", "-p", "--format=", "main").splitlines()
    assert {"+one", "+two", "+hello"} <= set(log)
    assert repo.files() == {"c.md": b"two\n"}


async def test_writes_that_never_stop_still_commit_every_3_seconds(tmp_path, monkeypatch):
    """Each change restarts the quiet period, so under continuous writes the snapshotter's
    bound (max_delay, 3 s by default) is what commits: `git diff HEAD~1` in the mount then
    finds a parent within seconds. On trio's MockClock, with the commits run inline (not in a
    worker thread, whose real time would let the mock clock race ahead), so the times are
    exact."""
    async def inline(fn, *args, **_kwargs):
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    repo = make_repo(tmp_path)
    committed_at: list[float] = []
    snapshots = Snapshotter(repo, on_committed=lambda _sha: committed_at.append(
        trio.current_time()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(snapshots.run)
        start = trio.current_time()
        for n in range(48):  # a write every 0.25 s for 12 s, never a quiet second
            snapshots.record("system/human.md", f"write {n}".encode(), Origin.LOCAL)
            await trio.sleep(0.25)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip([start] + committed_at, committed_at)]
    assert len(committed_at) >= 3 and max(gaps) <= 3.25, gaps
    assert len(list(repo.repo.get_walker())) == len(committed_at)


def work_tree(tmp_path, repo) -> Path:
    """A directory standing for the mount: a `.git` gitfile pointing at `repo`, and `system/`."""
    work = tmp_path / "work"
    (work / "system").mkdir(parents=True)
    (work / ".git").write_text(f"gitdir: {repo.path}\n")
    return work


def git_status(work: Path) -> str:
    return subprocess.run(["git", "-C", str(work), "status", "--porcelain"],
                          capture_output=True, text=True, check=True).stdout


def test_index_follows_the_snapshots_so_git_status_is_clean(tmp_path):
    repo = make_repo(tmp_path)
    work = work_tree(tmp_path, repo)
    (work / "system/human.md").write_bytes(b"v1")
    (work / "notes.md").write_bytes(b"n")
    repo.commit({"system/human.md": b"v1", "notes.md": b"n"}, SERVER_AUTHOR, "Snapshot")
    assert git_status(work) == ""
    (work / "system/human.md").write_bytes(b"version 2")
    (work / "notes.md").unlink()
    repo.commit({"system/human.md": b"version 2", "notes.md": None}, local_author(), "Edit")
    assert git_status(work) == ""


def test_a_snapshot_waits_for_git_to_release_the_index_lock(tmp_path):
    # Every `git status` holds index.lock while it runs; a snapshot landing then must still
    # update the index, or `git status` lists the path as modified until it changes again
    # (the cause of test_git_commands_work_inside_the_mount failing in loaded full runs).
    repo = make_repo(tmp_path)
    work = work_tree(tmp_path, repo)
    (work / "system/human.md").write_bytes(b"v1")
    repo.commit({"system/human.md": b"v1"}, SERVER_AUTHOR, "Snapshot")
    (work / "system/human.md").write_bytes(b"version 2")
    lock = repo.path / "index.lock"
    lock.write_bytes(b"")  # a git command is running
    release = threading.Timer(0.3, lock.unlink)
    release.start()
    repo.commit({"system/human.md": b"version 2"}, local_author(), "Edit")
    release.join()
    assert git_status(work) == ""


async def test_after_a_crash_uncommitted_local_edits_are_committed_as_the_persons(tmp_path):
    repo = make_repo(tmp_path)
    repo.commit({"system/human.md": b"old", "system/persona.md": b"p1"}, SERVER_AUTHOR,
                "Snapshot at mount")
    human = Block("b1", "human", "mine", 100)
    persona = Block("b2", "persona", "p2 (changed on the server meanwhile)", 100)
    crashed = Snapshotter(repo)  # acknowledged writes, then kill -9 before the quiet period
    crashed.record("system/human.md", b"refused", Origin.REJECTED)
    crashed.record("system/human.md", render(human), Origin.LOCAL)
    crashed.record("system/persona.md", b"seen from the server", Origin.SERVER)
    snapshots = Snapshotter(repo)  # the next mount
    state = MountState(Tree(), snapshots.record)
    state.load([human, persona], [], 0.0, repo.files(), snapshots.recover())
    await snapshots.flush({Origin.SERVER: "Snapshot at mount",
                           Origin.LOCAL: "Local edit (recovered at mount)"})
    user = local_author().decode().split(" <")[0]
    assert git(repo, "log", "--format=%an|%s", "main").splitlines() == [
        "Letta server|Snapshot at mount: system/persona.md",
        f"{user}|Local edit (recovered at mount): system/human.md",
        f"{user}|Rejected local edit: system/human.md",
        "Letta server|Snapshot at mount: system/human.md, system/persona.md"]
    assert Snapshotter(repo).recover() == []  # committed: nothing left to recover


@pytest.mark.expect_error("snapshot of a.md failed")
async def test_on_commit_is_taken_with_the_pending_changes_and_run_once_they_are_committed(
        tmp_path, monkeypatch):
    repo = make_repo(tmp_path)
    seen = []

    def on_commit():
        seen.append(("taken", repo.head()))

        async def after():
            seen.append(("after", repo.head()))
        return after

    snapshots = Snapshotter(repo, on_commit=on_commit)
    await snapshots.flush()
    assert seen == []  # nothing pending: nothing to describe
    snapshots.record("a.md", b"1", Origin.LOCAL)
    await snapshots.flush()
    assert seen == [("taken", None), ("after", repo.head())]

    def broken(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(repo, "commit", broken)
    snapshots.record("a.md", b"2", Origin.LOCAL)
    await snapshots.flush()
    assert seen[2:] == [("taken", repo.head())]  # the commit failed: the map is not saved


async def test_a_rejected_edits_commit_says_why_it_was_refused(tmp_path):
    repo = make_repo(tmp_path)
    snapshots = Snapshotter(repo)
    snapshots.record("system/persona.md", b"too long", Origin.REJECTED,
                     "value is 41 characters, over the limit of 40")
    snapshots.record("system/human.md", b"theirs", Origin.REJECTED, "the server changed first")
    await snapshots.flush()
    user = local_author().decode().split(" <")[0]
    assert git(repo, "log", "--format=%an|%s", "main").splitlines() == [
        f"{user}|Rejected local edit (the server changed first): system/human.md",
        f"{user}|Rejected local edit (value is 41 characters, over the limit of 40): "
        "system/persona.md"]


def test_track_names_the_endpoint_as_origin_and_origin_main_follows_main(tmp_path):
    repo = make_repo(tmp_path)
    first = repo.commit({"a.md": b"a"}, SERVER_AUTHOR, "Server change")
    url = "http://127.0.0.1:8285/v1/git/agent-1/state.git"
    assert repo.track(url)
    assert git(repo, "remote", "get-url", "origin").strip() == url
    assert git(repo, "rev-parse", "--abbrev-ref", "main@{u}").strip() == "origin/main"
    assert git(repo, "rev-parse", "origin/main").strip() == first.decode()
    assert git(repo, "config", "gc.auto").strip() == "0"
    second = repo.commit({"a.md": b"b"}, SERVER_AUTHOR, "Server change")
    assert git(repo, "rev-parse", "origin/main").strip() == second.decode()
    third = repo.commit({"a.md": b"c"}, SERVER_AUTHOR, "Server change")
    for ref in (b"refs/heads/main", b"refs/remotes/origin/main"):
        repo.repo.refs[ref] = second  # as a push judged on `second` finds them
    assert repo.move(second, third)
    assert git(repo, "rev-parse", "origin/main").strip() == third.decode()
    assert git(repo, "rev-list", "--count", "main@{u}..main").strip() == "0"


def test_track_leaves_a_persons_own_origin_alone(tmp_path):
    repo = make_repo(tmp_path)
    repo.commit({"a.md": b"a"}, SERVER_AUTHOR, "Server change")
    subprocess.run(["git", "--git-dir", str(repo.path), "remote", "add", "origin",
                    "git@example.org:me/memory.git"], check=True)
    assert not repo.track("http://127.0.0.1:8285/v1/git/agent-1/state.git")
    assert git(repo, "remote", "get-url", "origin").strip() == "git@example.org:me/memory.git"
    repo.commit({"a.md": b"b"}, SERVER_AUTHOR, "Server change")
    refs = git(repo, "for-each-ref", "--format=%(refname)")
    assert "refs/remotes/origin/main" not in refs  # nothing tracked for it
