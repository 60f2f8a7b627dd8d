"""The one owner of what the mount shows: the tree, scratch bytes, tombstones, and their history.

Every change to what a program can see in the mount happens here, and each change to a block
file is recorded to history in the same step (one `record(path, content, origin)` call per
change; content None: the file is gone). Other modules read `state.tree` but never write it.
This is also the only writer of the journal (journal.py): a change the server cannot take is
appended, fsync'd, before the tree shows it.

Two callers change state: the FUSE side after the server accepted a change, or after it was
journaled (`written`, `journaled`, `renamed`, `bury`, ...; origin LOCAL), and the server side
(`reconcile` from a listing, `refreshed` from a revalidating read, `replayed`; origin SERVER),
which also tells the kernel to drop what it cached (an Invalidator). Nothing here does I/O
except those kernel notifications and the journal's appends.
"""
from __future__ import annotations

import errno
import logging
import os
import dataclasses
from typing import Any, Callable, Protocol

import pyfuse3
import trio

from . import blockfile, fileattrs
from .errors import FsError
from .grace import Graveyard, Tombstone
from .journal import CREATE, RELOCATE, WRITE, Entry, Journal
from .layout import CLASSIC, KEPT_FILE_LIMIT, KEPT_LIMIT, Layout, PathKind
from .model import (MAX_PATH, MEMORY_FILESYSTEM_LABEL, Block, Location, Origin, create_marker,
                    is_provisional)
from .scratch import ScratchStore
from .tree import Kind, Node, Tree

log = logging.getLogger("memfuse.state")

Recorder = Callable[..., None]  # (path, content or None, Origin[, reason of a rejection]
#   [, durable=True: a kept file's change, fsync'd before the call returns; raises OSError])



def kept_error(exc: OSError) -> FsError:
    """The refusal a program sees when a kept file's change could not be made durable (`exc`,
    from Snapshotter.record): the change is made and the next commit takes it (within
    seconds), but it would not survive a crash before that. ENOSPC and EDQUOT as they are,
    anything else EIO."""
    code = exc.errno if exc.errno in (errno.ENOSPC, errno.EDQUOT) else errno.EIO
    return FsError(code, f"the change is made, but the record of changes not committed yet "
                         f"could not be written ({exc.strerror or exc}); history commits it "
                         f"within seconds, and a crash before that would lose it")


def journal_error(exc: OSError, path: "os.PathLike[str] | str | None" = None) -> FsError:
    """The refusal a program sees when the journal at `path` cannot be written (`exc`): ENOSPC
    (the disk is full) and EDQUOT (the user's quota is used up) as they are, every other
    OSError as EIO; the reason names the disk's state and the journal's path."""
    where = f" ({path})" if path is not None else ""
    if exc.errno == errno.ENOSPC:
        return FsError(errno.ENOSPC, f"the disk holding the journal{where} is full; the change "
                                     f"was not made (free some space and retry)")
    if exc.errno == errno.EDQUOT:
        return FsError(errno.EDQUOT, f"the disk quota of the journal{where} is used up; the "
                                     f"change was not made")
    return FsError(errno.EIO, f"the journal{where} cannot be written "
                              f"({exc.strerror or exc}); the change was not made")


# the kinds of node whose times and modes are kept across mounts (fileattrs.py)
KEEPS_ATTRS = (Kind.DIR, Kind.BLOCK, Kind.KEPT, Kind.GITFILE)


class Invalidator(Protocol):
    """Tells the kernel to drop what it cached (FUSE notify calls)."""

    def entry(self, parent_inode: int, name: str) -> None:
        """Forget the directory entry `name` (it moved, appeared or went away)."""

    def attributes(self, inode: int) -> None:
        """Forget the attributes (size, mode, times) of `inode`, at once: safe inside any
        FUSE handler, since it waits for no page."""

    async def inode(self, inode: int) -> None:
        """Forget the attributes and cached pages of `inode` (its content changed)."""


class KernelInvalidator:
    """The real one: pyfuse3's notify calls. `invalidate_inode` may wait for the kernel, which
    may wait for this daemon, so it runs in a worker thread; entries go through pyfuse3's own
    asynchronous queue."""

    def entry(self, parent_inode: int, name: str) -> None:
        """`pyfuse3.invalidate_entry_async`; a name the kernel never saw is fine."""
        pyfuse3.invalidate_entry_async(parent_inode, os.fsencode(name), ignore_enoent=True)

    def attributes(self, inode: int) -> None:
        """`pyfuse3.invalidate_inode(inode, attr_only=True)`: one notify write, no page lock
        (FUSE_NOTIFY_INVAL_INODE with offset -1); an inode the kernel forgot is fine."""
        try:
            pyfuse3.invalidate_inode(inode, attr_only=True)
        except OSError:  # ENOENT: the kernel holds nothing of it
            pass

    async def inode(self, inode: int) -> None:
        """`pyfuse3.invalidate_inode` in a worker thread; an inode the kernel forgot is fine."""
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode)
        except OSError:  # the kernel never looked it up, or forgot it: nothing cached
            pass


class NoInvalidator:
    """For a tree nothing is mounted on yet (the load at mount) and for tests."""

    def entry(self, parent_inode: int, name: str) -> None:
        """Nothing cached: nothing to do."""

    def attributes(self, inode: int) -> None:
        """Nothing cached: nothing to do."""

    async def inode(self, inode: int) -> None:
        """Nothing cached: nothing to do."""


@dataclasses.dataclass
class _Moves:
    """One listing's moves: `desired` (block id -> (path parts, block)) as `_desired` gives
    it, the `pinned` blocks (not moved), and `aside`: inode -> the path of a block file taken
    off its path for another file to take it (a label swap)."""

    desired: dict[str, tuple[tuple[str, ...], Block]]
    pinned: set[str]
    aside: dict[int, str] = dataclasses.field(default_factory=dict)

    def leaving(self, node: Node, parts: tuple[str, ...]) -> bool:
        """Whether block file `node`, now at `parts`, moves elsewhere in this listing."""
        block = node.block
        return (node.kind is Kind.BLOCK and block is not None and block.id in self.desired
                and block.id not in self.pinned and self.desired[block.id][0] != parts)


class MountState:
    """What one mount shows, and the only writer of it.

    tree: the namespace (`Tree(gitfile=...)`, empty); record: the history's recorder
    (`Snapshotter.record`); invalidator: the kernel's cache (KernelInvalidator once mounted);
    scratch: the scratch-file store; graveyard: tombstones of unlinked block files; journal:
    changes the server could not take yet, and unlinks in their grace period (None: no
    journal, such changes fail). A block with a journaled write, create or rename is *pinned*:
    the mount shows it as the journal makes it, whatever the server lists, until it is
    replayed; a block with a journaled unlink is hidden.

    layout: where blocks are shown (layout.py: CLASSIC, or GIT_MEMORY for an agent tagged
    `git-memory-enabled`), chosen once at mount (daemon.py) and fixed for the mount's life.
    Every path <-> block question of any module goes through this object's `location`,
    `location_at`, `path_of` and `is_block_path`, never through model.Location directly.
    """

    def __init__(self, tree: Tree, record: Recorder, *, invalidator: Invalidator | None = None,
                 scratch: ScratchStore | None = None, graveyard: Graveyard | None = None,
                 journal: Journal | None = None, layout: Layout = CLASSIC):
        self.tree = tree
        self.layout = layout
        self._record = record
        self.invalidator: Invalidator = invalidator or NoInvalidator()
        # whatever changes a block file, the kernel's copy of its attributes goes at once
        tree.on_change = lambda node: self.invalidator.attributes(node.inode)
        self.scratch = scratch or ScratchStore()
        self.kept_used = 0  # bytes of the linked kept files (Kind.KEPT), capped at KEPT_LIMIT
        self.graveyard = graveyard or Graveyard()
        self.journal = journal
        self._warned: set[str] = set()
        self.duplicates: dict[str, list[str]] = {}  # path -> ids of the blocks it could show
        # create marker -> (the values its block could hold, the block it settled on, when),
        # of each journaled create replayed: another block carrying one, in a later listing,
        # is a late POST of a create already settled (an orphan)
        self._settled_creates: dict[str, tuple[set[str], str | None, float]] = {}
        self._gone: dict[int, str] = {}  # inode -> the path of a block file whose block left
        # the server (deleted, or detached and no longer owned) while the kernel still held it
        # called after a change of times or modes alone (no history): fileattrs keeps them
        self.on_attributes: Callable[[], None] = lambda: None

    def pinned(self) -> set[str]:
        """Blocks shown as the journal makes them until it is replayed (Journal.pinned)."""
        return self.journal.pinned() if self.journal is not None else set()

    def unlinked_ids(self) -> set[str]:
        """Blocks whose files were unlinked: in their grace period, being retired, retired by
        this mount, or their unlink journaled. A create never takes one as its label's."""
        ids = self.graveyard.unlinked_block_ids()
        return ids | self.journal.hidden() if self.journal is not None else ids

    def settled_create(self, marker: str, values: set[str], made: str | None,
                       at: float) -> None:
        """A journaled create tagging its block `marker` is settled (made, refused, or
        created and removed) at `at` (trio time); `values`: what any attempt of it could
        have POSTed; `made`: the id of the block it settled on (None: none)."""
        self._settled_creates[marker] = (values, made, at)

    def orphan(self, block: Block, listed_at: float) -> bool:
        """Whether `block`, in a listing started at `listed_at` (trio time), was made by an
        attempt of a journaled create settled before that listing (its POST took effect
        after replay had looked for it: a cut link the server went on with), is not the
        block that create settled on, and holds only what that create sent: a block nobody
        has as a file, which the poller deletes (`Remote.discard`). A listing started before
        the settle may show the create's own block with its marker not dropped yet: it
        judges nothing."""
        for tag in block.tags:
            settled = self._settled_creates.get(tag)
            if settled is not None:
                values, made, at = settled
                if at <= listed_at and block.id != made and block.value in values:
                    return True
        return False

    def hidden(self) -> set[str]:
        """Blocks whose files were unlinked and that are not retired yet: in their grace period
        or journaled."""
        ids = self.graveyard.pending_block_ids()
        return ids | self.journal.hidden() if self.journal is not None else ids

    def _journal(self, append: Callable[[], Any]) -> Any:
        """Run a journal append and return what it returns. OSError (the disk refused; the
        journal and the state are then as they were: Journal._append) becomes FsError with the
        errno a program understands: ENOSPC for a full disk, EDQUOT for a quota, EIO for
        anything else."""
        try:
            return append()
        except OSError as exc:
            raise journal_error(exc, self.journal.path if self.journal is not None else None
                                ) from None

    # -- queries -------------------------------------------------------------------------------

    def location(self, node: Node) -> Location:
        """Where the block file `node` puts its block. Raises FsError(EINVAL) when its path
        cannot be a block file, or it was removed."""
        parts = self.tree.parts(node)
        if parts is None:
            raise FsError(errno.EINVAL, f"{node.name} was removed: it holds no block")
        return self.location_at(parts)

    def location_at(self, parts: tuple[str, ...]) -> Location:
        """The block a file at `parts` stands for, in the mount's layout. Raises FsError when
        that path cannot be a block file: ENAMETOOLONG past MAX_PATH bytes (git's limit),
        EINVAL otherwise (in either layout: a label that would be invalid, or a path that is
        no block's)."""
        location = self.layout.location_at(parts)
        if location is None:
            path = "/".join(parts)
            if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH:
                raise FsError(errno.ENAMETOOLONG, f"the path is over {MAX_PATH} bytes, more than "
                                                  f"git's index can hold")
            raise FsError(errno.EINVAL, f"{path} cannot be a block file (its label would be "
                                        f"invalid)")
        return location

    def path_of(self, location: Location) -> tuple[str, ...] | None:
        """The path of `location`'s block file in the mount's layout, or None when that block
        is not shown (a label that cannot be a file; a detached block in the git-memory
        layout)."""
        return self.layout.parts(location)

    def is_kept_path(self, parts: tuple[str, ...]) -> bool:
        """Whether a file at `parts` is a kept file: no block, but committed to history and
        never sent to the server (PathKind.KEPT; the git-memory layout only)."""
        return self.layout.kind(parts) is PathKind.KEPT

    def is_block_path(self, parts: tuple[str, ...]) -> bool:
        """Whether a file at `parts` is meant as a block file: one (`PathKind.BLOCK`), or a
        name the server would read as a block whose label cannot be shown (`REFUSED`: making
        it fails, `location_at`). Scratch and kept files are not (layout.py)."""
        return self.layout.kind(parts) in (PathKind.BLOCK, PathKind.REFUSED)

    @staticmethod
    def shows(node: Node, block_id: str) -> bool:
        """Whether `node` is still a linked block file for `block_id` (or for a block not
        created yet): state may change while a server call is awaited."""
        return (node.parent != 0 and node.kind is Kind.BLOCK
                and (node.block is None or node.block.id == block_id))

    def size(self, node: Node) -> int:
        """Bytes of the file as stored (not counting any open block handle's unsent
        writes)."""
        if node.kind is Kind.SCRATCH:
            return self.scratch.size(node.inode)
        return len(node.content)

    def read(self, node: Node, offset: int, size: int) -> bytes:
        """Bytes of a non-block file (scratch, kept, symlink target, `.git`) at `offset`."""
        if node.kind is Kind.SCRATCH:
            return self.scratch.read(node.inode, offset, size)
        return bytes(node.content[offset:offset + size])

    def memory_filesystem_node(self) -> Node | None:
        """The attached `memory_filesystem` block's file, when the agent has one."""
        parts = self.path_of(Location(True, MEMORY_FILESYSTEM_LABEL))
        node = self._node_at(parts) if parts is not None else None
        return node if node is not None and node.block is not None else None

    def _node_at(self, parts: tuple[str, ...]) -> Node | None:
        node: Node | None = self.tree.root
        for name in parts:
            node = self.tree.child(node, name) if node is not None else None
        return node

    # -- the server's side -------------------------------------------------------------------

    def load(self, attached: list[Block], owned: list[Block], listed_at: float,
             committed: dict[str, bytes],
             recovered: list[tuple] = ()) -> None:
        """Build the tree from the first listing; record the difference from `committed` (the
        history's files at its head) so the next snapshot makes history equal the tree.
        Nothing is mounted yet, so the kernel is not told.

        recovered: the local changes a daemon that crashed recorded but never committed
        (Snapshotter.recover). Rejected edits among them are recorded again as they were; a
        file whose content on the server is what a local change made is recorded as LOCAL
        (the person's edit, first), everything else as SERVER. Kept files (`_load_kept`) are
        the history's, with the recovered changes to them on top (LOCAL)."""
        shown: list[tuple[str, bytes | None, Origin]] = []
        record, self._record = self._record, lambda *change: shown.append(change)
        try:
            self._apply(attached, owned, listed_at, [])
            self._load_kept(committed, recovered)
        finally:
            self._record = record
        changes = {path: content for path, content, _origin in shown}
        changes.update({path: None for path in committed.keys() - self.tree.files().keys()})
        mine: dict[str, bytes | None] = {}
        for path, content, origin, *why in recovered:
            if origin is Origin.REJECTED:
                self._record(path, content, Origin.REJECTED, why[0] if why else None)
            else:
                mine[path] = content
        local = {p for p, c in changes.items() if p in mine and mine[p] == c}
        for path in sorted(local):
            self._record(path, changes[path], Origin.LOCAL)
        for path, content in changes.items():
            if path not in local:
                self._record(path, content, Origin.SERVER)

    def _load_kept(self, committed: dict[str, bytes], recovered: list[tuple]) -> None:
        """At load: show the kept files of `committed` (the history's head), each changed as
        the `recovered` local changes (a crashed daemon's, not committed) say, in order; a
        file whose content is not `committed`'s is recorded. A path a block file or
        directory has taken is left out with a WARNING (its bytes stay in history's earlier
        commits). Not counted against KEPT_LIMIT: refusing them would lose them."""
        if not self.layout.keeps_files:
            return
        files = {p: c for p, c in committed.items() if self.is_kept_path(tuple(p.split("/")))}
        for path, content, origin, *_why in recovered:
            if origin is Origin.LOCAL and self.is_kept_path(tuple(path.split("/"))):
                files[path] = content
        for path, content in sorted(files.items()):
            if content is None:
                continue
            parts = tuple(path.split("/"))
            parent = self.tree.makedirs(parts[:-1])
            if parent is None or parts[-1] in parent.children:
                log.warning("%s: a kept file of the history cannot be shown (a block file or "
                            "directory has its path); it stays in the history's earlier "
                            "commits", path)
                continue
            self._set_kept(self.tree.add(Kind.KEPT, parent, parts[-1]), content)
            if committed.get(path) != content:
                self._record(path, content, Origin.LOCAL)

    async def reconcile(self, attached: list[Block], owned: list[Block], listed_at: float
                        ) -> None:
        """Make the tree show `attached` (under system/) and `owned` minus attached (at the
        root): changed values and metadata, blocks created, deleted, attached, detached or
        relabelled. Each change is recorded (origin SERVER) and the kernel's cache of it
        invalidated. listed_at: when the listing started (trio clock). Blocks whose files are
        in their grace period stay hidden."""
        changed: list[int] = []
        self._apply(attached, owned, listed_at, changed)
        for inode in changed:
            await self.invalidator.inode(inode)

    async def reconcile_attached(self, attached: list[Block], left: list[Block],
                                 listed_at: float) -> None:
        """Apply a listing of the attached blocks alone (the poller's frequent one): blocks
        attached, changed or relabelled under system/ are shown as in `reconcile`; a block
        shown under system/ that is missing from `attached` moves to the root when it is in
        `left` (read again since it left the listing, and still owned), else leaves the mount.
        Files at the root are otherwise left to the full listing. listed_at: when the
        listing started (trio clock)."""
        changed: list[int] = []
        self._apply(attached, left, listed_at, changed, attached_only=True)
        for inode in changed:
            await self.invalidator.inode(inode)

    def left_attached(self, attached: list[Block]) -> list[Node]:
        """The block files shown under system/ whose blocks are missing from the attached
        listing `attached` (detached or deleted on the server), except those the journal pins
        or hides: the poller reads each again before `reconcile_attached`."""
        skip = {b.id for b in attached} | self.hidden() | self.pinned()
        return [n for n in self._shown_attached() if n.block.id not in skip]

    def _shown_attached(self) -> list[Node]:
        """The block files of attached blocks: a walk of the layout's `attached_dir` alone
        (classic: `system/`, where the few attached blocks are while the root may hold
        thousands; git memory: the whole tree, every block being attached)."""
        top = self._node_at(self.layout.attached_dir)
        if top is None:
            return []
        return [n for n in self.tree.walk(top) if n.kind is Kind.BLOCK
                and n.block is not None and self.tree.block_node(n.block.id) is n]

    def _desired(self, attached: list[Block], owned: list[Block], hidden: set[str],
                 journaled: set[str]) -> dict[str, tuple[tuple[str, ...], Block]]:
        """Where each listed block would show: block id -> (path parts, block). Left out: the
        `hidden` blocks, and a block that carries the create marker of a provisional block
        in `journaled` (its create is replayed: the block is that file's, half made by an
        attempt whose answer was lost, not a file of its own), and a detached block where
        the layout shows none (git memory)."""
        attached_ids = {b.id for b in attached}
        markers = {create_marker(i) for i in journaled if is_provisional(i)}
        desired = {}
        detached = owned if self.layout.shows_detached else []
        for block, is_attached in [(b, True) for b in attached] + [
                (b, False) for b in detached if b.id not in attached_ids]:
            if block.id in hidden or block.id in desired or markers.intersection(block.tags):
                continue
            parts = self.path_of(Location(is_attached, block.label))
            if parts is None:
                self._warn_once(block.id, f"block {block.id}: label {block.label!r} cannot be "
                                          f"shown as a file; left out")
                continue
            desired[block.id] = (parts, block)
        return desired

    def _apply(self, attached: list[Block], owned: list[Block], listed_at: float,
               changed: list[int], attached_only: bool = False) -> None:
        hidden = self.hidden()  # unlinked here, not retired yet
        pinned = self.pinned()  # the journal's version is shown until it is replayed
        desired = self._desired(attached, owned, hidden, hidden | pinned)
        kept = hidden | pinned
        if not attached_only:  # the full listing sees every block one path could show
            self._note_duplicates(desired)
        # an attached listing says nothing of the root's files: the full listing judges those
        for node in self._shown_attached() if attached_only else self.tree.blocks():
            if node.block.id not in desired and node.block.id not in kept:
                self._gone_on_server(node)
        moves = _Moves(desired, pinned)
        for block_id, (parts, block) in desired.items():
            node = self.tree.block_node(block_id)
            if node is None:
                self._new_on_server(parts, block, listed_at)
                continue
            if block_id in pinned:
                continue  # shown as the journal makes it (moved, written) until replayed
            if self.tree.parts(node) != parts and not self._moved_on_server(node, parts, moves):
                continue
            if self.tree.bind(node, block, listed_at):
                changed.append(node.inode)
                self._record(self.tree.path(node), bytes(node.content), Origin.SERVER)
        self._place_aside(moves)

    def _gone_on_server(self, node: Node) -> None:
        """The block file `node` leaves the mount: its block was deleted or detached."""
        path = self.tree.path(node)
        self._gone[node.inode] = path
        self._remove(node, notify=True)
        self._record(path, None, Origin.SERVER)
        log.info("%s: gone on the server (deleted or detached)", path)

    def _new_on_server(self, parts: tuple[str, ...], block: Block, listed_at: float) -> None:
        """Show `block`, new to the mount, at `parts` (not while that path is taken)."""
        parent = self._free_parent(parts, block.id)
        if parent is None:
            return
        node = self.tree.add(Kind.BLOCK, parent, parts[-1])
        self.invalidator.entry(parent.inode, parts[-1])
        self.tree.bind(node, block, listed_at)
        self._record(self.tree.path(node), bytes(node.content), Origin.SERVER)
        log.info("%s: new on the server", self.tree.path(node))

    def _moved_on_server(self, node: Node, parts: tuple[str, ...], moves: _Moves) -> bool:
        """Move the block file `node` to `parts` (relabelled, attached or detached on the
        server); False when that path is taken (it stays where it is until it is free). A file
        at `parts` that moves away in this same listing (labels swapped: `a` <-> `b`) is first
        set aside (`moves`), so both get where they belong."""
        aside = moves.aside.pop(node.inode, None)  # its removal is recorded already
        old_path = aside or self.tree.path(node)
        old_parent, old_name = node.parent, node.name
        self._set_aside(parts, moves)
        parent = self._free_parent(parts, node.block.id)
        if parent is None:
            if aside is not None:  # set aside itself: it waits there
                moves.aside[node.inode] = aside
            return False
        self.tree.move(node, parent, parts[-1])
        self.invalidator.entry(old_parent, old_name)
        self.invalidator.entry(parent.inode, parts[-1])
        if aside is None:
            self._record(old_path, None, Origin.SERVER)
        self._record(self.tree.path(node), bytes(node.content), Origin.SERVER)
        log.info("%s: moved on the server to %s", old_path, self.tree.path(node))
        return True

    def _set_aside(self, parts: tuple[str, ...], moves: _Moves) -> None:
        """If the block file at `parts` is one this listing moves elsewhere, take it off its
        path (to a name no lookup can ask for: `_apply` runs with no checkpoint, so no
        operation sees it) until its own turn."""
        parent = self.tree.makedirs(parts[:-1])
        inode = parent.children.get(parts[-1]) if parent is not None else None
        node = self.tree.node(inode) if inode is not None else None
        if node is None or not moves.leaving(node, self.tree.parts(node)):
            return
        path = moves.aside[node.inode] = self.tree.path(node)
        self.invalidator.entry(node.parent, node.name)
        self.tree.move(node, self.tree.root, f"\0aside-{node.inode}")
        self._record(path, None, Origin.SERVER)  # before another file's text is recorded there

    def _place_aside(self, moves: _Moves) -> None:
        """Place the files set aside whose turn came before they were (their path was taken
        then): where the listing puts them, else back where they were; a file that can go
        to neither leaves the mount (its block stays on the server) with a WARNING."""
        for inode, path in list(moves.aside.items()):
            node = self.tree.node(inode)
            parts, _block = moves.desired[node.block.id]
            if self._moved_on_server(node, parts, moves):
                continue
            moves.aside.pop(inode, None)
            back = tuple(path.split("/"))
            parent = self.tree.makedirs(back[:-1])
            if parent is not None and back[-1] not in parent.children:
                self.tree.move(node, parent, back[-1])
                self.invalidator.entry(parent.inode, back[-1])
                self._record(path, bytes(node.content), Origin.SERVER)
                continue
            log.warning("%s: its block %s moved on the server to %s, which is taken, and "
                        "its own path is taken too; not shown until one is free", path,
                        node.block.id, "/".join(parts))
            self._gone[node.inode] = path
            self._remove(node, notify=True)  # its removal was recorded when it was set aside

    def _note_duplicates(self, desired: dict[str, tuple[tuple[str, ...], Block]]) -> None:
        """Keep `duplicates` (path -> the ids of the blocks that would show there, oldest
        first) for paths more than one of the agent's blocks would take: left by an earlier
        memfuse, or made through the API. The mount shows one; `memfuse status` lists all."""
        by_path: dict[str, list[str]] = {}
        for block_id, (parts, _block) in desired.items():
            by_path.setdefault("/".join(parts), []).append(block_id)
        found = {path: sorted(ids) for path, ids in by_path.items() if len(ids) > 1}
        for path, ids in found.items():
            if self.duplicates.get(path) != ids:
                log.warning("%s: %d blocks of the agent have this path (%s); one is shown, "
                            "`memfuse status` says which", path, len(ids), ", ".join(ids))
        self.duplicates = found

    def shown_at(self, path: str) -> str | None:
        """The id of the block the file at `path` shows, or None."""
        node = self._node_at(tuple(path.split("/")))
        return node.block.id if node is not None and node.block is not None else None

    def _free_parent(self, parts: tuple[str, ...], block_id: str) -> Node | None:
        parent = self.tree.makedirs(parts[:-1])
        if parent is None or parts[-1] in parent.children:
            self._warn_once(block_id, f"block {block_id}: {'/'.join(parts)} is taken in the "
                                      f"mount; not shown there until it is free")
            return None
        return parent

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def refreshed(self, node: Node, block: Block, read_at: float) -> bool:
        """A read of `block` that started at `read_at` (trio clock) came back: the node shows
        it, unless the node changed meanwhile, already shows a newer view, or is pinned by the
        journal. Recorded (SERVER) when the content changed; returns whether it did. The kernel
        drops its pages at open, so nothing is invalidated."""
        if (not self.shows(node, block.id) or block.id in self.pinned()
                or not self.tree.bind(node, block, read_at)):
            return False
        self._record(self.tree.path(node), bytes(node.content), Origin.SERVER)
        return True

    # -- local changes the server accepted --------------------------------------------------

    def written(self, node: Node, block: Block, origin: Origin = Origin.LOCAL) -> bool:
        """A write of `node`'s file was accepted; `block` is the server's answer. Recorded even
        when unchanged (after an unlink + re-create history must see the file back). Returns
        False, recording nothing, when the node was unlinked or replaced while the call was in
        flight: the server has the write, the mount does not show that block any more."""
        if not self.shows(node, block.id):
            log.info("%s: removed while its write was in flight", node.name)
            return False
        self._bind_written(node, block)
        self._record(self.tree.path(node), bytes(node.content), origin)
        return True

    def _bind_written(self, node: Node, block: Block) -> None:
        """Show the block a local write made: mtime and ctime move to now, unless the program
        gave the mtime with utimens after its last write (`tar -x`, `cp -a`: write, futimens,
        close): then that mtime stays."""
        given = node.mtime_ns if node.mtime_given else None
        if self.tree.bind(node, block, trio.current_time()) and given is not None:
            node.mtime_ns, node.mtime_given = given, True

    def journaled(self, node: Node, view: Block, content: bytes, base: Block) -> None:
        """A write the server could not take: journal it (durable when this returns) and show
        `view` (the block as the write makes it) at `node`, recorded as a local edit. base:
        the server's block the write was made on. Raises FsError (ENOSPC, EDQUOT, EIO:
        journal_error) when the journal cannot be written (then nothing changed)."""
        self.journal_write(view, self.tree.path(node), content, base)
        self._bind_written(node, view)
        self._record(self.tree.path(node), bytes(node.content), Origin.LOCAL)

    def journal_write(self, block: Block, path: str, content: bytes, base: Block) -> None:
        """Journal a write of the file `content` to `block` at `path`, made on the server's
        `base`, before the tree shows it (`renamed` over a block file). Raises FsError
        (journal_error)."""
        assert self.journal is not None
        self._journal(lambda: self.journal.add(block, path, content, base))

    def journal_create(self, block_id: str, path: str, location: Location,
                       content: bytes) -> None:
        """Journal the create of a new block `block_id` (provisional) at `location` with the
        file `content`, before the tree shows it (`written`, `renamed`). Raises FsError
        (journal_error) when the journal cannot be written."""
        assert self.journal is not None
        self._journal(lambda: self.journal.add_create(block_id, path, location, content))

    def journal_relocations(self, moves: list[tuple[Node, Location]]) -> None:
        """Renames the server could not take now: journal each block file's move to its new
        location (one append) before the tree changes (`renamed`, `dir_renamed`). Raises
        FsError (journal_error) when the journal cannot be written."""
        assert self.journal is not None
        self._journal(lambda: self.journal.add_relocations(
            (node.block.id, self.tree.path(node), self.location(node), location)
            for node, location in moves))

    def show_journal(self) -> None:
        """At mount: every block with journaled changes is shown as they make it (pinned): its
        writes applied, moved where its renames put it, a block created through the journal
        added. A block the server no longer lists is left out (the replay finds out what
        happened to it); so is a change whose path is taken."""
        if self.journal is None:
            return
        hidden, groups = self.hidden(), {}
        for entry in self.journal.pending():
            groups.setdefault(entry.block_id, []).append(entry)
        for block_id, entries in groups.items():
            node = self.tree.block_node(block_id)
            if block_id in hidden or (node is None and entries[0].kind != CREATE):
                continue
            block = node.block if node is not None else None
            location = self.location(node) if node is not None else None
            for entry in entries:
                if entry.kind == CREATE:
                    block = Block(block_id, entry.to.label, "", blockfile.DEFAULT_LIMIT)
                if entry.kind in (CREATE, WRITE):
                    block = blockfile.applied(block, blockfile.parse(entry.content))
                if entry.kind in (CREATE, RELOCATE):
                    location = entry.to
                    block = dataclasses.replace(block, label=entry.to.label)
            self._show(node, block, location)

    def _show(self, node: Node | None, block: Block, location: Location) -> None:
        parts = self.path_of(location)
        old = self.tree.path(node) if node is not None else None
        if parts is None:
            return
        if node is None or self.tree.parts(node) != parts:
            parent = self._free_parent(parts, block.id)
            if parent is None:
                return
            if node is None:
                node = self.tree.add(Kind.BLOCK, parent, parts[-1])
            else:
                self.tree.move(node, parent, parts[-1])
                self._record(old, None, Origin.LOCAL)
        self.tree.bind(node, block, trio.current_time())
        self._record(self.tree.path(node), bytes(node.content), Origin.LOCAL)

    def replayed(self, entries: list[Entry], block: Block | None, outcome: str, sent: bool,
                 recorded: bool = False) -> None:
        """A block's journaled changes `entries` (oldest first) are settled (`outcome` in
        words); block: the server's block now (None: gone from the server, or retired); sent:
        the server took them; recorded: history heard of another version of the file
        meanwhile (a conflict, a refusal). A block created through the journal takes its
        server id. When nothing is pending for the block any more the node shows the server's
        block again, recorded as a local edit when it was sent; while later changes are
        pending (journaled during the replay) the node keeps showing the last of them, and
        history hears of that again after another version. Raises FsError (journal_error)
        when the journal cannot be written: then nothing changed, and the entries stay
        pending (a replay later finds them on the server)."""
        assert self.journal is not None
        last = entries[-1]
        created = block is not None and block.id != last.block_id
        self._journal(lambda: self.journal.done(last, outcome, entries[:-1],
                                                block_id=block.id if created else None))
        node = self.tree.block_node(last.block_id)
        if node is None or not self.shows(node, last.block_id):
            return
        now = trio.current_time()
        if created:
            listed = self.tree.block_node(block.id)
            if listed is not None and listed is not node:
                # the block was listed as a file of its own (its marker gone: the LabelTaken
                # of a create whose earlier attempt completed): it is this file's block,
                # shown where the person put it
                path = self.tree.path(listed)
                self._remove(listed, notify=True)
                self._record(path, None, Origin.LOCAL)
            self.tree.bind(node, dataclasses.replace(node.block, id=block.id), now)
        if node.block.id in self.pinned():
            if recorded:  # later changes still shown: history hears of the shown file again
                self._record(self.tree.path(node), bytes(node.content), Origin.LOCAL)
            return
        if block is None:
            return  # the server's version is unknown: the next poll shows it
        if self.tree.bind(node, block, now) or sent or recorded:
            self._record(self.tree.path(node), bytes(node.content),
                         Origin.LOCAL if sent else Origin.SERVER)

    def refused(self, path: str, made: Block, reason: str | None = None) -> None:
        """Journaled changes the server refused for good (their block is gone, say): the file
        they made (`made`) goes to history at `path` (where the block is shown now) as a
        rejected edit, so a person can get it back with git."""
        self._record(path, blockfile.render(made), Origin.REJECTED, reason)

    def refused_unshown(self, path: str, made: Block, reason: str | None = None) -> None:
        """Journaled changes to a file the mount no longer shows, whose block was never made
        (its create was refused): the file they made (`made`) goes to history at `path` as a
        rejected edit, then `path` as the mount shows it now (another file there, or none), so
        a person can get the bytes back with git and history still equals the mount."""
        self._record(path, blockfile.render(made), Origin.REJECTED, reason)
        node: Node | None = self.tree.root
        for name in path.split("/"):
            node = self.tree.child(node, name) if node is not None else None
        shown = node is not None and node.kind is Kind.BLOCK and node.block is not None
        self._record(path, bytes(node.content) if shown else None, Origin.SERVER)

    def rejected(self, node: Node, data: bytes, made: bool = True,
                 reason: str | None = None) -> None:
        """A close of the block file `node` failed (EFBIG, EINVAL, a refusal of the server):
        the bytes `data` the program wrote go to history as a rejected edit, then the file as
        the mount still shows it, so a person can get them back with git and history still
        equals the mount. A new file whose block was never made (no block, or made=False: a
        journaled create the server refused) leaves the mount (it would be a file neither the
        server nor the journal knows); an open handle keeps it as scratch."""
        path = self.tree.path(node)
        self._record(path, data, Origin.REJECTED, reason)
        if node.block is not None and made:
            self._record(path, bytes(node.content), Origin.SERVER)
            return
        self._record(path, None, Origin.SERVER)
        self._remove(node, notify=True)
        log.warning("%s: its block could not be made; the file is removed (its bytes are in "
                    "history as a rejected edit)", path)

    def conflict(self, path: str, theirs: Block, rejected: blockfile.ParsedFile | None = None,
                 node: Node | None = None, reason: str = "the server changed first") -> None:
        """A write met a newer server version `theirs`: that version goes to history first.
        rejected: the refused file (`--on-conflict reject`), recorded as REJECTED (rendered as
        the block it would have made) and followed by `theirs` again, which `node` (the file,
        if any) then shows."""
        server = blockfile.render(theirs)
        self._record(path, server, Origin.SERVER)
        if rejected is None:
            return
        self._record(path, blockfile.render(blockfile.applied(theirs, rejected)), Origin.REJECTED,
                     reason)
        if node is not None and self.shows(node, theirs.id):
            self.tree.bind(node, theirs, trio.current_time())
        self._record(path, server, Origin.SERVER)

    def create(self, parent: Node, name: str) -> Node:
        """A new file `name` in `parent`: a block file with no block yet, empty (its first
        flush makes its block, or takes back the one unlinked at its path within the grace
        period: `claim`); a kept path (git-memory layout) an empty kept file, recorded at its
        first close; any other name is an empty scratch file. Raises FsError: EEXIST,
        EINVAL (a `*.md` name whose path cannot be a label)."""
        if name in parent.children:
            raise FsError(errno.EEXIST, "file exists")
        parts = (self.tree.parts(parent) or ()) + (name,)
        if self.is_kept_path(parts):
            return self.tree.add(Kind.KEPT, parent, name)
        if not self.is_block_path(parts):
            return self.tree.add(Kind.SCRATCH, parent, name)
        self.location_at(parts)
        return self.tree.add(Kind.BLOCK, parent, name)

    def claim(self, node: Node) -> Tombstone | None:
        """The first flush of the new block file `node`: take back the block unlinked at its
        path within the grace period (vim, `git checkout`: one PATCH of the same block), or
        None. Not at create: until that flush the new file is empty, as POSIX has it (a `touch`
        after `rm` must not show the old text), and it has no block, so every other operation
        on it waits for its first flush (ordering.NameOrder). Raises FsError
        (journal_error)."""
        parts = self.tree.parts(node)
        if parts is None or self.graveyard.peek(parts) is None:
            return None
        self._claim_entry(parts)
        tomb = self.graveyard.claim(parts)
        log.info("%s: re-created within the grace period: same block %s", tomb.path,
                 tomb.block.id)
        return tomb

    def unclaim(self, tomb: Tombstone) -> None:
        """A first flush that claimed `tomb` (`claim`) failed: its block waits out a grace
        period again, with its unlink journaled again, so it is still retired. Raises FsError
        (journal_error)."""
        entry = None
        if self.journal is not None:
            entry = self._journal(lambda: self.journal.add_unlink(
                tomb.block.id, tomb.path, Location(tomb.attached, tomb.block.label)))
        self.graveyard.bury(tomb.parts, tomb.block, tomb.attached, entry)

    def mkdir(self, parent: Node, name: str) -> Node:
        """A directory (a label prefix, kept by the daemon). Raises FsError(EEXIST)."""
        if name in parent.children:
            raise FsError(errno.EEXIST, "file exists")
        return self.tree.add(Kind.DIR, parent, name)

    def symlink(self, parent: Node, name: str, target: bytes) -> Node:
        """A symbolic link kept by the daemon. Raises FsError(EEXIST)."""
        if name in parent.children:
            raise FsError(errno.EEXIST, "file exists")
        return self.tree.add(Kind.SYMLINK, parent, name, content=target, mode=0o777)

    def _claim_entry(self, parts: tuple[str, ...]) -> None:
        """A file appears at `parts`: the journaled unlink of a tombstone there is settled
        first (the tombstone itself is claimed by the caller). Raises FsError
        (journal_error)."""
        tomb = self.graveyard.peek(parts)
        if tomb is not None and tomb.entry is not None and self.journal is not None:
            self._journal(lambda: self.journal.done(
                tomb.entry, "claimed back: a file appeared at its path within the grace period"))
            tomb.entry = None

    def bury(self, node: Node) -> None:
        """The linked block file `node` becomes a scratch file with the same bytes; its block
        (if sent) is gone from history at this path and retired after the grace period unless
        a file claims it back. With a journal the unlink is journaled first (a crash in the
        grace period still retires the block at the next mount). Raises FsError
        (journal_error) when the journal cannot be written (then nothing changed)."""
        parts = self.tree.parts(node)
        assert parts is not None
        location = (self.layout.location_at(parts)
                    or Location(not self.layout.shows_detached, "/".join(parts)))
        entry = None
        if node.block is not None and self.journal is not None:
            entry = self._journal(lambda: self.journal.add_unlink(node.block.id, "/".join(parts),
                                                                  location))
        block, content = self.tree.unbind(node)
        self.scratch.adopt(node.inode, content)
        if block is not None:
            self.graveyard.bury(parts, block, location.attached, entry)
            self._record("/".join(parts), None, Origin.LOCAL)

    def retired(self, entry: Entry | None, outcome: str) -> None:
        """An unlinked file's block was retired (or found gone, or refused for good): its
        journaled unlink is settled. Raises FsError (journal_error) when the journal cannot be
        written."""
        if entry is not None and self.journal is not None:
            self._journal(lambda: self.journal.done(entry, outcome))

    def queue_unlink(self, entry: Entry) -> None:
        """The retirement of an unlinked file's block cannot be made now: its journaled unlink
        waits for the server (replayed with the block's other changes)."""
        assert self.journal is not None
        self.journal.queue(entry)

    def unlink(self, node: Node) -> None:
        """Remove a file (a block file is buried first) or an empty directory. A kept file's
        removal is recorded, durable (`_keep`: raises FsError when it cannot be, the file
        being gone already)."""
        if node.kind is Kind.BLOCK:
            self.bury(node)
        path = self.tree.path(node) if node.kind is Kind.KEPT else None
        self._remove(node, notify=False)
        if path is not None:
            self._keep(path, None)

    def _remove(self, node: Node, notify: bool) -> None:
        """Take `node` out of the mount without history or tombstone (callers record)."""
        parent, name = node.parent, node.name
        if node.kind is Kind.BLOCK:
            _block, content = self.tree.unbind(node)  # a handle still open now writes scratch
            self.scratch.adopt(node.inode, content)
        if node.kind is Kind.KEPT:  # its bytes stay with the node while a handle holds it
            self.kept_used -= len(node.content)
        if self.tree.unlink(node):
            self.scratch.drop(node.inode)
            self._gone.pop(node.inode, None)
        if notify:
            self.invalidator.entry(parent, name)

    def gone(self, node: Node) -> str | None:
        """The path `node` had when the server deleted its block (or detached it from an agent
        that no longer owns it) while a handle held the file open; None otherwise."""
        return self._gone.get(node.inode)

    def lost_block(self, node: Node, data: bytes) -> None:
        """A close of a file whose block left the server while it was open (`gone`): the bytes
        `data` the program wrote go to history at the path the file had, as a rejected edit,
        and the path is gone again (history equals the tree)."""
        path = self._gone[node.inode]
        self._record(path, data, Origin.REJECTED, "its block was deleted on the server")
        self._record(path, None, Origin.SERVER)

    def renamed(self, src: Node, new_parent: Node, new_name: str, *, shows: Block | None,
                bury_source: bool, bury_target: bool = False) -> None:
        """Move the file `src` to `new_name` in `new_parent` once the server accepted what that
        means (namespace.Namespace.rename decides). A file at the target is replaced (its block,
        if any, is not retired: the target path keeps it or `shows` replaces it); a tombstone
        at the target is claimed. bury_source: a block file `src` becomes scratch and its block
        (if any) is retired (a scratch name, or a rename over another block); else its old
        path leaves history. shows: the block
        the moved file shows (recorded at its new path), None for a scratch target or a block
        file not sent yet. bury_target: `src` is a new block file not sent yet; the target's
        block (a block file's, or a tombstone's) waits in the graveyard for its first flush
        to claim it."""
        new_parts = (self.tree.parts(new_parent) or ()) + (new_name,)
        dst = self.tree.child(new_parent, new_name)
        kept = shows is None and self._kept_target(src, dst, new_parts)  # may refuse: first
        if src.kind is Kind.BLOCK and bury_source:
            self.bury(src)  # first: it may fail (EIO) before anything changed
        if bury_target and dst is not None and dst.kind is Kind.BLOCK and dst.block is not None:
            self.bury(dst)
        elif not bury_target:
            self._claim_entry(new_parts)
            self.graveyard.claim(new_parts)
        if src.kind is Kind.BLOCK and not bury_source and src.block is not None:
            self._record(self.tree.path(src), None, Origin.LOCAL)
        old_kept = self.tree.path(src) if src.kind is Kind.KEPT else None
        dst_kept = dst is not None and dst.kind is Kind.KEPT
        if dst is not None:
            self._remove(dst, notify=False)
        self._convert(src, kept, block=shows is not None)
        self.tree.move(src, new_parent, new_name)
        if shows is not None:
            times = src.atime_ns, src.mtime_ns
            self.tree.bind(src, shows, trio.current_time())
            # the file is the source's inode: it keeps the source's times (rsync sets them on
            # its temporary file, then renames it onto the block)
            src.atime_ns, src.mtime_ns = times
            self._record(self.tree.path(src), bytes(src.content), Origin.LOCAL)
        if old_kept is not None:
            self._keep(old_kept, None)
        if kept or dst_kept:  # a kept file there now, or none any more
            self._keep("/".join(new_parts), bytes(src.content) if kept else None)

    def _kept_target(self, src: Node, dst: Node | None, new_parts: tuple[str, ...]) -> bool:
        """Whether the file `src`, renamed to `new_parts` (over `dst`) with no block to show,
        is a kept file there. Raises FsError (EFBIG, ENOSPC: `_kept_room`) when its bytes
        would pass the caps, before anything changed."""
        if src.kind not in (Kind.BLOCK, Kind.SCRATCH, Kind.KEPT) or not self.is_kept_path(
                new_parts):
            return False
        size = self.scratch.size(src.inode) if src.kind is Kind.SCRATCH else len(src.content)
        freed = len(src.content) if src.kind is Kind.KEPT else 0
        if dst is not None and dst.kind is Kind.KEPT and dst is not src:
            freed += len(dst.content)
        self._kept_room(size, self.kept_used - freed)
        return True

    def _convert(self, node: Node, kept: bool, block: bool) -> None:
        """A renamed file takes the kind its new path gives: a block file's (`block`: the
        server took it; its bytes are rendered from the block next), a kept file's (`kept`),
        else a scratch file's; a block file not buried stays one."""
        if block and node.kind in (Kind.SCRATCH, Kind.KEPT):
            self._unkeep(node)
            self.scratch.drop(node.inode)
            node.kind = Kind.BLOCK
        elif kept and node.kind is Kind.SCRATCH:
            data = self.scratch.drop(node.inode)
            node.kind, node.content = Kind.KEPT, b""
            self._set_kept(node, data)
        elif not kept and not block and node.kind is Kind.KEPT:
            data = self._unkeep(node)
            node.kind = Kind.SCRATCH
            self.scratch.adopt(node.inode, data)

    def _unkeep(self, node: Node) -> bytes:
        """Take a kept file's bytes out of the node (and out of `kept_used`); returns them.
        Nothing for a node of another kind."""
        if node.kind is not Kind.KEPT:
            return b""
        data, node.content = bytes(node.content), b""
        if node.parent:
            self.kept_used -= len(data)
        return data

    # -- kept files (the git-memory layout: in history, never sent) ----------------------------

    def _kept_room(self, size: int, others: int) -> None:
        """Refuse a kept file of `size` bytes beside `others` bytes of other kept files:
        FsError EFBIG past KEPT_FILE_LIMIT, ENOSPC past KEPT_LIMIT in all."""
        if size > KEPT_FILE_LIMIT:
            raise FsError(errno.EFBIG, f"a file that is no block is kept in history up to "
                                       f"{KEPT_FILE_LIMIT >> 20} MiB ({KEPT_FILE_LIMIT} bytes)")
        if others + size > KEPT_LIMIT:
            raise FsError(errno.ENOSPC, f"files that are no block are kept in history up to "
                                        f"{KEPT_LIMIT >> 20} MiB in all ({KEPT_LIMIT} bytes)")

    def _set_kept(self, node: Node, data: bytes) -> None:
        """The kept file `node` holds `data` now (mtime and ctime move)."""
        if node.parent:
            self.kept_used += len(data) - len(node.content)
        node.content = data
        node.touch()

    def _keep(self, path: str, content: bytes | None) -> None:
        """Record a kept file's change (None: gone) as the person's, durable: it is in the
        record of uncommitted changes, fsync'd, when this returns (history.Snapshotter.record),
        and committed with the next snapshot. Raises FsError (kept_error) when that record
        cannot be written; the change is made and pending all the same."""
        try:
            self._record(path, content, Origin.LOCAL, durable=True)
        except OSError as exc:
            raise kept_error(exc) from None

    def kept_saved(self, node: Node) -> None:
        """A close, fsync or truncate of the kept file `node`: its bytes go to history, durable
        (`_keep`). Nothing for a file unlinked meanwhile or no longer kept. Raises FsError
        (kept_error)."""
        parts = self.tree.parts(node)
        if parts is not None and node.kind is Kind.KEPT:
            self._keep("/".join(parts), bytes(node.content))

    def dir_renamed(self, src: Node, new_parent: Node, new_name: str,
                    relocated: list[tuple[Node, str, Block]]) -> None:
        """Move the directory `src` (an empty directory at the target is replaced) once the
        server relabelled every block below; relocated: (node, old path, block as the server
        has it now) of each. The kept files below move too, recorded (durable: raises FsError,
        kept_error, once everything moved)."""
        dst = self.tree.child(new_parent, new_name)
        if dst is not None:
            self._remove(dst, notify=False)
        kept = [(node, self.tree.path(node)) for node in self.tree.walk(src)
                if node.kind is Kind.KEPT]
        self.tree.move(src, new_parent, new_name)
        for node, old_path, block in relocated:
            self._record(old_path, None, Origin.LOCAL)
            self.tree.bind(node, block, trio.current_time())
            self._record(self.tree.path(node), bytes(node.content), Origin.LOCAL)
        for node, old_path in kept:  # the namespace checked that each stays a kept file
            self._keep(old_path, None)
            self._keep(self.tree.path(node), bytes(node.content))

    # -- the bytes of scratch and kept files, and attributes -----------------------------------

    def local_write(self, node: Node, offset: int, buf: bytes) -> None:
        """Write `buf` at `offset` into a scratch or kept file (a gap is NUL bytes); a kept
        file's change is recorded at its close (`kept_saved`). Raises FsError: ENOSPC past
        the scratch limit; EFBIG, ENOSPC past a kept file's caps (`_kept_room`), the file
        unchanged."""
        if node.kind is not Kind.KEPT:
            self.scratch.write(node.inode, offset, buf)
            node.touch()
            return
        data = bytearray(node.content)
        if offset > len(data):
            self._kept_room(offset + len(buf), self._kept_others(node))
            data.extend(b"\0" * (offset - len(data)))
        data[offset:offset + len(buf)] = buf
        if len(data) > len(node.content):
            self._kept_room(len(data), self._kept_others(node))
        self._set_kept(node, bytes(data))

    def local_truncate(self, node: Node, size: int) -> None:
        """Resize a scratch or kept file (bytes; NUL bytes when it grows). Raises FsError as
        `local_write`."""
        if node.kind is not Kind.KEPT:
            self.scratch.truncate(node.inode, size)
            node.touch()
            return
        if size > len(node.content):
            self._kept_room(size, self._kept_others(node))
        self._set_kept(node, bytes(node.content[:size]).ljust(size, b"\0"))

    def local_replace(self, node: Node, data: bytes) -> None:
        """A handle opened on a block file that became a scratch or kept file meanwhile was
        flushed: its bytes become the file's (a kept file's recorded: `kept_saved`). Raises
        FsError: ENOSPC past the scratch limit, EFBIG or ENOSPC past the kept caps, and
        kept_error's."""
        if node.kind is not Kind.KEPT:
            self.scratch.put(node.inode, data)
            node.touch()
            return
        self._kept_room(len(data), self._kept_others(node))
        self._set_kept(node, data)
        self.kept_saved(node)

    def _kept_others(self, node: Node) -> int:
        """Bytes of the linked kept files but `node` (an unlinked one counts for none)."""
        return self.kept_used - len(node.content) if node.parent else 0

    def set_mode(self, node: Node, mode: int) -> None:
        """chmod: `mode`'s permission bits (mode & 0o7777) are the node's, kept in the daemon
        (and across mounts: fileattrs.py); nothing is sent, the server has no modes. ctime
        moves. Raises FsError(EPERM) for a read-only block and the `.git` file: they stay
        0444 whatever chmod asks; a symbolic link has no mode of its own (0777) and keeps it."""
        if node.read_only:
            raise FsError(errno.EPERM, "a read-only file stays 0444")
        if node.kind is Kind.SYMLINK:
            return
        node.mode = mode & 0o7777
        node.changed()
        self._attributes_changed(node)

    def set_times(self, node: Node, atime_ns: int | None, mtime_ns: int | None) -> None:
        """utimens: the node's atime and/or mtime (nanoseconds since the epoch; None: left as
        it is), kept in the daemon (and across mounts: fileattrs.py); nothing is sent. ctime
        moves. A given mtime holds through the close of writes made before it (`_bind_written`)
        until the next write (`wrote`) or server change."""
        if atime_ns is not None:
            node.atime_ns = atime_ns
        if mtime_ns is not None:
            node.mtime_ns, node.mtime_given = mtime_ns, True
        node.changed()
        self._attributes_changed(node)

    def owner_changed(self, node: Node) -> None:
        """chown: accepted and not kept (every file belongs to the mounting user); ctime
        moves, as for any change of metadata."""
        node.changed()
        self._attributes_changed(node)

    def _attributes_changed(self, node: Node) -> None:
        if node.kind in KEEPS_ATTRS:  # what fileattrs keeps
            self.on_attributes()

    def wrote(self, node: Node) -> None:
        """A program changed the bytes of `node` through an open file (write, ftruncate,
        O_TRUNC), to be sent at close: an mtime given by utimens before no longer holds."""
        node.mtime_given = False

    # -- times and modes across mounts (fileattrs.py) -----------------------------------------

    def attrs(self) -> dict[str, fileattrs.Attrs]:
        """Path -> mode and times of every block file, kept file, directory and the `.git`
        file the mount shows (root: ""); scratch files and links are gone at unmount and left
        out."""
        found: dict[str, fileattrs.Attrs] = {}
        stack = [(self.tree.root, "")]
        while stack:
            node, path = stack.pop()
            found[path] = fileattrs.Attrs(node.mode, node.atime_ns, node.mtime_ns,
                                          node.ctime_ns)
            if node.kind is Kind.DIR:
                for name, inode in node.children.items():
                    child = self.tree.node(inode)
                    if child.kind in KEEPS_ATTRS:
                        stack.append((child, f"{path}/{name}" if path else name))
        return found

    def restore_attrs(self, kept: dict[str, fileattrs.Attrs], committed: dict[str, bytes]
                      ) -> int:
        """At mount, after `load`: what an earlier mount kept (`kept`, path -> Attrs) comes
        back. Every file and directory still there gets its mode (a read-only block stays
        0444); its times come back when nothing changed while it was not mounted: a block
        file whose content is `committed`'s (the history's head, which the times describe),
        a directory whose entries are those the head's paths make. Anything else the mount
        saw change now, and keeps the times of now. Returns how many nodes got their times
        back."""
        shown = self.tree.files()
        before, after = _entries(committed), _entries(shown)
        restored = 0
        stack = [(self.tree.root, "")]
        while stack:
            node, path = stack.pop()
            if node.kind is Kind.DIR:
                stack.extend((self.tree.node(i), f"{path}/{n}" if path else n)
                             for n, i in node.children.items())
            attrs = kept.get(path)
            if attrs is None or node.kind not in KEEPS_ATTRS:
                continue
            if not node.read_only:
                node.mode = attrs.mode & 0o7777
            same = (before.get(path, set()) == after.get(path, set()) if node.kind is Kind.DIR
                    else node.kind is Kind.GITFILE or committed.get(path) == shown.get(path))
            if same:
                node.atime_ns, node.mtime_ns, node.ctime_ns = (attrs.atime_ns, attrs.mtime_ns,
                                                               attrs.ctime_ns)
                restored += 1
        return restored

    # -- the kernel's references ---------------------------------------------------------------

    # -- a git push served by the mount (mountgit.py) --------------------------------------------

    def shown_blocks(self) -> dict[str, tuple[Block, bool]]:
        """Path -> (block, attached) of every block file the mount shows: what a push is
        judged against (gitpush.plan's `live`)."""
        return {self.tree.path(node): (node.block, self.location(node).attached)
                for node in self.tree.blocks() if node.block is not None}

    def expect_pushed(self, blocks: dict[str, Block], changes: dict[str, bytes | None]) -> None:
        """A push put `changes` (path -> bytes) on the server as `blocks` (path -> the block
        the server answered): the next `bind` of each block shows the pushed bytes, not its
        rendering, when they say exactly what it is (Tree.pushed)."""
        for path, block in blocks.items():
            if changes.get(path) is not None:
                self.tree.pushed[block.id] = changes[path]

    async def show_pushed(self, changes: dict[str, bytes | None]) -> None:
        """After a push and the listing that shows its blocks: a block whose pushed bytes no
        listing bound (its block did not change: only the file's form did) shows them now;
        the kept files of `changes` (path -> bytes, None: removed) are shown as pushed. Each
        change is recorded (SERVER: the branch holds it already, so it makes no commit) and
        the kernel's cache of it dropped."""
        changed: list[int] = []
        for block_id in list(self.tree.pushed):
            node = self.tree.block_node(block_id)
            if node is not None and node.block is not None and self.tree.bind(
                    node, node.block, trio.current_time()):
                self._record(self.tree.path(node), bytes(node.content), Origin.SERVER)
                changed.append(node.inode)
        self.tree.pushed.clear()
        for path, data in sorted(changes.items()):
            parts = tuple(path.split("/"))
            if self.is_kept_path(parts):
                changed += self._pushed_kept(parts, data)
        for inode in changed:
            await self.invalidator.inode(inode)

    def _pushed_kept(self, parts: tuple[str, ...], data: bytes | None) -> list[int]:
        """Show the kept file at `parts` as a push left it (None: removed); returns the inode
        whose content changed. A path a block file or directory has taken is left out with a
        WARNING (the branch holds the file)."""
        path, node = "/".join(parts), self._node_at(parts)
        if data is None:
            if node is not None and node.kind is Kind.KEPT:
                self._remove(node, notify=True)
                self._record(path, None, Origin.SERVER)
            return []
        missing = [d for d in range(1, len(parts)) if self._node_at(parts[:d]) is None]
        parent = self.tree.makedirs(parts[:-1])
        if parent is not None:
            for depth in missing:  # a new directory: the kernel may hold a negative entry
                self.invalidator.entry(self._node_at(parts[:depth - 1]).inode, parts[depth - 1])
        if parent is None or (node is not None and node.kind is not Kind.KEPT):
            log.warning("%s: a pushed file cannot be shown (a block file or directory has its "
                        "path); the history holds it", path)
            return []
        if node is None:
            node = self.tree.add(Kind.KEPT, parent, parts[-1])
            self.invalidator.entry(parent.inode, parts[-1])
        elif node.content == data:
            return []
        self._set_kept(node, data)
        self._record(path, data, Origin.SERVER)
        return [node.inode]

    def looked_up(self, node: Node) -> None:
        """The kernel got an entry for `node` (lookup, create, mkdir, symlink, readdirplus)."""
        self.tree.looked_up(node)

    def forget(self, inode: int, count: int) -> None:
        """FUSE forget: an unlinked node with no lookups left is gone, with its scratch bytes."""
        if self.tree.forget(inode, count):
            self.scratch.drop(inode)
            self._gone.pop(inode, None)


def _entries(paths) -> dict[str, set[str]]:
    """Directory path -> the names in it that `paths` (block file paths) make ("" the root)."""
    found: dict[str, set[str]] = {}
    for path in paths:
        parts = path.split("/")
        for depth in range(len(parts)):
            found.setdefault("/".join(parts[:depth]), set()).add(parts[depth])
    return found
