"""pyfuse3 Operations: translate FUSE requests into Namespace, BlockFiles and MountState calls.

Kept thin on purpose: the semantics live in namespace.py (create/unlink/rename), files.py
(block contents to and from the server), state.py (the one writer of the mount's state) and
blockfile.py (the format). What is here is the per-open-file buffer of a block file and the FUSE
plumbing. Every refusal that reaches a program is also logged as one line naming the file and
the reason.
"""
from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import stat
from dataclasses import dataclass

import pyfuse3
import trio

from . import blockfile
from .errors import Faults, FsError
from .files import BlockFiles
from .model import MAX_NAME, Block
from .namespace import Namespace
from .pagecache import PageCache
from .remote import Stale
from .state import MountState
from .tree import Kind, Node

log = logging.getLogger("memfuse.fs")

# Block files: the kernel keeps their attributes, and MountState tells it to forget them at once
# whenever what a block file shows changes (tree.Tree.on_change), so `st_size` never lags the
# content. Scratch files change under the kernel's eyes only: never cached.
BLOCK_ATTR_TIMEOUT = 60.0
FILE_ATTR_TIMEOUT = 0.0
DIR_ATTR_TIMEOUT = 1.0
# Names: the kernel keeps a looked-up entry for a minute. Changes made through the mount update
# its entries itself; every change the daemon makes on its own (a listing's create, relabel,
# attach, detach or delete; a refused new file leaving) invalidates the entry at once
# (MountState: invalidator.entry), so a pass over 10,000 files does not look each up again.
ENTRY_TIMEOUT = 60.0
BLOCK_SIZE = 4096
MAX_BLOCK_FILE = 64 << 20  # bytes: no block file grows past this in the daemon's memory
# Seconds after a writer closed during which a reader's reads bypass the kernel's size and pages
# (direct_io): a save in place (O_TRUNC) makes the kernel set the size to 0 at its open, and a
# reader whose read follows would get a cut or empty version. Outside this window readers use
# the page cache (keep_cache), as warm reads need.
WRITER_WINDOW = 2.0


@dataclass(eq=False)
class OpenFile:
    """One open file description of a block file (or another file the daemon renders: `.git`).

    data: the bytes this handle reads and, once written, will send (a copy-on-write snapshot
    taken at open). dirty: `data` has changes the server has not accepted. written: a write or
    ftruncate came since open; an `O_TRUNC` or `O_CREAT` open alone is dirty but not written
    (see `flush`). refused: the errno a write() was refused with (EFBIG, EINVAL): what the
    program meant is not in the
    buffer, so nothing from this handle is sent and its close fails too.
    """

    node: Node
    data: bytes | bytearray
    writable: bool
    base: Block | None = None  # the block as this handle read it: a later server change conflicts
    dirty: bool = False
    written: bool = False
    written_at: float = 0.0
    refused: int | None = None  # errno of a refused write: the handle then never sends
    refused_why: str | None = None  # that refusal's reason, in words (history says it)
    append: bool = False  # opened with O_APPEND: every write goes to the end
    pid: int | None = None  # the process that opened it: it alone sees this handle's size
    added: bytearray | None = None  # O_APPEND without O_TRUNC, never truncated: the bytes
    # written since the last send, which go to the end of the block as the server has it then
    fresh: bool = False  # opened by the create of a new block file: dirty only so that its
    # first flush makes the block; once another handle made it, not written means nothing
    attempted: bytes | None = None  # what the refused write would have made (kept in history)


@dataclass(eq=False)
class ScratchFile:
    """One open file description of a scratch file: reads and writes go to the scratch store."""

    node: Node
    writable: bool


def _safe(handler):
    """The safe boundary around one FUSE handler: a refusal (FUSEError) goes to the program;
    any other exception is a bug, answered with EIO for this call only, logged with its
    traceback and counted (`MemoryFs.faults`), so no input can stop the daemon."""
    @functools.wraps(handler)
    async def guarded(self, *args):
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            self.faults.caught(log, f"FUSE {handler.__name__} failed unexpectedly; answered EIO")
            raise pyfuse3.FUSEError(errno.EIO) from None
    return guarded


def _with_safe_boundary(cls):
    for name, value in list(vars(cls).items()):
        if (not name.startswith("_") and hasattr(pyfuse3.Operations, name)
                and inspect.iscoroutinefunction(value)):
            setattr(cls, name, _safe(value))
    return cls


@_with_safe_boundary
class MemoryFs(pyfuse3.Operations):
    """The FUSE filesystem of one agent's memory (see SEMANTICS.md for what each call does).
    Every handler runs inside the safe boundary (`_safe`); `faults` counts what it caught."""

    supports_dot_lookup = True

    def __init__(self, state: MountState, files: BlockFiles, namespace: Namespace,
                 faults: Faults | None = None):
        super().__init__()
        self.state, self.files, self.namespace = state, files, namespace
        self.faults = faults or Faults()
        self.tree = state.tree
        self._files: dict[int, OpenFile | ScratchFile] = {}
        self._pages = PageCache()  # what the kernel's page cache holds: keep_cache at open
        self._dirs: dict[int, tuple[int, list[tuple[str, int]]]] = {}  # fh -> (dir, entries)
        self._next_fh = 1
        self._writer_closed: dict[int, float] = {}  # inode -> trio time its last writer closed
        self._uid, self._gid = os.getuid(), os.getgid()

    # -- helpers -------------------------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        try:
            return self.tree.node(inode)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _refuse(self, where: str, exc: FsError) -> pyfuse3.FUSEError:
        # A refusal is the program's error, not the daemon's: one warning line.
        if exc.errno != errno.ENOENT:
            name = errno.errorcode.get(exc.errno, str(exc.errno))
            log.warning("%s: %s (%s)", where or "/", exc.reason, name)
        return pyfuse3.FUSEError(exc.errno)

    def _child_path(self, parent: Node, name: str) -> str:
        return "/".join(p for p in (self.tree.path(parent), name) if p)

    def _fh(self) -> int:
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return fh

    def _writers(self, node: Node) -> list[OpenFile]:
        return [f for f in self._files.values()
                if f.node is node and isinstance(f, OpenFile) and f.writable]

    def _being_written(self, node: Node) -> bool:
        """Whether a handle writes `node` now, or closed less than WRITER_WINDOW seconds ago: a
        program saving in place again and again (O_TRUNC, write, close) moves the kernel's
        size between a reader's open and its read."""
        if self._writers(node):
            return True
        closed = self._writer_closed.get(node.inode)
        if closed is None:
            return False
        if trio.current_time() - closed < WRITER_WINDOW:
            return True
        del self._writer_closed[node.inode]
        return False

    def _size(self, node: Node, pid: int | None) -> int:
        """st_size as process `pid` sees it: its own unsent writes' size when it writes the
        file, else the last version closed (what every other process reads)."""
        mine = [f for f in self._writers(node) if f.dirty and f.pid == pid]
        if mine:
            return len(max(mine, key=lambda f: f.written_at).data)
        return self.state.size(node)

    def _attr(self, node: Node, ctx=None) -> pyfuse3.EntryAttributes:
        """What stat shows of `node` to the process of `ctx` (a FUSE request's context; None:
        no process in particular): the mode a chmod gave (0444 for a read-only file, 0777 for
        a link), the times the node keeps (ns), no link once it is unlinked, and the size as
        that process sees it (`_size`)."""
        pid = ctx.pid if ctx is not None else None
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.st_nlink = 1 if node.parent else 0  # unlinked, still open: no name links to it
        attr.attr_timeout = FILE_ATTR_TIMEOUT
        if node.kind is Kind.DIR:
            attr.st_mode = stat.S_IFDIR | (node.mode & 0o7777)
            if node.parent:
                attr.st_nlink = 2 + sum(1 for i in node.children.values()
                                        if self.tree.node(i).kind is Kind.DIR)
            attr.st_size = BLOCK_SIZE
            attr.attr_timeout = DIR_ATTR_TIMEOUT
        elif node.kind is Kind.SYMLINK:
            attr.st_mode = stat.S_IFLNK | 0o777
            attr.st_size = len(node.content)
        else:
            attr.st_mode = stat.S_IFREG | (0o444 if node.read_only else node.mode & 0o7777)
            attr.st_size = self._size(node, pid)
            if node.kind is Kind.BLOCK and not self._writers(node):
                # while a handle writes it, sizes differ by process: the kernel must ask
                attr.attr_timeout = BLOCK_ATTR_TIMEOUT
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_blksize = BLOCK_SIZE
        attr.st_uid, attr.st_gid = self._uid, self._gid
        attr.st_atime_ns, attr.st_mtime_ns = node.atime_ns, node.mtime_ns
        attr.st_ctime_ns = node.ctime_ns
        attr.entry_timeout = ENTRY_TIMEOUT
        return attr

    def _entry(self, node: Node, ctx=None) -> pyfuse3.EntryAttributes:
        """Attributes of an entry handed to the kernel (which then holds a lookup on it), as
        the process of `ctx` sees them."""
        self.state.looked_up(node)
        return self._attr(node, ctx)

    def _dir(self, inode: int) -> Node:
        node = self._node(inode)
        if node.kind is not Kind.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return node

    # -- namespace -----------------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        """FUSE lookup: the entry `name` in a directory (`.` and `..` too); ENOENT if none,
        ENAMETOOLONG for a name over MAX_NAME bytes (no file can have one)."""
        parent = self._dir(parent_inode)
        self._check_length(parent, name)
        name = os.fsdecode(name)
        if name == ".":
            return self._entry(parent, ctx)
        if name == "..":
            return self._entry(self._node(parent.parent), ctx)
        child = self.tree.child(parent, name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry(child, ctx)

    async def forget(self, inode_list):
        """FUSE forget: drop the kernel's lookups; unlinked nodes with none left are freed."""
        for inode, count in inode_list:
            self.state.forget(inode, count)
            self._pages.forget(inode)  # the kernel may drop its pages with the inode

    async def getattr(self, inode, ctx=None):
        """FUSE getattr: attributes from memory (exact st_size: the last version closed, or to
        a process writing the file, its own unsent writes' size)."""
        return self._attr(self._node(inode), ctx)

    async def setattr(self, inode, attr, fields, fh, ctx):
        """FUSE setattr: size = truncate (buffered with fh, else one PATCH now); the mode, the
        atime and the mtime (ns; utimensat by path or fd, before or after close) are kept in
        the daemon and nothing is sent (MountState.set_mode, set_times); chown is accepted and
        not kept (the mounting user owns every file); ctime moves. EPERM for a chmod of a
        read-only file (it stays 0444)."""
        node = self._node(inode)
        if fields.update_size:
            self.state.wrote(node)  # a truncate is a write: an mtime given before is gone
            await self._truncate(node, attr.st_size, self._files.get(fh) if fh else None)
        if fields.update_mode:
            try:
                self.state.set_mode(node, attr.st_mode)
            except FsError as exc:
                raise self._refuse(self.tree.path(node), exc) from None
        if fields.update_atime or fields.update_mtime:
            self.state.set_times(node, attr.st_atime_ns if fields.update_atime else None,
                                 attr.st_mtime_ns if fields.update_mtime else None)
        if fields.update_uid or fields.update_gid:
            self.state.owner_changed(node)
        return self._attr(node, ctx)

    async def _truncate(self, node: Node, size: int, handle: OpenFile | ScratchFile | None
                        ) -> None:
        path = self.tree.path(node)
        try:
            if node.kind is Kind.SCRATCH and not isinstance(handle, OpenFile):
                self.state.scratch_truncate(node, size)
            elif node.kind not in (Kind.BLOCK, Kind.SCRATCH) or node.read_only:
                raise FsError(errno.EACCES, "file is read-only")
            elif isinstance(handle, OpenFile):
                self._check_buffer(node, bytes(handle.data[:size]), size - len(handle.data))
                self._resize(handle, size)
                handle.written = True
            else:  # truncate(2) by path has no close to wait for: it is one write now.
                self._check_buffer(node, bytes(node.content[:size]), size - len(node.content))
                data = bytes(node.content[:size]).ljust(size, b"\0")
                await self.files.send(node, data, node.block)
        except FsError as exc:
            raise self._refuse(path, exc) from None

    def _check_buffer(self, node: Node, data: bytes | bytearray, gap: int = 0) -> None:
        """Refuse, before any allocation, to let a block file's buffer become `data` followed
        by `gap` NUL bytes when that is already refused (`_buffer_refusal`). Raises
        FUSEError (logged)."""
        refusal = self._buffer_refusal(node, data, gap)
        if refusal is not None:
            raise self._refuse(self.tree.path(node), refusal)

    @staticmethod
    def _buffer_refusal(node: Node, data: bytes | bytearray, gap: int = 0) -> FsError | None:
        """Why a block file's buffer may not become `data` followed by `gap` NUL bytes
        (blockfile.check_partial: EINVAL for a complete bad frontmatter, EFBIG past the limit
        or MAX_BLOCK_FILE bytes), or None."""
        if node.kind is not Kind.BLOCK:
            return None
        if len(data) + gap > MAX_BLOCK_FILE:
            return FsError(errno.EFBIG, f"block files are limited to {MAX_BLOCK_FILE >> 20} MiB")
        limit = node.block.limit if node.block is not None else blockfile.DEFAULT_LIMIT
        return blockfile.check_partial(data, limit, gap)

    def _resize(self, handle: OpenFile, size: int) -> None:
        data = bytearray(handle.data)
        del data[size:]
        data.extend(b"\0" * (size - len(data)))
        handle.data, handle.dirty, handle.written_at = data, True, trio.current_time()
        handle.added = None  # no longer only added bytes: the whole file is sent
        self.state.wrote(handle.node)

    async def opendir(self, inode, ctx):
        """FUSE opendir: snapshot the entries, so readdir offsets stay stable."""
        node = self._dir(inode)
        fh = self._fh()
        self._dirs[fh] = (inode, sorted(node.children.items()))
        return fh

    async def readdir(self, fh, start_id, token):
        """FUSE readdir(plus): entries from `start_id` (an index into the snapshot), less those
        no longer at that name in this directory: each reply hands the kernel an entry it keeps
        for ENTRY_TIMEOUT, and a name the daemon removed (a server relabel or delete) after the
        snapshot, its invalidation already sent, must not come back."""
        directory, entries = self._dirs[fh]
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            try:
                node = self.tree.node(inode)
            except KeyError:
                continue
            if node.parent != directory or node.name != name:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(node), index + 1):
                return
            self.state.looked_up(node)

    async def releasedir(self, fh):
        """FUSE releasedir: drop the snapshot."""
        self._dirs.pop(fh, None)

    def _shown(self, parent: Node, name: bytes) -> str:
        """The path of `name` in `parent` for a log line (bytes that are not UTF-8 escaped)."""
        return self._child_path(parent, os.fsdecode(name).encode("utf-8", "backslashreplace")
                                .decode("utf-8"))

    def _check_length(self, parent: Node, name: bytes) -> None:
        """Refuse a name over MAX_NAME bytes. Raises FUSEError(ENAMETOOLONG) (logged)."""
        if len(name) > MAX_NAME:
            raise self._refuse(self._shown(parent, name)[:300], FsError(
                errno.ENAMETOOLONG, f"a name is at most {MAX_NAME} bytes"))

    def _new_name(self, parent: Node, name: bytes) -> str:
        """A name for a new entry: UTF-8 (labels, git paths and the prompt are text) and at
        most MAX_NAME bytes. Raises FUSEError: EINVAL, ENAMETOOLONG (logged)."""
        self._check_length(parent, name)
        shown = self._shown(parent, name)
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError:
            raise self._refuse(shown, FsError(errno.EINVAL, "the name is not valid UTF-8")
                               ) from None

    def _in_dir(self, parent_inode: int, name: bytes, operation, new: bool = False):
        """Run operation(parent, name) of the namespace; refusals are logged and raised.
        new: the operation makes an entry called `name` (its name is checked first)."""
        parent = self._dir(parent_inode)
        name = self._new_name(parent, name) if new else os.fsdecode(name)
        try:
            return operation(parent, name)
        except FsError as exc:
            raise self._refuse(self._child_path(parent, name), exc) from None

    async def mkdir(self, parent_inode, name, mode, ctx):
        """FUSE mkdir: a label prefix kept by the daemon (Namespace.mkdir), with `mode`'s
        permission bits."""
        node = self._in_dir(parent_inode, name, self.namespace.mkdir, new=True)
        self.state.set_mode(node, mode)
        return self._entry(node)

    async def rmdir(self, parent_inode, name, ctx):
        """FUSE rmdir: remove an empty directory (Namespace.rmdir)."""
        self._in_dir(parent_inode, name, self.namespace.rmdir)

    async def unlink(self, parent_inode, name, ctx):
        """FUSE unlink: remove a file (after its create, if under way); a block is retired
        after the grace period."""
        parent, name = self._dir(parent_inode), os.fsdecode(name)
        try:
            await self.namespace.unlink(parent, name)
        except FsError as exc:
            raise self._refuse(self._child_path(parent, name), exc) from None

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        """FUSE rename: relabel, attach/detach, or update a replaced block (Namespace.rename)."""
        parent, name = self._dir(parent_inode_old), os.fsdecode(name_old)
        new_parent = self._dir(parent_inode_new)
        new_name = self._new_name(new_parent, name_new)
        try:
            await self.namespace.rename(parent, name, new_parent, new_name, flags)
        except FsError as exc:
            where = f"{self._child_path(parent, name)} -> {self._child_path(new_parent, new_name)}"
            raise self._refuse(where, exc) from None

    async def symlink(self, parent_inode, name, target, ctx):
        """FUSE symlink: a scratch link (emacs lock files); EPERM for a block name."""
        return self._entry(self._in_dir(
            parent_inode, name, lambda parent, n: self.namespace.symlink(parent, n, target),
            new=True))

    async def readlink(self, inode, ctx):
        """FUSE readlink: the target of a scratch link."""
        node = self._node(inode)
        if node.kind is not Kind.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return bytes(node.content)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        """FUSE link: hard links are refused with EPERM."""
        node = self._node(inode)
        raise self._refuse(self.tree.path(node), FsError(errno.EPERM, "hard links are not "
                                                                      "supported"))

    async def statfs(self, ctx):
        """FUSE statfs: 4 KiB blocks, 1 GiB free, 255-byte names."""
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = BLOCK_SIZE
        used = (sum(len(n.content) for n in self.tree.blocks()) + self.state.scratch.used
                ) // BLOCK_SIZE + 1
        stats.f_blocks = used + (1 << 18)  # report 1 GiB free: blocks are small
        stats.f_bfree = stats.f_bavail = 1 << 18
        stats.f_files = self.tree.inode_count() + (1 << 16)
        stats.f_ffree = stats.f_favail = 1 << 16
        stats.f_namemax = 255
        return stats

    # -- files ---------------------------------------------------------------------------------

    def _open_handle(self, node: Node, flags: int, ctx=None) -> pyfuse3.FileInfo:
        writable = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        truncate = writable and flags & os.O_TRUNC  # libfuse 3 passes O_TRUNC here
        handle: OpenFile | ScratchFile
        fh = self._fh()
        keep_cache = direct_io = False
        if node.kind is Kind.SCRATCH:
            handle = ScratchFile(node, writable)
            if truncate:
                self.state.scratch_truncate(node, 0)
        else:
            append = bool(flags & os.O_APPEND)
            # a reader while another handle writes: its reads come from its own snapshot, past
            # the kernel's size and pages, which the writer's O_TRUNC and writes have moved
            direct_io = not writable and node.kind is Kind.BLOCK and self._being_written(node)
            handle = OpenFile(node, node.content, writable, base=node.block, append=append,
                              added=bytearray() if append and writable and not truncate
                              else None, pid=ctx.pid if ctx is not None else None)
            keep_cache = self._pages.opened(node.inode, fh, node.version, writable)
            if truncate:
                self._resize(handle, 0)
        self._files[fh] = handle
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache and not direct_io,
                                direct_io=direct_io)

    async def open(self, inode, flags, ctx):
        """FUSE open: revalidate a block older than the window, then snapshot its bytes for this
        handle; EACCES for writing a read-only file; O_TRUNC empties the handle's buffer."""
        node = self._node(inode)
        if node.kind is Kind.DIR:
            raise pyfuse3.FUSEError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        if writable and node.read_only:
            what = "the .git file" if node.kind is Kind.GITFILE else "the block"
            raise self._refuse(self.tree.path(node), FsError(errno.EACCES, f"{what} is read-only"))
        if node.kind is Kind.BLOCK:
            await self.files.order.settled(node.inode)  # a new file: after its create
            await self.files.revalidate(node)
        return self._open_handle(node, flags, ctx)

    async def create(self, parent_inode, name, mode, flags, ctx):
        """FUSE create: a new file, open (Namespace.create); a block file starts empty. A name
        that exists (the kernel had no entry for it) is opened, as open(2) does without
        O_EXCL."""
        existing = self.tree.child(self._dir(parent_inode), os.fsdecode(name))
        if existing is not None and not flags & os.O_EXCL and existing.kind is not Kind.DIR:
            return await self.open(existing.inode, flags, ctx), self._entry(existing, ctx)
        node = self._in_dir(parent_inode, name, self.namespace.create, new=True)
        self.state.set_mode(node, mode)
        info = self._open_handle(node, flags, ctx)
        if node.kind is Kind.BLOCK:  # a new block file: empty, its block made at first flush
            handle = self._files[info.fh]
            handle.dirty = handle.fresh = True
        return info, self._entry(node, ctx)

    async def read(self, fh, off, size):
        """FUSE read: up to `size` bytes at `off` from the handle's bytes (a scratch file's
        live bytes)."""
        handle = self._files[fh]
        if isinstance(handle, ScratchFile):
            return self.state.read(handle.node, off, size)
        return bytes(handle.data[off:off + size])

    async def write(self, fh, off, buf):
        """FUSE write: into the handle's buffer (a scratch file: the scratch store); nothing is
        sent. Returns the byte count. A block file's write that makes it refused already (its
        value past the limit: EFBIG; a complete frontmatter that is invalid: EINVAL) fails
        itself, so every program sees it, not only those that check close(); ENOSPC past the
        scratch limit."""
        handle = self._files[fh]
        if not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        if isinstance(handle, ScratchFile):
            try:
                self.state.scratch_write(handle.node, off, buf)
            except FsError as exc:
                raise self._refuse(self.tree.path(handle.node), exc) from None
            return len(buf)
        if handle.append:  # the kernel's offset is its cached size, which another writer
            off = len(handle.data)  # may have moved: an append goes to this handle's end
        gap = max(0, off - len(handle.data))
        # refused now, so every program sees it (shells ignore errors at close)
        data = handle.data
        if gap:  # NUL bytes before the write: counted before any is allocated
            refusal = self._buffer_refusal(handle.node, handle.data, gap + len(buf))
        else:
            data = bytearray(handle.data)
            data[off:off + len(buf)] = buf
            refusal = self._buffer_refusal(handle.node, data)
        if refusal is None and gap:
            data = bytearray(handle.data)
            data.extend(b"\0" * gap)
            data[off:off + len(buf)] = buf
        if refusal is not None:
            handle.refused, handle.refused_why = refusal.errno, refusal.reason
            handle.attempted = bytes(data) if not gap else bytes(handle.data)
            raise self._refuse(self.tree.path(handle.node), refusal)
        handle.data = data
        handle.dirty, handle.written, handle.written_at = True, True, trio.current_time()
        if handle.added is not None:
            handle.added += buf
        self.state.wrote(handle.node)
        return len(buf)

    @staticmethod
    def _refusal(handle: OpenFile) -> str:
        return (f"a write to it was refused ({errno.errorcode[handle.refused]}"
                + (f": {handle.refused_why}" if handle.refused_why else "") + ")")

    async def _send(self, handle: OpenFile) -> None:
        node = handle.node
        if handle.refused is not None:
            if handle.attempted is not None and node.kind is Kind.BLOCK:
                self.state.rejected(node, handle.attempted,  # once: later closes find None
                                    reason=handle.refused_why or self._refusal(handle))
                handle.attempted = None
            raise self._refuse(self.tree.path(node), FsError(
                handle.refused, f"{self._refusal(handle)}; nothing was sent"))
        try:
            if node.kind is Kind.BLOCK:
                try:
                    if handle.added is not None and node.block is not None:
                        await self.files.append(node, bytes(handle.added))
                        handle.added = bytearray()
                    else:
                        await self.files.send(
                            node, bytes(handle.data), handle.base,
                            create_only=handle.fresh and not handle.written,
                            added=bytes(handle.added) if handle.added is not None else None)
                        if handle.added is not None:
                            handle.added = bytearray()
                except Stale:
                    raise  # both versions are in history already
                except FsError as exc:
                    if node.kind is Kind.BLOCK:
                        self.state.rejected(node, bytes(handle.data), reason=exc.reason)
                    raise
                handle.base = node.block
            elif self.state.gone(node) is not None:  # its block was deleted on the server
                self.state.lost_block(node, bytes(handle.data))
                raise FsError(errno.ESTALE, "its block was deleted on the server while the "
                                            "file was open; the bytes written are kept in "
                                            "history as a rejected edit")
            else:  # the file stopped being a block while open: its bytes stay local
                if node.parent == 0:
                    log.warning("%s: removed while open; the write stays local", node.name)
                if node.kind is Kind.SCRATCH:
                    self.state.scratch_replace(node, bytes(handle.data))
        except FsError as exc:
            raise self._refuse(self.tree.path(node), exc) from None
        handle.dirty = False

    async def flush(self, fh):
        """FUSE flush (each close): send the handle's writes as one PATCH and wait for it."""
        # flush comes with every close() of every dup of the descriptor. A shell's `> file` opens
        # with O_TRUNC and closes a dup before the first write: sending then would blank the block
        # on the server for a moment, so a truncation with no write yet waits for release.
        # A new file's block is created at its first flush, so that close() returns once the
        # block exists (or its create is journaled) and the next command finds it.
        handle = self._files[fh]
        if (isinstance(handle, OpenFile) and handle.fresh and not handle.written
                and handle.node.block is not None):
            handle.dirty = False  # its new file was made by another handle: nothing to send
        if isinstance(handle, OpenFile) and handle.dirty and (
                handle.written or handle.refused is not None
                or (handle.node.kind is Kind.BLOCK and handle.node.block is None)):
            await self._send(handle)

    async def fsync(self, fh, datasync):
        """FUSE fsync/fdatasync: send any pending change now and wait for the server."""
        handle = self._files[fh]
        if isinstance(handle, OpenFile) and handle.dirty:
            await self._send(handle)

    async def release(self, fh):
        """FUSE release (last close): send an O_TRUNC/O_CREAT open that was never written."""
        handle = self._files.pop(fh)
        if isinstance(handle, OpenFile):
            self._pages.released(handle.node.inode, fh)
            if handle.writable:
                self._writer_closed[handle.node.inode] = trio.current_time()
            if handle.written or handle.refused is not None:
                # the kernel sized the file by this handle's writes; what it shows may differ
                self.state.invalidator.attributes(handle.node.inode)
        if not isinstance(handle, OpenFile) or not handle.dirty:
            return
        if handle.refused is not None:
            log.warning("%s: closed after %s; the block is unchanged", self.tree.path(handle.node),
                        self._refusal(handle))
        elif not handle.written:  # `: > file`, `touch new.md`: never written
            try:
                await self._send(handle)
            except pyfuse3.FUSEError:
                pass  # already logged; release cannot report an error to the program
        else:
            log.warning("%s: closed with changes the server refused; they are kept in history "
                        "as a rejected edit", self.tree.path(handle.node))

    async def shutdown(self) -> None:
        """Send every open file's unsent writes as its close would (at unmount); a write the
        server refuses is logged as lost."""
        for handle in list(self._files.values()):
            if (isinstance(handle, OpenFile) and handle.dirty and handle.refused is None
                    and handle.node.kind is Kind.BLOCK):
                try:
                    await self._send(handle)
                except pyfuse3.FUSEError:
                    log.error("%s: an unsent write was refused at unmount; it is kept in "
                              "history as a rejected edit", self.tree.path(handle.node))

    def unsent(self) -> int:
        """How many open block files have writes the server has not accepted (for status)."""
        return sum(1 for f in self._files.values()
                   if isinstance(f, OpenFile) and f.dirty and f.node.kind is Kind.BLOCK)
