"""The loopback git servers the git remote's integration tests use (tests/integration/
gitservers.py): they must not flake on a busy machine, nor outlive their tests."""
import socket
import threading
import time

import pytest

from .integration.gitservers import GitDaemon, Silent, git, init_bare


def test_a_closed_silent_listener_no_longer_listens():
    silent = Silent()
    socket.create_connection(("127.0.0.1", silent.port), timeout=5).close()
    silent.close()
    assert not silent._thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", silent.port), timeout=5).close()


def hold(port: int) -> socket.socket:
    """A listener on `port` that is not git daemon (what free_port's race may leave)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    return holder


def test_git_daemon_waits_for_its_port_and_then_serves_on_it(tmp_path):
    init_bare(tmp_path / "h.git")
    daemon = GitDaemon(tmp_path)
    holder = hold(daemon.port)
    threading.Timer(1.0, holder.close).start()  # the port is free again in 1 s
    try:
        daemon.start()
        assert daemon.proc.poll() is None
        git("ls-remote", daemon.url("h.git"))  # this git daemon answers, not the holder
        daemon.stop()
        daemon.start()  # and again on the same port, at once
        git("ls-remote", daemon.url("h.git"))
    finally:
        daemon.stop()


def test_git_daemon_says_so_when_its_port_stays_taken(tmp_path):
    daemon = GitDaemon(tmp_path)
    holder = hold(daemon.port)
    try:
        start = time.monotonic()
        with pytest.raises(AssertionError, match="could not listen on port"):
            daemon.start(attempts=3, pause=0.1)
        assert time.monotonic() - start < 30 and daemon.proc is None
    finally:
        holder.close()
        daemon.stop()
