"""The order of operations on one name while its block is being created.

A new block file has no block until its first flush creates one (POST, attach, drop the marker:
several round trips). Every other operation on that name must come after the create, or join it
(SEMANTICS.md, "Ordering"): otherwise a second writer, an append, a rename or an unlink sent in
that window would make a second block with the same label, or act on a block that is not there.
This module keeps that order for one mount; it makes no server call itself.

- `creating(inode)`: held by the one create of a node's block (files.BlockFiles.send).
- `settled(inode)`: what every other operation on the node awaits first.
- `holding(inodes)`: held by a rename of a file, for its source and target.
- `moving()`: held by a directory rename; a create that has not started waits for it, and it
  waits for the creates already under way, so no create sends a label the rename is changing.

Once a block exists, `BlockOrder` keeps its changes in one order: a write, a rename over it and
the replay of its journaled changes are decided and sent one at a time.
"""
from __future__ import annotations

from contextlib import AsyncExitStack, asynccontextmanager
from typing import AsyncIterator

import trio


class BlockOrder:
    """One lock per block id, shared by files.BlockFiles (online writes) and replay.Replayer
    (journaled units): a write that waited never overtakes one journaled before it."""

    def __init__(self):
        self._locks: dict[str, trio.Lock] = {}

    def of(self, block_id: str) -> trio.Lock:
        """The lock of block `block_id` (made on first use; ids are few per mount)."""
        return self._locks.setdefault(block_id, trio.Lock())


class NameOrder:
    """Creates in flight, by inode, and the directory renames that must not overlap them."""

    def __init__(self):
        self._creating: dict[int, trio.Event] = {}  # inode -> set when its create is over
        self._moving = trio.Lock()  # held by a directory rename: one at a time
        self._still = trio.Event()  # set while no directory rename is under way
        self._still.set()

    def busy(self, inode: int) -> bool:
        """Whether the block of node `inode` is being created now."""
        return inode in self._creating

    async def settled(self, inode: int) -> None:
        """Return once no create of node `inode`'s block is in flight (at once when none is)."""
        while (done := self._creating.get(inode)) is not None:
            await done.wait()

    @asynccontextmanager
    async def creating(self, inode: int) -> AsyncIterator[None]:
        """Hold the create of node `inode`'s block: waits for an earlier create of it and for a
        directory rename under way, then keeps `settled(inode)` waiting until the block exits.
        The caller checks again, inside, whether the node still needs a block."""
        while True:
            await self.settled(inode)
            if not self._still.is_set():  # wait for the rename (never for the lock: creates
                await self._still.wait()  # handing it on to each other would spin)
                continue
            if inode not in self._creating:
                break
        done = self._creating[inode] = trio.Event()  # no await since the checks: still true
        try:
            yield
        finally:
            del self._creating[inode]
            done.set()

    @asynccontextmanager
    async def holding(self, inodes: list[int]) -> AsyncIterator[None]:
        """Hold the nodes `inodes` as a create does (`creating`, in inode order): a rename holds
        its source and its target while it changes the server, so no create of either starts
        meanwhile (it would make a block with a label the rename is changing or freeing)."""
        async with AsyncExitStack() as stack:
            for inode in sorted(set(inodes)):
                await stack.enter_async_context(self.creating(inode))
            yield

    @asynccontextmanager
    async def moving(self, inodes: list[int]) -> AsyncIterator[None]:
        """Hold a directory rename: one at a time; creates not yet started wait for it; the
        creates of `inodes` (the nodes below the directory) already under way are waited for."""
        async with self._moving:
            still = self._still = trio.Event()
            try:
                for inode in inodes:
                    await self.settled(inode)
                yield
            finally:
                still.set()
