"""The `memfuse` command without a server: flags to Config, the report pipe, status and umount
of what is (not) mounted."""
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from memfuse import cli
from memfuse.config import RunningMount
from memfuse.daemon import MountError
from memfuse.status import Status


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("LETTA_BASE_URL", raising=False)
    monkeypatch.delenv("LETTA_API_KEY", raising=False)
    return tmp_path


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def daemon_like(agent_id: str = "agent-1") -> subprocess.Popen:
    """A running process whose command line is a memfuse daemon's (`-m memfuse.cli mount ...
    --foreground`), as the pid file of a live mount names; it runs until its stdin is closed
    (or it is signalled). Returned once it runs its code: just after exec its command line
    still reads empty."""
    process = subprocess.Popen([sys.executable, "-c", "import sys; print(flush=True); "
                                "sys.stdin.read()", "-m", "memfuse.cli", "mount", agent_id,
                                "--foreground"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    process.stdout.readline()
    return process


@pytest.fixture
def live_pid():
    """The pid of a daemon_like process, ended after the test."""
    process = daemon_like()
    yield process.pid
    process.stdin.close()
    process.stdout.close()
    process.wait()


def test_mount_flags_become_the_config_and_ready_goes_down_the_pipe(home, monkeypatch):
    seen = {}

    async def fake_serve(config, on_ready, on_notice=None, on_progress=None):
        seen["config"] = config
        on_ready(None)

    monkeypatch.setattr(cli, "serve", fake_serve)
    read_fd, write_fd = os.pipe()
    code = cli.main(["mount", "agent-1", "--base-url", "http://server:1", "--revalidate", "2.5",
                     "--poll-interval", "3", "--on-conflict", "reject", "--foreground",
                     "--ready-fd", str(write_fd)])
    assert code == 0
    assert os.read(read_fd, 100) == b"ready\n"
    config = seen["config"]
    assert config.mountpoint == home / ".letta/agents/agent-1/memory"
    assert config.history_dir == home / ".letta/agents/agent-1/memory.git"
    assert (config.base_url, config.revalidate, config.poll_interval, config.on_conflict) == (
        "http://server:1", 2.5, 3.0, "reject")


@pytest.mark.expect_error("not found on http://x")
def test_a_start_up_refusal_is_reported_and_exits_1(home, monkeypatch):
    async def refusing_serve(config, on_ready, on_notice=None, on_progress=None):
        on_ready("agent agent-1 not found on http://x")
        raise MountError("agent agent-1 not found on http://x")

    monkeypatch.setattr(cli, "serve", refusing_serve)
    read_fd, write_fd = os.pipe()
    assert cli.main(["mount", "agent-1", "--foreground", "--ready-fd", str(write_fd)]) == 1
    assert os.read(read_fd, 100) == b"error agent agent-1 not found on http://x\n"


def test_a_notice_goes_down_the_pipe_before_ready_and_is_read_back(home, monkeypatch):
    async def local_first_serve(config, on_ready, on_notice=None, on_progress=None):
        on_notice("the server at http://x cannot be reached; mounted agent agent-1 from its "
                  "local history (2 blocks, 0 journaled changes)")
        on_ready(None)

    monkeypatch.setattr(cli, "serve", local_first_serve)
    read_fd, write_fd = os.pipe()
    assert cli.main(["mount", "agent-1", "--foreground", "--ready-fd", str(write_fd)]) == 0
    try:
        lines = cli._read_report(read_fd, 5)
    finally:
        os.close(read_fd)
    assert lines == ["notice the server at http://x cannot be reached; mounted agent agent-1 "
                     "from its local history (2 blocks, 0 journaled changes)", "ready"]


def test_progress_lines_are_printed_as_they_come_and_not_returned(capsys):
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"progress loading agent a: 2,000 of 10,003 blocks listed\nprogress lo")
    try:
        with pytest.raises(TimeoutError):  # the first line is shown while the daemon works on
            with _alarm(0.3):
                cli._read_report(read_fd, 5)
        assert capsys.readouterr().err == ("memfuse: loading agent a: 2,000 of 10,003 blocks "
                                           "listed\n")
    finally:
        os.close(write_fd)
        os.close(read_fd)


def test_a_line_split_across_reads_is_read_back_whole():
    read_fd, write_fd = os.pipe()
    chunks = [b"notice mounted a ", b"caf\xc3", b"\xa9 b\nready\n"]  # after a space, in a letter

    def daemon():
        for chunk in chunks:
            os.write(write_fd, chunk)
            time.sleep(0.1)
        os.close(write_fd)

    writer = threading.Thread(target=daemon)
    writer.start()
    try:
        assert cli._read_report(read_fd, 5) == ["notice mounted a café b", "ready"]
    finally:
        writer.join()
        os.close(read_fd)


def test_the_report_pipe_says_when_the_daemon_exits_without_a_word():
    for written, expected in ((b"", [""]), (b"notice one\n", ["notice one", ""]),
                              (b"notice one\nnotice two\nerror bad\n",
                               ["notice one", "notice two", "error bad"])):
        read_fd, write_fd = os.pipe()
        os.write(write_fd, written)
        os.close(write_fd)
        try:
            assert cli._read_report(read_fd, 5) == expected
        finally:
            os.close(read_fd)


def test_status_and_umount_with_nothing_mounted(home, capsys):
    assert cli.main(["status"]) == 0
    assert "no mounts are running" in capsys.readouterr().out
    assert cli.main(["umount", "agent-1"]) == 1
    assert "nothing is mounted" in capsys.readouterr().err


def test_status_of_a_dead_daemon_says_so(home, capsys):
    state = home / ".letta/agents/agent-1"
    state.mkdir(parents=True)
    RunningMount("agent-1", str(state / "memory"), dead_pid(), "http://x",
                 str(state / "memfuse.log")).save(state / "memfuse.pid")
    assert cli.main(["status", "agent-1"]) == 1
    assert f"nothing is mounted at {state / 'memory'}" in capsys.readouterr().out


def save_status(state, pid: int) -> None:
    """A status report of agent-1's daemon `pid`, nothing pending, in `state`."""
    Status(agent_id="agent-1", mountpoint=str(state / "memory"), base_url="http://x",
           pid=pid, reachable=True, last_poll=None, pending_writes=0, pending_unlinks=0,
           uncommitted=0, last_commit=None, last_commit_message=None, last_commit_at=None,
           last_conflict=None, last_error=None, last_error_at=None,
           updated_at=1e12).save(state / "memfuse.status.json")


def test_status_of_a_live_daemon_prints_its_report(home, capsys, live_pid):
    state = home / ".letta/agents/agent-1"
    state.mkdir(parents=True)
    RunningMount("agent-1", str(state / "memory"), live_pid, "http://x",
                 str(state / "memfuse.log")).save(state / "memfuse.pid")
    save_status(state, live_pid)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"agent agent-1 mounted at {state / 'memory'}" in out
    assert "http://x: reachable" in out


def test_status_of_a_live_daemon_never_shows_a_dead_daemons_report(home, capsys, live_pid):
    # kill -9 leaves the last report; the next daemon's pid file is written before its first
    # report: until that report, the old one (here: journal empty) is not this daemon's
    state = home / ".letta/agents/agent-1"
    state.mkdir(parents=True)
    RunningMount("agent-1", str(state / "memory"), live_pid, "http://x",
                 str(state / "memfuse.log")).save(state / "memfuse.pid")
    save_status(state, dead_pid())
    assert cli.main(["status", "agent-1"]) == 0
    out = capsys.readouterr().out
    assert f"(pid {live_pid}): starting, no status yet" in out
    assert "journal" not in out


def test_umount_of_a_dead_daemon_with_no_mount_left_says_so(home, capsys):
    state = home / ".letta/agents/agent-1"
    state.mkdir(parents=True)
    (state / "memory").mkdir()
    RunningMount("agent-1", str(state / "memory"), dead_pid(), "http://x",
                 str(state / "memfuse.log")).save(state / "memfuse.pid")
    assert cli.main(["umount", "agent-1"]) == 1  # nothing mounted, nothing to stop
    assert "nothing is mounted" in capsys.readouterr().err


@pytest.mark.parametrize("agent_id", ["../../etc", "..", "a/b", "", ".hidden", "agent 1"])
def test_an_agent_id_that_is_not_one_is_refused_before_any_path_is_made(home, capsys,
                                                                        agent_id):
    assert cli.main(["mount", agent_id, "--foreground"]) == 2
    assert "is not an agent id" in capsys.readouterr().err
    assert not (home / ".letta").exists() and not (home / "etc").exists()


def test_umount_of_another_users_mount_says_so(home, capsys, monkeypatch, live_pid):
    # the narrow case: a pid file here naming a daemon this user may not signal (another
    # user's mount found by its path: integration test_owner)
    state = home / ".letta/agents/agent-1"
    state.mkdir(parents=True)
    RunningMount("agent-1", str(state / "memory"), live_pid, "http://x",
                 str(state / "memfuse.log")).save(state / "memfuse.pid")

    def refuse(pid, signum):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", lambda pid, sig: refuse(pid, sig) if sig else None)
    assert cli.main(["umount", "agent-1"]) == 1
    assert f"served by pid {live_pid}, which belongs to root (uid 0)" in capsys.readouterr().err


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise TimeoutError in the main thread after `seconds` (a blocking read goes on)."""
    def ring(*_):
        raise TimeoutError
    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_the_git_remote_reaches_the_daemon_through_its_environment_never_its_argv(
        home, monkeypatch):
    url = "https://me:s3cr3t-t0ken@git.example.test/h.git"
    started = {}

    def fake_popen(argv, **kwargs):
        started.update(argv=argv, env=kwargs["env"])

    monkeypatch.setattr(cli.subprocess, "Popen", fake_popen)
    monkeypatch.setattr(cli, "_read_report", lambda fd, timeout: ["ready"])
    assert cli.main(["mount", "agent-1", "--git-remote", url]) == 0
    assert not any("s3cr3t" in arg for arg in started["argv"])
    assert started["env"]["MEMFUSE_GIT_REMOTE"] == url

    seen = {}

    async def fake_serve(config, on_ready, on_notice=None, on_progress=None):
        seen["config"] = config
        on_ready(None)

    monkeypatch.setattr(cli, "serve", fake_serve)
    monkeypatch.setenv("MEMFUSE_GIT_REMOTE", url)
    read_fd, write_fd = os.pipe()
    assert cli.main(["mount", "agent-1", "--foreground", "--ready-fd", str(write_fd)]) == 0
    os.close(read_fd)
    assert seen["config"].git_remote == url and url not in repr(seen["config"])
    assert "MEMFUSE_GIT_REMOTE" not in os.environ  # no child of the daemon inherits it


def test_a_git_remote_memfuse_cannot_push_to_is_refused_before_mounting(home, capsys):
    assert cli.main(["mount", "agent-1", "--git-remote", "ssh://me:s3cr3t@host/h.git"]) == 2
    err = capsys.readouterr().err
    assert "not ssh" in err and "s3cr3t" not in err
    assert not (home / ".letta/agents/agent-1").exists()


def test_a_token_in_a_url_given_on_the_command_line_is_warned_about_once(
        home, monkeypatch, capsys):
    monkeypatch.setattr(cli.subprocess, "Popen", lambda argv, **kwargs: None)
    monkeypatch.setattr(cli, "_read_report", lambda fd, timeout: ["ready"])
    url = "https://me:s3cr3t-t0ken@git.example.test/h.git"
    assert cli.main(["mount", "agent-1", "--git-remote", url]) == 0
    err = capsys.readouterr().err
    assert err.count("visible to other users in ps") == 1
    assert "MEMFUSE_GIT_REMOTE" in err and "s3cr3t" not in err
    for quiet in (["--git-remote", "https://me@git.example.test/h.git"],  # a name, no token
                  ["--git-remote", "git://git.example.test/h.git"]):
        assert cli.main(["mount", "agent-1", *quiet]) == 0
        assert "warning" not in capsys.readouterr().err
    monkeypatch.setenv("MEMFUSE_GIT_REMOTE", url)  # not on a command line: no warning
    assert cli.main(["mount", "agent-1"]) == 0
    assert "warning" not in capsys.readouterr().err
