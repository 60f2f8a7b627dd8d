"""Unlinked block files waiting out their grace period before their block is retired.

Editors save in ways that look like deleting a file: vim and emacs rename `x.md` away to a backup
and write a new `x.md`; `git checkout` unlinks and re-creates it. So unlinking a block file
removes it from the mount at once but *retires* its block on the server (detach, drop the owner
tag) only after a grace period; a file that appears at the same path meanwhile claims the
tombstone and is bound to that same block.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator

import trio

from .errors import FsError
from .model import Block

log = logging.getLogger("memfuse.grace")

UNLINK_GRACE = 2.0  # seconds between unlinking a block file and retiring its block
RETIRE_TRIES = 5    # attempts before a retirement is given up (logged as an error)


@dataclass
class Tombstone:
    """A block whose file was unlinked at `path` (`parts` from the mount root); retired on the
    server at `deadline` (trio clock, seconds). `tries`: failed attempts so far (without a
    journal; with one, a retirement the server cannot take is queued in the journal)."""

    block: Block
    attached: bool
    parts: tuple[str, ...]
    deadline: float
    tries: int = 0
    entry: Any = None  # its journal.Entry (unlink), when the mount has a journal

    @property
    def path(self) -> str:
        """The unlinked file's path relative to the mount root."""
        return "/".join(self.parts)


Retire = Callable[[Tombstone], Awaitable[None]]


class Graveyard:
    """Tombstones by path. `grace`: seconds from unlink to retirement."""

    def __init__(self, grace: float = UNLINK_GRACE):
        self.grace = grace
        self._tombstones: dict[tuple[str, ...], Tombstone] = {}
        self._wakeup = trio.Event()
        self._retiring: dict[tuple[str, ...], trio.Event] = {}  # set when that retirement ends
        self._in_retirement: dict[tuple[str, ...], Tombstone] = {}  # retirements under way
        self._retired: set[str] = set()  # blocks retired by this mount (ids: a few bytes each)
        self._held: dict[tuple[str, ...], int] = {}  # paths whose tombstones wait past deadline

    def bury(self, parts: tuple[str, ...], block: Block, attached: bool, entry: Any = None
             ) -> None:
        """Schedule `block`'s retirement `grace` seconds from now (file unlinked at `parts`);
        entry: the unlink's journal entry, if any."""
        self._tombstones[parts] = Tombstone(block, attached, parts,
                                            trio.current_time() + self.grace, entry=entry)
        self._wakeup.set()

    def claim(self, parts: tuple[str, ...]) -> Tombstone | None:
        """Take the tombstone at `parts` back (a file appeared there again), or None."""
        return self._tombstones.pop(parts, None)

    def peek(self, parts: tuple[str, ...]) -> Tombstone | None:
        """The tombstone at `parts`, left in place, or None."""
        return self._tombstones.get(parts)

    def pending_block_ids(self) -> set[str]:
        """Blocks whose files were unlinked and that are not retired yet: in their grace
        period, or being retired now."""
        return ({t.block.id for t in self._tombstones.values()}
                | {t.block.id for t in self._in_retirement.values()})

    def unlinked_block_ids(self) -> set[str]:
        """`pending_block_ids` and every block this mount retired: none of them is a new
        file's block, whatever a listing read a moment ago says."""
        return self.pending_block_ids() | self._retired

    async def quiet(self, parts: tuple[str, ...]) -> None:
        """Return once no retirement of a block unlinked at `parts` is under way: a new file
        there must not take that label while the server still shows the old block as the
        agent's (it would be written to it, and the retirement would then take it away)."""
        while (done := self._retiring.get(parts)) is not None:
            await done.wait()

    @contextmanager
    def holding(self, parts: tuple[str, ...]) -> Iterator[None]:
        """Keep the tombstone at `parts` from being retired meanwhile (a rename over that path
        is writing to its block and claims it when the server accepted)."""
        self._held[parts] = self._held.get(parts, 0) + 1
        try:
            yield
        finally:
            self._held[parts] -= 1
            if not self._held[parts]:
                del self._held[parts]

    async def _attempt(self, tomb: Tombstone, retire: Retire) -> None:
        done = self._retiring[tomb.parts] = trio.Event()
        self._in_retirement[tomb.parts] = tomb
        try:
            await retire(tomb)
            self._retired.add(tomb.block.id)
        except FsError as exc:
            tomb.tries += 1
            if tomb.tries >= RETIRE_TRIES:
                log.error("%s: gave up retiring block %s after %d tries: %s", tomb.path,
                          tomb.block.id, tomb.tries, exc.reason)
                return
            log.warning("%s: retiring block %s failed (%s); will retry", tomb.path,
                        tomb.block.id, exc.reason)
            tomb.deadline = trio.current_time() + self.grace * tomb.tries
            if self._tombstones.setdefault(tomb.parts, tomb) is tomb:
                self._wakeup.set()
        finally:
            if self._retiring.get(tomb.parts) is done:
                del self._retiring[tomb.parts]
            if self._in_retirement.get(tomb.parts) is tomb:
                del self._in_retirement[tomb.parts]
            done.set()

    async def run(self, retire: Retire) -> None:
        """Call `retire` for each tombstone whose deadline passed, forever (cancel to stop).
        A failure (FsError) is retried later, up to RETIRE_TRIES attempts in all."""
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
            if parts in self._held:  # a rename over it is under way: later, or claimed
                tomb.deadline = trio.current_time() + self.grace
                continue
            if self._tombstones.get(parts) is tomb:
                del self._tombstones[parts]
                await self._attempt(tomb, retire)

    async def retire_all(self, retire: Retire) -> None:
        """Retire every pending block now, one attempt each (at unmount)."""
        while self._tombstones:
            _parts, tomb = self._tombstones.popitem()
            tomb.tries = RETIRE_TRIES - 1
            await self._attempt(tomb, retire)
