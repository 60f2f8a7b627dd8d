"""memfuse daemons among this machine's processes, read from /proc.

A pid file may outlive its daemon and the pid be taken by another program: a daemon is live
only when its pid is a memfuse daemon's (`memfuse mount ... --foreground`, which is how every
daemon runs). The HOME a daemon was started with says where its records are; only its user and
root may read a process's environment.
"""
from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def argv(pid: int) -> list[str] | None:
    """The command line of `pid` ([] for a zombie or a kernel thread); None when it cannot be
    read (no such process, or /proc hides it)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return [os.fsdecode(a) for a in raw.split(b"\0")[:-1]] if raw else []


def is_daemon_argv(args: list[str]) -> bool:
    """Whether `args` runs the memfuse daemon: `memfuse` (the console script, maybe through
    its interpreter) or `-m memfuse.cli`, then `mount` and `--foreground`."""
    for i, arg in enumerate(args):
        if os.path.basename(arg) == "memfuse" or (arg == "memfuse.cli" and i
                                                  and args[i - 1] == "-m"):
            rest = args[i + 1:]
            return "mount" in rest and "--foreground" in rest
    return False


def is_memfuse_daemon(pid: int) -> bool | None:
    """Whether `pid` is a running memfuse daemon; None when its command line cannot be read."""
    args = argv(pid)
    return None if args is None else is_daemon_argv(args)


def is_serve_argv(args: list[str]) -> bool:
    """Whether `args` runs `memfuse serve` (the console script, maybe through its
    interpreter, or `-m memfuse.cli`)."""
    for i, arg in enumerate(args):
        if os.path.basename(arg) == "memfuse" or (arg == "memfuse.cli" and i
                                                  and args[i - 1] == "-m"):
            return args[i + 1:i + 2] == ["serve"]
    return False


def is_memfuse_serve(pid: int) -> bool | None:
    """Whether `pid` is a running `memfuse serve`; None when its command line cannot be
    read."""
    args = argv(pid)
    return None if args is None else is_serve_argv(args)


def zombie(pid: int) -> bool:
    """Whether `pid` has exited and waits for its parent to reap it (state Z)."""
    try:
        stat = (PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] == b"Z"  # after the name, which may hold ") "


def exiting(pid: int) -> bool:
    """Whether `pid` is in the middle of exiting: its memory is released, so its command line
    reads empty, but it is not a zombie yet (the kernel closes its files after that: a FUSE
    daemon's /dev/fuse may still be open)."""
    return argv(pid) == [] and not zombie(pid) and (PROC / str(pid)).exists()


def uid_of(pid: int) -> int | None:
    """The user `pid` runs as, or None when there is no such process."""
    try:
        return (PROC / str(pid)).stat().st_uid
    except OSError:
        return None


def daemons(uid: int) -> list[int]:
    """The pids of the memfuse daemons `uid` runs, in pid order."""
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and uid_of(int(entry.name)) == uid \
                and is_memfuse_daemon(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def home_of(pid: int) -> Path | None:
    """The HOME in `pid`'s environment, or None when it has none or this user may not read
    it (another user's process, unless we are root)."""
    try:
        environ = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    for item in environ.split(b"\0"):
        if item.startswith(b"HOME="):
            return Path(os.fsdecode(item[5:]))
    return None
