"""The agent's memory as the mount serves it: the tree kept in step with the Letta server.

This is where file contents meet the API: loading the blocks at mount, revalidating a block when a
file is opened (close-to-open consistency), and turning a flushed file into one PATCH. Every
change it makes to the tree is reported to history with its origin.
"""
from __future__ import annotations

import errno
import logging
from typing import Callable

import trio

from . import blockfile
from .errors import FsError, from_letta
from .history import Origin
from .letta import Block, LettaClient, LettaError, NotFound
from .tree import Node, Tree

log = logging.getLogger("memfuse.memory")

Recorder = Callable[[str, "bytes | None", Origin], None]


class AgentMemory:
    """Blocks of one agent, cached in `tree`, read and written through `client`.

    revalidate: seconds a cached block is trusted before `open` asks the server again.
    record: called as record(path, content, origin) after each change to a file's content.
    """

    def __init__(self, client: LettaClient, agent_id: str, tree: Tree, *, revalidate: float,
                 record: Recorder):
        self.client, self.agent_id, self.tree = client, agent_id, tree
        self.revalidate_after = revalidate
        self.record = record
        self._locks: dict[str, trio.Lock] = {}

    async def load(self) -> None:
        """List attached and owned blocks and build the tree. Raises LettaError."""
        attached = await self.client.list_attached_blocks(self.agent_id)
        owned = await self.client.list_owned_blocks(self.agent_id)
        attached_ids = {b.id for b in attached}
        detached = [b for b in owned if b.id not in attached_ids]
        self.tree.load(attached, detached, trio.current_time())

    async def revalidate(self, node: Node) -> None:
        """Refresh `node` from `GET /v1/blocks/{id}` when its copy is older than the window.

        When the server cannot be reached the cached copy keeps being served (logged).
        """
        assert node.block is not None
        if trio.current_time() - node.checked_at < self.revalidate_after:
            return
        async with self._lock(node.block.id):
            if trio.current_time() - node.checked_at < self.revalidate_after:
                return
            try:
                block = await self.client.get_block(node.block.id)
            except NotFound:
                log.warning("%s: block %s is gone from the server; serving the last copy",
                            self.tree.path(node), node.block.id)
                return
            except LettaError as exc:
                log.warning("%s: could not revalidate (%s); serving the cached copy",
                            self.tree.path(node), exc)
                return
            if self.tree.set_block(node, block, trio.current_time()):
                self.record(self.tree.path(node), node.content, Origin.SERVER)

    async def write(self, node: Node, data: bytes) -> None:
        """Make the block of `node` say what the file bytes `data` say: one PATCH, or none when
        nothing changed. Returns after the server accepted it.

        Raises FsError: EINVAL (bad frontmatter, non-UTF-8, NUL, read_only changed), EFBIG (value
        over the limit, in characters), EACCES (read-only block), or the errno of a server refusal
        (errors.from_letta). The server is not touched when the content is refused.
        """
        block = node.block
        assert block is not None
        if block.read_only:
            raise FsError(errno.EACCES, "block is read-only")
        parsed = blockfile.parse(data)
        async with self._lock(block.id):
            block = node.block
            changes = blockfile.plan_update(block, parsed)
            if not changes:
                return
            try:
                updated: Block = await self.client.update_block(block.id, **changes)
            except LettaError as exc:
                raise from_letta(exc) from None
            if self.tree.set_block(node, updated, trio.current_time()):
                self.record(self.tree.path(node), node.content, Origin.LOCAL)
            log.info("%s: wrote %s", self.tree.path(node), ", ".join(sorted(changes)))

    def _lock(self, block_id: str) -> trio.Lock:
        return self._locks.setdefault(block_id, trio.Lock())
