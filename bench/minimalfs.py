"""A minimal pyfuse3 filesystem: the floor a FUSE filesystem in Python cannot go below, measured
beside memfuse in the same run (bench/warm_read.py, bench/scale.py).

Two forms, both read-only, answered from memory with pyfuse3's defaults (keep_cache, 300 s
attribute and entry timeouts):
- one file of N bytes at the root, `/file.md` (warm open+read+close);
- `--tree DIR`: a copy of every file under DIR (read into memory at start), with its
  directories (grep over N block files, mount time, RSS, idle CPU).

Usage: python bench/minimalfs.py MOUNTPOINT [BYTES]        (serves until unmounted)
       python bench/minimalfs.py MOUNTPOINT --tree DIR
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
    """A read-only tree held in memory: `files` maps a path (bytes, `a/b.md`) to its content;
    its directories are implied. Everything else is ENOENT."""

    def __init__(self, files: dict[bytes, bytes]):
        super().__init__()
        self.data: dict[int, bytes] = {}             # inode -> content (files)
        self.children: dict[int, dict[bytes, int]] = {pyfuse3.ROOT_INODE: {}}  # directories
        next_inode = pyfuse3.ROOT_INODE + 1
        for path in sorted(files):
            parent = pyfuse3.ROOT_INODE
            *dirs, name = path.split(b"/")
            for part in dirs:
                if part not in self.children[parent]:
                    self.children[parent][part] = next_inode
                    self.children[next_inode] = {}
                    next_inode += 1
                parent = self.children[parent][part]
            self.children[parent][name] = next_inode
            self.data[next_inode] = files[path]
            next_inode += 1

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode in self.children:
            attr.st_mode, attr.st_size = stat.S_IFDIR | 0o755, 0
        else:
            attr.st_mode, attr.st_size = stat.S_IFREG | 0o644, len(self.data[inode])
        attr.st_uid, attr.st_gid = os.getuid(), os.getgid()
        return attr

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        inode = self.children.get(parent_inode, {}).get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        entries = sorted(self.children[fh].items())
        for index, (name, inode) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), index):
                return

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        return self.data[fh][off:off + size]


def load_tree(root: str) -> dict[bytes, bytes]:
    """Every file under `root` (directories starting with `.` skipped): path -> bytes."""
    files = {}
    for directory, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                files[os.fsencode(os.path.relpath(path, root))] = f.read()
    return files


def main() -> None:
    mountpoint = sys.argv[1]
    if len(sys.argv) > 3 and sys.argv[2] == "--tree":
        files = load_tree(sys.argv[3])
    else:
        files = {NAME: b"x" * (int(sys.argv[2]) if len(sys.argv) > 2 else 2048)}
    pyfuse3.init(MinimalFs(files), mountpoint, {"fsname=minimalfs"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
