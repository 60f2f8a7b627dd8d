"""Open files: the state machine of one FUSE file handle, apart from FUSE.

A `BlockHandle` is one open file description of a file the daemon renders (a block file, or
`.git`): a private buffer of bytes, written and truncated in memory, sent at flush (each
close), fsync or release (last close) by `BlockFiles`, and the bookkeeping of what came of it
(a refused write, a rejected edit, a new file's create). A `ScratchHandle` is one of a file the
daemon keeps itself, a scratch file or a kept file (the git-memory layout's files that are no
block): its reads and writes go straight to the file's bytes (MountState.local_*), nothing is
ever sent; a kept file's close records it in history, durable. Both answer
the same calls (read, write, truncate, needs_flush, at_release, sends_at_unmount, `dirty`,
`unsent`), so fs.py does not branch on the kind of handle.

fs.py holds the handles by file handle number and translates each FUSE request into one call
here; the mount's components (MountState, BlockFiles) are passed in by the caller. Every
method raises FsError for a refusal (fs.py logs it with the path and answers the errno);
none raises FUSEError. Sizes and offsets are bytes throughout.
"""
from __future__ import annotations

import enum
import errno
import logging
import os
from dataclasses import dataclass

import trio

from . import blockfile
from .errors import FsError
from .files import BlockFiles
from .model import Block
from .remote import Stale
from .state import MountState
from .tree import Kind, Node

# These lines were the FUSE layer's before the handles left fs.py: they keep its name.
log = logging.getLogger("memfuse.fs")

MAX_BLOCK_FILE = 64 << 20  # bytes: no block file grows past this in the daemon's memory


def open_flags(flags: int) -> tuple[bool, bool]:
    """(writable, truncate) of the `flags` of a FUSE open or create (os.O_*): truncate is
    O_TRUNC on a writable open (libfuse 3 passes it to open)."""
    writable = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
    return writable, bool(writable and flags & os.O_TRUNC)


def buffer_refusal(node: Node, data: bytes | bytearray, gap: int = 0) -> FsError | None:
    """Why a block file's buffer may not become the bytes `data` followed by `gap` NUL bytes
    (blockfile.check_partial: EINVAL for a complete bad frontmatter, EFBIG past the block's
    limit in characters or MAX_BLOCK_FILE bytes), or None; always None for a file that is not
    a block file. Counted before anything is allocated."""
    if node.kind is not Kind.BLOCK:
        return None
    if len(data) + gap > MAX_BLOCK_FILE:
        return FsError(errno.EFBIG, f"block files are limited to {MAX_BLOCK_FILE >> 20} MiB")
    limit = node.block.limit if node.block is not None else blockfile.DEFAULT_LIMIT
    return blockfile.check_partial(data, limit, gap)


async def truncate_path(node: Node, size: int, state: MountState, files: BlockFiles) -> None:
    """FUSE setattr of the size with no block handle (truncate(2) by path, or an ftruncate of
    a scratch handle): a scratch file is resized in the store; a block file has no close to
    wait for, so its first `size` bytes (NUL-padded) are sent now, as one write; a kept file
    is recorded now (durable). Raises FsError: EACCES (read-only, or `.git`), EFBIG/EINVAL
    (`buffer_refusal`), ENOSPC (scratch limit), EFBIG/ENOSPC (kept caps), and what
    BlockFiles.send and MountState.kept_saved raise."""
    if node.kind in (Kind.SCRATCH, Kind.KEPT):
        state.local_truncate(node, size)
        state.kept_saved(node)
        return
    if node.kind is not Kind.BLOCK or node.read_only:
        raise FsError(errno.EACCES, "file is read-only")
    refusal = buffer_refusal(node, bytes(node.content[:size]), size - len(node.content))
    if refusal is not None:
        raise refusal
    data = bytes(node.content[:size]).ljust(size, b"\0")
    await files.send(node, data, node.block)


class Release(enum.Enum):
    """What the release (last close) of a handle does about its unsent bytes."""

    NOTHING = "nothing"  # nothing unsent
    SEND = "send"  # an O_TRUNC or O_CREAT open never written (`: > file`, `touch new.md`)
    REFUSED = "refused"  # a write was refused: the block stays as it was
    UNSENT = "unsent"  # written, but the server refused them at flush (already in history)


@dataclass(eq=False)
class BlockHandle:
    """One open file description of a block file (or another file the daemon renders:
    `.git`), from FUSE open or create to release.

    data: the bytes this handle reads and, once written, will send (a copy-on-write snapshot
    taken at open). dirty: `data` has changes the server has not accepted. written: a write or
    ftruncate came since open; an `O_TRUNC` or `O_CREAT` open alone is dirty but not written
    (see `needs_flush`). refused: the errno a write() was refused with (EFBIG, EINVAL): what
    the program meant is not in the buffer, so nothing from this handle is sent and its close
    fails too. written_at: trio time (seconds) of the last write or resize.
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

    @classmethod
    def open(cls, node: Node, flags: int, state: MountState, pid: int | None = None,
             new: bool = False) -> BlockHandle:
        """The handle of a FUSE open (or create, `new`) of `node` with `flags` (os.O_*) by
        process `pid`: a snapshot of the node's bytes and block; O_TRUNC empties it (dirty,
        not written); a new block file's handle is dirty and `fresh` (its first flush makes
        the block)."""
        writable, truncate = open_flags(flags)
        append = bool(flags & os.O_APPEND)
        handle = cls(node, node.content, writable, base=node.block, append=append,
                     added=bytearray() if append and writable and not truncate else None,
                     pid=pid)
        if truncate:
            handle._resize(0, state)
        if new and node.kind is Kind.BLOCK:  # empty, its block made at first flush
            handle.dirty = handle.fresh = True
        return handle

    @property
    def refusal(self) -> str:
        """The refused write, in words for a log line or history (only when `refused`)."""
        return (f"a write to it was refused ({errno.errorcode[self.refused]}"
                + (f": {self.refused_why}" if self.refused_why else "") + ")")

    @property
    def unsent(self) -> bool:
        """A block file's handle with changes the server has not accepted (for status)."""
        return self.dirty and self.node.kind is Kind.BLOCK

    def read(self, offset: int, size: int, state: MountState) -> bytes:
        """FUSE read: up to `size` bytes at `offset` of this handle's own bytes."""
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes, state: MountState) -> None:
        """FUSE write of the bytes `data` at `offset` into the buffer; nothing is sent. O_APPEND
        writes at the end of the buffer whatever the offset (the kernel's offset is its cached
        size, which another writer may have moved); a write past the end fills the gap with NUL
        bytes. Raises FsError (EFBIG past the limit, EINVAL for a complete bad frontmatter:
        `buffer_refusal`) when the write makes the buffer refused: the buffer is unchanged, the
        handle is `refused` from then on and keeps in `attempted` what the write would have
        made (the buffer before it, when the write left a gap), for history."""
        if self.append:  # the kernel's offset is its cached size, which another writer may
            offset = len(self.data)  # have moved: an append goes to this handle's end
        gap = max(0, offset - len(self.data))
        # refused now, so every program sees it (shells ignore errors at close)
        made = self.data
        if gap:  # NUL bytes before the write: counted before any is allocated
            refusal = buffer_refusal(self.node, self.data, gap + len(data))
        else:
            made = bytearray(self.data)
            made[offset:offset + len(data)] = data
            refusal = buffer_refusal(self.node, made)
        if refusal is not None:
            self.refused, self.refused_why = refusal.errno, refusal.reason
            self.attempted = bytes(made) if not gap else bytes(self.data)
            raise refusal
        if gap:
            made = bytearray(self.data)
            made.extend(b"\0" * gap)
            made[offset:offset + len(data)] = data
        self.data = made
        self.dirty, self.written, self.written_at = True, True, trio.current_time()
        if self.added is not None:
            self.added += data
        state.wrote(self.node)

    async def truncate(self, size: int, state: MountState, files: BlockFiles) -> None:
        """FUSE setattr of the size with this handle (ftruncate): the buffer becomes its first
        `size` bytes, NUL-padded; dirty and written, sent at close as the whole file. Raises
        FsError: EACCES (`.git`, a read-only block), EFBIG/EINVAL (`buffer_refusal`, before
        anything is allocated; the handle is not `refused` by it)."""
        if self.node.kind not in (Kind.BLOCK, Kind.SCRATCH) or self.node.read_only:
            raise FsError(errno.EACCES, "file is read-only")
        refusal = buffer_refusal(self.node, bytes(self.data[:size]), size - len(self.data))
        if refusal is not None:
            raise refusal
        self._resize(size, state)
        self.written = True

    def _resize(self, size: int, state: MountState) -> None:
        data = bytearray(self.data)
        del data[size:]
        data.extend(b"\0" * (size - len(data)))
        self.data, self.dirty, self.written_at = data, True, trio.current_time()
        self.added = None  # no longer only added bytes: the whole file is sent
        state.wrote(self.node)

    def needs_flush(self) -> bool:
        """Whether a FUSE flush (each close of each dup) sends this handle now. A truncation
        with no write yet waits for release (a shell's `> file` closes a dup before its first
        write: sending then would blank the block for a moment); a new file's block is made
        at its first flush, so close() returns once it exists (or its create is journaled). A
        new file's handle never written whose block another handle made has nothing to send:
        it stops being dirty here."""
        if self.fresh and not self.written and self.node.block is not None:
            self.dirty = False
        return self.dirty and (self.written or self.refused is not None
                               or (self.node.kind is Kind.BLOCK and self.node.block is None))

    def at_release(self) -> Release:
        """What FUSE release (the last close) does about this handle's unsent bytes."""
        if not self.dirty:
            return Release.NOTHING
        if self.refused is not None:
            return Release.REFUSED
        if not self.written:
            return Release.SEND
        return Release.UNSENT

    def sends_at_unmount(self) -> bool:
        """Whether the unmount sends this handle's bytes, as its close would have."""
        return self.dirty and self.refused is None and self.node.kind is Kind.BLOCK

    async def send(self, state: MountState, files: BlockFiles) -> None:
        """Send the buffer (FUSE flush, fsync, release, unmount): an O_APPEND handle's added
        bytes go to the end of the block as the server has it (BlockFiles.append), any other
        buffer is the whole file (BlockFiles.send: an update, or the create of a new file's
        block); no longer dirty once taken. A file that stopped being a block file while
        open: its block deleted on the server, the bytes go to history and ESTALE; otherwise
        they stay local (a scratch file's bytes become them).

        Raises FsError: the refused write's errno when `refused` (nothing sent; the attempted
        bytes go to history once); a refusal of BlockFiles (the buffer goes to history as a
        rejected edit, but for Stale, whose versions are both there already); ESTALE."""
        node = self.node
        if self.refused is not None:
            raise self._refused_at_close(state)
        if node.kind is Kind.BLOCK:
            await self._send_block(state, files)
        elif state.gone(node) is not None:  # its block was deleted on the server
            state.lost_block(node, bytes(self.data))
            raise FsError(errno.ESTALE, "its block was deleted on the server while the "
                                        "file was open; the bytes written are kept in "
                                        "history as a rejected edit")
        else:  # the file stopped being a block while open: its bytes stay local (in history
            if node.parent == 0:  # when it is a kept file now)
                log.warning("%s: removed while open; the write stays local", node.name)
            if node.kind in (Kind.SCRATCH, Kind.KEPT):
                state.local_replace(node, bytes(self.data))
        self.dirty = False

    def _refused_at_close(self, state: MountState) -> FsError:
        if self.attempted is not None and self.node.kind is Kind.BLOCK:
            state.rejected(self.node, self.attempted,  # once: later closes find None
                           reason=self.refused_why or self.refusal)
            self.attempted = None
        return FsError(self.refused, f"{self.refusal}; nothing was sent")

    async def _send_block(self, state: MountState, files: BlockFiles) -> None:
        node = self.node
        try:
            if self.added is not None and node.block is not None:
                await files.append(node, bytes(self.added))
                self.added = bytearray()
            else:
                await files.send(node, bytes(self.data), self.base,
                                 create_only=self.fresh and not self.written,
                                 added=bytes(self.added) if self.added is not None else None)
                if self.added is not None:
                    self.added = bytearray()
        except Stale:
            raise  # both versions are in history already
        except FsError as exc:
            if node.kind is Kind.BLOCK:  # still, after the wait
                state.rejected(node, bytes(self.data), reason=exc.reason)
            raise
        self.base = node.block


@dataclass(eq=False)
class ScratchHandle:
    """One open file description of a file the daemon keeps itself: a scratch file (swap
    files, backups) or a kept file (git-memory layout). Reads and writes go to the file's
    bytes at once (MountState.local_*), so every handle sees them and nothing is ever unsent.
    A scratch file's flush, fsync and release do nothing; a kept file written through this
    handle (or made by its create, or truncated at its open) is recorded in history at the
    next flush, fsync or release (MountState.kept_saved: durable when it returns)."""

    node: Node
    writable: bool
    written: bool = False  # changed through this handle since it was last recorded
    unsent = False  # nothing of it is for the server

    @property
    def dirty(self) -> bool:
        """Whether a flush or fsync has something to do: a kept file's change to record."""
        return self.written and self.node.kind is Kind.KEPT

    @classmethod
    def open(cls, node: Node, flags: int, state: MountState, new: bool = False
             ) -> ScratchHandle:
        """The handle of a FUSE open or create (`new`) of the scratch or kept file `node` with
        `flags` (os.O_*); O_TRUNC empties the file. A new kept file is recorded at its first
        close, even when nothing is written (`touch`)."""
        writable, truncate = open_flags(flags)
        if truncate:
            state.local_truncate(node, 0)
        return cls(node, writable, written=truncate or new)

    def read(self, offset: int, size: int, state: MountState) -> bytes:
        """FUSE read: up to `size` bytes at `offset` of the file as it is now."""
        return state.read(self.node, offset, size)

    def write(self, offset: int, data: bytes, state: MountState) -> None:
        """FUSE write of the bytes `data` at `offset` into the file. Raises FsError: ENOSPC
        past the scratch limit; EFBIG or ENOSPC past the kept caps (the file unchanged)."""
        state.local_write(self.node, offset, data)
        self.written = True

    async def truncate(self, size: int, state: MountState, files: BlockFiles) -> None:
        """FUSE setattr of the size with this handle: the file resized (a kept file recorded
        at close), or, for a file that became a block file while open, as by path
        (`truncate_path`)."""
        if self.node.kind in (Kind.SCRATCH, Kind.KEPT):
            state.local_truncate(self.node, size)
            self.written = True
            return
        await truncate_path(self.node, size, state, files)

    def needs_flush(self) -> bool:
        """Whether a FUSE flush (each close) records the file: a kept file changed."""
        return self.dirty

    def at_release(self) -> Release:
        """SEND when a kept file's change is still to be recorded, else NOTHING."""
        return Release.SEND if self.dirty else Release.NOTHING

    def sends_at_unmount(self) -> bool:
        """Whether the unmount records this handle's kept file, as its close would have."""
        return self.dirty

    async def send(self, state: MountState, files: BlockFiles) -> None:
        """Record the kept file in history (MountState.kept_saved: durable when it returns).
        Raises FsError (kept_error)."""
        self.written = False
        state.kept_saved(self.node)


Handle = BlockHandle | ScratchHandle  # what one FUSE file handle number holds
