"""Namespace operations and what they mean for blocks: create, unlink, rename, mkdir, rmdir,
symlink (SEMANTICS.md, "Namespace").

Editors save in ways that look like deleting a file: vim and emacs rename `x.md` away to a backup
and write a new `x.md`; `git checkout` unlinks and re-creates it. So unlinking a block file (or
renaming it to a scratch name) removes it from the mount at once but *retires* its block on the
server (detach, drop the owner tag) only after a grace period. When a file of the same path
appears within it, by create or rename, it is bound to that same block and its content becomes
one update: same block id, no detach, no new block. A real delete costs a 2 s delay on the server,
never a wrong guess: either way the block's content history is kept and the block never deleted.
"""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import pyfuse3
import trio

from . import blockfile
from .errors import FsError
from .history import Origin
from .letta import Block
from .memory import AgentMemory, block_location
from .tree import Kind, Node, is_block_name

log = logging.getLogger("memfuse.namespace")

UNLINK_GRACE = 2.0  # seconds between unlinking a block file and retiring its block
RETIRE_RETRIES = 5


@dataclass
class Tombstone:
    """A block whose file was unlinked; retired on the server at `deadline` (trio clock)."""

    block: Block
    attached: bool
    path: str
    deadline: float
    tries: int = 0


class Namespace:
    """The namespace operations of one mount over `memory` (its tree and server calls)."""

    def __init__(self, memory: AgentMemory, *, grace: float = UNLINK_GRACE):
        self.memory = memory
        self.tree = memory.tree
        self.grace = grace
        self._tombstones: dict[tuple[str, ...], Tombstone] = {}
        self._wakeup = trio.Event()

    # -- helpers -------------------------------------------------------------------------------

    def _protected(self, node: Node) -> bool:
        return node is self.tree.system or node.kind is Kind.GITFILE

    def _record(self, path: str, content: bytes | None) -> None:
        self.memory.record(path, content, Origin.LOCAL)

    def _bury(self, node: Node) -> None:
        """Turn the block file `node` (still linked) into scratch and schedule its block's
        retirement at its current path."""
        parts = self.tree.parts(node)
        assert parts is not None
        attached = self.tree.location(parts) is not None and parts[0] == "system"
        block = self.tree.unbind(node)
        if block is not None:
            path = "/".join(parts)
            self._tombstones[parts] = Tombstone(block, attached, path,
                                                trio.current_time() + self.grace)
            self._record(path, None)
            self._wakeup.set()

    def _claim(self, parts: tuple[str, ...]) -> Tombstone | None:
        return self._tombstones.pop(parts, None)

    def pending_block_ids(self) -> set[str]:
        """Blocks whose files were unlinked and that are not retired yet."""
        return {t.block.id for t in self._tombstones.values()}

    # -- operations ----------------------------------------------------------------------------

    def create(self, parent: Node, name: str) -> Node:
        """A new file. A block name gives a block file with no block yet (it is created when the
        file is first flushed), or bound to the block unlinked at this path within the grace
        period. Any other name is a scratch file. Raises FsError: EEXIST, EINVAL (a `*.md`
        name whose path cannot be a label)."""
        if name in parent.children:
            raise FsError(errno.EEXIST, "file exists")
        parts = (self.tree.parts(parent) or ()) + (name,)
        log.debug("create %s", "/".join(parts))
        if not is_block_name(name):
            return self.tree.add(Kind.SCRATCH, parent, name, content=bytearray())
        block_location(parts)
        node = self.tree.add(Kind.BLOCK, parent, name)
        tomb = self._claim(parts)
        if tomb is not None:
            self.tree.bind(node, tomb.block, trio.current_time())
            log.info("%s: re-created within the grace period: same block %s", tomb.path,
                     tomb.block.id)
        return node

    def mkdir(self, parent: Node, name: str) -> Node:
        """A directory: only a label prefix, kept by the daemon. Raises FsError(EEXIST)."""
        if name in parent.children:
            raise FsError(errno.EEXIST, "file exists")
        return self.tree.add(Kind.DIR, parent, name)

    def symlink(self, parent: Node, name: str, target: bytes) -> Node:
        """A symbolic link, scratch only (emacs lock files). Raises FsError: EEXIST, EPERM for
        a block name."""
        if name in parent.children:
            raise FsError(errno.EEXIST, "file exists")
        if is_block_name(name):
            raise FsError(errno.EPERM, "a block file cannot be a symbolic link")
        return self.tree.add(Kind.SYMLINK, parent, name, content=target, mode=0o777)

    def unlink(self, parent: Node, name: str) -> None:
        """Remove a file. A block file's block is retired after the grace period. Raises
        FsError: ENOENT, EISDIR, EPERM (`.git`)."""
        node = self.tree.child(parent, name)
        if node is None:
            raise FsError(errno.ENOENT, "no such file")
        log.debug("unlink %s", self.tree.path(node))
        if node.kind is Kind.DIR:
            raise FsError(errno.EISDIR, "is a directory")
        if self._protected(node):
            raise FsError(errno.EPERM, "the .git file belongs to memfuse")
        if node.read_only:
            raise FsError(errno.EACCES, "the block is read-only")
        if node.kind is Kind.BLOCK:
            self._bury(node)
        self.tree.unlink(node)

    def rmdir(self, parent: Node, name: str) -> None:
        """Remove an empty directory. Raises FsError: ENOENT, ENOTDIR, ENOTEMPTY, EPERM."""
        node = self.tree.child(parent, name)
        if node is None:
            raise FsError(errno.ENOENT, "no such directory")
        if node.kind is not Kind.DIR:
            raise FsError(errno.ENOTDIR, "not a directory")
        if self._protected(node):
            raise FsError(errno.EPERM, "system/ holds the attached blocks and cannot be removed")
        if node.children:
            raise FsError(errno.ENOTEMPTY, "directory not empty")
        self.tree.unlink(node)

    async def rename(self, parent: Node, name: str, new_parent: Node, new_name: str,
                     flags: int) -> None:
        """Rename, with the block effects of SEMANTICS.md. The server is changed first; the
        mount only when the server accepted. Raises FsError: ENOENT, EINVAL (RENAME_EXCHANGE,
        an invalid label, a directory into itself), EEXIST (RENAME_NOREPLACE), EISDIR, ENOTDIR,
        ENOTEMPTY, EPERM (`system/`, `.git`), or what the server call raises."""
        src = self.tree.child(parent, name)
        if src is None:
            raise FsError(errno.ENOENT, "no such file")
        log.debug("rename %s -> %s/%s", self.tree.path(src), self.tree.path(new_parent), new_name)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        dst = self.tree.child(new_parent, new_name)
        if dst is src:
            return
        if dst is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise FsError(errno.EEXIST, "target exists (RENAME_NOREPLACE)")
        if self._protected(src) or (dst is not None and self._protected(dst)):
            raise FsError(errno.EPERM, "system/ and .git cannot be renamed or replaced")
        if src.read_only or (dst is not None and dst.read_only):
            raise FsError(errno.EACCES, "a read-only block cannot be renamed or replaced")
        if src.kind is Kind.DIR:
            await self._rename_dir(src, new_parent, new_name, dst)
        elif dst is not None and dst.kind is Kind.DIR:
            raise FsError(errno.EISDIR, "target is a directory")
        elif is_block_name(new_name):
            await self._rename_to_block(src, new_parent, new_name, dst)
        else:
            if dst is not None:
                self.unlink(new_parent, new_name)
            if src.kind is Kind.BLOCK:
                self._bury(src)
            self.tree.move(src, new_parent, new_name)

    async def _rename_to_block(self, src: Node, new_parent: Node, new_name: str,
                               dst: Node | None) -> None:
        if src.kind is Kind.SYMLINK:
            raise FsError(errno.EPERM, "a symbolic link cannot become a block file")
        new_parts = (self.tree.parts(new_parent) or ()) + (new_name,)
        attached, label = block_location(new_parts)
        target = dst.block if dst is not None and dst.block is not None else None
        tomb = None if target is not None else self._tombstones.get(new_parts)
        if tomb is not None:
            target = tomb.block
        if target is not None and src.kind is Kind.BLOCK and src.block is None:
            result = target  # a new file not sent yet takes the target over; its flush sends
        elif target is not None:
            # Replacing a block file (sed -i, atomic savers, rename over): the target block takes
            # the source's content; the source's own block, if any, is retired.
            parsed = blockfile.parse(bytes(src.content))
            result = await self.memory.update(target, parsed, "/".join(new_parts), base=target)
        elif src.block is not None:
            src_parts = self.tree.parts(src)
            was_attached = bool(src_parts) and src_parts[0] == "system"
            result = await self.memory.relocate(src.block, was_attached, attached, label)
        elif src.kind is Kind.SCRATCH:
            result = await self.memory.create(attached, label, blockfile.parse(bytes(src.content)))
        else:
            result = None  # a new block file not sent yet: it is created at its first flush
        # The server accepted: now change the mount to match.
        if tomb is not None:
            self._claim(new_parts)
        if target is not None and src.block is not None:
            self._bury(src)
        elif src.block is not None:
            self._record(self.tree.path(src), None)
        if dst is not None:
            if dst.block is not None:
                self.tree.unbind(dst)
            self.tree.unlink(dst)
        self.tree.move(src, new_parent, new_name)
        if result is not None:
            self.tree.bind(src, result, trio.current_time())
            self._record(self.tree.path(src), bytes(src.content))

    async def _rename_dir(self, src: Node, new_parent: Node, new_name: str,
                          dst: Node | None) -> None:
        if dst is not None and dst.kind is not Kind.DIR:
            raise FsError(errno.ENOTDIR, "target is not a directory")
        if dst is not None and dst.children:
            raise FsError(errno.ENOTEMPTY, "target directory is not empty")
        node = new_parent
        while True:
            if node is src:
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
            if node is self.tree.root:
                break
            node = self.tree.node(node.parent)
        old_parts = self.tree.parts(src) or ()
        new_parts = (self.tree.parts(new_parent) or ()) + (new_name,)
        moves = []  # (node, old path, was_attached, attached, label)
        for node in self.tree.walk(src):
            if node.read_only:
                raise FsError(errno.EACCES, f"{self.tree.path(node)} is read-only and cannot be "
                                            f"renamed")
            if node.kind is Kind.BLOCK and node.block is not None:
                rel = self.tree.parts(node)[len(old_parts):]
                was_attached = old_parts[0] == "system"
                attached, label = block_location(new_parts + rel)
                moves.append((node, "/".join(old_parts + rel), was_attached, attached, label))
        done: list[tuple[tuple, Block]] = []
        try:
            for move in moves:
                node, _path, was_attached, attached, label = move
                done.append((move, await self.memory.relocate(node.block, was_attached, attached,
                                                              label)))
        except FsError:
            for (node, path, was_attached, attached, _label), block in reversed(done):
                try:  # put the ones already moved back
                    await self.memory.relocate(block, attached, was_attached, node.block.label)
                except FsError as exc:
                    log.error("%s: could not undo a partial directory rename: %s", path,
                              exc.reason)
            raise
        if dst is not None:
            self.tree.unlink(dst)
        self.tree.move(src, new_parent, new_name)
        for (node, old_path, *_rest), block in done:
            self._record(old_path, None)
            self.tree.bind(node, block, trio.current_time())
            self._record(self.tree.path(node), bytes(node.content))

    # -- retiring ------------------------------------------------------------------------------

    async def _retire(self, tomb: Tombstone) -> None:
        try:
            await self.memory.retire(tomb.block, tomb.attached, tomb.path)
        except FsError as exc:
            tomb.tries += 1
            if tomb.tries >= RETIRE_RETRIES:
                log.error("%s: gave up retiring block %s: %s", tomb.path, tomb.block.id,
                          exc.reason)
                return
            log.warning("%s: retiring block %s failed (%s); will retry", tomb.path,
                        tomb.block.id, exc.reason)
            tomb.deadline = trio.current_time() + self.grace * tomb.tries
            self._tombstones.setdefault(tuple(tomb.path.split("/")), tomb)

    async def run(self) -> None:
        """Retire blocks whose grace period ended, forever (cancel to stop)."""
        while True:
            if not self._tombstones:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            parts, tomb = min(self._tombstones.items(), key=lambda item: item[1].deadline)
            delay = tomb.deadline - trio.current_time()
            if delay > 0:
                with trio.move_on_after(delay):
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                continue
            if self._tombstones.get(parts) is tomb:
                del self._tombstones[parts]
                await self._retire(tomb)

    async def retire_all(self) -> None:
        """Retire every pending block now (at unmount)."""
        while self._tombstones:
            _parts, tomb = self._tombstones.popitem()
            tomb.tries = RETIRE_RETRIES - 1
            await self._retire(tomb)
