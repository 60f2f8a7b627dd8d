"""The one-writer lock of an agent's history: an exclusive `flock` on `<history>.lock`.

Each agent's history (the git repository, its journal, block map and times) has one writer at
a time: a mount daemon for as long as it runs, or `memfuse serve` for the length of one request
for an agent that is not mounted. Both take this lock before they write; the kernel drops it
when its holder's file is closed or its process dies, so a crash never leaves it taken.

`flock(2)` locks belong to an open file description: two threads of one process that each open
the file exclude each other as two processes do (serve's concurrent requests for one agent).
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Callable

POLL = 0.05  # seconds between attempts while the lock is taken


class WriterLock:
    """The lock on `path` (`Config.writer_lock_file`). Not reentrant; one holder per object."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free, without waiting: True when taken. The file is made
        (mode 0600, its directory with it) when missing. Raises OSError when it cannot be
        opened."""
        assert self._fd is None, "already held"
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def acquire(self, wait: float, give_up: Callable[[], bool] | None = None) -> bool:
        """Take the lock, trying every POLL seconds for at most `wait` seconds: True when
        taken, False when the time ran out or `give_up()` said so first (asked before each
        wait: the holder is one that will not let go soon, a mount). Blocking: an event loop
        calls it from a worker thread. Raises OSError."""
        deadline = time.monotonic() + wait
        while not self.try_acquire():
            if (give_up is not None and give_up()) or time.monotonic() >= deadline:
                return False
            time.sleep(POLL)
        return True

    def release(self) -> None:
        """Let the lock go (nothing happens when it is not held)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor of the description drops the flock
