"""Block file contents both ways: revalidate on open, send a flushed file.

An `open` of a block file re-reads its block when the cached copy is older than the revalidation
window (close-to-open consistency); a flushed file becomes one PATCH of its block (or the block
is created); a conflict with a newer server version is settled by the policy and both versions
go to history. The server is called through remote.Remote, every change lands through
state.MountState: flush -> BlockFiles.send -> Remote.update (PATCH) -> MountState.written
(tree and history).
"""
from __future__ import annotations

import dataclasses
import errno
import logging

import trio

from . import blockfile
from .errors import FsError, ServerAway, ServerRefused
from .journal import Entry, base_of
from .letta import LettaError, NotFound, ServerError, Unreachable
from .model import Block
from .remote import Remote, Stale
from .state import MountState
from .tree import Node

log = logging.getLogger("memfuse.files")

WRITE_BUDGET = 2.0  # seconds of retries before a write the server does not take is journaled
REPLAY_FAILURES = 5  # 5xx answers to one journaled write before it is given up as refused


def _target(entries: list[Entry]) -> blockfile.ParsedFile:
    """What a block's journaled writes, in order, make of it: each file's value, and each
    frontmatter key it names (a key left out keeps the earlier write's), as one file."""
    block = entries[0].base_block()
    for entry in entries:
        block = blockfile.applied(block, blockfile.parse(entry.content))
    fields = {"description": block.description, "limit": block.limit}
    return blockfile.ParsedFile(value=block.value,
                                fields={k: v for k, v in fields.items() if v is not None},
                                has_frontmatter=True)


class BlockFiles:
    """The contents of one mount's block files.

    revalidate: seconds a cached block is trusted before `open` asks the server again.
    `last_conflict`: the last conflict, `last_replay` the last journal entry replayed and
    its outcome, in words (for `memfuse status`).
    """

    def __init__(self, state: MountState, remote: Remote, *, revalidate: float):
        self.state, self.remote, self.tree = state, remote, state.tree
        self.revalidate_after = revalidate
        self.last_conflict: str | None = None
        self.last_replay: str | None = None
        self._order_locks: dict[str, trio.Lock] = {}
        self._failures: dict[int, int] = {}  # journal seq -> 5xx answers at replay

    def _fresh(self, node: Node) -> bool:
        return (node.block is None
                or trio.current_time() - node.checked_at < self.revalidate_after)

    async def revalidate(self, node: Node) -> None:
        """Refresh `node` from `GET /v1/blocks/{id}` when its copy is older than the window.

        One attempt, never a retry budget: when the server does not answer, or is already known
        not to (Remote.reachable), the cached copy is served at once.
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
            except (Unreachable, ServerError) as exc:  # Remote logs the outage once
                log.debug("%s: could not revalidate (%s); serving the cached copy",
                          self.tree.path(node), exc)
                return
            except LettaError as exc:
                log.warning("%s: could not revalidate (%s); serving the cached copy",
                            self.tree.path(node), exc)
                return
            if block is not None:  # None: the server is known to be away
                self.state.refreshed(node, block, started)

    async def send(self, node: Node, data: bytes, base: Block | None = None) -> None:
        """Make the block file `node` say what the bytes `data` say (a flushed file): update
        its block, or create one when the node has none yet; the node then shows the result
        (history records it). base: the block as the writer read it (conflict detection).

        With a journal, an update the server cannot take (no answer within WRITE_BUDGET
        seconds, or the server already known to be away, or earlier writes still journaled:
        order is kept) is journaled instead: durable when this returns, shown at once,
        replayed later. Writes to one block are decided and sent one at a time (`_order`), so
        a write that waited never overtakes one that was journaled. Raises FsError (see
        `write` and Remote.create); on Stale the node shows the server's block."""
        location = self.state.location(node) if node.block is None else None
        parsed = blockfile.parse(data)
        if location is not None:
            block = await self.remote.create(location, parsed)
            log.info("%s: created block %s", self.tree.path(node), block.id)
            self.state.written(node, block)
            return
        journal, block_id = self.state.journal, node.block.id
        async with self._order(block_id):
            if not self.state.shows(node, block_id):
                log.info("%s: removed while its write waited; the write stays local", node.name)
                return
            if journal is not None and (journal.pending() or not self.remote.reachable):
                self._journal(node, parsed, data, base)
                return
            try:
                block = await self.write(node.block, parsed, self.tree.path(node), base, node,
                                         budget=WRITE_BUDGET if journal is not None else None)
            except ServerAway as exc:
                if journal is None or not self.state.shows(node, block_id):
                    raise
                log.info("%s: %s", self.tree.path(node), exc.reason)
                self._journal(node, parsed, data, base)
                return
            self.state.written(node, block)

    async def write_now(self, block: Block, parsed: blockfile.ParsedFile, path: str,
                        base: Block | None = None) -> Block:
        """An update that cannot be journaled yet (the target of a rename over a block file):
        the journal is sent first so the order of writes is kept. Raises FsError(EIO) when
        the server is away (ServerAway), as `write` otherwise."""
        journal = self.state.journal
        if journal is not None and journal.pending():
            await self.replay()
        async with self._order(block.id):
            if journal is not None and journal.pending():
                raise ServerAway(errno.EIO, "the server is away and this change cannot be "
                                            "journaled yet (only writes to block files are)")
            return await self.write(block, parsed, path, base)

    def _order(self, block_id: str) -> trio.Lock:
        return self._order_locks.setdefault(block_id, trio.Lock())

    def _journal(self, node: Node, parsed: blockfile.ParsedFile, data: bytes,
                 base: Block | None) -> None:
        """Journal a write the server cannot take now, after the same checks as online (a
        refused file is refused: EACCES, EINVAL, EFBIG). Raises FsError(EIO) when the journal
        cannot be written."""
        block = node.block
        if block.read_only:
            raise FsError(errno.EACCES, "block is read-only")
        changes = blockfile.plan_update(block, parsed)
        if not changes:
            return
        view = dataclasses.replace(block, **changes)
        # The conflict base: what the server will hold when this entry is replayed, i.e. the
        # previous journaled write's result, or else the server's block the writer read.
        pending = [e for e in self.state.journal.pending() if e.block_id == block.id]
        server_base = block if pending else (base or block)
        try:
            self.state.journaled(node, view, data, server_base)
        except OSError as exc:
            raise FsError(errno.EIO, f"the server is away and the journal cannot be written "
                                     f"({exc.strerror})") from None
        log.info("%s: the server is away; journaled (%d pending)", self.tree.path(node),
                 len(self.state.journal.pending()))

    async def replay(self) -> bool:
        """Send the journaled writes, block by block in the order of their first write; for
        each block only its last journaled write is sent (the earlier ones are in history
        already), checked against the server's block as it was before the first of them,
        under the conflict rule of an online write (a newer server version is committed to
        history first; then the journal's version overwrites it, or under `reject` is
        committed as refused). Stops, returning False, when the server stops answering or
        answers with something that may pass (401/403/429, a 5xx fewer than REPLAY_FAILURES
        times); True when the journal is empty. A write the server refuses for good
        (400/404/422, a limit it now has, a 5xx REPLAY_FAILURES times) is committed to history
        as refused and logged, never dropped silently."""
        journal = self.state.journal
        if journal is None:
            return True
        for block_id in dict.fromkeys(e.block_id for e in journal.pending()):
            async with self._order(block_id):
                entries = [e for e in journal.pending() if e.block_id == block_id]
                if not entries:
                    continue
                last = entries[-1]
                try:
                    outcome, block, recorded = await self._replay(last, entries[0].base,
                                                                  _target(entries))
                except (ServerAway, ServerRefused) as exc:
                    if not self._gives_up(last, exc):
                        self.last_replay = f"{last.path}: not sent yet ({exc.reason})"
                        return False
                    outcome, block, recorded = self._refuse(last, exc), None, True
                self._failures.pop(last.seq, None)
                self.state.replayed(last, block, outcome, sent=outcome == "sent",
                                    recorded=recorded, superseded=entries[:-1])
            self.last_replay = f"{last.path}: {outcome}" + (
                f" ({len(entries) - 1} earlier write(s) superseded)" if len(entries) > 1 else "")
            log.info("journal: %s", self.last_replay)
        return True

    async def run_replay(self, interval: float = 0.5) -> None:
        """Replay the journal whenever it holds writes and the server answers, forever (cancel
        to stop); checks every `interval` seconds."""
        while True:
            journal = self.state.journal
            if journal is not None and journal.pending() and self.remote.reachable:
                await self.replay()
            await trio.sleep(interval)

    def _gives_up(self, entry: Entry, exc: FsError) -> bool:
        """Whether a failure at replay is final for `entry`: a refusal the server judged, or a
        5xx for the REPLAY_FAILURES-th time (a value the server keeps failing on)."""
        if isinstance(exc, ServerRefused):
            return exc.status in ServerRefused.FINAL
        if exc.status is None:
            return False  # no answer at all: the server is away, wait for it
        self._failures[entry.seq] = self._failures.get(entry.seq, 0) + 1
        return self._failures[entry.seq] >= REPLAY_FAILURES

    def _refuse(self, entry: Entry, exc: FsError) -> str:
        node = self.tree.block_node(entry.block_id)
        if node is not None and self.state.shows(node, entry.block_id):
            self.state.refused(entry, self.tree.path(node))
        log.error("%s: the server refused a journaled write (%s); it is kept in history as "
                  "a rejected edit", entry.path, exc.reason)
        return f"refused: {exc.reason}; kept in history as a rejected edit"

    async def _replay(self, entry: Entry, base: dict, parsed: blockfile.ParsedFile
                      ) -> tuple[str, Block | None, bool]:
        """Send `parsed` (what the block's journaled writes up to `entry` make of it), made on
        the server's `base` (value, description, limit): (outcome in words, the server's block
        now, whether history heard of a server or refused version). History only hears of it where the block is still shown
        (a file unlinked since has its journaled version in history already). Raises
        ServerAway, ServerRefused (the caller decides whether that is final)."""
        node = self.tree.block_node(entry.block_id)
        path = self.tree.path(node) if node is not None else None
        current = await self.remote.fetch_now(entry.block_id, WRITE_BUDGET)
        try:
            changes = blockfile.plan_update(current, parsed)
        except FsError as exc:  # e.g. the server's limit is now lower than the value
            if path is not None:
                self.state.conflict(path, current, rejected=parsed, node=node)
            log.error("%s: a journaled write cannot apply any more (%s); it is kept in "
                      "history as a rejected edit", entry.path, exc.reason)
            return (f"refused: {exc.reason}; kept in history as a rejected edit", current,
                    path is not None)
        if not changes:
            return "already on the server", current, False
        recorded = False
        if base_of(current) != base:
            where = path or entry.path
            if self.remote.on_conflict == "reject":
                if path is not None:
                    self.state.conflict(path, current, rejected=parsed, node=node)
                self.last_conflict = (f"{where}: changed on the server while the write was "
                                      f"journaled; the write was rejected (both versions are "
                                      f"in history)")
                log.warning("%s", self.last_conflict)
                return "rejected: the server changed first", current, path is not None
            if path is not None:
                self.state.conflict(path, current)
                recorded = True
            self.last_conflict = (f"{where}: changed on the server while the write was "
                                  f"journaled; the journaled version was written over it "
                                  f"(both versions are in history)")
            log.warning("%s", self.last_conflict)
        written = await self.remote.update(current, parsed, budget=WRITE_BUDGET)
        return "sent", written.block, recorded

    async def write(self, block: Block, parsed: blockfile.ParsedFile, path: str,
                    base: Block | None = None, node: Node | None = None,
                    budget: float | None = None) -> Block:
        """Update `block` (shown at `path`, by `node` if any) to what `parsed` says; returns the
        block as the server has it. A conflict (the server changed since `base`) commits the
        server's version first; `reject` then records the refused file and raises Stale (the
        node shows the server's block). Raises FsError as Remote.update does."""
        try:
            written = await self.remote.update(block, parsed, base, budget)
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
