"""Server -> mount: list the agent's blocks every interval and reconcile the mount with them.

Each poll is two paginated list calls (attached blocks, blocks tagged `owner:<agent>`); the
listing goes to MountState.reconcile, which applies the difference, tells the kernel and records
each change under the server's author, so `cat` and `ls` see a server-side change within about
one interval.
"""
from __future__ import annotations

import logging
import time

import trio

from .letta import LettaError
from .remote import Remote
from .state import MountState

log = logging.getLogger("memfuse.poller")


class Poller:
    """Keeps the mount in step with the server. `last_poll` is the time.time() of the last
    listing that answered; `last_error` the last failure (None once a poll succeeds);
    `applied` is set once a listing has been applied (the mount shows the server's blocks:
    a mount started from history waits for it before replaying the journal). Each listing is
    one attempt (the next comes one interval later): while the server is away, the poller is
    what notices it is back (Remote.reachable)."""

    def __init__(self, state: MountState, remote: Remote, *, interval: float = 1.0):
        self.state, self.remote = state, remote
        self.interval = interval
        self.last_poll: float | None = None
        self.last_error: str | None = None
        self.applied = trio.Event()

    @property
    def reachable(self) -> bool:
        """Whether the server answered the last call (Remote.reachable)."""
        return self.remote.reachable

    async def run(self) -> None:
        """Poll forever (cancel to stop)."""
        while True:
            await self.poll_once()
            await trio.sleep(self.interval)

    async def poll_once(self) -> bool:
        """One listing and, unless a local change raced it, its reconciliation. Returns whether
        it was applied."""
        generation = self.remote.generation
        started = trio.current_time()
        try:
            attached, owned = await self.remote.listing(budget=0)
        except LettaError as exc:
            if self.last_error is None:
                log.warning("poll failed: %s; serving the last known state", exc)
            self.last_error = f"poll failed: {exc}"
            return False
        self.last_poll, self.last_error = time.time(), None
        if self.remote.in_flight or self.remote.generation != generation:
            return False  # a local change raced the listing: it may not show it yet
        await self.state.reconcile(attached, owned, started)
        self.applied.set()
        return True
