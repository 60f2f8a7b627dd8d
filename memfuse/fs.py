"""pyfuse3 Operations: translate FUSE requests into Namespace, BlockFiles and MountState calls.

Kept thin on purpose: the semantics live in namespace.py (create/unlink/rename), files.py
(block contents to and from the server), state.py (the one writer of the mount's state),
handles.py (what one open file holds and sends) and blockfile.py (the format). What is here is
the FUSE plumbing: file handle numbers, attributes, the kernel's caches, errnos. Every refusal
that reaches a program is also logged as one line naming the file and the reason.
"""
from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import stat

import pyfuse3
import trio

from .errors import Faults, FsError
from .files import BlockFiles
from .handles import BlockHandle, Handle, Release, ScratchHandle, truncate_path
from .model import MAX_NAME
from .namespace import Namespace
from .pagecache import PageCache
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
# Seconds after a writer closed during which a reader's reads bypass the kernel's size and pages
# (direct_io): a save in place (O_TRUNC) makes the kernel set the size to 0 at its open, and a
# reader whose read follows would get a cut or empty version. Outside this window readers use
# the page cache (keep_cache), as warm reads need.
WRITER_WINDOW = 2.0


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
        self._files: dict[int, Handle] = {}
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

    def _writers(self, node: Node) -> list[BlockHandle]:
        return [f for f in self._files.values()
                if f.node is node and isinstance(f, BlockHandle) and f.writable]

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
        elif node.kind is Kind.SYMLINK or (node.kind is Kind.GITFILE and self.tree.gitlink):
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

    async def _truncate(self, node: Node, size: int, handle: Handle | None) -> None:
        path = self.tree.path(node)
        try:
            if handle is None:
                await truncate_path(node, size, self.state, self.files)
            else:
                await handle.truncate(size, self.state, self.files)
        except FsError as exc:
            raise self._refuse(path, exc) from None

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
        """FUSE readlink: the target of a scratch link, or of `.git` (the history) in the
        git-memory layout."""
        node = self._node(inode)
        if not (node.kind is Kind.SYMLINK or (node.kind is Kind.GITFILE and self.tree.gitlink)):
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
                + self.state.kept_used) // BLOCK_SIZE + 1
        stats.f_blocks = used + (1 << 18)  # report 1 GiB free: blocks are small
        stats.f_bfree = stats.f_bavail = 1 << 18
        stats.f_files = self.tree.inode_count() + (1 << 16)
        stats.f_ffree = stats.f_favail = 1 << 16
        stats.f_namemax = 255
        return stats

    # -- files ---------------------------------------------------------------------------------

    def _open_handle(self, node: Node, flags: int, ctx=None, new: bool = False
                     ) -> pyfuse3.FileInfo:
        """A new file handle on `node` for a FUSE open or create (`new`) with `flags`, and how
        the kernel may cache its pages."""
        fh = self._fh()
        if node.kind in (Kind.SCRATCH, Kind.KEPT):
            handle: Handle = ScratchHandle.open(node, flags, self.state, new)
            keep_cache = direct_io = False
        else:
            handle = BlockHandle.open(node, flags, self.state,
                                      ctx.pid if ctx is not None else None, new)
            # a reader while another handle writes: its reads come from its own snapshot, past
            # the kernel's size and pages, which the writer's O_TRUNC and writes have moved
            direct_io = (not handle.writable and node.kind is Kind.BLOCK
                         and self._being_written(node))
            keep_cache = self._pages.opened(node.inode, fh, node.version, handle.writable)
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
        return self._open_handle(node, flags, ctx, new=True), self._entry(node, ctx)

    async def read(self, fh, off, size):
        """FUSE read: up to `size` bytes at `off` from the handle's bytes (a scratch file's
        live bytes)."""
        return self._files[fh].read(off, size, self.state)

    async def write(self, fh, off, buf):
        """FUSE write: into the handle's buffer (a scratch file: the scratch store); nothing is
        sent. Returns the byte count. A block file's write that makes it refused already (its
        value past the limit: EFBIG; a complete frontmatter that is invalid: EINVAL) fails
        itself, so every program sees it, not only those that check close(); ENOSPC past the
        scratch limit."""
        handle = self._files[fh]
        if not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            handle.write(off, buf, self.state)
        except FsError as exc:
            raise self._refuse(self.tree.path(handle.node), exc) from None
        return len(buf)

    async def _send(self, handle: Handle) -> None:
        """Send `handle` (BlockHandle.send; a kept file's ScratchHandle.send records it); a
        refusal is logged and raised as FUSEError."""
        try:
            await handle.send(self.state, self.files)
        except FsError as exc:
            raise self._refuse(self.tree.path(handle.node), exc) from None

    async def flush(self, fh):
        """FUSE flush (each close): send the handle's writes as one PATCH and wait for it (a
        truncation with no write yet waits for release: BlockHandle.needs_flush)."""
        handle = self._files[fh]
        if handle.needs_flush():
            await self._send(handle)

    async def fsync(self, fh, datasync):
        """FUSE fsync/fdatasync: send any pending change now and wait for the server."""
        handle = self._files[fh]
        if handle.dirty:
            await self._send(handle)

    async def release(self, fh):
        """FUSE release (last close): send an O_TRUNC/O_CREAT open that was never written."""
        handle = self._files.pop(fh)
        if isinstance(handle, BlockHandle):
            self._closed(handle, fh)
        what = handle.at_release()
        if what is Release.REFUSED:
            log.warning("%s: closed after %s; the block is unchanged", self.tree.path(handle.node),
                        handle.refusal)
        elif what is Release.SEND:  # `: > file`, `touch new.md`: never written
            try:
                await self._send(handle)
            except pyfuse3.FUSEError:
                pass  # already logged; release cannot report an error to the program
        elif what is Release.UNSENT:
            log.warning("%s: closed with changes the server refused; they are kept in history "
                        "as a rejected edit", self.tree.path(handle.node))

    def _closed(self, handle: BlockHandle, fh: int) -> None:
        """The kernel's caches after the release of block handle `fh`."""
        self._pages.released(handle.node.inode, fh)
        if handle.writable:
            self._writer_closed[handle.node.inode] = trio.current_time()
        if handle.written or handle.refused is not None:
            # the kernel sized the file by this handle's writes; what it shows may differ
            self.state.invalidator.attributes(handle.node.inode)

    async def shutdown(self) -> None:
        """Send every open file's unsent writes as its close would (at unmount); a write the
        server refuses is logged as lost."""
        for handle in list(self._files.values()):
            if handle.sends_at_unmount():
                try:
                    await self._send(handle)
                except pyfuse3.FUSEError:
                    log.error("%s: an unsent write was refused at unmount; it is kept in "
                              "history as a rejected edit", self.tree.path(handle.node))

    def unsent(self) -> int:
        """How many open block files have writes the server has not accepted (for status)."""
        return sum(1 for f in self._files.values() if f.unsent)
