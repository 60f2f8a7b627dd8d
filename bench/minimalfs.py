"""A minimal pyfuse3 filesystem: one read-only file of N bytes at the root, answered from
memory with pyfuse3's defaults (keep_cache, 300 s attribute and entry timeouts). The floor a
FUSE filesystem in Python cannot go below, measured beside memfuse (bench/warm_read.py).

Usage: python bench/minimalfs.py MOUNTPOINT [BYTES]   (serves until unmounted)
"""
from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

NAME = b"file.md"


class MinimalFs(pyfuse3.Operations):
    """`/file.md` with `data`; everything else ENOENT."""

    def __init__(self, data: bytes):
        super().__init__()
        self.data = data
        self.inode = pyfuse3.ROOT_INODE + 1

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_size = stat.S_IFDIR | 0o755, 0
        else:
            attr.st_mode, attr.st_size = stat.S_IFREG | 0o644, len(self.data)
        attr.st_uid, attr.st_gid = os.getuid(), os.getgid()
        return attr

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self.inode)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        return self.data[off:off + size]


def main() -> None:
    mountpoint = sys.argv[1]
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    pyfuse3.init(MinimalFs(b"x" * size), mountpoint, {"fsname=minimalfs"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
