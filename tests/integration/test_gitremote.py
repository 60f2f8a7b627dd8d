"""History on a git remote, against real git servers on loopback (`git daemon`, smart HTTP
through `git http-backend` with basic auth), the real Letta server and real mounts."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import start_mount, stop_mount, wait_for
from .gitservers import GitDaemon, GitHttp, Silent, git, head_of, init_bare

pytestmark = pytest.mark.integration

USER, TOKEN = "alice", "tok-9f3Kq27xZp"


@pytest.fixture
def served(tmp_path):
    """A directory of bare repositories (`h.git` made) that the servers export."""
    root = tmp_path / "served"
    init_bare(root / "h.git")
    return root


@pytest.fixture
def gitd(served):
    daemon = GitDaemon(served)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def http(served):
    server = GitHttp(served, USER, TOKEN)
    yield server
    server.close()


def history(m) -> Path:
    return m.state / "memory.git"


def status_of(m) -> dict:
    return json.loads((m.state / "memfuse.status.json").read_text())


def write(m, text: str) -> None:
    (m.path / "system/human.md").write_text(text)


def pushed(m, bare: Path) -> bool:
    """The remote's main is the history's head, nothing waits to be committed, and the status
    says so (it is written every second)."""
    head, status = head_of(history(m)), status_of(m)
    return (head is not None and head == head_of(bare) == status["last_push"]
            and status["uncommitted"] == 0)


def assert_no_credentials(m, pid: int, *secrets: str) -> None:
    """No secret in the log, the status and pid files, the history's config, or the daemon's
    command line."""
    places = {"memfuse.log": (m.state / "memfuse.log").read_bytes(),
              "config": (history(m) / "config").read_bytes(),
              "cmdline": Path(f"/proc/{pid}/cmdline").read_bytes()}
    for name in ("memfuse.status.json", "memfuse.pid"):
        if (m.state / name).exists():
            places[name] = (m.state / name).read_bytes()
    for secret in secrets:
        for name, data in places.items():
            assert secret.encode() not in data, f"{secret!r} found in {name}"


def test_the_remote_going_down_and_coming_back_while_writes_go_on(agent, home, gitd, served):
    bare = served / "h.git"
    m = start_mount(agent, home, "--git-remote", gitd.url("h.git"))
    try:
        write(m, "Before the outage.\n")
        wait_for(lambda: pushed(m, bare), timeout=60)
        before = head_of(bare)
        gitd.stop()
        took, commits = [], []
        for n in range(4):
            last = head_of(history(m))
            start = time.monotonic()
            write(m, f"During the outage, edit {n}.\n")
            took.append(time.monotonic() - start)
            commits.append(wait_for(lambda: head_of(history(m)) != last and head_of(history(m)),
                                    timeout=60))
        wait_for(lambda: status_of(m)["push_failing"], timeout=60)
        assert head_of(bare) == before  # nothing reached it: it was away
        assert max(took) < 30  # far below one push's timeout (60 s): no write waited for it
        report = m.memfuse("status", agent).stdout
        assert "FAILING" in report and "connection refused" in report
        gitd.start()
        wait_for(lambda: pushed(m, bare), timeout=180)  # the backoff is 60 s at most
        assert not status_of(m)["push_failing"]
        outage = git("--git-dir", str(bare), "rev-list", f"{before}..main").split()
        assert set(commits) <= set(outage)  # every commit of the outage, caught up
        write(m, "Just before umount.\n")  # committed and pushed by the unmount itself
    finally:
        stop_mount(m)
    assert head_of(bare) == head_of(history(m))
    assert git("--git-dir", str(bare), "show", "main:system/human.md").endswith(
        "Just before umount.")


def test_a_diverged_remote_is_reported_never_forced_and_the_mount_serves_on(
        agent, home, gitd, served, tmp_path):
    bare = served / "h.git"
    m = start_mount(agent, home, "--git-remote", gitd.url("h.git"))
    try:
        wait_for(lambda: pushed(m, bare), timeout=60)
        other = tmp_path / "other"
        git("clone", "--quiet", gitd.url("h.git"), str(other))
        (other / "theirs.md").write_text("Someone else's commit.\n")
        ident = ["-c", "user.name=Other", "-c", "user.email=o@example.test"]
        git(*ident, "add", "theirs.md", cwd=other)
        git(*ident, "commit", "--quiet", "-m", "someone else", cwd=other)
        git("push", "--quiet", "origin", "main", cwd=other)
        theirs = head_of(bare)
        write(m, "Ours, after theirs.\n")
        wait_for(lambda: status_of(m)["push_diverged"], timeout=60)
        assert "diverged" in status_of(m)["last_push_error"]
        assert "DIVERGED" in m.memfuse("status", agent).stdout
        write(m, "Ours again: the mount keeps serving.\n")
        wait_for(lambda: "Ours again" in git("--git-dir", str(history(m)), "show",
                                             "main:system/human.md"), timeout=60)  # committed
        assert head_of(bare) == theirs  # never forced
        assert head_of(history(m)) != theirs
        said = [line for line in m.log().splitlines() if "diverged" in line]
        assert len(said) == 1 and " WARNING " in said[0]
    finally:
        stop_mount(m)
    assert head_of(bare) == theirs


def test_smart_http_with_credentials_in_the_url_never_shows_them(agent, home, http, served):
    bare = served / "h.git"
    m = start_mount(agent, home, "--git-remote", http.url("h.git", credentials=True))
    try:
        write(m, "Over HTTP.\n")
        wait_for(lambda: pushed(m, bare), timeout=60)
        pid = json.loads((m.state / "memfuse.pid").read_text())["pid"]
        assert status_of(m)["git_remote"] == f"http://***@127.0.0.1:{http.port}/h.git"
        report = m.memfuse("status", agent).stdout
        assert "http://***@127.0.0.1" in report and TOKEN not in report
        assert_no_credentials(m, pid, TOKEN, f"{USER}:")
    finally:
        stop_mount(m)
    assert TOKEN not in m.log() and f"{USER}:" not in m.log()
    assert head_of(bare) == head_of(history(m))


def test_smart_http_with_a_credential_helper(agent, home, http, served, tmp_path):
    bare = served / "h.git"
    store = tmp_path / "git-credentials"
    store.write_text(f"http://{USER}:{TOKEN}@127.0.0.1:{http.port}\n")
    git("config", "--global", "credential.helper", f"store --file {store}", env=home)
    m = start_mount(agent, home, "--git-remote", http.url("h.git"))
    try:
        write(m, "Over HTTP, with a helper.\n")
        wait_for(lambda: pushed(m, bare), timeout=60)
        assert http.refused > 0  # it asked without credentials first, as git does
        pid = json.loads((m.state / "memfuse.pid").read_text())["pid"]
        assert_no_credentials(m, pid, TOKEN)
    finally:
        stop_mount(m)
    assert TOKEN not in m.log()
    assert head_of(bare) == head_of(history(m))


def test_a_remote_that_never_answers_delays_no_write_and_no_umount(agent, home):
    silent = Silent()
    try:
        m = start_mount(agent, home, "--git-remote", f"git://127.0.0.1:{silent.port}/h.git")
        try:
            wait_for(lambda: silent.accepted, timeout=60)  # a push hangs in there now
            took = []
            for n in range(3):
                start = time.monotonic()
                write(m, f"While the remote hangs, edit {n}.\n")
                took.append(time.monotonic() - start)
            assert max(took) < 30  # far below the hung push's timeout (60 s)
            wait_for(lambda: "a push under way" in m.memfuse("status", agent).stdout,
                     timeout=60)
            wait_for(lambda: "edit 2" in git("--git-dir", str(history(m)), "show",
                                             "main:system/human.md"), timeout=60)  # committed
        finally:
            result = m.memfuse("umount", agent, check=False)
            stop_mount(m)
        assert result.returncode == 0, result.stderr
        assert "the last push did not finish within 5 s" in m.log()
    finally:
        silent.close()


def test_a_url_memfuse_cannot_push_to_is_refused_before_mounting(agent, home):
    state = Path(home["HOME"]) / ".letta" / "agents" / agent
    result = subprocess.run([str(Path(sys.executable).parent / "memfuse"),
                             "mount", agent, "--git-remote", f"ssh://me:{TOKEN}@host/x.git"],
                            env=home, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not ssh" in result.stderr
    assert TOKEN not in result.stderr
    assert not (state / "memory.git").exists()
