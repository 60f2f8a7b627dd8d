"""The bytes of scratch files (swap files, backups, temp files), kept in the daemon's memory.

Scratch files never reach the server. Their total size is capped: a write or truncate that would
pass the cap is refused with ENOSPC before any byte is allocated.
"""
from __future__ import annotations

import errno

from .errors import FsError

SCRATCH_LIMIT = 64 << 20  # bytes of scratch files the daemon keeps in all


class ScratchStore:
    """Scratch file contents by inode number, within `limit` bytes in all.

    `used` is the total size in bytes, kept as files change (never recounted).
    """

    def __init__(self, limit: int = SCRATCH_LIMIT):
        self.limit = limit
        self.used = 0
        self._data: dict[int, bytearray] = {}

    def _room(self, inode: int, size: int) -> None:
        current = len(self._data.get(inode, b""))
        if size > current and self.used - current + size > self.limit:
            raise FsError(errno.ENOSPC, f"scratch files are limited to {self.limit >> 20} MiB "
                                        f"in all ({self.limit} bytes)")

    def _buffer(self, inode: int) -> bytearray:
        return self._data.setdefault(inode, bytearray())

    def size(self, inode: int) -> int:
        """The file's size in bytes (0 when it has no content)."""
        return len(self._data.get(inode, b""))

    def read(self, inode: int, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`."""
        return bytes(self._data.get(inode, b"")[offset:offset + size])

    def content(self, inode: int) -> bytes:
        """All of the file's bytes."""
        return bytes(self._data.get(inode, b""))

    def put(self, inode: int, data: bytes) -> None:
        """Replace the file's content. Raises FsError(ENOSPC) past the limit."""
        self._room(inode, len(data))
        self.used += len(data) - self.size(inode)
        self._data[inode] = bytearray(data)

    def adopt(self, inode: int, data: bytes) -> None:
        """Keep `data` as the file's content without checking the limit: bytes a block file
        already held when it became scratch (refusing them would lose them)."""
        self.used += len(data) - self.size(inode)
        self._data[inode] = bytearray(data)

    def write(self, inode: int, offset: int, buf: bytes) -> None:
        """Write `buf` at `offset`, filling a gap with NUL bytes. Raises FsError(ENOSPC)."""
        data = self._buffer(inode)
        end = offset + len(buf)
        self._room(inode, end)
        before = len(data)
        if offset > before:
            data.extend(b"\0" * (offset - before))
        data[offset:end] = buf
        self.used += len(data) - before

    def truncate(self, inode: int, size: int) -> None:
        """Cut or extend (with NUL bytes) to `size` bytes. Raises FsError(ENOSPC)."""
        self._room(inode, size)
        data = self._buffer(inode)
        before = len(data)
        del data[size:]
        data.extend(b"\0" * (size - len(data)))
        self.used += len(data) - before

    def drop(self, inode: int) -> bytes:
        """Forget the file; returns what it held."""
        data = self._data.pop(inode, bytearray())
        self.used -= len(data)
        return bytes(data)
