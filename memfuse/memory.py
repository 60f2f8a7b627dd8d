"""The agent's memory as the mount serves it: the tree kept in step with the Letta server.

This is where file contents meet the API: loading the blocks at mount, revalidating a block when a
file is opened (close-to-open consistency), sending a flushed file as one PATCH (or creating its
block), relabelling and attaching/detaching on rename, and retiring a block on unlink. Every
change it makes to a block file is reported to history with its origin.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
from typing import Any, Callable

import trio

from . import blockfile
from .errors import FsError, from_letta
from .history import Origin
from .letta import Block, LettaClient, LettaError, NotFound
from .tree import Kind, Node, Tree

log = logging.getLogger("memfuse.memory")

Recorder = Callable[[str, "bytes | None", Origin], None]
CONFLICT_POLICIES = ("overwrite", "reject")


class Stale(FsError):
    """A write was rejected because the server changed the block after the file was opened
    (`--on-conflict reject`); `current` is the server's block."""

    def __init__(self, reason: str, current: Block):
        super().__init__(errno.ESTALE, reason)
        self.current = current


def block_location(parts: tuple[str, ...]) -> tuple[bool, str]:
    """(attached, label) of a block file at path `parts`. Raises FsError(EINVAL) when the path
    cannot be a block file."""
    where = Tree.location(parts)
    if where is None:
        raise FsError(errno.EINVAL, f"{'/'.join(parts)} cannot be a block file (its label "
                                    f"would be invalid)")
    return where


def _content(block: Block) -> tuple:
    return block.value, block.description, block.limit


class AgentMemory:
    """Blocks of one agent, cached in `tree`, read and written through `client`.

    revalidate: seconds a cached block is trusted before `open` asks the server again.
    record: called as record(path, content, origin) after each change to a block file (content
    None: the file is gone).
    """

    def __init__(self, client: LettaClient, agent_id: str, tree: Tree, *, revalidate: float,
                 record: Recorder, on_conflict: str = "overwrite"):
        self.client, self.agent_id, self.tree = client, agent_id, tree
        self.owner_tag = f"owner:{agent_id}"
        self.revalidate_after = revalidate
        self.record = record
        self.on_conflict = on_conflict
        self.last_conflict: str | None = None
        # Server calls that change state: `in_flight` now, `generation` ever. The poller drops a
        # listing that raced one of them, so it never undoes a local change it has not seen.
        self.in_flight = 0
        self.generation = 0
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
        if node.block is None or trio.current_time() - node.checked_at < self.revalidate_after:
            return
        async with self._lock(node.block.id):
            if node.block is None or trio.current_time() - node.checked_at < self.revalidate_after:
                return
            started = trio.current_time()
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
            if self._shows(node, block.id) and self.tree.bind(node, block, started):
                self.record(self.tree.path(node), bytes(node.content), Origin.SERVER)

    @staticmethod
    def _shows(node: Node, block_id: str) -> bool:
        """Whether `node` is still a linked block file for `block_id` (or for a block not
        created yet): state may change while a server call is awaited."""
        return (node.parent != 0 and node.kind is Kind.BLOCK
                and (node.block is None or node.block.id == block_id))

    def where(self, node: Node) -> tuple[bool, str]:
        """(attached, label) that the node's path gives its block. Raises FsError(EINVAL)."""
        parts = self.tree.parts(node)
        if parts is None:
            raise FsError(errno.EINVAL, f"{node.name} was removed: it holds no block")
        return block_location(parts)

    async def send(self, node: Node, data: bytes, base: Block | None = None) -> None:
        """Make the block file `node` say what the bytes `data` say (a flushed file): `update`
        its block, or `create` one when the node has none yet; bind the node to the result and
        record the change. base: the block as the writer read it (conflict detection). Raises
        FsError as `update` and `create` do; on Stale the node shows the server's block."""
        parsed = blockfile.parse(data)
        if node.block is None:
            attached, label = self.where(node)
            block = await self.create(attached, label, parsed)
            log.info("%s: created block %s", self.tree.path(node), block.id)
        else:
            try:
                block = await self.update(node.block, parsed, self.tree.path(node), base)
            except Stale as exc:
                if self._shows(node, exc.current.id):
                    self.tree.bind(node, exc.current, trio.current_time())
                raise
        if not self._shows(node, block.id):
            # Unlinked or replaced while the server call was in flight: the server has the
            # write, but the file no longer shows that block, so neither does history.
            log.info("%s: removed while its write was in flight", node.name)
            return
        self.tree.bind(node, block, trio.current_time())
        # Recorded even when unchanged: after an unlink + re-create the history must see it back.
        self.record(self.tree.path(node), bytes(node.content), Origin.LOCAL)

    async def update(self, block: Block, parsed: blockfile.ParsedFile, path: str,
                     base: Block | None = None) -> Block:
        """One `PATCH /v1/blocks/{id}` with the fields `parsed` changes (none: no call); returns
        the block as the server has it now.

        base: the block as the writer read it. Then the server's block is read first
        (`GET /v1/blocks/{id}`); if it changed since (value, description or limit), that is a
        conflict: the server's version is recorded to history first, and then either the file
        wins (`overwrite`, the default; fields are planned against the server's version) or the
        write is refused (`reject`: Stale/ESTALE, the refused version recorded too).

        Raises FsError: EINVAL (read_only changed), EFBIG (value over the limit, in characters),
        EACCES (read-only block), ESTALE (Stale), or the errno of a server refusal
        (errors.from_letta). Content that is refused never reaches the server.
        """
        if block.read_only:
            raise FsError(errno.EACCES, "block is read-only")
        async with self._lock(block.id):
            if base is not None:
                block = await self._check_conflict(base, parsed, path)
            changes = blockfile.plan_update(block, parsed)
            if not changes:
                return block
            updated = await self._call(self.client.update_block(block.id, **changes))
        log.info("%s: wrote %s", path, ", ".join(sorted(changes)))
        return updated

    async def _check_conflict(self, base: Block, parsed: blockfile.ParsedFile, path: str
                              ) -> Block:
        try:
            current = await self.client.get_block(base.id)
        except LettaError as exc:
            raise from_letta(exc) from None
        if _content(current) == _content(base):
            return current
        blockfile.plan_update(current, parsed)  # a refused file is refused, conflict or not
        self.record(path, blockfile.render(current), Origin.SERVER)
        if self.on_conflict == "reject":
            fields = {k: v for k, v in parsed.fields.items() if k in ("description", "limit")}
            mine = dataclasses.replace(current, value=parsed.value, **fields)
            self.record(path, blockfile.render(mine), Origin.REJECTED)
            self.record(path, blockfile.render(current), Origin.SERVER)
            self.last_conflict = (f"{path}: changed on the server after it was opened; the "
                                  f"write was rejected (both versions are in history)")
            log.warning("%s", self.last_conflict)
            raise Stale("changed on the server after it was opened (--on-conflict reject); "
                        "both versions are in history", current)
        self.last_conflict = (f"{path}: changed on the server after it was opened; the file's "
                              f"version was written over it (both versions are in history)")
        log.warning("%s", self.last_conflict)
        return current

    async def create(self, attached: bool, label: str, parsed: blockfile.ParsedFile) -> Block:
        """A new block for a new file: `POST /v1/blocks/` tagged `owner:<agent>`, then attach it
        when `attached`. A file without frontmatter gets `Memory block: <label>` and limit
        20000. Raises FsError: EINVAL (read_only set), EFBIG, EEXIST (an attached block has the
        label), or the errno of a server refusal."""
        if parsed.fields.get("read_only"):
            raise FsError(errno.EINVAL, "read_only cannot be set from a file")
        limit = parsed.fields.get("limit", blockfile.DEFAULT_LIMIT)
        if len(parsed.value) > limit:
            raise FsError(errno.EFBIG, f"value is {len(parsed.value)} characters, over the "
                                       f"limit of {limit}")
        description = parsed.fields.get("description") or f"Memory block: {label}"
        block = await self._call(self.client.create_block(
            label=label, value=parsed.value, description=description, limit=limit,
            tags=[self.owner_tag]))
        if attached:
            await self._call(self.client.attach_block(self.agent_id, block.id))
        return block

    async def relocate(self, block: Block, was_attached: bool, attached: bool, label: str
                       ) -> Block:
        """Give `block` a new label and attachment (a rename): PATCH `label`, attach or detach.
        A block moved to the root keeps (or gets) the owner tag, so it stays visible. Returns the
        block as the server has it now. Raises FsError."""
        async with self._lock(block.id):
            fields: dict[str, Any] = {}
            if label != block.label:
                fields["label"] = label
            if not attached and self.owner_tag not in block.tags:
                fields["tags"] = [*block.tags, self.owner_tag]
            if fields:
                block = await self._call(self.client.update_block(block.id, **fields))
            if attached and not was_attached:
                await self._call(self.client.attach_block(self.agent_id, block.id))
            elif was_attached and not attached:
                await self._call(self.client.detach_block(self.agent_id, block.id))
        return block

    async def retire(self, block: Block, attached: bool, path: str) -> None:
        """What unlinking a block file means on the server: detach it (when attached) and drop
        the owner tag. The block itself is never deleted. Raises FsError."""
        async with self._lock(block.id):
            try:
                current = await self.client.get_block(block.id)
            except NotFound:
                return
            except LettaError as exc:
                raise from_letta(exc) from None
            if attached:
                await self._call(self.client.detach_block(self.agent_id, block.id))
            if self.owner_tag in current.tags:
                tags = [t for t in current.tags if t != self.owner_tag]
                await self._call(self.client.update_block(block.id, tags=tags))
        log.info("%s: block %s %s", path, block.id,
                 "detached and untagged" if attached else "untagged")

    async def set_value(self, node: Node, value: str) -> None:
        """Write a block memfuse itself keeps (memory_filesystem): one PATCH of the value, no
        checks; failures are logged, not raised (the next refresh retries)."""
        try:
            async with self._lock(node.block.id):
                block = await self._call(self.client.update_block(node.block.id, value=value))
        except FsError as exc:
            log.warning("%s: could not update: %s", self.tree.path(node), exc.reason)
            return
        log.debug("%s: kept up to date (%d lines)", self.tree.path(node), value.count("\n") + 1)
        if self.tree.bind(node, block, trio.current_time()):
            self.record(self.tree.path(node), bytes(node.content), Origin.LOCAL)

    async def _call(self, coro):
        """Await a state-changing server call; LettaError becomes FsError."""
        self.in_flight += 1
        try:
            return await coro
        except LettaError as exc:
            raise from_letta(exc) from None
        finally:
            self.in_flight -= 1
            self.generation += 1

    def _lock(self, block_id: str) -> trio.Lock:
        return self._locks.setdefault(block_id, trio.Lock())
