"""An agent tagged `git-memory-enabled`, mounted in the git-memory layout (layout.py), at the
filesystem level over the fake API: labels are paths, every block file is an attached block,
`rm` detaches, `mv` relabels, the journal replays. The real server and real programs are in
tests/integration/test_git_memory.py."""
import errno
import json
import subprocess
import os
from functools import partial
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from memfuse import daemon
from memfuse import state as state_module
from memfuse.config import Config
from memfuse.history import HistoryRepo, Snapshotter
from memfuse.keeper import TreeBlockKeeper
from memfuse.layout import CLASSIC, GIT_MEMORY, GIT_MEMORY_TAG
from memfuse.model import Block, Origin
from memfuse.poller import Poller
from memfuse.state import KEPT_FILE_LIMIT, MountState
from memfuse.status import Status
from memfuse.tree import ROOT_INODE, Kind, Tree

from .fakeletta import FakeLetta
from .fsworld import (git_memory_agent, inode_of, make_world, read_all, replay, setattr_fields,
                      write_file)
from .test_history import git
from .test_daemon import in_thread
from .test_namespace import GRACE_PASSED, create, listdir, rename, unlink

def attached_labels(world) -> set[str]:
    return {world.fake.blocks[i]["label"] for i in world.fake.agents[world.agent]}


def block(world, label: str) -> dict:
    [found] = world.fake.by_label(label)
    return found


# -- what is shown where ---------------------------------------------------------------------

async def test_a_tagged_agent_shows_its_labels_as_paths(git_world):
    assert git_world.state.layout is GIT_MEMORY
    assert sorted(git_world.state.tree.files()) == [
        "notes/todo.md", "projects/policy.md", "skills/pdf/SKILL.md", "system/human.md",
        "system/persona.md"]  # the detached `scratchpad` is no file of a git-memory agent
    assert (await read_all(git_world.fs, "notes/todo.md")).endswith(b"\n---\n- one\n")
    assert (await read_all(git_world.fs, "skills/pdf/SKILL.md")).endswith(b"Read PDFs.\n")


async def test_a_classic_agent_keeps_the_classic_layout(world):
    assert world.state.layout is CLASSIC
    assert "system/human.md" in world.state.tree.files() and "notes.md" in world.state.tree.files()


# -- operations --------------------------------------------------------------------------------

async def test_creating_a_block_path_makes_an_attached_block_with_that_label(git_world):
    fs = git_world.fs
    await fs.mkdir(ROOT_INODE, b"reference", 0o755, None)
    await create(fs, "reference/api.md", b"GET /v1/agents\n")
    await create(fs, "system/style.md", b"Be brief.\n")
    await fs.mkdir(await inode_of(fs, "skills"), b"docx", 0o755, None)
    await create(fs, "skills/docx/SKILL.md", b"Write DOCX.\n")
    for label, value in [("reference/api", "GET /v1/agents\n"), ("system/style", "Be brief.\n"),
                         ("skills/docx", "Write DOCX.\n")]:
        made = block(git_world, label)
        assert made["value"] == value and made["tags"] == [f"owner:{git_world.agent}"]
        assert made["id"] in git_world.fake.agents[git_world.agent]
    assert git_world.records[-1][:3] == ("skills/docx/SKILL.md",
                                         git_world.state.tree.files()["skills/docx/SKILL.md"],
                                         Origin.LOCAL)


# -- kept files: no block, in history, never sent --------------------------------------------

KEPT = {"skills/pdf/extract.py": b"import sys\n", "skills/pdf/notes.md": b"kept\n",
        "notes/todo.txt": b"not a block\n", ".letta/config.json": b"{}\n",
        "image.png": b"\x89PNG\r\n\x1a\n\0\xff"}


def sent(world) -> list:
    """Every request that would change the server (all but reads)."""
    return [r for r in world.fake.requests if r[0] != "GET"]


def kind_at(world, path: str) -> Kind:
    return await_node(world, path).kind


async def make_kept(world, files=KEPT) -> None:
    for path, data in files.items():
        parent = path.rpartition("/")[0]
        if parent and await_node(world, parent) is None:
            await world.fs.mkdir(await inode_of(world.fs, parent.rpartition("/")[0])
                                 if "/" in parent else ROOT_INODE,
                                 parent.rpartition("/")[2].encode(), 0o755, None)
        await create(world.fs, path, data)


async def test_a_file_that_is_no_block_is_kept_in_history_and_never_sent(git_world):
    await make_kept(git_world)
    assert sent(git_world) == []  # no create, no PATCH, nothing at all
    for path, data in KEPT.items():
        assert kind_at(git_world, path) is Kind.KEPT
        assert await read_all(git_world.fs, path) == data
        assert (path, data, Origin.LOCAL) in git_world.records
    assert git_world.state.kept_used == sum(map(len, KEPT.values()))


@pytest.mark.parametrize("name", [".extract.py.swp", "extract.py~", "4913", "sedAb12Cd",
                                  "tmpab12cd_9", "#extract.py#"])
async def test_editor_temporary_files_stay_scratch_beside_kept_files(git_world, name):
    await create(git_world.fs, f"skills/pdf/{name}", b"temporary\n")
    assert kind_at(git_world, f"skills/pdf/{name}") is Kind.SCRATCH
    assert git_world.records == [] and sent(git_world) == []


async def test_a_kept_file_is_recorded_at_each_close_and_at_truncate(git_world):
    fs = git_world.fs
    await create(fs, "skills/pdf/extract.py", b"v1\n")
    await write_file(fs, "skills/pdf/extract.py", b"v2\n")
    info = await fs.open(await inode_of(fs, "skills/pdf/extract.py"), os.O_WRONLY, None)
    await fs.write(info.fh, 3, b"more\n")
    assert git_world.records[-1][1] == b"v2\n"  # recorded at close, not at each write
    await fs.flush(info.fh)
    await fs.release(info.fh)
    await fs.setattr(await inode_of(fs, "skills/pdf/extract.py"),
                     SimpleNamespace(st_size=2), setattr_fields(update_size=True), None, None)
    assert [r[1] for r in git_world.records] == [b"v1\n", b"v2\n", b"v2\nmore\n", b"v2"]
    assert sent(git_world) == []


async def test_kept_files_rename_and_unlink_are_recorded_and_never_sent(git_world):
    fs = git_world.fs
    await make_kept(git_world, {"skills/pdf/extract.py": b"x = 1\n",
                                "skills/pdf/notes.md": b"notes\n"})
    git_world.records.clear()
    await rename(fs, "skills/pdf/extract.py", "skills/pdf/run.py")
    await create(fs, "skills/pdf/old.py", b"old\n")
    await rename(fs, "skills/pdf/run.py", "skills/pdf/old.py")  # over another kept file
    await unlink(fs, "skills/pdf/notes.md")
    assert git_world.records == [
        ("skills/pdf/extract.py", None, Origin.LOCAL),
        ("skills/pdf/run.py", b"x = 1\n", Origin.LOCAL),
        ("skills/pdf/old.py", b"old\n", Origin.LOCAL),
        ("skills/pdf/run.py", None, Origin.LOCAL),
        ("skills/pdf/old.py", b"x = 1\n", Origin.LOCAL),
        ("skills/pdf/notes.md", None, Origin.LOCAL)]
    assert await listdir(fs, "skills/pdf") == ["SKILL.md", "old.py"]
    assert sent(git_world) == [] and git_world.state.kept_used == len(b"x = 1\n")


async def test_a_directory_rename_moves_kept_files_with_the_blocks(git_world):
    fs = git_world.fs
    await make_kept(git_world, {"skills/pdf/extract.py": b"x\n"})
    await rename(fs, "skills/pdf", "skills/reader")
    assert git_world.fake.blocks[git_world.ids["pdf"]]["label"] == "skills/reader"
    assert git_world.records[-2:] == [("skills/pdf/extract.py", None, Origin.LOCAL),
                                      ("skills/reader/extract.py", b"x\n", Origin.LOCAL)]
    assert kind_at(git_world, "skills/reader/extract.py") is Kind.KEPT


async def test_a_directory_rename_that_would_make_a_kept_file_a_block_is_exdev(git_world):
    # skills/pdf/sub/SKILL.md is kept (no block under skills/ but skills/<name>/SKILL.md);
    # at skills/sub/SKILL.md it would be a block: mv copies and removes file by file instead
    fs = git_world.fs
    await fs.mkdir(await inode_of(fs, "skills/pdf"), b"sub", 0o755, None)
    await create(fs, "skills/pdf/sub/SKILL.md", b"a kept file\n")
    assert kind_at(git_world, "skills/pdf/sub/SKILL.md") is Kind.KEPT
    with pytest.raises(Exception) as raised:
        await rename(fs, "skills/pdf/sub", "skills/sub")
    assert getattr(raised.value, "errno", None) == errno.EXDEV
    assert kind_at(git_world, "skills/pdf/sub/SKILL.md") is Kind.KEPT and sent(git_world) == []


async def test_a_kept_file_moved_to_a_block_path_becomes_that_block(git_world):
    await create(git_world.fs, "notes/idea.txt", b"an idea\n")
    await rename(git_world.fs, "notes/idea.txt", "notes/idea.md")
    assert block(git_world, "notes/idea")["value"] == "an idea\n"
    assert git_world.records[-1] == ("notes/idea.txt", None, Origin.LOCAL)
    assert kind_at(git_world, "notes/idea.md") is Kind.BLOCK
    assert git_world.state.kept_used == 0


async def test_a_block_file_moved_to_a_kept_path_keeps_its_bytes_and_is_as_rm(git_world):
    rendered = git_world.state.tree.files()["notes/todo.md"]
    await rename(git_world.fs, "notes/todo.md", "notes/todo.txt")
    await trio.sleep(GRACE_PASSED)
    assert git_world.ids["todo"] in git_world.fake.blocks  # never deleted
    assert "notes/todo" not in attached_labels(git_world)
    assert kind_at(git_world, "notes/todo.txt") is Kind.KEPT
    assert await read_all(git_world.fs, "notes/todo.txt") == rendered
    assert git_world.records[-1] == ("notes/todo.txt", rendered, Origin.LOCAL)


async def test_saves_of_kept_files_through_temporary_files_keep_them(git_world):
    fs = git_world.fs
    await make_kept(git_world, {"skills/pdf/extract.py": b"v1\n"})
    # sed -i: a scratch temporary file renamed over the kept one
    await create(fs, "skills/pdf/sedAb12Cd", b"v2\n")
    await rename(fs, "skills/pdf/sedAb12Cd", "skills/pdf/extract.py")
    assert git_world.records[-1] == ("skills/pdf/extract.py", b"v2\n", Origin.LOCAL)
    # vim with a backup: the file renamed to its backup, written anew, the backup removed
    await rename(fs, "skills/pdf/extract.py", "skills/pdf/extract.py~")
    assert kind_at(git_world, "skills/pdf/extract.py~") is Kind.SCRATCH
    await create(fs, "skills/pdf/extract.py", b"v3\n")
    await unlink(fs, "skills/pdf/extract.py~")
    assert git_world.records[-2:] == [("skills/pdf/extract.py", None, Origin.LOCAL),
                                      ("skills/pdf/extract.py", b"v3\n", Origin.LOCAL)]
    assert await read_all(fs, "skills/pdf/extract.py") == b"v3\n" and sent(git_world) == []


async def test_kept_files_over_the_caps_are_refused(git_world, monkeypatch):
    fs = git_world.fs
    await create(fs, "big.bin", b"a" * 10)
    info = await fs.open(await inode_of(fs, "big.bin"), os.O_WRONLY, None)
    with pytest.raises(Exception) as raised:  # one file: KEPT_FILE_LIMIT (1 MiB)
        await fs.write(info.fh, 10, b"b" * KEPT_FILE_LIMIT)
    assert getattr(raised.value, "errno", None) == errno.EFBIG
    await fs.flush(info.fh)
    await fs.release(info.fh)
    assert await read_all(fs, "big.bin") == b"a" * 10  # as before the refused write
    await create(fs, "tmpab12cd_9", b"s" * (KEPT_FILE_LIMIT + 1))  # scratch: no such cap
    with pytest.raises(Exception) as raised:
        await rename(fs, "tmpab12cd_9", "big.bin")
    assert getattr(raised.value, "errno", None) == errno.EFBIG
    assert await read_all(fs, "big.bin") == b"a" * 10
    monkeypatch.setattr(state_module, "KEPT_LIMIT", 25)  # all of them: KEPT_LIMIT
    await create(fs, "second.bin", b"c" * 15)
    info, _attr = await fs.create(ROOT_INODE, b"third.bin", 0o644, os.O_WRONLY | os.O_CREAT,
                                  None)
    with pytest.raises(Exception) as raised:
        await fs.write(info.fh, 0, b"d")
    assert getattr(raised.value, "errno", None) == errno.ENOSPC
    await fs.flush(info.fh)  # an empty file, recorded
    await fs.release(info.fh)
    assert git_world.records[-1] == ("third.bin", b"", Origin.LOCAL)
    await unlink(fs, "second.bin")  # removing one makes room
    await create(fs, "fourth.bin", b"e" * 15)
    assert git_world.state.kept_used == 25 and sent(git_world) == []


async def test_kept_files_come_back_at_a_new_mount_of_the_same_history(git_world):
    await make_kept(git_world)
    committed = replay(git_world.loaded, git_world.records)  # the history's head
    again = []
    state = MountState(Tree(), lambda *change, **_: again.append(change), layout=GIT_MEMORY)
    state.load(*await git_world.remote.listing(), 0.0, committed)
    assert [change for change in again if change[0] in KEPT] == []  # as history has them
    assert {p: c for p, c in state.tree.files().items() if p in KEPT} == KEPT
    assert all(n.kind is Kind.KEPT for n in state.tree.kept())
    assert state.kept_used == sum(map(len, KEPT.values()))


async def test_a_classic_mount_has_no_kept_files(world):
    await create(world.fs, "extract.py", b"x\n")
    assert kind_at(world, "extract.py") is Kind.SCRATCH and world.records == []


async def test_a_kept_file_closed_is_recovered_after_a_crash(tmp_path):
    # close() returned: the change is in the uncommitted record, fsync'd; the daemon is killed
    # before the quiet period; the next mount (also one from history alone) shows it, and
    # commits it as the person's
    repo = HistoryRepo(tmp_path / "memory.git")
    repo.open()
    first = Snapshotter(repo)
    first.record("system/human.md", b"---\ndescription: d\nlimit: 10\n---\nh", Origin.SERVER)
    first.record("skills/pdf/old.py", b"old\n", Origin.LOCAL, durable=True)
    await first.flush()
    crashed = Snapshotter(repo)
    crashed.record("skills/pdf/extract.py", b"import sys\n", Origin.LOCAL, durable=True)
    crashed.record("skills/pdf/old.py", None, Origin.LOCAL, durable=True)
    snapshots = Snapshotter(repo)  # the next mount
    state = MountState(Tree(), snapshots.record, layout=GIT_MEMORY)
    human = Block("b1", "system/human", "h", 10, "d")
    state.load([human], [], 0.0, repo.files(), snapshots.recover())
    assert state.tree.files() == {"system/human.md": repo.files()["system/human.md"],
                                  "skills/pdf/extract.py": b"import sys\n"}
    await snapshots.flush({Origin.LOCAL: "Local edit (recovered at mount)"})
    assert sorted(repo.files()) == ["skills/pdf/extract.py", "system/human.md"]
    assert git(repo, "log", "-1", "--format=%s", "main").startswith(
        "Local edit (recovered at mount)")
    repo.close()


def await_node(world, path: str):
    node = world.state.tree.root
    for name in path.split("/"):
        node = world.state.tree.child(node, name) if node is not None else None
    return node


@pytest.mark.parametrize("path", [".md", "notes/.md", "notes/a\tb.md"])
async def test_a_path_whose_label_cannot_be_shown_is_refused_as_in_the_classic_layout(
        git_world, path):
    parent, _, name = path.rpartition("/")
    with pytest.raises(Exception) as raised:
        await git_world.fs.create(await inode_of(git_world.fs, parent) if parent else ROOT_INODE,
                                  name.encode(), 0o644, os.O_WRONLY, None)
    assert getattr(raised.value, "errno", None) == errno.EINVAL
    assert git_world.fake.calls("create") == []


async def test_rm_detaches_the_block_and_never_deletes_it(git_world):
    await unlink(git_world.fs, "notes/todo.md")
    await trio.sleep(GRACE_PASSED)
    todo = git_world.fake.blocks[git_world.ids["todo"]]  # still there
    assert todo["id"] not in git_world.fake.agents[git_world.agent]
    assert f"owner:{git_world.agent}" not in todo["tags"]
    assert "notes/todo.md" not in git_world.state.tree.files()


async def test_mv_relabels_and_the_block_stays_attached(git_world):
    await rename(git_world.fs, "notes/todo.md", "notes/done.md")
    await rename(git_world.fs, "system/human.md", "people.md")  # out of the prompt
    todo, human = (git_world.fake.blocks[git_world.ids[k]] for k in ("todo", "human"))
    assert (todo["label"], human["label"]) == ("notes/done", "people")
    assert {"notes/done", "people"} <= attached_labels(git_world)
    assert git_world.fake.calls("detach") == [] and git_world.fake.calls("create") == []
    assert await listdir(git_world.fs, "notes") == ["done.md"]


async def test_mv_onto_a_name_that_is_no_block_is_as_rm(git_world):
    await rename(git_world.fs, "notes/todo.md", "notes/todo.txt")
    await trio.sleep(GRACE_PASSED)
    assert git_world.ids["todo"] in git_world.fake.blocks  # never deleted
    assert "notes/todo" not in attached_labels(git_world)
    assert await read_all(git_world.fs, "notes/todo.txt") != b""  # the bytes live on, kept


async def test_a_directory_rename_relabels_every_block_under_it(git_world):
    fs = git_world.fs
    await fs.mkdir(await inode_of(fs, "notes"), b"deep", 0o755, None)
    await create(fs, "notes/deep/idea.md", b"an idea\n")
    await rename(fs, "notes", "archive")
    assert {"archive/todo", "archive/deep/idea"} <= attached_labels(git_world)
    await rename(fs, "skills/pdf", "skills/reader")
    assert git_world.fake.blocks[git_world.ids["pdf"]]["label"] == "skills/reader"
    assert "skills/reader/SKILL.md" in git_world.state.tree.files()


async def test_a_directory_rename_that_would_unmake_a_skill_is_refused(git_world):
    with pytest.raises(Exception) as raised:  # skills/pdf/SKILL.md -> skills/x/pdf/SKILL.md
        await git_world.fs.mkdir(await inode_of(git_world.fs, "skills"), b"x", 0o755, None)
        await rename(git_world.fs, "skills/pdf", "skills/x/pdf")
    assert getattr(raised.value, "errno", None) == errno.EINVAL
    assert git_world.fake.blocks[git_world.ids["pdf"]]["label"] == "skills/pdf"


async def test_mkdir_at_any_depth_and_system_stays(git_world):
    fs = git_world.fs
    parent = ROOT_INODE
    for name in (b"a", b"b", b"c"):
        parent = (await fs.mkdir(parent, name, 0o755, None)).st_ino
    await create(fs, "a/b/c/d.md", b"deep\n")
    assert block(git_world, "a/b/c/d")["id"] in git_world.fake.agents[git_world.agent]
    with pytest.raises(Exception) as raised:
        await fs.rmdir(ROOT_INODE, b"system", None)
    assert getattr(raised.value, "errno", None) == errno.EPERM
    with pytest.raises(Exception) as raised:
        await rename(fs, "system", "prompt")
    assert getattr(raised.value, "errno", None) == errno.EPERM


async def test_a_sed_save_updates_the_same_block(git_world):
    # GNU sed -i: a temporary file beside the target, renamed over it
    await create(git_world.fs, "notes/sedAb12Cd", b"- one\n- two\n")
    await rename(git_world.fs, "notes/sedAb12Cd", "notes/todo.md")
    assert git_world.fake.blocks[git_world.ids["todo"]]["value"] == "- one\n- two\n"
    assert git_world.fake.calls("create") == [] and git_world.fake.calls("detach") == []


async def test_a_write_reaches_the_block(git_world):
    await write_file(git_world.fs, "system/human.md", b"Ada.\n")
    assert git_world.fake.blocks[git_world.ids["human"]]["value"] == "Ada.\n"


# -- the server's changes -----------------------------------------------------------------------

async def test_server_relabels_detaches_and_new_blocks_show_at_their_paths(git_world):
    fake, state = git_world.fake, git_world.state
    fake.blocks[git_world.ids["todo"]]["label"] = "notes/later"
    fake.agents[git_world.agent].remove(git_world.ids["persona"])  # detached: no file now
    fake.add_block("reference/new", "new\n", agent=git_world.agent)
    poller = Poller(state, git_world.remote)
    assert await poller.poll_attached()
    files = state.tree.files()
    assert "notes/later.md" in files and "reference/new.md" in files
    assert "system/persona.md" not in files and "notes/todo.md" not in files


async def test_a_label_swap_on_the_server_moves_both_files(git_world):
    fake, state, ids = git_world.fake, git_world.state, git_world.ids
    before = state.tree.files()
    fake.blocks[ids["todo"]]["label"] = "system/human"
    fake.blocks[ids["human"]]["label"] = "notes/todo"
    assert await Poller(state, git_world.remote).poll_attached()
    files = state.tree.files()
    assert files["system/human.md"].split(b"---\n")[-1] == (
        before["notes/todo.md"].split(b"---\n")[-1])
    assert files["notes/todo.md"].split(b"---\n")[-1] == (
        before["system/human.md"].split(b"---\n")[-1])
    assert state.tree.problems() == []


# -- the journal ----------------------------------------------------------------------------------

async def test_changes_made_while_the_server_is_away_are_replayed_in_the_layout(git_world):
    fs, fake = git_world.fs, git_world.fake
    fake.down = True
    await fs.mkdir(ROOT_INODE, b"reference", 0o755, None)
    await create(fs, "reference/api.md", b"made offline\n")
    await write_file(fs, "system/human.md", b"Written offline.\n")
    await rename(fs, "notes/todo.md", "notes/done.md")
    await unlink(fs, "skills/pdf/SKILL.md")
    await trio.sleep(GRACE_PASSED)
    assert len(git_world.journal.pending()) >= 4
    fake.down = False
    assert await git_world.replayer.replay()
    assert git_world.journal.pending() == []
    assert block(git_world, "reference/api")["value"] == "made offline\n"
    assert fake.blocks[git_world.ids["human"]]["value"] == "Written offline.\n"
    assert fake.blocks[git_world.ids["todo"]]["label"] == "notes/done"
    assert {"reference/api", "notes/done", "system/human"} <= attached_labels(git_world)
    assert "skills/pdf" not in attached_labels(git_world)
    assert fake.blocks[git_world.ids["pdf"]]["label"] == "skills/pdf"  # detached, not deleted


async def test_a_restart_shows_the_journal_in_the_layout(nursery):
    first = await make_world(nursery, git_memory=True)
    first.fake.down = True
    await first.fs.mkdir(ROOT_INODE, b"reference", 0o755, None)
    await create(first.fs, "reference/api.md", b"made offline\n")
    await rename(first.fs, "notes/todo.md", "notes/done.md")
    first.fake.down = False  # the daemon died; the next one lists the server, then replays
    second = await make_world(nursery, after=first, git_memory=True)
    assert second.state.layout is GIT_MEMORY
    files = second.state.tree.files()
    assert "reference/api.md" in files and "notes/done.md" in files and "notes/todo.md" not in files
    assert await second.replayer.replay()
    assert {"reference/api", "notes/done"} <= attached_labels(second)
    await first.client.aclose()
    await second.client.aclose()


# -- a tag change while mounted ---------------------------------------------------------------

async def test_a_tag_change_while_mounted_is_said_and_the_mount_keeps_its_layout(world, caplog):
    poller = Poller(world.state, world.remote, model_interval=30)
    assert await poller.poll_once() and poller.model_changed is None
    world.fake.agent_tags[world.agent] = [GIT_MEMORY_TAG]
    assert await poller.poll_once()
    assert poller.model_changed is None  # read at most every model_interval
    await trio.sleep(31)
    assert await poller.poll_once()
    assert poller.model_changed == "git-memory" and world.state.layout is CLASSIC
    assert "system/human.md" in world.state.tree.files()  # the files stay where they are
    assert any("remount to show it in its new layout" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    line = status(layout="classic", layout_changed="git-memory").render()
    assert "the agent's memory model changed on the server" in line
    assert "remount to show it in its new layout" in line
    world.fake.agent_tags[world.agent] = []
    await trio.sleep(31)
    assert await poller.poll_once() and poller.model_changed is None


def status(**fields) -> Status:
    return Status(agent_id="agent-x", mountpoint="/m", base_url="http://l", pid=1,
                  reachable=True, last_poll=None, pending_writes=0, pending_unlinks=0,
                  uncommitted=0, last_commit=None, last_commit_message=None,
                  last_commit_at=None, last_conflict=None, last_error=None,
                  last_error_at=None, updated_at=0.0, **fields)


# -- the daemon: choosing, recording, and a local-first mount -----------------------------------

@pytest.fixture
def git_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(daemon, "STATUS_INTERVAL", 0.02)
    fake = FakeLetta()
    agent, ids = git_memory_agent(fake)
    config = Config.build(agent, base_url="http://letta.test", quiet_period=0.05,
                          poll_interval=0.05, full_poll_interval=0.05, retry_budget=0.2)
    return fake, config, ids


async def _serve_until(config, fake, check) -> list:
    """Mount (the daemon in this process), run `check()` in a worker thread, unmount."""
    reports, ready = [], trio.Event()

    def on_ready(error):
        reports.append(error)
        ready.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(daemon.serve, config, on_ready, on_notice=lambda _n: None,
                                   transport=fake.transport()))
        await ready.wait()
        assert reports == [None]
        result = await in_thread(check)
        nursery.cancel_scope.cancel()
    return result


GIT_FILES = ["notes/todo.md", "projects/policy.md", "skills/pdf/SKILL.md", "system/human.md",
             "system/persona.md"]


def tree(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.md"))


@pytest.mark.real_clock
async def test_the_daemon_mounts_by_the_tags_records_the_layout_and_a_local_first_mount_uses_it(
        git_setup):
    fake, config, ids = git_setup
    online = await _serve_until(config, fake, lambda: tree(config.mountpoint))
    assert online == GIT_FILES
    assert json.loads(config.block_map_file.read_text())["layout"] == "git-memory"
    fake.down = True  # a local-first mount: the layout the history recorded
    offline = await _serve_until(config, fake, lambda: (
        tree(config.mountpoint), (config.mountpoint / "notes/todo.md").read_bytes(),
        Status.load(config.status_file).render()))
    assert offline[0] == GIT_FILES and offline[1].endswith(b"- one\n")
    assert "layout         git-memory" in offline[2]


@pytest.mark.real_clock
async def test_a_classic_history_whose_agent_got_tagged_mounts_in_the_new_layout(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    fake = FakeLetta()
    agent = fake.add_agent()
    fake.add_block("system/human", "The human.\n", agent=agent)
    config = Config.build(agent, base_url="http://letta.test", quiet_period=0.05,
                          poll_interval=0.05, full_poll_interval=0.05, retry_budget=0.2)
    assert await _serve_until(config, fake, lambda: tree(config.mountpoint)) == [
        "system/system/human.md"]
    fake.agent_tags[agent] = [GIT_MEMORY_TAG]
    assert await _serve_until(config, fake, lambda: tree(config.mountpoint)) == [
        "system/human.md"]
    repo = HistoryRepo(config.history_dir)
    repo.open()
    try:
        assert sorted(repo.files()) == ["system/human.md"]
    finally:
        repo.close()
    # the switch is one commit of moves: git's rename detection follows each file through it
    follow = subprocess.run(["git", "--git-dir", str(config.history_dir), "log", "--follow",
                             "--name-status", "--format=%an: %s", "--", "system/human.md"],
                            capture_output=True, text=True, check=True).stdout
    lines = [line for line in follow.splitlines() if line]
    assert lines == ["Letta server: Layout switch classic -> git-memory at mount: "
                     "system/human.md, system/system/human.md",
                     "R100\tsystem/system/human.md\tsystem/human.md",
                     "Letta server: Snapshot at mount: system/system/human.md",
                     "A\tsystem/system/human.md"]


@pytest.mark.real_clock
async def test_kept_files_survive_unmount_a_remount_and_a_local_first_mount(git_setup):
    fake, config, _ids = git_setup
    skill = config.mountpoint / "skills" / "pdf"

    def write():
        (skill / "extract.py").write_bytes(b"import sys\n")
        (config.mountpoint / ".letta").mkdir()
        (config.mountpoint / ".letta" / "config.json").write_bytes(b"{}\n")
        (skill / "gone.txt").write_bytes(b"x\n")
        (skill / "gone.txt").unlink()

    await _serve_until(config, fake, write)
    repo = HistoryRepo(config.history_dir)
    repo.open()
    try:
        files = repo.files()
    finally:
        repo.close()
    assert files["skills/pdf/extract.py"] == b"import sys\n" and "skills/pdf/gone.txt" not in files
    assert files[".letta/config.json"] == b"{}\n"
    before = len(fake.requests)

    def read():
        return ((skill / "extract.py").read_bytes(),
                (config.mountpoint / ".letta" / "config.json").read_bytes())

    assert await _serve_until(config, fake, read) == (b"import sys\n", b"{}\n")
    assert [r for r in fake.requests[before:] if r[0] != "GET"] == []  # never sent
    fake.down = True  # a local-first mount: from the history alone
    assert await _serve_until(config, fake, read) == (b"import sys\n", b"{}\n")


async def test_a_memory_filesystem_block_is_not_kept_in_the_git_memory_layout(git_world):
    fake = git_world.fake
    block_id = fake.add_block("memory_filesystem", "/memory/", agent=git_world.agent)
    await Poller(git_world.state, git_world.remote).poll_once()
    fake.requests.clear()
    await create(git_world.fs, "notes/new.md", b"x")
    await TreeBlockKeeper(git_world.state, git_world.remote).refresh()
    assert fake.blocks[block_id]["value"] == "/memory/"  # 0.16.8 draws the tree itself
    assert not [p for m, p, _ in fake.requests if m == "PATCH" and block_id in p]
    assert "memory_filesystem.md" in await listdir(git_world.fs, "")



@pytest.mark.parametrize("policy", ["overwrite", "reject"])
async def test_the_conflict_rule_holds_in_the_git_memory_layout(git_world, policy):
    fs, fake = git_world.fs, git_world.fake
    git_world.remote.on_conflict = policy
    info = await fs.open(await inode_of(fs, "notes/todo.md"), os.O_WRONLY | os.O_TRUNC, None)
    fake.blocks[git_world.ids["todo"]]["value"] = "Server's words.\n"
    await fs.write(info.fh, 0, b"Mine.\n")
    if policy == "overwrite":
        await fs.flush(info.fh)
    else:
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await fs.flush(info.fh)
        assert caught.value.errno == errno.ESTALE
    await fs.release(info.fh)
    versions = [(p, c.split(b"---\n")[-1], o) for p, c, o in git_world.records]
    if policy == "overwrite":
        assert fake.blocks[git_world.ids["todo"]]["value"] == "Mine.\n"
        assert versions == [("notes/todo.md", b"Server's words.\n", Origin.SERVER),
                            ("notes/todo.md", b"Mine.\n", Origin.LOCAL)]
    else:
        assert fake.blocks[git_world.ids["todo"]]["value"] == "Server's words.\n"
        assert versions == [("notes/todo.md", b"Server's words.\n", Origin.SERVER),
                            ("notes/todo.md", b"Mine.\n", Origin.REJECTED),
                            ("notes/todo.md", b"Server's words.\n", Origin.SERVER)]
