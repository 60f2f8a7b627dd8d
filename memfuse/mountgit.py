"""The mount's side of `memfuse serve`: git requests for a mounted agent, answered by its daemon.

The daemon is its history's one writer (writerlock.py), so `memfuse serve` hands it what a git
request needs written, over the hand-off socket (handoff.py; issue 20 point 5):

- `sync`, before a ref advertisement: one full listing of the server, applied to the mount
  (Poller.listed_since; it holds the mount's own changes back while it runs, so a mount
  written without a pause cannot race it), then the snapshot committed (Snapshotter.flush).
  The head `serve` then advertises is the mount and the server as they are now: an edit
  in the mount, or an API edit, is in the next fetch, and a push on an older base is not a
  fast-forward.
- `push`: the objects `serve` received (it writes nothing into the history) and one ref
  update, with the request's key. With the snapshots paused (the branch is the mount as it
  was), gitpush.Receiver judges the update against the files the mount shows; with the
  listings paused, it applies the steps with the request's key; then one listing shows them
  in the mount, each pushed file with the bytes pushed (Tree.pushed) and its kernel caches
  dropped, kept files included; then the branch moves to the pushed commit itself. What the
  mount recorded meanwhile is what the branch holds, so no commit follows it. The answer is
  the Verdict, given once all that is done: the mount shows the push when `git push` returns.

A push is refused while the mount holds changes the server has not taken (the journal), or has
not listed the server since it started from its local history: it would be judged against a
mount that is not the server.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from dulwich.objects import ShaFile

from . import gitpush, handoff
from .config import Config
from .history import HistoryRepo, Snapshotter
from .poller import Poller
from .remote import Client, make_client
from .state import MountState

log = logging.getLogger("memfuse.mountgit")

SYNC_WAIT = 30.0  # seconds a sync waits for a full listing (thousands of blocks take seconds)
SHOW_WAIT = 30.0  # seconds a push waits for the listing that shows it in the mount
RETRY_BUDGET = 5.0  # seconds of retries of one server call of a push (as serve's own)


def verdict_message(verdict: gitpush.Verdict) -> dict[str, Any]:
    """A Verdict as the push answer carries it."""
    return {"ok": verdict.ok, "reason": verdict.reason, "lines": list(verdict.lines)}


def refused(reason: str, *lines: str) -> gitpush.Verdict:
    return gitpush.Verdict(False, reason, lines or (reason,))


@dataclass
class MountGit:
    """Answers the hand-off requests (handoff.Handler) for the mount made of `config`, `repo`,
    `snapshots`, `state` and `poller` (daemon.Mount's). transport: the server's stand-in for
    the clients made with a request's key (tests)."""

    config: Config
    repo: HistoryRepo
    snapshots: Snapshotter
    state: MountState
    poller: Poller
    transport: httpx.AsyncBaseTransport | None = None

    def __post_init__(self) -> None:
        self._pushing = trio.Lock()  # one push at a time

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One hand-off request: `{"op": "sync"}` or `{"op": "push", ...}` (`push`)."""
        op = request.get("op")
        if op == "sync":
            return await self.sync()
        if op == "push":
            try:
                ref, old, new = (str(request[k]).encode() for k in ("ref", "old", "new"))
                objects = handoff.objects_of(request.get("objects", []))
            except (KeyError, ValueError) as exc:
                return {"error": f"a push request that cannot be read: {exc}"}
            key = request.get("key")
            verdict = await self.push(ref, old, new, objects, key if isinstance(key, str)
                                      else None)
            return verdict_message(verdict)
        return {"error": f"no such request: {op!r}"}

    async def sync(self) -> dict[str, Any]:
        """List the server now and commit what the mount shows. Answers `{"head": <id or
        null>}`, or `{"away": <reason>}` when the server did not answer the listing."""
        if await self.poller.listed_since(trio.current_time(), SYNC_WAIT,
                                          exclusive=True) is None:
            return {"away": (self.poller.last_error or "no listing in time").removeprefix(
                "poll failed: ")}
        await self.snapshots.flush()
        head = self.repo.head()
        return {"head": head.decode() if head else None}

    async def push(self, ref: bytes, old: bytes, new: bytes, objects: list[ShaFile],
                   key: str | None) -> gitpush.Verdict:
        """Take the update of `ref` from `old` to `new` (`objects`: what the push brought),
        applied with `key` (the request's). Returns the Verdict once the server and the mount
        show what it applied."""
        async with self._pushing:
            await trio.to_thread.run_sync(self._add, objects)
            waiting = self._not_now()
            if waiting is not None:
                return waiting
            async with self.snapshots.paused():
                return await self._push(ref, old, new, key)

    def _not_now(self) -> gitpush.Verdict | None:
        queued = self.state.journal.queued() if self.state.journal is not None else []
        if queued:
            return refused(f"the mount holds {len(queued)} change(s) the server has not taken "
                           f"yet (its journal): push again once they are sent (memfuse status)")
        if not self.poller.applied.is_set():
            return refused("the mount has not listed the server since it started from its "
                           "local history: push again once it has (memfuse status)")
        return None

    def _add(self, objects: list[ShaFile]) -> None:
        if objects:
            self.repo.repo.object_store.add_objects([(obj, None) for obj in objects])

    async def _push(self, ref: bytes, old: bytes, new: bytes, key: str | None
                    ) -> gitpush.Verdict:
        receiver = gitpush.Receiver(self.repo, self.state.layout, self.state.shown_blocks(),
                                    lambda: self._client(key), self.config.agent_id)
        judged = await trio.to_thread.run_sync(receiver.judge, ref, old, new)
        if isinstance(judged, gitpush.Verdict):
            return judged
        head, pushed = judged
        async with self.poller.paused():  # no listing binds a pushed block before its bytes
            outcome = await receiver.apply(pushed.steps)
            changes = outcome.applied(pushed)
            self.state.expect_pushed(outcome.blocks, changes)
        if outcome.done and await self.poller.listed_since(trio.current_time(), SHOW_WAIT,
                                                           exclusive=True) is None:
            log.warning("push: no listing showed it in the mount yet (%s); the next one will",
                        self.poller.last_error or "none in time")
        verdict = await trio.to_thread.run_sync(receiver.settle, head, new, pushed, outcome)
        await self.state.show_pushed(changes)
        return verdict

    def _client(self, key: str | None) -> Client:
        return make_client(self.config.base_url, key, retry_budget=RETRY_BUDGET,
                           transport=self.transport)
