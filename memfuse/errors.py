"""The one error type the filesystem layer turns into an errno."""
from __future__ import annotations

import errno

from .letta import Conflict, LettaError, NotFound, Unauthorized, Unreachable


class FsError(Exception):
    """A file operation is refused: `errno` goes to the program, `reason` (words) to the log."""

    def __init__(self, errno_: int, reason: str):
        super().__init__(reason)
        self.errno = errno_
        self.reason = reason


def from_letta(exc: LettaError) -> FsError:
    """The errno a program sees when the server refused or could not be reached.

    404 -> ESTALE (the block is gone), 409 -> EEXIST (a conflict that outlived the retries is in
    practice a label an attached block already has), 401/403 -> EACCES, 400/422 -> EINVAL, no
    answer or 5xx -> EIO.
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
    what = "server unreachable" if isinstance(exc, Unreachable) else "server refused"
    return FsError(code, f"{what}: {exc}")
