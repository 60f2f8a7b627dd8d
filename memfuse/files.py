"""Block file contents both ways: revalidate on open, send a flushed file.

An `open` of a block file re-reads its block when the cached copy is older than the revalidation
window (close-to-open consistency); a flushed file becomes one PATCH of its block (or the block
is created); a conflict with a newer server version is settled by the policy and both versions
go to history. The server is called through remote.Remote, every change lands through
state.MountState: flush -> BlockFiles.send -> Remote.update (PATCH) -> MountState.written
(tree and history).
"""
from __future__ import annotations

import logging

import trio

from . import blockfile
from .letta import LettaError, NotFound
from .model import Block
from .remote import Remote, Stale
from .state import MountState
from .tree import Node

log = logging.getLogger("memfuse.files")


class BlockFiles:
    """The contents of one mount's block files.

    revalidate: seconds a cached block is trusted before `open` asks the server again.
    `last_conflict`: the last conflict, in words (for `memfuse status`).
    """

    def __init__(self, state: MountState, remote: Remote, *, revalidate: float):
        self.state, self.remote, self.tree = state, remote, state.tree
        self.revalidate_after = revalidate
        self.last_conflict: str | None = None

    def _fresh(self, node: Node) -> bool:
        return (node.block is None
                or trio.current_time() - node.checked_at < self.revalidate_after)

    async def revalidate(self, node: Node) -> None:
        """Refresh `node` from `GET /v1/blocks/{id}` when its copy is older than the window.

        When the server cannot be reached the cached copy keeps being served (logged).
        """
        if self._fresh(node):
            return
        async with self.remote.lock(node.block.id):
            if self._fresh(node):  # another open refreshed it while this one waited
                return
            started = trio.current_time()
            try:
                block = await self.remote.fetch(node.block.id)
            except NotFound:
                log.warning("%s: block %s is gone from the server; serving the last copy",
                            self.tree.path(node), node.block.id)
                return
            except LettaError as exc:
                log.warning("%s: could not revalidate (%s); serving the cached copy",
                            self.tree.path(node), exc)
                return
            self.state.refreshed(node, block, started)

    async def send(self, node: Node, data: bytes, base: Block | None = None) -> None:
        """Make the block file `node` say what the bytes `data` say (a flushed file): update
        its block, or create one when the node has none yet; the node then shows the result
        (history records it). base: the block as the writer read it (conflict detection).
        Raises FsError (see `write` and Remote.create); on Stale the node shows the server's
        block."""
        location = self.state.location(node) if node.block is None else None
        parsed = blockfile.parse(data)
        if location is not None:
            block = await self.remote.create(location, parsed)
            log.info("%s: created block %s", self.tree.path(node), block.id)
        else:
            block = await self.write(node.block, parsed, self.tree.path(node), base, node)
        self.state.written(node, block)

    async def write(self, block: Block, parsed: blockfile.ParsedFile, path: str,
                    base: Block | None = None, node: Node | None = None) -> Block:
        """Update `block` (shown at `path`, by `node` if any) to what `parsed` says; returns the
        block as the server has it. A conflict (the server changed since `base`) commits the
        server's version first; `reject` then records the refused file and raises Stale (the
        node shows the server's block). Raises FsError as Remote.update does."""
        try:
            written = await self.remote.update(block, parsed, base)
        except Stale as exc:
            self.state.conflict(path, exc.theirs, rejected=parsed, node=node)
            self.last_conflict = (f"{path}: changed on the server after it was opened; the "
                                  f"write was rejected (both versions are in history)")
            log.warning("%s", self.last_conflict)
            raise
        if written.theirs is not None:
            self.state.conflict(path, written.theirs)
            self.last_conflict = (f"{path}: changed on the server after it was opened; the "
                                  f"file's version was written over it (both versions are in "
                                  f"history)")
            log.warning("%s", self.last_conflict)
        if written.fields:
            log.info("%s: wrote %s", path, ", ".join(written.fields))
        return written.block
