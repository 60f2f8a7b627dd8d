"""The one error type the filesystem layer turns into an errno, and the count of unexpected
ones (bugs) that the safe boundary caught."""
from __future__ import annotations

import errno
import logging
import time

from .letta import (Conflict, LettaError, NotFound, ServerError, Throttled, Unauthorized,
                    Unreachable)


class FsError(Exception):
    """A file operation is refused: `errno` goes to the program, `reason` (words) to the log."""

    def __init__(self, errno_: int, reason: str):
        super().__init__(reason)
        self.errno = errno_
        self.reason = reason


class ServerAway(FsError):
    """The server gave no answer (connect error, timeout) or only 5xx within the budget: the
    change may be journaled instead of refused (EIO when it is not). `status`: the last HTTP
    status (None: no answer at all)."""

    def __init__(self, errno_: int, reason: str, status: int | None = None):
        super().__init__(errno_, reason)
        self.status = status


class ServerRefused(FsError):
    """The server answered with a refusal (4xx, or an answer that is not the API's). `status`:
    the HTTP status. Final for the change only when the server judged it (400, 404, 409, 422);
    a 401/403 may pass (a key)."""

    FINAL = (400, 404, 409, 422)  # 409: a label taken (a create resolves its own first)

    def __init__(self, errno_: int, reason: str, status: int | None):
        super().__init__(errno_, reason)
        self.status = status


def from_letta(exc: LettaError) -> FsError:
    """The errno a program sees when the server refused or could not be reached.

    404 -> ESTALE (the block is gone), 409 -> EEXIST (a conflict that outlived the retries is in
    practice a label an attached block already has), 401/403 -> EACCES, 400/422 -> EINVAL, no
    answer, 5xx, 408 or 429 -> EIO (ServerAway: with a journal, the change is journaled).
    """
    if isinstance(exc, NotFound):
        code = errno.ESTALE
    elif isinstance(exc, Conflict):
        code = errno.EEXIST
    elif isinstance(exc, Unauthorized):
        code = errno.EACCES
    elif exc.status in (400, 422):
        code = errno.EINVAL
    else:
        code = errno.EIO
    if isinstance(exc, (Unreachable, ServerError, Throttled)):
        what = {Unreachable: "server unreachable", ServerError: "server failing",
                Throttled: "server busy (asked to wait)"}[type(exc)]
        return ServerAway(code, f"{what}: {exc}", exc.status)
    return ServerRefused(code, f"server refused: {exc}", exc.status)


class Faults:
    """Unexpected exceptions (bugs, never a program's mistake) caught at the safe boundary: a
    FUSE operation then answers EIO and a background task is restarted, so the mount keeps
    serving. `count` of them so far, `last` in words and `last_at` (time.time()) for
    `memfuse status`."""

    def __init__(self):
        self.count = 0
        self.last: str | None = None
        self.last_at: float | None = None

    def caught(self, log: logging.Logger, what: str) -> None:
        """Count the exception being handled and log it with its traceback as `what`."""
        self.count += 1
        self.last, self.last_at = what, time.time()
        log.exception("%s", what)
