"""pyfuse3 Operations: translate FUSE requests into tree lookups and AgentMemory calls.

Kept thin on purpose: the semantics live in memory.py (server I/O), tree.py (namespace) and
blockfile.py (format). What is here is the per-open-file write buffer and the FUSE plumbing.
Every refusal that reaches a program is also logged as one line naming the file and the reason.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

import pyfuse3
import trio

from .errors import FsError
from .memory import AgentMemory
from .tree import Kind, Node

log = logging.getLogger("memfuse.fs")

# Block files: attributes are never cached by the kernel, so `st_size` always matches what a read
# returns after the content changed on the server (getattr is served from memory, so it is cheap).
FILE_ATTR_TIMEOUT = 0.0
DIR_ATTR_TIMEOUT = 1.0
ENTRY_TIMEOUT = 1.0
BLOCK_SIZE = 4096


@dataclass(eq=False)
class OpenFile:
    """One open file description: the bytes it reads and, once written, the bytes it will send.

    dirty: `data` has changes not yet accepted by the server. written: a write or ftruncate came
    since open; an `O_TRUNC` open alone is dirty but not written (see `flush`).
    """

    node: Node
    data: bytes | bytearray
    writable: bool
    dirty: bool = False
    written: bool = False
    written_at: float = 0.0


class MemoryFs(pyfuse3.Operations):
    """The FUSE filesystem of one agent's memory (see SEMANTICS.md for what each call does)."""

    supports_dot_lookup = True

    def __init__(self, memory: AgentMemory):
        super().__init__()
        self.memory = memory
        self.tree = memory.tree
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, list[tuple[str, int]]] = {}
        self._next_fh = 1
        self._uid, self._gid = os.getuid(), os.getgid()

    # -- helpers -------------------------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        try:
            return self.tree.node(inode)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _refuse(self, node: Node, exc: FsError) -> pyfuse3.FUSEError:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        log.error("%s: %s (%s)", self.tree.path(node) or "/", exc.reason, name)
        return pyfuse3.FUSEError(exc.errno)

    def _fh(self) -> int:
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return fh

    def _size(self, node: Node) -> int:
        writers = [f for f in self._files.values() if f.node is node and f.dirty]
        if writers:
            return len(max(writers, key=lambda f: f.written_at).data)
        return len(node.content)

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        if node.kind is Kind.DIR:
            attr.st_mode = stat.S_IFDIR | 0o755
            subdirs = sum(1 for i in node.children.values() if self.tree.node(i).kind is Kind.DIR)
            attr.st_nlink = 2 + subdirs
            attr.st_size = BLOCK_SIZE
            attr.attr_timeout = DIR_ATTR_TIMEOUT
        else:
            attr.st_mode = stat.S_IFREG | (0o444 if node.read_only else 0o644)
            attr.st_nlink = 1
            attr.st_size = self._size(node)
            attr.attr_timeout = FILE_ATTR_TIMEOUT
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_blksize = BLOCK_SIZE
        attr.st_uid, attr.st_gid = self._uid, self._gid
        attr.st_atime_ns = attr.st_mtime_ns = node.mtime_ns
        attr.st_ctime_ns = node.ctime_ns
        attr.entry_timeout = ENTRY_TIMEOUT
        return attr

    # -- namespace -----------------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._node(parent_inode)
        name = os.fsdecode(name)
        if name == ".":
            return self._attr(parent)
        if name == "..":
            return self._attr(self._node(parent.parent))
        child = self.tree.child(parent, name) if parent.kind is Kind.DIR else None
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(child)

    async def getattr(self, inode, ctx=None):
        return self._attr(self._node(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        if fields.update_size:
            await self._truncate(node, attr.st_size, self._files.get(fh) if fh else None)
        if fields.update_mtime:  # kept in the daemon only: nothing about times goes to the server
            node.mtime_ns = attr.st_mtime_ns
        # chmod/chown/atime: accepted, nothing sent (blocks have no owner or mode).
        return self._attr(node)

    async def _truncate(self, node: Node, size: int, handle: OpenFile | None) -> None:
        if node.kind is not Kind.BLOCK or node.read_only:
            raise self._refuse(node, FsError(errno.EACCES, "file is read-only"))
        if handle is not None:
            self._resize(handle, size)
            handle.written = True
            return
        data = node.content[:size].ljust(size, b"\0")
        try:  # truncate(2) by path has no close to wait for: it is one write now.
            await self.memory.write(node, data)
        except FsError as exc:
            raise self._refuse(node, exc) from None

    def _resize(self, handle: OpenFile, size: int) -> None:
        data = bytearray(handle.data)
        del data[size:]
        data.extend(b"\0" * (size - len(data)))
        handle.data, handle.dirty, handle.written_at = data, True, trio.current_time()

    async def opendir(self, inode, ctx):
        node = self._node(inode)
        if node.kind is not Kind.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._fh()
        self._dirs[fh] = sorted(node.children.items())
        return fh

    async def readdir(self, fh, start_id, token):
        entries = self._dirs[fh]
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            try:
                attr = self._attr(self.tree.node(inode))
            except KeyError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, index + 1):
                return

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    async def statfs(self, ctx):
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = BLOCK_SIZE
        used = sum(len(n.content) for n in self.tree.blocks()) // BLOCK_SIZE + 1
        stats.f_blocks = used + (1 << 18)  # report 1 GiB free: blocks are small
        stats.f_bfree = stats.f_bavail = 1 << 18
        stats.f_files = self.tree.inode_count() + (1 << 16)
        stats.f_ffree = stats.f_favail = 1 << 16
        stats.f_namemax = 255
        return stats

    async def forget(self, inode_list):
        # Inodes are never reused within a mount (blocks keep theirs), so there is nothing to free.
        pass

    # -- files ---------------------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if node.kind is Kind.DIR:
            raise pyfuse3.FUSEError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        if writable and node.read_only:
            what = "gitfile" if node.kind is Kind.GITFILE else "block"
            raise self._refuse(node, FsError(errno.EACCES, f"{what} is read-only"))
        if node.kind is Kind.BLOCK:
            await self.memory.revalidate(node)
        handle = OpenFile(node, node.content, writable)
        if writable and flags & os.O_TRUNC:  # libfuse 3 passes O_TRUNC here, not as setattr
            self._resize(handle, 0)
        fh = self._fh()
        self._files[fh] = handle
        return pyfuse3.FileInfo(fh=fh, keep_cache=False)

    async def read(self, fh, off, size):
        return bytes(self._files[fh].data[off:off + size])

    async def write(self, fh, off, buf):
        handle = self._files[fh]
        if not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        data = handle.data if isinstance(handle.data, bytearray) else bytearray(handle.data)
        if off > len(data):
            data.extend(b"\0" * (off - len(data)))
        data[off:off + len(buf)] = buf
        handle.data, handle.dirty, handle.written_at = data, True, trio.current_time()
        handle.written = True
        return len(buf)

    async def _send(self, handle: OpenFile) -> None:
        try:
            await self.memory.write(handle.node, bytes(handle.data))
        except FsError as exc:
            raise self._refuse(handle.node, exc) from None
        handle.dirty = False

    async def flush(self, fh):
        # flush comes with every close() of every dup of the descriptor. A shell's `> file` opens
        # with O_TRUNC and closes a dup before the first write: sending then would blank the block
        # on the server for a moment, so a truncation with no write yet waits for release.
        handle = self._files[fh]
        if handle.dirty and handle.written:
            await self._send(handle)

    async def fsync(self, fh, datasync):
        handle = self._files[fh]
        if handle.dirty:
            await self._send(handle)

    async def release(self, fh):
        handle = self._files.pop(fh)
        if handle.dirty and not handle.written:  # `: > file`: opened with O_TRUNC, never written
            try:
                await self._send(handle)
            except pyfuse3.FUSEError:
                pass  # already logged; release cannot report an error to the program
        elif handle.dirty:
            log.error("%s: closed with changes the server refused; they are discarded",
                      self.tree.path(handle.node))

    def dirty_handles(self) -> list[OpenFile]:
        """Open files with writes not yet sent (flushed by the daemon at shutdown)."""
        return [f for f in self._files.values() if f.dirty]
