"""One agent's blocks on the Letta server: the calls a mount makes, as block operations.

Listing, reading, updating (with the conflict check), creating, relabelling, attaching and
detaching, retiring. Server errors become FsError (errors.from_letta). Nothing here touches the
tree or history: callers hand the blocks returned to state.MountState.
"""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any

import trio

from . import blockfile
from .errors import FsError, from_letta
from .letta import LettaClient, LettaError, NotFound
from .model import Block, Location

log = logging.getLogger("memfuse.remote")

CONFLICT_POLICIES = ("overwrite", "reject")


class Stale(FsError):
    """A write was refused because the server changed the block after the file was opened
    (`--on-conflict reject`); `theirs` is the server's block."""

    def __init__(self, reason: str, theirs: Block):
        super().__init__(errno.ESTALE, reason)
        self.theirs = theirs


@dataclass(frozen=True)
class Written:
    """An accepted update: `block` as the server has it now; `fields` the names of the fields
    sent (empty: nothing changed, no PATCH); `theirs` the newer server version the write
    replaced (a conflict under `overwrite`), None when there was no conflict."""

    block: Block
    fields: tuple[str, ...] = ()
    theirs: Block | None = None


def _content(block: Block) -> tuple:
    return block.value, block.description, block.limit


class Remote:
    """The block API calls of one mount: `client` for agent `agent_id`.

    on_conflict: `overwrite` or `reject` (CONFLICT_POLICIES). `in_flight` counts state-changing
    calls under way and `generation` those ever made: a poller drops a listing that raced one of
    them, so it never undoes a local change it has not seen. Calls for one block are serialised
    by a per-block lock.
    """

    def __init__(self, client: LettaClient, agent_id: str, *, on_conflict: str = "overwrite"):
        self.client, self.agent_id = client, agent_id
        self.owner_tag = f"owner:{agent_id}"
        self.on_conflict = on_conflict
        self.in_flight = 0
        self.generation = 0
        self._locks: dict[str, trio.Lock] = {}

    def lock(self, block_id: str) -> trio.Lock:
        """The lock that serialises calls about `block_id` (reads that revalidate take it too)."""
        return self._locks.setdefault(block_id, trio.Lock())

    async def listing(self) -> tuple[list[Block], list[Block]]:
        """(attached, owned) blocks: `GET /v1/agents/{id}/core-memory/blocks` and
        `GET /v1/blocks/?tags=owner:<id>`, both paginated. Raises LettaError."""
        attached = await self.client.list_attached_blocks(self.agent_id)
        owned = await self.client.list_owned_blocks(self.agent_id)
        return attached, owned

    async def fetch(self, block_id: str) -> Block:
        """`GET /v1/blocks/{id}`. Raises LettaError (NotFound when it is gone)."""
        return await self.client.get_block(block_id)

    async def update(self, block: Block, parsed: blockfile.ParsedFile,
                     base: Block | None = None) -> Written:
        """One `PATCH /v1/blocks/{id}` with the fields `parsed` changes (none: no call).

        base: the block as the writer read it. Then the server's block is read first
        (`GET /v1/blocks/{id}`); if it changed since (value, description or limit), that is a
        conflict: the file wins (`overwrite`; fields are planned against the server's version
        and `Written.theirs` is that version) or the write is refused (`reject`: Stale).

        Raises FsError: EACCES (read-only block), EINVAL (read_only changed), EFBIG (value over
        the limit, in characters), ESTALE (Stale), or the errno of a server refusal. Content
        that is refused never reaches the server.
        """
        if block.read_only:
            raise FsError(errno.EACCES, "block is read-only")
        theirs = None
        async with self.lock(block.id):
            if base is not None:
                current = await self._call(self.client.get_block(base.id), changes=False)
                if _content(current) != _content(base):
                    blockfile.plan_update(current, parsed)  # refused is refused, conflict or not
                    if self.on_conflict == "reject":
                        raise Stale("changed on the server after it was opened "
                                    "(--on-conflict reject); both versions are in history",
                                    current)
                    theirs = current
                block = current
            changes = blockfile.plan_update(block, parsed)
            if changes:
                block = await self._call(self.client.update_block(block.id, **changes))
        return Written(block, tuple(sorted(changes)), theirs)

    async def create(self, location: Location, parsed: blockfile.ParsedFile) -> Block:
        """A new block for a new file: `POST /v1/blocks/` tagged `owner:<agent>`, then attach it
        when `location.attached`. A file without frontmatter gets `Memory block: <label>` and
        limit 20000. Raises FsError: EINVAL (read_only set), EFBIG, EEXIST (an attached block
        has the label), or the errno of a server refusal."""
        if parsed.fields.get("read_only"):
            raise FsError(errno.EINVAL, "read_only cannot be set from a file")
        limit = parsed.fields.get("limit", blockfile.DEFAULT_LIMIT)
        if len(parsed.value) > limit:
            raise FsError(errno.EFBIG, f"value is {len(parsed.value)} characters, over the "
                                       f"limit of {limit}")
        description = parsed.fields.get("description") or f"Memory block: {location.label}"
        block = await self._call(self.client.create_block(
            label=location.label, value=parsed.value, description=description, limit=limit,
            tags=[self.owner_tag]))
        if location.attached:
            await self._call(self.client.attach_block(self.agent_id, block.id))
        return block

    async def relocate(self, block: Block, was_attached: bool, location: Location) -> Block:
        """Give `block` a new label and attachment (a rename): PATCH `label`, attach or detach.
        A block moved to the root keeps (or gets) the owner tag, so it stays visible. Returns the
        block as the server has it now. Raises FsError."""
        async with self.lock(block.id):
            fields: dict[str, Any] = {}
            if location.label != block.label:
                fields["label"] = location.label
            if not location.attached and self.owner_tag not in block.tags:
                fields["tags"] = [*block.tags, self.owner_tag]
            if fields:
                block = await self._call(self.client.update_block(block.id, **fields))
            if location.attached and not was_attached:
                await self._call(self.client.attach_block(self.agent_id, block.id))
            elif was_attached and not location.attached:
                await self._call(self.client.detach_block(self.agent_id, block.id))
        return block

    async def retire(self, block: Block, attached: bool) -> bool:
        """What unlinking a block file means on the server: detach it (when attached) and drop
        the owner tag. The block itself is never deleted. Returns False when it was already
        gone from the server. Raises FsError."""
        async with self.lock(block.id):
            try:
                current = await self.client.get_block(block.id)
            except NotFound:
                return False
            except LettaError as exc:
                raise from_letta(exc) from None
            if attached:
                await self._call(self.client.detach_block(self.agent_id, block.id))
            if self.owner_tag in current.tags:
                tags = [t for t in current.tags if t != self.owner_tag]
                await self._call(self.client.update_block(block.id, tags=tags))
        return True

    async def set_value(self, block: Block, value: str) -> Block:
        """One PATCH of a value memfuse itself keeps (memory_filesystem), no checks. Returns the
        block as stored. Raises FsError."""
        async with self.lock(block.id):
            return await self._call(self.client.update_block(block.id, value=value))

    async def _call(self, coro, changes: bool = True):
        """Await a server call; LettaError becomes FsError. changes: it changes server state
        (counted in `in_flight`/`generation`)."""
        if changes:
            self.in_flight += 1
        try:
            return await coro
        except LettaError as exc:
            raise from_letta(exc) from None
        finally:
            if changes:
                self.in_flight -= 1
                self.generation += 1
