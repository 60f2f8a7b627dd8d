"""Block file contents both ways: revalidate on open, send a flushed file.

An `open` of a block file re-reads its block when the cached copy is older than the revalidation
window (close-to-open consistency); a burst of such opens (`grep -r`) is served by one full
listing instead of a GET each; a flushed file becomes one PATCH of its block (or the block
is created); a conflict with a newer server version is settled by the policy and both versions
go to history. The server is called through remote.Remote, every change lands through
state.MountState: flush -> BlockFiles.send -> Remote.update (PATCH) -> MountState.written
(tree and history).
"""
from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import math
import uuid
from typing import Awaitable, Callable

import trio

from . import blockfile
from .errors import BlockGone, FsError, ServerAway, ServerCallError, Throttled
from .grace import Tombstone
from .journal import CREATE, WRITE
from .model import PROVISIONAL_PREFIX, Block, Location, create_marker, is_provisional
from .ordering import BlockOrder, NameOrder
from .remote import FETCH_TIMEOUT, LabelTaken, Remote, Stale
from .state import MountState
from .tree import Kind, Node

log = logging.getLogger("memfuse.files")

WRITE_BUDGET = 2.0  # seconds of retries before a write the server does not take is journaled
# Seconds a close (or fsync) waits for the server, with a journal to fall back on: then the
# change is journaled and the close returns (a slow server: answers that take seconds each)
CLOSE_DEADLINE = 5.0
READ_DEADLINE = FETCH_TIMEOUT  # seconds an open waits to revalidate before serving the cache
BURST_OPENS = 3  # opens that must revalidate, within BURST_WINDOW seconds: a burst
BURST_WINDOW = 1.0
BURST_SPAN = 5.0  # seconds a burst's listing serves its opens after it arrived, at most


def blank(block: Block) -> Block:
    """`block` as a new, empty file would have read it: the base of a write made by a file
    that did not know the block existed (any text the block has is then a conflict)."""
    return dataclasses.replace(block, value="", description=None,
                               limit=blockfile.DEFAULT_LIMIT)


class BlockFiles:
    """The contents of one mount's block files.

    revalidate: seconds a cached block is trusted before `open` asks the server again.
    listed_since: Poller.listed_since (set by the daemon): how a burst of opens asks for one
    full listing instead of a GET each.
    `last_conflict`: the last conflict, in words (for `memfuse status`); `block_order`
    the per-block order its writes share with journal replay (replay.Replayer).
    """

    def __init__(self, state: MountState, remote: Remote, *, revalidate: float):
        self.state, self.remote, self.tree = state, remote, state.tree
        self.revalidate_after = revalidate
        self.listed_since: Callable[[float, float], Awaitable[float | None]] | None = None
        self._burst_from: float | None = None  # start of the listing serving the burst of opens
        # going on (None: none is)
        self._burst_until = float("-inf")  # trio time until which that listing serves opens
        self._last_open = float("-inf")  # trio time of the last open that asked to revalidate
        self._stale_opens: collections.deque[float] = collections.deque(maxlen=BURST_OPENS)
        self.last_conflict: str | None = None
        self.block_order = BlockOrder()  # writes and replayed units of one block: one at a time
        self.order = NameOrder()  # creates in flight: every other operation on the name waits

    def _fresh(self, node: Node) -> bool:
        # the clock first: within the window (every warm open) the journal is not asked
        if node.block is None or trio.current_time() - node.checked_at < self.revalidate_after:
            return True
        if node.block.id in self.state.pinned():
            return True
        # a burst's listing serves its opens for BURST_SPAN seconds after it arrived, at most:
        # however long opens keep coming, no copy older than that (plus the listing's own
        # time) is served without asking again; counted from its arrival, so a listing of
        # thousands of blocks that takes seconds still serves a long pass
        return (self._burst_from is not None and node.checked_at >= self._burst_from
                and trio.current_time() < self._burst_until)

    async def revalidate(self, node: Node) -> None:
        """Refresh `node` from `GET /v1/blocks/{id}` when its copy is older than the window.

        One attempt, never a retry budget: when the server does not answer, or is already known
        not to (Remote.reachable), the cached copy is served at once. A block the journal pins
        (its changes not replayed yet) is served as the journal makes it, with no call.

        A burst of opens (`grep -r`: BURST_OPENS opens needing a read within BURST_WINDOW
        seconds) is served by one full listing that started after the burst's first open
        (`listed_since`, waited for at most FETCH_TIMEOUT seconds or twice the last full
        listing's time) instead of a GET each: the burst's later opens take a copy that
        listing or a later one confirmed, until no open comes for BURST_WINDOW seconds or
        the listing arrived BURST_SPAN seconds ago (then the next burst asks for a newer one). So
        a pass over the memory sees every change made before it began; a block the listing
        did not show is read alone.
        """
        now = trio.current_time()
        if now - self._last_open >= BURST_WINDOW:
            self._burst_from = None  # no open for a while: the burst is over
        self._last_open = now
        if self._fresh(node):
            return
        self._stale_opens.append(now)
        if (self.listed_since is not None and self.remote.reachable
                and len(self._stale_opens) == BURST_OPENS
                and now - self._stale_opens[0] < BURST_WINDOW):
            listed = await self.listed_since(self._stale_opens[0], FETCH_TIMEOUT)
            if listed is not None:
                self._burst_from = listed
                self._last_open = trio.current_time()
                self._burst_until = self._last_open + BURST_SPAN
                if self._fresh(node):
                    return
        if node.block is None:  # unlinked while the listing was awaited: nothing to refresh
            return
        with trio.move_on_after(READ_DEADLINE) as deadline:
            await self._refresh(node)
        if deadline.cancelled_caught:  # a slow server, or a write holding the block's lock
            log.info("%s: no answer within %g s; serving the cached copy",
                     self.tree.path(node), READ_DEADLINE)

    async def _refresh(self, node: Node) -> None:
        """One `GET /v1/blocks/{id}` of `node`'s block under its lock (see `revalidate`)."""
        async with self.remote.lock(node.block.id):
            if self._fresh(node):  # another open refreshed it while this one waited
                return
            started = trio.current_time()
            try:
                block = await self.remote.fetch(node.block.id)
            except BlockGone:
                log.warning("%s: block %s is gone from the server; serving the last copy",
                            self.tree.path(node), node.block.id)
                return
            except ServerCallError as exc:  # Remote logs an outage once: not again here
                outage = isinstance(exc, ServerAway) and not isinstance(exc, Throttled)
                log.log(logging.DEBUG if outage else logging.WARNING,
                        "%s: could not revalidate (%s); serving the cached copy",
                        self.tree.path(node), exc.failure)
                return
            if block is not None:  # None: the server is known to be away
                self.state.refreshed(node, block, started)

    # -- sending, or journaling what the server cannot take ------------------------------------

    def offline(self) -> bool:
        """Whether a change goes to the journal without trying the server: the server is known
        to be away, or changes already wait in the journal (order is kept). False without a
        journal."""
        journal = self.state.journal
        return journal is not None and (journal.waiting() or not self.remote.reachable)

    def _budget(self) -> float | None:
        """Seconds of retries for a change: WRITE_BUDGET with a journal to fall back on, else
        the client's whole budget."""
        return WRITE_BUDGET if self.state.journal is not None else None

    def _fall_back(self, exc: FsError, what: str) -> None:
        """A change met `exc`: with a journal, no answer (ServerAway) means journal it (the
        caller does); anything else is raised."""
        if self.state.journal is None or not isinstance(exc, ServerAway):
            raise exc
        log.info("%s: %s; journaling it", what, exc.reason)

    async def send(self, node: Node, data: bytes, base: Block | None = None,
                   create_only: bool = False, added: bytes | None = None) -> None:
        """Make the block file `node` say what the bytes `data` say (a flushed file): update
        its block, or create one when the node has none yet; the node then shows the result
        (history records it). base: the block as the writer read it (conflict detection).

        With a journal, a change the server cannot take (no answer within WRITE_BUDGET
        seconds, or `offline`) is journaled instead: durable when this returns, shown at once,
        replayed later. Writes to one block are decided and sent one at a time (`_order`), so
        a write that waited never overtakes one that was journaled. Raises FsError (see
        `write` and Remote.create); on Stale the node shows the server's block."""
        parsed = blockfile.parse(data)
        if node.block is None and await self._first_flush(node, parsed, data, create_only,
                                                          added):
            return
        if base is None:  # the writer opened the file before its block existed: it read an
            base = dataclasses.replace(node.block, value="")  # empty file; any other text
        block_id = node.block.id  # the server has by now is a conflict (both go to history)
        with self._deadline() as deadline:
            while True:
                async with self._order(block_id):
                    block_id, retargeted = self._now_writing(node, block_id)
                    if retargeted:  # renamed over another file while this waited: the file
                        # is that file's block now (holding the bytes it showed), written
                        base = node.block  # under its own order
                        continue
                    if not self.state.shows(node, block_id):
                        log.info("%s: removed while its write waited; the write stays local",
                                 node.name)
                        return
                    if base is not None and is_provisional(base.id):
                        base = node.block  # read before its create was replayed: no conflict
                    await self._write_or_journal(node, block_id, parsed, data, base)
                    return
        if deadline.cancelled_caught and self.state.shows(node, block_id) and node.block:
            if base is not None and is_provisional(base.id):
                base = node.block
            log.warning("%s: no answer within %g s (the server is slow); the write is "
                        "journaled", self.tree.path(node), CLOSE_DEADLINE)
            self._journal(node, parsed, data, base)

    async def _first_flush(self, node: Node, parsed: blockfile.ParsedFile, data: bytes,
                           create_only: bool, added: bytes | None) -> bool:
        """A flush of `node` that has no block yet (see `send`): make its block (or take back
        the one unlinked at its path), unless another handle's create made it meanwhile.
        True when nothing is left to do; False when this is now a write to that block."""
        while node.block is None:
            if not self.state.shows(node, ""):
                log.info("%s: removed while its create waited; the write stays local",
                         node.name)
                return True
            async with self.order.creating(node.inode):
                if node.block is None and self.state.shows(node, ""):
                    await self.state.graveyard.quiet(self.tree.parts(node))
                    tomb = self.state.claim(node)
                    if tomb is not None:
                        await self._reuse(node, tomb, parsed, data)
                    else:
                        await self._create_file(node, parsed, data)
                    return True
            # another handle's create made the block meanwhile: this is a write to it
            if create_only and node.block is not None:  # a new file's handle never
                return True  # written: the block another handle made is its file
            if added is not None and node.block is not None:  # an O_APPEND handle: its
                # bytes go after that block's text
                await self.append(node, added)
                return True
        return False

    def _now_writing(self, node: Node, block_id: str) -> tuple[str, bool]:
        """The block a write to `node`, begun as one to `block_id`, goes to now, and whether
        that is another block's file since (the file was renamed over it meanwhile)."""
        if node.block is not None and node.block.id == self._real(block_id):
            return node.block.id, False  # the same block (its create was replayed meanwhile)
        if node.block is not None and node.parent != 0 and node.kind is Kind.BLOCK:
            return node.block.id, True
        return block_id, False

    async def _write_or_journal(self, node: Node, block_id: str, parsed: blockfile.ParsedFile,
                                data: bytes, base: Block | None) -> None:
        """Under `block_id`'s order: send the write of `node` (`write`), or journal it when
        the server is away or the journal already holds changes. Raises FsError as `write`
        (ServerAway when there is no journal, or the node no longer shows the block)."""
        if self.offline():
            self._journal(node, parsed, data, base)
            return
        try:
            block = await self.write(node.block, parsed, self.tree.path(node), base, node,
                                     budget=self._budget())
        except ServerAway as exc:
            if not self.state.shows(node, block_id):
                raise
            self._fall_back(exc, self.tree.path(node))
            self._journal(node, parsed, data, base)
            return
        self.state.written(node, block)

    def _deadline(self) -> trio.CancelScope:
        """The scope of a change's wait for the server: CLOSE_DEADLINE seconds when a journal
        can take the change instead (the caller journals it when the scope was cancelled:
        whatever the server did meanwhile is found at replay), else no limit."""
        return trio.move_on_after(CLOSE_DEADLINE if self.state.journal is not None
                                  else math.inf)

    async def _create_file(self, node: Node, parsed: blockfile.ParsedFile, data: bytes) -> None:
        """The first flush of the new block file `node` (held in `order.creating`): create its
        block where the node is and show it. The namespace waits for this create, so the node
        cannot move meanwhile; if it was removed all the same, the block just made is retired
        at once rather than left live with no file. Raises FsError as `create`."""
        location = self.state.location(node)
        path = self.tree.path(node)
        block = await self.create(location, parsed, data, path, node)
        if block is None or self.state.written(node, block):
            return
        if not is_provisional(block.id):
            try:
                await self.remote.retire(block, location.attached, budget=self._budget())
            except FsError as exc:
                log.error("%s: block %s was made for a file removed meanwhile and could not "
                          "be retired (%s)", path, block.id, exc.reason)

    async def _reuse(self, node: Node, tomb: Tombstone, parsed: blockfile.ParsedFile,
                     data: bytes) -> None:
        """The first flush of the new block file `node` (held in `order.creating`), whose path
        had a block unlinked within the grace period (`tomb`, claimed): that block takes the
        file, as a write made on the block as it was unlinked (a server change since is a
        conflict); journaled when the server cannot take it. A refusal buries the block again,
        so it is still retired. Raises FsError as `write`."""
        path = self.tree.path(node)
        try:
            async with self._order(tomb.block.id):
                block = self._current(tomb.block)
                with self._deadline() as deadline:
                    if not self.offline():
                        try:
                            written = await self.write(block, parsed, path, block, node,
                                                       budget=self._budget())
                        except ServerAway as exc:
                            self._fall_back(exc, path)
                        else:
                            self.state.written(node, written)
                            return
                if deadline.cancelled_caught:
                    log.warning("%s: no answer within %g s (the server is slow); the write is "
                                "journaled", path, CLOSE_DEADLINE)
                if block.read_only:
                    raise FsError(errno.EACCES, "block is read-only")
                changes = blockfile.plan_update(block, parsed)
                if not changes:
                    self.state.written(node, block)
                    return
                self.state.journaled(node, dataclasses.replace(block, **changes), data,
                                     self._server_base(block, block))
        except FsError:
            if node.block is None:  # a Stale write shows the server's block: it stays claimed
                self.state.unclaim(tomb)
            raise

    async def append(self, node: Node, added: bytes) -> None:
        """Add the bytes `added` (what an O_APPEND handle wrote) to the end of the block file
        `node`'s value as the server has it now (`GET /v1/blocks/{id}`, then one PATCH), not as
        it was when the file was opened: appenders, and the agent's own edits meanwhile, all
        keep their text, in the order of the closes. Not a conflict. With the server away (or
        a journal waiting) the file as the mount shows it plus `added` is journaled instead.
        Raises FsError: EINVAL (not UTF-8), EFBIG (past the limit), as `send`."""
        try:
            text = added.decode("utf-8")
        except UnicodeDecodeError:
            raise FsError(errno.EINVAL, "the appended bytes are not valid UTF-8") from None
        while True:
            if node.block is None:
                log.info("%s: removed while its append waited; it stays local", node.name)
                return
            block_id = node.block.id
            async with self._order(block_id):
                if (node.block is not None and node.block.id != block_id and node.parent != 0
                        and node.kind is Kind.BLOCK):
                    continue  # renamed over another file meanwhile: append to its block now
                if not self.state.shows(node, block_id) or node.block is None:
                    log.info("%s: removed while its append waited; it stays local", node.name)
                    return
                if not self.offline() and not is_provisional(node.block.id):
                    with self._deadline():
                        try:
                            current = await self.remote.fetch_now(node.block.id, self._budget())
                            parsed = blockfile.ParsedFile(value=current.value + text, fields={},
                                                          has_frontmatter=False)
                            block = await self.write(current, parsed, self.tree.path(node), None,
                                                     node, budget=self._budget())
                        except ServerAway as exc:
                            self._fall_back(exc, self.tree.path(node))
                        else:
                            self.state.written(node, block)
                            return
                data = bytes(node.content) + added
                self._journal(node, blockfile.parse(data), data, node.block)
                return

    def _real(self, block_id: str) -> str:
        journal = self.state.journal
        return journal.real_id(block_id) if journal is not None else block_id

    async def create(self, location: Location, parsed: blockfile.ParsedFile, data: bytes,
                     path: str, node: Node | None = None) -> Block | None:
        """A new block at `location` for the file `data` (a first flush of `node`, a rename of
        a scratch file to a block name): POST it, or, when the server cannot take it, journal
        the create and return the block it makes with a provisional id (the caller shows it
        either way). Both carry the provisional id's marker tag until the block is complete,
        so a create journaled after a half-done attempt (no answer after the POST, or to the
        attach) finds that block at replay. None: `node` was removed while the server was
        tried (nothing is journaled; its bytes stay with the open file). Checked as online
        first: EINVAL, EFBIG. Raises FsError."""
        provisional = Remote.new_block(PROVISIONAL_PREFIX + uuid.uuid4().hex, location, parsed)
        if self.remote.agent_gone_since is not None:  # its block would belong to nobody
            raise FsError(errno.ESTALE, "the agent is gone from the server (deleted?); the "
                                        "new file is kept in history as a rejected edit")
        if not self.offline():
            with self._deadline() as deadline:
                try:
                    block = await self.remote.create(location, parsed, self._budget(),
                                                     marker=create_marker(provisional.id),
                                                     retiring=self.state.unlinked_ids)
                    log.info("%s: created block %s", path, block.id)
                    return block
                except LabelTaken as exc:
                    return await self._write_taken(exc, parsed, path, node)
                except FsError as exc:
                    self._fall_back(exc, path)
            if deadline.cancelled_caught:  # what the server made meanwhile carries the marker
                log.warning("%s: no answer within %g s (the server is slow); the create is "
                            "journaled", path, CLOSE_DEADLINE)
            if node is not None and (node.parent == 0 or node.kind is not Kind.BLOCK
                                     or node.block is not None):
                log.info("%s: removed while its create waited; the write stays local", path)
                return None
        self.state.journal_create(provisional.id, path, location, data)
        log.info("%s: the server is away; its create is journaled", path)
        return dataclasses.replace(provisional, tags=(self.remote.owner_tag,))

    async def _write_taken(self, taken: LabelTaken, parsed: blockfile.ParsedFile, path: str,
                           node: Node | None) -> Block:
        """A new file whose label the agent already has (LabelTaken): the file is a write to
        that block, under the conflict rule, as if it had been read empty (its text first goes
        to history as the server's version). Raises FsError as `write` (Stale under reject)."""
        theirs = taken.theirs
        log.warning("%s: %s; the new file is written to that block (both versions are in "
                    "history)", path, taken.reason)
        return await self.write(theirs, parsed, path, base=blank(theirs), node=node,
                                budget=self._budget())

    async def write_now(self, block: Block, parsed: blockfile.ParsedFile, path: str,
                        base: Block | None = None) -> Block:
        """An update of `block` by a file that replaces its file (a rename over a block file):
        sent, or journaled when the server cannot take it (then the block as the write makes
        it is returned and the caller shows it). Raises FsError as `write`."""
        async with self._order(block.id):
            block = self._current(block)
            if not self.offline():
                try:
                    return await self.write(block, parsed, path, base, budget=self._budget())
                except ServerAway as exc:
                    self._fall_back(exc, path)
            if block.read_only:
                raise FsError(errno.EACCES, "block is read-only")
            view = dataclasses.replace(block, **blockfile.plan_update(block, parsed))
            self.state.journal_write(view, path, blockfile.render(view), self._server_base(
                block, base))
            log.info("%s: the server is away; the write is journaled", path)
            return view

    async def relocate(self, node: Node, location: Location) -> Block:
        """Give the block file `node`'s block a new `location` (a rename: label, attach or
        detach): sent, or journaled when the server cannot take it; returns the block as the
        server has it, or as the journaled rename makes it. Raises FsError (a refusal)."""
        async with self._order(node.block.id):
            block = node.block  # read under the lock: a replayed create may have changed its id
            if not self.offline():
                try:
                    return await self.remote.relocate(block, self.state.location(node).attached,
                                                      location, budget=self._budget())
                except ServerAway as exc:
                    self._fall_back(exc, self.tree.path(node))
            self.state.journal_relocations([(node, location)])
            log.info("%s: the server is away; its rename to %s is journaled",
                     self.tree.path(node), "/".join(self.state.path_of(location) or ()))
            return dataclasses.replace(block, label=location.label)

    async def retire(self, tomb: Tombstone) -> None:
        """The grace period of an unlinked file ended: retire its block (Remote.retire), or,
        when the server cannot take it, queue its journaled unlink (replayed later). A refusal
        the server judged is logged as an ERROR and settles the entry. Raises FsError without
        a journal (the graveyard retries)."""
        entry = tomb.entry
        if entry is not None and self.offline():
            self.state.queue_unlink(entry)
            log.info("%s: the server is away; retiring block %s is journaled", tomb.path,
                     tomb.block.id)
            return
        try:
            retired = await self.remote.retire(tomb.block, tomb.attached, budget=self._budget())
        except FsError as exc:
            if entry is None:
                raise
            if isinstance(exc, ServerAway):
                self.state.queue_unlink(entry)
                log.info("%s: %s; retiring block %s is journaled", tomb.path, exc.reason,
                         tomb.block.id)
                return
            log.error("%s: the server refused to retire block %s (%s)", tomb.path,
                      tomb.block.id, exc.reason)
            self.state.retired(entry, f"refused: {exc.reason}")
            return
        if retired:
            log.info("%s: block %s %s", tomb.path, tomb.block.id,
                     "detached and untagged" if tomb.attached else "untagged")
        self.state.retired(entry, "retired" if retired else "already gone from the server")

    def _order(self, block_id: str) -> trio.Lock:
        return self.block_order.of(block_id)

    def note_conflict(self, words: str) -> None:
        """Keep `words` as the last conflict (for `memfuse status`) and log it (WARNING)."""
        self.last_conflict = words
        log.warning("%s", words)

    def writing(self, block_id: str) -> trio.Lock:
        """The lock under which writes to block `block_id` are decided and sent one at a time:
        a rename over another file holds its source's, so a close of the source under way
        ends before the rename reads its bytes."""
        return self._order(block_id)

    def _current(self, block: Block) -> Block:
        """`block`, or the block the mount shows for it now when its create was replayed
        since it was read (the provisional id became the server's)."""
        real = self._real(block.id)
        node = self.tree.block_node(real) if real != block.id else None
        return node.block if node is not None and node.block is not None else block

    def _server_base(self, block: Block, base: Block | None) -> Block:
        """The conflict base of a journaled write to `block`: what the server will hold when it
        is replayed, i.e. the previous journaled write's result, or else the server's block
        the writer read (`base`)."""
        journal = self.state.journal
        earlier = any(e.block_id == block.id and e.kind in (WRITE, CREATE)
                      for e in journal.pending())
        return block if earlier else (base or block)

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
        self.state.journaled(node, view, data, self._server_base(block, base))
        log.info("%s: the server is away; journaled (%d pending)", self.tree.path(node),
                 len(self.state.journal.pending()))

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
            self.note_conflict(f"{path}: changed on the server after it was opened; the "
                                  f"write was rejected (both versions are in history)")
            raise
        # a file unlinked while the write was in flight has left history: the server's version
        # is not recorded at its path again (history would show a file the mount has not)
        if written.theirs is not None and (node is None or self.state.shows(node, block.id)):
            self.state.conflict(path, written.theirs)
            self.note_conflict(f"{path}: changed on the server after it was opened; the "
                                  f"file's version was written over it (both versions are in "
                                  f"history)")
        if written.fields:
            log.info("%s: wrote %s", path, ", ".join(written.fields))
        return written.block
