"""The git remote (gitremote.py): pushes against local bare repositories (real dulwich, no
server), and the pusher's backoff, catch-up, divergence and redaction on trio's MockClock."""
import logging
import shutil
import subprocess
import time
import traceback

import pytest
import trio
from dulwich.objects import Blob, Commit, Tree
from dulwich.repo import Repo

from memfuse import gitremote
from memfuse.gitremote import (GitRemote, PushError, PushOutcome, Pusher, RemoteError, RemoteUrl,
                               parse_remote_url)
from memfuse.history import BRANCH, HistoryRepo
from memfuse.status import Status

from .integration.gitservers import Silent

SECRET = "s3cr3t-t0ken"


@pytest.fixture
def history(tmp_path):
    repo = HistoryRepo(tmp_path / "memory.git")
    repo.open()
    repo.commit({"system/human.md": b"one\n"}, b"A <a@b>", "Local edit")
    yield repo
    repo.close()


@pytest.fixture
def bare(tmp_path):
    path = tmp_path / "remote.git"
    path.mkdir()
    Repo.init_bare(str(path)).close()
    return path


def remote_head(path) -> bytes | None:
    with Repo(str(path)) as repo:
        return repo.refs.as_dict().get(BRANCH)


def unrelated_commit(path) -> bytes:
    """Someone else's commit on the remote's main, not descending from ours."""
    with Repo(str(path)) as repo:
        blob = Blob.from_string(b"theirs\n")
        tree = Tree()
        tree.add(b"theirs.md", 0o100644, blob.id)
        commit = Commit()
        commit.tree, commit.parents = tree.id, []
        commit.author = commit.committer = b"Other <o@x>"
        commit.author_time = commit.commit_time = int(time.time())
        commit.author_timezone = commit.commit_timezone = 0
        commit.message = b"someone else's\n"
        for obj in (blob, tree, commit):
            repo.object_store.add_object(obj)
        repo.refs[BRANCH] = commit.id
        return commit.id


def test_a_push_creates_the_missing_branch_then_fast_forwards(history, bare):
    remote = GitRemote(str(bare))
    assert remote.push(history.path) == PushOutcome(history.head(), True)
    assert remote_head(bare) == history.head()
    history.commit({"system/human.md": b"two\n"}, b"A <a@b>", "Local edit")
    assert remote.push(history.path).pushed
    assert remote_head(bare) == history.head()
    assert GitRemote(f"file://{bare}").push(history.path).pushed  # already there: nothing sent


def test_a_diverged_remote_is_never_forced(history, bare):
    theirs = unrelated_commit(bare)
    outcome = GitRemote(str(bare)).push(history.path)
    assert outcome == PushOutcome(history.head(), False, theirs)
    assert remote_head(bare) == theirs


def test_a_remote_ahead_of_the_history_is_diverged_too(history, bare):
    remote = GitRemote(str(bare))
    first = history.head()
    history.commit({"system/human.md": b"two\n"}, b"A <a@b>", "Local edit")
    remote.push(history.path)
    history.repo.refs[BRANCH] = first  # the local history was reset behind the remote
    assert remote.push(history.path).diverged == remote_head(bare) != first


def test_an_absent_repository_is_an_error_and_is_not_created(history, tmp_path):
    missing = tmp_path / "nowhere.git"
    with pytest.raises(PushError, match="not a git repository"):
        GitRemote(str(missing)).push(history.path)
    assert not missing.exists()


@pytest.mark.parametrize("where", ["work tree", ".git", "file://"])
def test_a_repository_with_a_work_tree_is_refused_and_left_alone(history, tmp_path, where):
    notes = tmp_path / "notes"  # made with plain `git init`: main checked out
    subprocess.run(["git", "init", "--quiet", "--initial-branch=main", str(notes)], check=True)
    subprocess.run(["git", "-C", str(notes), "-c", "user.name=N", "-c", "user.email=n@x",
                    "commit", "--quiet", "--allow-empty", "-m", "mine"], check=True)
    before = remote_head(notes)
    url = {"work tree": str(notes), ".git": str(notes / ".git"),
           "file://": f"file://{notes}"}[where]
    with pytest.raises(PushError, match=r"not a bare repository \(create it with: git init "
                                        r"--bare\)"):
        GitRemote(url).push(history.path)
    assert remote_head(notes) == before


def test_a_remote_url_is_taken_apart_without_any_io(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_remote_url("https://bot:t%2Fk@example.org:8443/mem.git") == RemoteUrl(
        "http", "/mem.git", "https://bot:t%2Fk@example.org:8443/mem.git",
        "https://***@example.org:8443/mem.git", "https://example.org:8443/mem.git", "bot", "t/k",
        ("bot", "t%2Fk"))
    assert parse_remote_url("git://[::1]:9418/m.git").bare_url == "git://[::1]:9418/m.git"
    assert parse_remote_url("file://localhost/srv/m.git").path == "/srv/m.git"
    assert parse_remote_url("rel/m.git").path == str(tmp_path / "rel/m.git")


def test_urls_memfuse_cannot_push_to_are_refused_without_showing_credentials():
    for url in (f"ssh://me:{SECRET}@host/x.git", f"me:{SECRET}@host:x.git",
                f"ftp://me:{SECRET}@host/x.git", "a\nb", "git:///nohost"):
        with pytest.raises(RemoteError) as caught:
            GitRemote(url)
        assert SECRET not in str(caught.value)


def test_a_malformed_url_is_refused_without_showing_any_of_its_userinfo():
    # urllib's own errors would quote the text after the first ':' ("Port could not be cast
    # to integer value as 'Qz9'"): a password with an unencoded '/' in it. The secrets are
    # strings no traceback's file path holds (a worktree called wt-enable holds "ab")
    for url, secret in ((f"https://me:Qz9/cd@host/x.git", "Qz9"),
                        (f"https://me:{SECRET}/xyz@host/x.git", SECRET),
                        (f"me:Qz9/cd@host", "Qz9"),
                        (f"http://me:{SECRET}@host:99999/x.git", SECRET),
                        (f"http://me:{SECRET}@[::1/x.git", SECRET)):
        with pytest.raises(RemoteError) as caught:
            GitRemote(url)
        shown = "".join(traceback.format_exception(caught.value))  # what a traceback says
        assert secret not in shown and "cd@" not in shown, shown


def test_a_url_with_a_query_or_a_fragment_is_refused_without_showing_it():
    for url in (f"https://host/x.git?private_token={SECRET}", f"https://host/x.git#{SECRET}",
                f"file:///srv/x.git?{SECRET}", f"git://host/x.git?t={SECRET}#f"):
        with pytest.raises(RemoteError) as caught:
            GitRemote(url)
        assert SECRET not in str(caught.value) and "no query or fragment" in str(caught.value)
    assert GitRemote("https://host/x.git?").shown == "https://host/x.git"  # an empty one


def test_a_line_break_or_nul_in_the_decoded_userinfo_is_refused():
    # `git credential fill` reads lines: a decoded user name "evil\nhost=github.com" would
    # ask for github.com's credentials, then sent to attacker.example
    for url in ("https://evil%0Ahost=github.com@attacker.example/x.git",
                "https://evil%0D%0Ahost=github.com@attacker.example/x.git",
                f"https://me:{SECRET}%0Aprotocol=https@host/x.git",
                "https://me%00@host/x.git"):
        with pytest.raises(RemoteError) as caught:
            GitRemote(url)
        assert SECRET not in str(caught.value) and "github.com" not in str(caught.value)


@pytest.mark.parametrize("answer", ["username=u\npassword=p\rhost=github.com\n",
                                    "username=u\rx\npassword=p\n",
                                    "username=u\npassword=p\0q\n"])
def test_a_credential_helper_answer_with_a_carriage_return_or_nul_is_not_used(
        monkeypatch, answer):
    def fake_run(argv, **kwargs):
        return subprocess.CompletedProcess(argv, 0, stdout=answer, stderr="")

    monkeypatch.setattr(gitremote.subprocess, "run", fake_run)
    with pytest.raises(PushError, match="carriage return or NUL"):
        GitRemote("https://host/x.git")._fill()


def test_git_credential_fill_reads_no_repository_config_and_gets_no_memfuse_secrets(
        tmp_path, monkeypatch):
    # the daemon's directory is a repository whose config names a helper: not asked
    work = tmp_path / "work"
    Repo.init(str(work), mkdir=True).close()
    marker, env_dump = tmp_path / "local-helper-ran", tmp_path / "helper-env"
    with open(work / ".git" / "config", "a") as config:
        config.write(f"[credential]\n\thelper = \"!f() {{ touch {marker}; "
                     f"echo username=u; echo password=p; }}; f\"\n")
    home = tmp_path / "home"
    home.mkdir()
    # the user's own helper is asked, with the user's environment less memfuse's secrets
    (home / ".gitconfig").write_text(f"[credential]\n\thelper = \"!f() {{ env > {env_dump}; "
                                     f"}}; f\"\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("LETTA_API_KEY", "letta-key-" + SECRET)
    monkeypatch.setenv("MEMFUSE_GIT_REMOTE", f"https://me:{SECRET}@host/x.git")
    monkeypatch.chdir(work)
    assert GitRemote("https://host/x.git")._fill() is None
    assert not marker.exists()
    seen = env_dump.read_text()
    assert SECRET not in seen and "LETTA_API_KEY" not in seen
    assert f"HOME={home}" in seen and "GIT_TERMINAL_PROMPT=0" in seen


def test_credentials_are_redacted_everywhere_a_url_is_shown():
    remote = GitRemote(f"https://me:{SECRET}@example.test:8443/h.git")
    assert remote.shown == "https://***@example.test:8443/h.git"
    assert SECRET not in repr(remote) and "me:" not in remote.shown
    assert remote.scrub(f"failed for https://me:{SECRET}@example.test/h.git: {SECRET}") == \
        "failed for https://***@example.test/h.git: ***"
    encoded = GitRemote("https://me:p%40ss%2Fw0rd@example.test/h.git")
    assert encoded.password == "p@ss/w0rd"
    assert encoded.scrub("p@ss/w0rd and p%40ss%2Fw0rd") == "*** and ***"
    assert GitRemote("relative/path.git").url.startswith("/")


def test_a_user_name_is_scrubbed_only_when_it_carries_the_secret():
    with_password = GitRemote(f"https://git:{SECRET}@host/x.git")
    assert with_password.scrub(f"not a git repository; digit; {SECRET}") == \
        "not a git repository; digit; ***"
    assert GitRemote("https://git@host/x.git").scrub("not a git repository") == \
        "not a git repository"  # a short user name with no password: a name, not a token
    token = GitRemote(f"https://{SECRET}@host/x.git")  # the token as the user name
    assert token.scrub(f"refused {SECRET} at https://{SECRET}@host/x.git") == \
        "refused *** at https://***@host/x.git"


def test_a_failed_http_push_names_no_credentials(history):
    remote = GitRemote(f"http://me:{SECRET}@127.0.0.1:1/h.git", timeout=5)
    with pytest.raises(PushError) as caught:
        remote.push(history.path)
    assert str(caught.value) == "connection refused"  # not urllib3's long story of the URL


def test_a_silent_http_remote_is_given_up_after_one_timeout_not_four(history):
    silent = Silent()  # accepts, never answers
    try:
        remote = GitRemote(f"http://me:{SECRET}@127.0.0.1:{silent.port}/h.git", timeout=1)
        start = time.monotonic()
        with pytest.raises(PushError) as caught:
            remote.push(history.path)
        took = time.monotonic() - start
    finally:
        silent.close()
    assert str(caught.value) == "timed out"  # not urllib3's "Max retries exceeded" story
    assert 1 <= took < 3  # urllib3's default Retry(3) made it 4 timeouts


class FakeRemote:
    """An attempt function whose remote is up, down or diverged; records attempt times."""

    def __init__(self):
        self.state, self.times, self.head = "up", [], b"1" * 40

    async def __call__(self) -> PushOutcome:
        self.times.append(trio.current_time())
        if self.state == "down":
            raise PushError(f"connection refused by https://me:{SECRET}@host/h.git")
        if self.state == "diverged":
            return PushOutcome(self.head, False, b"9" * 40)
        return PushOutcome(self.head, True)


def fake_pusher(fake=None):
    fake = fake or FakeRemote()
    return fake, Pusher(GitRemote(f"https://me:{SECRET}@host/h.git"), fake)


async def test_failures_back_off_exponentially_to_a_ceiling_and_snapshots_do_not_cut_it_short(
        nursery, caplog):
    fake, pusher = fake_pusher()
    fake.state = "down"
    start = trio.current_time()
    nursery.start_soon(pusher.run)
    for _ in range(40):  # a snapshot every 5 s while the remote is away
        await trio.sleep(5)
        pusher.poke()
    gaps = [round(b - a, 3) for a, b in zip(fake.times, fake.times[1:])]
    assert fake.times[0] == start
    assert gaps[:7] == [1, 2, 4, 8, 16, 32, 60] and set(gaps[7:]) == {60}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one line for the outage, not one per retry
    assert pusher.failures == len(fake.times) and pusher.last_error.startswith("connection")
    assert not any(SECRET in r.getMessage() for r in caplog.records)
    assert SECRET not in pusher.last_error


async def test_when_the_remote_returns_the_push_catches_up_and_the_backoff_resets(
        nursery, history, bare, tmp_path):
    remote = GitRemote(str(bare))

    async def attempt():
        return remote.push(history.path)  # in this thread: the mock clock stays exact

    pusher = Pusher(remote, attempt)
    nursery.start_soon(pusher.run)
    await trio.sleep(0.1)
    assert remote_head(bare) == history.head() == pusher.last_push
    away = tmp_path / "away.git"
    bare.rename(away)  # the remote goes away
    for n in range(5):
        history.commit({"system/human.md": f"edit {n}\n".encode()}, b"A <a@b>", "Local edit")
        pusher.poke()
        await trio.sleep(2.5)  # never at a retry's instant (0.1, 1.1, 3.1, 7.1, 15.1, 31.1 s)
    await trio.sleep(30)  # retries with no new snapshot to prompt them
    assert pusher.failures >= 6 and pusher.retry_at is not None
    away.rename(bare)  # it comes back: the next retry (at 63.1 s) catches up
    await trio.sleep(61)
    assert remote_head(bare) == history.head() == pusher.last_push
    assert pusher.failures == 0 and "not a git repository" in pusher.last_error
    bare.rename(away)  # away again: the backoff starts over at 1 s
    history.commit({"system/human.md": b"after\n"}, b"A <a@b>", "Local edit")
    pusher.poke()
    await trio.sleep(0.5)
    assert pusher.failures == 1
    away.rename(bare)
    await trio.sleep(1)
    assert remote_head(bare) == history.head()


async def test_a_diverged_remote_is_said_once_and_retried_at_the_slow_rate_until_fixed(
        nursery, caplog):
    fake, pusher = fake_pusher()
    fake.state = "diverged"
    nursery.start_soon(pusher.run)
    await trio.sleep(200)
    pusher.poke()
    await trio.sleep(100)
    gaps = {round(b - a, 3) for a, b in zip(fake.times, fake.times[1:])}
    assert gaps == {60} and pusher.diverged
    assert "diverged" in pusher.last_error and "not forced" in pusher.last_error
    said = [r.getMessage() for r in caplog.records if "diverged" in r.getMessage()]
    assert len(said) == 1 and caplog.records[-1].levelno == logging.WARNING
    fake.state = "up"
    await trio.sleep(60)
    assert not pusher.diverged and pusher.last_push == fake.head


async def test_the_last_push_at_unmount_gives_up_after_its_timeout(caplog):
    calls = []

    async def hangs_after_the_first():
        calls.append(trio.current_time())
        if len(calls) > 1:
            await trio.sleep_forever()
        return PushOutcome(b"1" * 40, True)

    pusher = Pusher(GitRemote("/nowhere.git"), hangs_after_the_first)
    await pusher.push_once()  # the mount was up
    start = trio.current_time()
    with trio.fail_after(600):  # without its own timeout it would hang here
        await pusher.last_push_now(5)
    assert trio.current_time() - start == 5
    assert "did not finish within 5 s" in caplog.text


def test_status_shows_the_last_push_and_the_last_push_error():
    now = time.time()
    status = Status(agent_id="agent-1", mountpoint="/m", base_url="http://x", pid=1,
                    reachable=True, last_poll=now, pending_writes=0, pending_unlinks=0,
                    uncommitted=0, last_commit=None, last_commit_message=None,
                    last_commit_at=None, last_conflict=None, last_error=None,
                    last_error_at=None, updated_at=now, git_remote="https://***@h/x.git",
                    last_push="abcdef0123", last_push_at=now - 3,
                    last_push_error="connection refused", last_push_error_at=now - 10,
                    push_failing=True, next_push_retry_at=now + 4)
    text = status.render(now)
    assert "git remote     https://***@h/x.git: FAILING, next try in 4 s" in text
    assert "last push      abcdef0 3.0 s ago" in text
    assert "push error     connection refused (10.0 s ago)" in text
    status.push_failing, status.push_diverged = False, True
    assert "DIVERGED" in status.render(now)
    status.push_diverged, status.pushing_since = False, now - 12
    assert "https://***@h/x.git: ok; a push under way for 12 s" in status.render(now)


async def test_a_last_push_that_fails_says_so_once_at_unmount(caplog):
    fake, pusher = fake_pusher()
    fake.state = "down"
    await pusher.push_once()
    caplog.clear()
    await pusher.last_push_now(5)
    [line] = [r.getMessage() for r in caplog.records]
    assert "the last push failed (connection refused" in line and SECRET not in line


@pytest.mark.parametrize("state", ["down", "diverged"])
async def test_a_first_failure_at_unmount_is_one_line_that_says_what_is_true(
        nursery, caplog, state):
    fake, pusher = fake_pusher()
    nursery.start_soon(pusher.run)
    await trio.sleep(1)
    assert pusher.last_push == fake.head and pusher.failures == 0
    fake.state = state  # the remote breaks just before the unmount
    await pusher.last_push_now(5)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "the last push failed" in lines[0], lines
    assert "retrying" not in lines[0]  # there is no retry after the last push


async def test_a_pusher_that_never_ran_pushes_nothing_at_unmount(caplog):
    fake, pusher = fake_pusher()  # the mount failed before it was up
    await pusher.last_push_now(5)
    assert fake.times == [] and caplog.records == []
