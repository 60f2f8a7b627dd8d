"""Server -> mount: list the agent's blocks and reconcile the mount with them, at a cost that
does not grow with the number of blocks a mount holds.

Letta 0.16.8 offers no cheap change signal (blocks carry no version or update time, there is
no ETag and no updated-since filter; the agent's `updated_at` does not move on block writes),
so changes are found by listing. Two listings, at two rates:

- the attached blocks (`GET /v1/agents/{id}/core-memory/blocks`, one request) every
  `interval` (0.5 s): the blocks in the agent's prompt, the ones its memory tools edit, are
  few and change most. A block that leaves this listing is read once (`GET /v1/blocks/{id}`)
  to tell a detach (still owned: it moves to the root) from a deletion.
- the full listing (attached, then `GET /v1/blocks/?tags=owner:<id>`) every
  `full_interval` (3 s), or five times what the last one took, whichever is longer, so a
  listing of thousands of blocks never takes more than a fifth of the time; and at once when
  a burst of opens asks for it (`listed_since`).

The agent's tags choose the mount's layout (layout.py) at mount. They are read again after
a full listing every `model_interval` (30 s; `GET /v1/agents/{id}?include=agent.tags`): when
they now choose another layout, the poller says so (`model_changed`, a WARNING, a status
line) and the mount keeps its own until a remount: a layout switch moves every file, which
open files and a person's shell would not follow.

A listing answer whose bytes did not change is not decoded again (LettaClient), and an
unchanged block is not rendered again (Tree.bind), so an idle mount costs about 2.3 requests
a second and little CPU; the bytes of the full listing still grow with the values.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import AsyncIterator

import trio

from .errors import AgentGone, BlockGone, ServerCallError
from .layout import layout_for_tags
from .model import Block
from .remote import Remote
from .state import MountState

log = logging.getLogger("memfuse.poller")

FULL_INTERVAL = 3.0  # seconds between full listings, at least
FULL_COST_FACTOR = 5  # ... and at least this many times the last full listing's duration
MODEL_INTERVAL = 30.0  # seconds between reads of the agent's tags (its memory model), at least
RACED_LIMIT = 3  # full listings in a row dropped for a local change: the next holds changes


class Poller:
    """Keeps the mount in step with the server. `last_poll` is the time.time() of the last
    listing that answered; `last_error` the last failure (None once a poll succeeds);
    `applied` is set once a full listing has been applied (the mount shows the server's
    blocks: a mount started from history waits for it before replaying the journal);
    `last_full` the trio time at which the last applied full listing started (None: never).
    Each listing is one attempt (the next comes one interval later): while the server is
    away, the poller is what notices it is back (Remote.reachable).

    interval: seconds between attached listings; full_interval: seconds between full
    listings, at least (FULL_COST_FACTOR stretches it when a listing is slow);
    model_interval: seconds between reads of the agent's tags, at least. `model_changed` is
    the name of the layout the agent's tags choose now when it is not the mount's (None: the
    same, or not read yet)."""

    def __init__(self, state: MountState, remote: Remote, *, interval: float = 0.5,
                 full_interval: float = FULL_INTERVAL, model_interval: float = MODEL_INTERVAL):
        self.state, self.remote = state, remote
        self.interval, self.full_interval = interval, full_interval
        self.model_interval = model_interval
        self.model_changed: str | None = None
        self._model_due: float | None = None  # trio time of the next read of the tags
        self.last_poll: float | None = None
        self.last_error: str | None = None
        self.last_full: float | None = None
        self.full_duration = 0.0  # seconds the last full listing took
        self.applied = trio.Event()
        self._wanted = False  # a full listing was asked for (listed_since)
        self._exclusive = False  # ... one that no local change may race (listed_since)
        self._raced = 0  # full listings in a row dropped because a local change raced them
        self._wake = trio.Event()
        self._full_done = trio.Event()  # set (and replaced) after each full listing attempt
        self._full_failed = False  # the last full listing got no answer
        self._polling = trio.Lock()  # held by each listing and its reconciliation; `paused`

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No listing starts or is applied while the block runs (one under way finishes
        first): a served push (mountgit.py) changes the server, then has the mount show it
        from one listing that starts after, with the pushed bytes (Tree.pushed)."""
        async with self._polling:
            yield

    @property
    def reachable(self) -> bool:
        """Whether the server answered the last call (Remote.reachable)."""
        return self.remote.reachable

    async def run(self) -> None:
        """Poll forever (cancel to stop): a full listing first, then attached listings every
        `interval` and a full one when it is due or asked for."""
        next_full = trio.current_time()
        while True:
            if self._wanted or trio.current_time() >= next_full:
                self._wanted = False
                started = trio.current_time()
                async with self._polling:
                    await self.poll_once()
                spent = self.full_duration = trio.current_time() - started
                next_full = trio.current_time() + max(self.full_interval,
                                                      FULL_COST_FACTOR * spent)
            else:
                async with self._polling:
                    await self.poll_attached()
            with trio.move_on_after(max(0.0, min(self.interval,
                                                 next_full - trio.current_time()))):
                await self._wake.wait()
            self._wake = trio.Event()

    async def listed_since(self, since: float, timeout: float, exclusive: bool = False
                           ) -> float | None:
        """The start (trio clock) of an applied full listing that started at or after `since`,
        asking for one at once and waiting at most `timeout` seconds for it. None when the
        server did not answer (or not in time): the caller falls back to its own read. A
        burst of opens is served this way with one listing instead of a GET each. The wait
        is at least twice what the last full listing took: thousands of blocks take seconds,
        and a GET each meanwhile would cost more. exclusive: the listing holds the mount's
        changes back while it runs (Remote.changes_held), so a mount written without a pause
        cannot race it (a git request that must see the mount and the server as they are)."""
        with trio.move_on_after(max(timeout, 2 * self.full_duration)):
            while self.last_full is None or self.last_full < since:
                done = self._full_done
                self._wanted = True
                self._exclusive = self._exclusive or exclusive
                self._wake.set()
                await done.wait()
                if self._full_failed:
                    return None
        return self.last_full if self.last_full is not None and self.last_full >= since else None

    async def poll_once(self) -> bool:
        """One full listing and, unless a local change raced it, its reconciliation. Returns
        whether it was applied. The listing holds the mount's changes back while it runs
        (Remote.changes_held) when one was asked for so (`listed_since`), or after
        RACED_LIMIT in a row were dropped: a mount written without a pause would otherwise
        never see the server's changes."""
        exclusive = self._exclusive or self._raced >= RACED_LIMIT
        self._exclusive = False
        applied = False
        try:
            async with self.remote.changes_held() if exclusive else contextlib.nullcontext():
                generation = self.remote.generation
                started = trio.current_time()
                attached, owned = await self.remote.listing(budget=0)
            attached, owned = await self._without_orphans(started, attached, owned)
        except ServerCallError as exc:
            self._failed(exc)
        else:
            self._answered()
            self._raced = self._raced + 1 if self._raced_since(generation) else 0
            if not self._raced:
                await self.state.reconcile(attached, owned, started)
                self.last_full, applied = started, True
                self.applied.set()
        finally:
            self._full_failed = not self.remote.reachable or self.last_error is not None
            self._full_done.set()
            self._full_done = trio.Event()
        if applied:
            await self.check_model()
        return applied

    async def check_model(self) -> None:
        """Read the agent's tags when due: the first time at the first applied full listing
        (a mount started from history took its layout from there), then every
        `model_interval` seconds. When they choose another layout than the mount's, say so
        once (WARNING; `model_changed`); the mount keeps its layout. A failed read is
        retried at the next full listing."""
        now = trio.current_time()
        if self._model_due is not None and now < self._model_due:
            return
        try:
            tags = await self.remote.agent_tags()
        except ServerCallError as exc:
            log.debug("reading the agent's tags failed: %s", exc)
            return
        self._model_due = now + self.model_interval
        wanted = layout_for_tags(tags)
        changed = None if wanted is self.state.layout else wanted.name
        if changed is not None and changed != self.model_changed:
            log.warning("the agent's memory model changed on the server: its tags now choose "
                        "the %s layout, this mount shows the %s one; remount to show it in its "
                        "new layout", changed, self.state.layout.name)
        elif changed is None and self.model_changed is not None:
            log.info("the agent's tags choose this mount's %s layout again",
                     self.state.layout.name)
        self.model_changed = changed

    async def poll_attached(self) -> bool:
        """One listing of the attached blocks and, unless a local change raced it, its
        reconciliation; a block shown under system/ that left the listing is read once to
        tell where it went. Returns whether it was applied."""
        generation = self.remote.generation
        started = trio.current_time()
        try:
            [attached] = await self._without_orphans(started,
                                                     await self.remote.attached(budget=0))
            still_owned = []
            for node in self.state.left_attached(attached):
                try:
                    block = await self.remote.fetch(node.block.id)
                except BlockGone:
                    continue  # deleted
                if block is None:
                    return False  # the server went away meanwhile
                if self.remote.owner_tag in block.tags:
                    still_owned.append(block)
        except ServerCallError as exc:
            self._failed(exc)
            return False
        self._answered()
        if self._raced_since(generation):
            return False
        await self.state.reconcile_attached(attached, still_owned, started)
        return True

    async def _without_orphans(self, started: float, *listings: list[Block]
                               ) -> list[list[Block]]:
        """`listings` (started at `started`, trio time) without the blocks a settled journaled
        create's late POST made (MountState.orphan): each is deleted (Remote.discard), never
        shown. The delete changes the server, so this listing is not applied (`_raced_since`): the
        next one is. Raises ServerCallError (no answer to a delete)."""
        result = []
        for listing in listings:
            kept = []
            for block in listing:
                if self.state.orphan(block, started):
                    log.warning("block %s (%s): made by a create that was settled before its "
                                "request took effect; deleted", block.id, block.label)
                    await self.remote.discard(block)
                else:
                    kept.append(block)
            result.append(kept)
        return result

    def _raced_since(self, generation: int) -> bool:
        """A local change raced the listing: it may not show it yet."""
        return bool(self.remote.in_flight) or self.remote.generation != generation

    def _answered(self) -> None:
        self.last_poll, self.last_error = time.time(), None
        self.remote.agent_seen(True)

    def _failed(self, exc: ServerCallError) -> None:
        if isinstance(exc, AgentGone):
            self.remote.agent_seen(False)
        if self.last_error is None:
            log.warning("poll failed: %s; serving the last known state", exc.failure)
        self.last_error = f"poll failed: {exc.failure}"
