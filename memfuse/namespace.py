"""Namespace operations and what they mean for blocks: create, unlink, rename, mkdir, rmdir,
symlink (SEMANTICS.md, "Namespace"), and the retirement of unlinked blocks.

Each operation checks what may be done, asks the server first (remote.Remote) and then changes
the mount through state.MountState, so the mount only shows what the server accepted. Unlinking
a block file removes it at once and retires its block after a grace period (grace.py), which
makes editors' save patterns one update of the same block. A real delete costs a 2 s delay on
the server, never a wrong guess: the block's content history is kept and the block is never
deleted.
"""
from __future__ import annotations

import errno
import logging

import pyfuse3

from . import blockfile
from .errors import FsError
from .files import BlockFiles
from .model import GITFILE_NAME, Block, Location
from .remote import Remote
from .state import MountState
from .tree import Kind, Node

log = logging.getLogger("memfuse.namespace")


class Namespace:
    """The namespace operations of one mount (`state`, server calls through `remote`, block
    updates through `files`)."""

    def __init__(self, state: MountState, remote: Remote, files: BlockFiles):
        self.state, self.remote, self.files, self.tree = state, remote, files, state.tree

    async def _settled_child(self, parent: Node, name: str) -> Node | None:
        """The entry `name` in `parent` once no create of its block is under way (None when
        there is no such entry)."""
        while (node := self.tree.child(parent, name)) is not None and \
                self.files.order.busy(node.inode):
            await self.files.order.settled(node.inode)
        return node

    def _protected(self, node: Node) -> bool:
        return node is self.tree.system or node.kind is Kind.GITFILE

    # -- operations ----------------------------------------------------------------------------

    def create(self, parent: Node, name: str) -> Node:
        """A new file (MountState.create). Raises FsError: EEXIST, EINVAL."""
        log.debug("create %s/%s", self.tree.path(parent), name)
        return self.state.create(parent, name)

    def mkdir(self, parent: Node, name: str) -> Node:
        """A directory: only a label prefix, kept by the daemon. Raises FsError: EEXIST, EINVAL
        for `.git` in any case (git refuses paths through one, so its blocks could never be
        committed)."""
        if name.casefold() == GITFILE_NAME and name not in parent.children:
            raise FsError(errno.EINVAL, "a directory called .git would break the history")
        return self.state.mkdir(parent, name)

    def symlink(self, parent: Node, name: str, target: bytes) -> Node:
        """A symbolic link, scratch only (emacs lock files). Raises FsError: EEXIST, EPERM for
        a block file's path."""
        parts = (self.tree.parts(parent) or ()) + (name,)
        if self.state.is_block_path(parts) and name not in parent.children:
            raise FsError(errno.EPERM, "a block file cannot be a symbolic link")
        return self.state.symlink(parent, name, target)

    async def unlink(self, parent: Node, name: str) -> None:
        """Remove a file, after its block's create if one is under way (ordering.NameOrder). A
        block file's block is retired after the grace period. Raises FsError: ENOENT, EISDIR,
        EPERM (`.git`), EACCES (read-only block)."""
        node = await self._settled_child(parent, name)
        if node is None:
            raise FsError(errno.ENOENT, "no such file")
        log.debug("unlink %s", self.tree.path(node))
        if node.kind is Kind.DIR:
            raise FsError(errno.EISDIR, "is a directory")
        if self._protected(node):
            raise FsError(errno.EPERM, "the .git file belongs to memfuse")
        if node.read_only:
            raise FsError(errno.EACCES, "the block is read-only")
        self.state.unlink(node)

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
        self.state.unlink(node)

    async def rename(self, parent: Node, name: str, new_parent: Node, new_name: str,
                     flags: int) -> None:
        """Rename, with the block effects of SEMANTICS.md. The server is changed first; the
        mount only when the server accepted. Raises FsError: ENOENT, EINVAL (RENAME_EXCHANGE,
        an invalid label, a directory into itself), EEXIST (RENAME_NOREPLACE), EISDIR, ENOTDIR,
        ENOTEMPTY, EPERM (`system/`, `.git`), EACCES (read-only), or what the server raises."""
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        while True:  # after the creates of both names, if under way (ordering.NameOrder)
            src = await self._settled_child(parent, name)
            if src is None:
                raise FsError(errno.ENOENT, "no such file")
            dst = await self._settled_child(new_parent, new_name)
            if self.tree.child(parent, name) is not src or self.files.order.busy(src.inode):
                continue
            # held while the server changes: no create of either name starts meanwhile
            files = [n.inode for n in (src, dst) if n is not None and n.kind is not Kind.DIR]
            async with self.files.order.holding(files):
                if (self.tree.child(parent, name) is src
                        and self.tree.child(new_parent, new_name) is dst):
                    await self._rename(src, new_parent, new_name, dst, flags)
                    return

    async def _rename(self, src: Node, new_parent: Node, new_name: str, dst: Node | None,
                      flags: int) -> None:
        """The rename of `src` to `new_name` in `new_parent` (over `dst`, if any), no create
        of either under way (see `rename`)."""
        log.debug("rename %s -> %s/%s", self.tree.path(src), self.tree.path(new_parent), new_name)
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
        elif self.state.is_block_path((self.tree.parts(new_parent) or ()) + (new_name,)):
            await self._rename_to_block(src, new_parent, new_name, dst)
        else:
            self.state.renamed(src, new_parent, new_name, shows=None, bury_source=True)

    async def _rename_to_block(self, src: Node, new_parent: Node, new_name: str,
                               dst: Node | None) -> None:
        if src.kind is Kind.SYMLINK:
            raise FsError(errno.EPERM, "a symbolic link cannot become a block file")
        new_parts = (self.tree.parts(new_parent) or ()) + (new_name,)
        location = self.state.location_at(new_parts)
        target = dst.block if dst is not None and dst.block is not None else None
        if target is None:  # a retirement under way there ends first; a tombstone left is
            await self.state.graveyard.quiet(new_parts)  # kept until `renamed` claims it
            tomb = self.state.graveyard.peek(new_parts)
            target = tomb.block if tomb is not None else None
        with self.state.graveyard.holding(new_parts):
            await self._replace(src, new_parent, new_name, dst, new_parts, location, target)

    async def _replace(self, src: Node, new_parent: Node, new_name: str, dst: Node | None,
                       new_parts: tuple[str, ...], location: Location,
                       target: Block | None) -> None:
        """The rest of `_rename_to_block`: `target` is the block at the new path (its file's,
        or a tombstone's, held), or None."""
        result: Block | None
        unsent = src.kind is Kind.BLOCK and src.block is None
        if target is not None and unsent:
            # a new file not sent yet: the target's block waits in the graveyard and its first
            # flush takes it (state.claim); meanwhile the file shows its own bytes, not the
            # target's text
            result = None
        elif target is not None:
            # Replacing a block file (sed -i, atomic savers, rename over): the target block takes
            # the source's content; the source's own block, if any, is retired.
            if src.block is not None:  # a close of the source under way ends first: the
                async with self.files.writing(src.block.id):  # target takes its bytes
                    result = await self.files.write_now(
                        target, blockfile.parse(self._content(src)), "/".join(new_parts),
                        base=target)
            else:
                result = await self.files.write_now(
                    target, blockfile.parse(self._content(src)), "/".join(new_parts),
                    base=target)
        elif src.block is not None:
            result = await self.files.relocate(src, location)
        elif src.kind in (Kind.SCRATCH, Kind.KEPT):  # its bytes become a new block
            content = self._content(src)
            result = await self.files.create(location, blockfile.parse(content), content,
                                             "/".join(new_parts))
        else:
            result = None  # a new block file not sent yet: it is created at its first flush
        self.state.renamed(src, new_parent, new_name, shows=result,
                           bury_source=target is not None and src.block is not None,
                           bury_target=unsent)

    def _content(self, node: Node) -> bytes:
        """The bytes of a file: a scratch file's in the store, any other's in the node."""
        if node.kind is Kind.SCRATCH:
            return self.state.scratch.content(node.inode)
        return bytes(node.content)

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
        async with self.files.order.moving([n.inode for n in self.tree.walk(src)]):
            await self._move_dir(src, new_parent, new_name)

    async def _move_dir(self, src: Node, new_parent: Node, new_name: str) -> None:
        """Relabel every block below the directory `src`, then move it (no create under way:
        `_rename_dir` holds NameOrder.moving)."""
        moves = self._dir_moves(src, (self.tree.parts(new_parent) or ()) + (new_name,))
        done: list[tuple[Node, str, Block, Location, Location]] = []
        try:
            for node, path, was, location in moves:
                block = await self.files.relocate(node, location)
                done.append((node, path, block, location, was))
        except FsError:
            for node, path, block, location, was in reversed(done):
                try:  # put the ones already moved back
                    await self.remote.relocate(block, location.attached, was)
                except FsError as exc:
                    log.error("%s: could not undo a partial directory rename: %s", path,
                              exc.reason)
            raise
        self.state.dir_renamed(src, new_parent, new_name,
                               [(node, path, block) for node, path, block, *_ in done])

    def _dir_moves(self, src: Node, new_parts: tuple[str, ...]
                   ) -> list[tuple[Node, str, Location, Location]]:
        """(node, old path, old location, new location) of each block file below the
        directory `src` moved to `new_parts`. Raises FsError before anything changed: EACCES
        (a read-only block below), EINVAL or ENAMETOOLONG (a block whose new path cannot be
        its file), EXDEV (a kept file whose new path would be no kept file: a block path or
        a scratch name; `mv` then copies and removes file by file, and each file takes the
        kind of its new path)."""
        old_parts = self.tree.parts(src) or ()
        moves = []
        for node in self.tree.walk(src):
            if node.read_only:
                raise FsError(errno.EACCES, f"{self.tree.path(node)} is read-only and cannot be "
                                            f"renamed")
            rel = (self.tree.parts(node) or ())[len(old_parts):]
            if node.kind is Kind.KEPT and not self.state.is_kept_path(new_parts + rel):
                raise FsError(errno.EXDEV, f"{self.tree.path(node)} would be no kept file at "
                                           f"{'/'.join(new_parts + rel)}")
            if node.kind is Kind.BLOCK and node.block is not None:
                moves.append((node, "/".join(old_parts + rel), self.state.location(node),
                              self.state.location_at(new_parts + rel)))
        return moves

    # -- retiring ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Retire blocks whose grace period ended, forever (cancel to stop): BlockFiles.retire,
        which journals what the server cannot take."""
        await self.state.graveyard.run(self.files.retire)

    async def retire_all(self) -> None:
        """Retire every pending block now (at unmount)."""
        await self.state.graveyard.retire_all(self.files.retire)
