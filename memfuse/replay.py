"""Journal replay: send what the journal holds once the server answers again.

The journal (journal.py) keeps, in order, the changes the server could not take: writes,
creates, renames (relocations) and unlinks (retirements). `Replayer.replay` groups them into
units of one block (`units`) and sends each unit as few calls as it can, under the same
conflict rule and per-block order as an online write (files.BlockFiles shares its
`block_order`). What the server answered decides each unit's outcome: settled (sent, already
there, refused for good and kept in history), or waiting (no answer, a refused key, 'not now',
a 5xx). SEMANTICS.md, "The outage journal", states the rules; MountState.replayed lands each
outcome in the tree and history.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import trio

from . import blockfile
from .errors import FsError, ServerAway, ServerRefused
from .files import WRITE_BUDGET, blank
from .journal import CREATE, RELOCATE, UNLINK, WRITE, Entry, base_of
from .model import Block, Location, create_marker, is_provisional
from .ordering import BlockOrder
from .remote import LabelTaken, Remote
from .state import MountState
from .tree import Node

log = logging.getLogger("memfuse.replay")

STUCK_AFTER = 60.0  # seconds a journaled change may wait on an answering server before ERROR
KEY_RETRY = 30.0  # seconds between replays while the server refuses the API key
REPLAY_FAILURES = 5  # 5xx answers to one journaled write before it is given up as refused


@dataclass(frozen=True)
class Outcome:
    """What sending one unit came to: `words` for the log and status; `block` the server's
    block now (None: retired, or never made); `sent` whether the server took a change;
    `recorded` whether history heard of another version meanwhile (a conflict, a refusal)."""

    words: str
    block: Block | None = None
    sent: bool = False
    recorded: bool = False


def _versions(entries: list[Entry]) -> Iterator[Block]:
    """The block after each of a block's journaled writes (and create), in order, made of the
    first one's base: each file's value, and each frontmatter key it names (a key left out
    keeps the earlier write's)."""
    block = entries[0].base_block()
    for entry in entries:
        block = blockfile.applied(block, blockfile.parse(entry.content))
        yield block


def _made(entries: list[Entry]) -> Block:
    """The block a block's journaled writes (and create), in order, make (`_versions`)."""
    *_, block = _versions(entries)
    return block


def _changed_since(current: Block, base: dict) -> bool:
    """Whether the server's block `current` changed since a journaled write's `base`
    (journal.base_of): its value, limit or description, the description as a file shows it
    (a blank one and its default read the same: a local-first mount reads blocks back from
    their files, so its bases hold the default where the server holds none)."""
    then = Block(current.id, current.label, base["value"], base["limit"], base["description"])
    return blockfile.conflict_fields(current) != blockfile.conflict_fields(then)


def _ours(current: Block, contents: list[Entry]) -> bool:
    """Whether the server's block `current` is what the first n of a block's journaled writes
    `contents` make, for some n: this mount's own write, whose PATCH the server took before
    the answer was lost (the write was then journaled on the block as it was), or a replay
    cut short after its PATCH. Not a change of somebody else's, so no conflict."""
    fields = blockfile.conflict_fields(current)
    return any(blockfile.conflict_fields(block) == fields for block in _versions(contents))


def _target(entries: list[Entry]) -> blockfile.ParsedFile:
    """What a block's journaled writes, in order, make of it, as one file (`_made`)."""
    block = _made(entries)
    fields = {"description": block.description, "limit": block.limit}
    return blockfile.ParsedFile(value=block.value,
                                fields={k: v for k, v in fields.items() if v is not None},
                                has_frontmatter=True)


class Replayer:
    """Replays one mount's journal (`replay`, forever in `run_replay`).

    order: the per-block order shared with files.BlockFiles (a unit is sent under its block's
    lock, so an online write never overtakes a journaled one). note_conflict: where a
    conflict met at replay is told (BlockFiles.note_conflict, for `memfuse status`).
    `last_replay`: the last unit replayed and its outcome, in words; `key_refused`: why the
    server refused the API key, while replay is paused for it.
    """

    def __init__(self, state: MountState, remote: Remote, order: BlockOrder,
                 note_conflict: Callable[[str], None]):
        self.state, self.remote, self.tree = state, remote, state.tree
        self.order, self.note_conflict = order, note_conflict
        self.last_replay: str | None = None
        self.key_refused: str | None = None
        self._stuck: dict[str, float] = {}  # block id -> trio time its replay first failed
        self._stuck_reported: set[str] = set()
        self._failures: dict[int, int] = {}  # journal seq -> 5xx answers at replay

    @staticmethod
    def _units(queued: list[Entry]) -> list[list[Entry]]:
        """The queued entries (in seq order) as units of one block each, replayed in order: an
        entry joins the unit before it when that is its block's; a write also joins its
        block's latest unit further back (writes to different blocks commute). Creates,
        renames and unlinks of different blocks keep their order (a label one frees, another
        takes)."""
        units: list[list[Entry]] = []
        latest: dict[str, list[Entry]] = {}
        for entry in queued:
            unit = latest.get(entry.block_id)
            if unit is not None and (entry.kind == WRITE or units[-1] is unit):
                unit.append(entry)
                continue
            unit = [entry]
            units.append(unit)
            latest[entry.block_id] = unit
        return units

    async def replay(self) -> bool:
        """Send the journal's queued changes, unit by unit in order (`_units`). A unit's
        changes are sent together: what its writes (and create) make of the block as one
        PATCH (or one POST), checked against the server's block as it was before the first of
        them, under the conflict rule of an online write (a newer server version is committed
        to history first; then the journal's version overwrites it, or under `reject` is
        committed as refused); then its renames as one relocation; then its unlink as one
        retirement. A create first looks for the block an earlier attempt made (its marker
        tag), so a replay repeated after a crash makes no second block; a create whose file
        was unlinked within its grace period waits for it (it may be claimed back). Stops,
        returning False, when the server stops answering, refuses the key (401/403: paused,
        an ERROR), says "not now" (408/429: never given up; `run_replay` waits out its
        Retry-After), or at such a create; a unit of writes whose block the server fails on
        (5xx, fewer than REPLAY_FAILURES times) waits with its block's later units while the
        other blocks' units go on (then False). True when nothing is queued. A change the
        server refuses for good (400/404/409/422, a limit it now has, a block made read-only,
        a 5xx REPLAY_FAILURES times) is committed to history as refused and logged, never
        dropped silently. A block waiting past STUCK_AFTER seconds is an ERROR (`stuck`)."""
        journal = self.state.journal
        if journal is None:
            return True
        held: set[str] = set()  # blocks whose unit failed: their later units wait too
        for unit in self._units(journal.queued()):
            entries = [e for e in unit if journal.is_pending(e)]
            if not entries:
                continue
            block_id = entries[0].block_id
            if block_id in held:
                continue
            if is_provisional(block_id) and any(e.block_id == block_id and not e.queued
                                                for e in journal.pending()):
                self.last_replay = f"{entries[0].path}: waits for its unlink's grace period"
                return False
            async with self.order.of(block_id):
                entries = [e for e in entries if journal.is_pending(e)]
                if not entries:
                    continue
                last = entries[-1]
                try:
                    result = await self._replay(entries)
                except FsError as exc:
                    if not self._gives_up(last, exc):
                        self.last_replay = f"{last.path}: not sent yet ({exc.reason})"
                        self._waiting(last, exc)
                        if self._passes_over(entries, exc):
                            held.add(block_id)
                            continue
                        return False
                    result = Outcome(self._refuse(entries, exc), recorded=True)
                self._failures.pop(last.seq, None)
                self._stuck.pop(last.block_id, None)
                self._settled(entries, result.block)
                self.state.replayed(entries, result.block, result.words, sent=result.sent,
                                    recorded=result.recorded)
            self.last_replay = f"{last.path}: {result.words}" + (
                f" ({len(entries)} journaled changes)" if len(entries) > 1 else "")
            log.info("journal: %s", self.last_replay)
        self.key_refused = None  # every unit got an answer other than a refused key
        return not held

    def _settled(self, entries: list[Entry], block: Block | None) -> None:
        """A unit is settled on `block` (None: no block): when it holds a create, tell
        MountState what its block could hold and which block it is, so that a POST of it
        that takes effect only now is known for an orphan, and its own block never is."""
        if entries[0].kind == CREATE:
            contents = [e for e in entries if e.kind in (WRITE, CREATE)]
            self.state.settled_create(create_marker(entries[0].block_id), {
                _target(contents[:n]).value for n in range(1, len(contents) + 1)},
                block.id if block is not None else None, trio.current_time())

    @staticmethod
    def _passes_over(entries: list[Entry], exc: FsError) -> bool:
        """Whether the replay goes on past a unit that failed with `exc`: only writes (they
        commute with other blocks' changes), and only when the server answered for this block
        alone (a 5xx): no answer, a refused key (401/403) or a 'not now' (408/429) concern
        every unit, and creates, renames and unlinks keep their order."""
        status = getattr(exc, "status", None)
        return (status is not None and status >= 500
                and all(e.kind == WRITE for e in entries))

    def _waiting(self, entry: Entry, exc: FsError) -> None:
        """A unit is not sent yet: note since when its block waits; past STUCK_AFTER seconds
        that is an ERROR (once) and `stuck` for status. A refused key pauses the replay with an
        ERROR (once per pause): a key that expires during an outage must not turn the journal
        into rejected edits."""
        now = trio.current_time()
        since = self._stuck.setdefault(entry.block_id, now)
        status = getattr(exc, "status", None)
        if status in (401, 403):
            if self.key_refused is None:
                log.error("journal: the server refused the API key (%s); replay is paused and "
                          "the %d journaled change(s) are kept until it is accepted",
                          exc.reason, len(self.state.journal.pending()))
            self.key_refused = exc.reason
        if now - since >= STUCK_AFTER and entry.block_id not in self._stuck_reported:
            self._stuck_reported.add(entry.block_id)
            log.error("journal: %s has waited %.0f s for the server (%s); later changes to "
                      "other blocks are sent meanwhile where they can be", entry.path,
                      now - since, exc.reason)

    def stuck(self) -> str | None:
        """In words, the journaled change that has waited longest past STUCK_AFTER seconds
        (for `memfuse status`), or a refused key; None when nothing is stuck."""
        if self.key_refused is not None:
            return f"paused: the server refused the API key ({self.key_refused})"
        now = trio.current_time()
        old = [(since, block_id) for block_id, since in self._stuck.items()
               if now - since >= STUCK_AFTER]
        if not old:
            return None
        since, block_id = min(old)
        node = self.tree.block_node(block_id)
        where = self.tree.path(node) if node is not None else block_id
        return f"stuck for {now - since:.0f} s on {where}: {self.last_replay or ''}"

    async def run_replay(self, interval: float = 0.5) -> None:
        """Replay the journal whenever it holds queued changes and the server answers, forever
        (cancel to stop); checks every `interval` seconds, not before a 429's Retry-After
        (Remote.throttled_until), and every KEY_RETRY seconds while the key is refused."""
        while True:
            journal = self.state.journal
            if (journal is not None and journal.waiting() and self.remote.reachable
                    and trio.current_time() >= self.remote.throttled_until):
                await self.replay()
                if self.key_refused is not None:
                    await trio.sleep(KEY_RETRY)  # a refused key: ask again now and then
            await trio.sleep(interval)

    def _gives_up(self, entry: Entry, exc: FsError) -> bool:
        """Whether a failure at replay is final for `entry`: a refusal the server judged (or
        one found before sending: a block made read-only meanwhile), or a 5xx for the
        REPLAY_FAILURES-th time (a value the server keeps failing on)."""
        if isinstance(exc, ServerRefused):
            return exc.status in ServerRefused.FINAL
        if not isinstance(exc, ServerAway):
            return True
        if exc.status is None or exc.status in (408, 429):
            return False  # no answer at all, or "not now": wait for it, never give up
        self._failures[entry.seq] = self._failures.get(entry.seq, 0) + 1
        return self._failures[entry.seq] >= REPLAY_FAILURES

    def _refuse(self, entries: list[Entry], exc: FsError) -> str:
        """Keep what refused changes made: a create's file (as the person wrote it) leaves the
        mount, a write's result stays in history as a rejected edit."""
        last = entries[-1]
        node = self.tree.block_node(last.block_id)
        contents = [e for e in entries if e.kind in (WRITE, CREATE)]
        if contents and node is not None and self.state.shows(node, last.block_id):
            if entries[0].kind == CREATE:
                self.state.rejected(node, contents[-1].content, made=False, reason=exc.reason)
            else:
                self.state.refused(self.tree.path(node), _made(contents), reason=exc.reason)
        log.error("%s: the server refused journaled changes (%s); they are kept in history "
                  "as a rejected edit", last.path, exc.reason)
        return f"refused: {exc.reason}; kept in history as a rejected edit"

    async def _replay(self, entries: list[Entry]) -> Outcome:
        """Send one unit's changes `entries` (see `replay`) and say what came of it. Raises FsError
        (ServerAway, ServerRefused, a refusal found before sending: the caller decides
        whether that is final)."""
        first, last = entries[0], entries[-1]
        contents = [e for e in entries if e.kind in (WRITE, CREATE)]
        moves = [e for e in entries if e.kind == RELOCATE]
        unlink = last if last.kind == UNLINK else None
        if is_provisional(first.block_id) and first.kind != CREATE:
            return self._unmade(entries, contents)
        node = self.tree.block_node(first.block_id)
        path = self.tree.path(node) if node is not None else None
        if first.kind == CREATE:
            location = moves[-1].to if moves else first.to
            made = await self._create(first, contents, location, unlink is not None, path,
                                      node)
            if made.block is None:
                return made
            block, words, sent, recorded = made.block, [made.words], True, made.recorded
            moves = []  # the create put the block where the last rename did
        else:
            block = await self.remote.fetch_now(first.block_id, WRITE_BUDGET)
            words, sent, recorded = [], False, False
            if contents:
                written = await self._write(block, contents[0].base, contents, path, node,
                                            entry_path=first.path)
                block, sent, recorded = written.block, written.sent, written.recorded
                words.append(written.words)
        if moves:
            block = await self.remote.relocate(block, moves[0].frm.attached, moves[-1].to,
                                               WRITE_BUDGET)
            words.append(f"moved to {'/'.join(self.state.path_of(moves[-1].to) or ())}")
            sent = True
        if unlink is not None:
            attached = unlink.frm.attached if first.kind != CREATE else location.attached
            retired = await self.remote.retire(block, attached, WRITE_BUDGET)
            words.append("retired" if retired else "already gone from the server")
            return Outcome(", ".join(words), None, sent=True, recorded=recorded)
        return Outcome(", ".join(words), block, sent=sent, recorded=recorded)

    async def _create(self, first: Entry, contents: list[Entry], location: Location,
                      unlinked: bool, path: str | None, node: Node | None) -> Outcome:
        """Send a unit's create (`first`) of a block at `location` with what its writes
        `contents` make: the block an earlier attempt made is found by its marker (or, for a
        file since unlinked, by label, owner tag and value) and finished (`_finish`); else one
        is made. A label the agent has already takes the file as a write. Its `block` is None
        only when the file was created and removed while the server was away and no attempt
        made a block. Raises FsError as `_replay`."""
        marker = create_marker(first.block_id)
        sent_values = {_target(contents[:n]).value for n in range(1, len(contents) + 1)}
        found = await self.remote.find_marked(marker, WRITE_BUDGET)
        if found is None and unlinked:  # made, marker dropped, answer lost?
            block = await self.remote.find_made(location, sent_values, WRITE_BUDGET)
            if block is None:
                return Outcome("created and removed while the server was away")
            found = (block, location.attached)
        try:
            if found is None:
                block = await self.remote.create(location, _target(contents), WRITE_BUDGET,
                                                 marker=marker,
                                                 retiring=self.state.unlinked_ids)
                return Outcome("created", block, sent=True)
            return await self._finish(*found, first, contents, sent_values, location, path,
                                      node)
        except LabelTaken as taken:  # an earlier attempt whose marker is gone (the answer to
            # its drop was lost), or a block made elsewhere: the file is written to it
            log.warning("%s: %s; the journaled file is written to that block",
                        first.path, taken.reason)
            written = await self._write(taken.theirs, base_of(blank(taken.theirs)), contents,
                                        path, node, entry_path=first.path)
            block = written.block
            if marker in block.tags:  # this create's own earlier block: complete it now
                block = await self.remote.complete(block, location, WRITE_BUDGET)
            return Outcome(f"written to the block the label had ({taken.theirs.id}): "
                           f"{written.words}", block, sent=True, recorded=written.recorded)

    async def _finish(self, block: Block, attached: bool, first: Entry, contents: list[Entry],
                      sent_values: set[str], location: Location, path: str | None,
                      node: Node | None) -> Outcome:
        """Finish `block`, which an earlier attempt of this create made (no answer after its
        POST, or a crash; `attached`: whether it is attached now): move it where the unit's
        last rename put the file, write what the unit's writes make, drop its marker
        (`Remote.complete`). A value no attempt sent (`sent_values`) is someone else's edit
        (an attached block is in the agent's prompt): it goes to history first, as any
        conflict. A refusal deletes the block when it holds only what this create sent, so a
        refused create leaves no live block. Raises FsError as `_replay`."""
        ours = block.value in sent_values
        try:
            # attaching is `complete`'s (it resolves a 409): relocate only relabels, or detaches
            block = await self.remote.relocate(block, attached or location.attached, location,
                                               WRITE_BUDGET)
            base = base_of(block) if ours else base_of(blank(block))
            written = await self._write(block, base, contents, path, node,
                                        entry_path=first.path)
            block = await self.remote.complete(written.block, location, WRITE_BUDGET)
        except ServerRefused:
            if ours:
                await self.remote.discard(block, WRITE_BUDGET)
            raise
        return Outcome("created (by an earlier attempt)" + (
            "" if written.words == "already on the server" else f", {written.words}"),
            block, sent=True, recorded=written.recorded)

    def _unmade(self, entries: list[Entry], contents: list[Entry]) -> Outcome:
        """A unit of a provisional block whose create is settled but made no block (the server
        refused it for good; history has the file as a rejected edit): nothing is sent (a
        provisional id means nothing to the server). What its writes made goes to history at
        the unit's last path as a rejected edit, so no byte is dropped. Returns what `_replay`
        returns."""
        last = entries[-1]
        if contents:
            self.state.refused_unshown(last.path, _made(contents),
                                       reason="its file's create was refused by the server")
            log.error("%s: journaled writes to a file whose create the server refused; they "
                      "are kept in history as a rejected edit", last.path)
            return Outcome("refused: its create was refused; kept in history as a rejected "
                           "edit", recorded=True)
        return Outcome("nothing to send: its create was refused")

    async def _write(self, current: Block, base: dict, contents: list[Entry], path: str | None,
                     node: Node | None, entry_path: str) -> Outcome:
        """Send what the journaled writes `contents` make of the block, made on the server's
        `base` (value, description, limit), to the server's block `current`; the outcome's
        block is the server's block now (never None). History
        only hears of it where the block is still shown at `path` (a file unlinked since has
        its journaled version in history already). Raises ServerAway, ServerRefused."""
        parsed = _target(contents)
        try:
            changes = blockfile.plan_update(current, parsed)
        except FsError as exc:  # e.g. the server's limit is now lower than the value
            if path is not None:
                self.state.conflict(path, current, rejected=parsed, node=node,
                                    reason=exc.reason)
            log.error("%s: a journaled write cannot apply any more (%s); it is kept in "
                      "history as a rejected edit", entry_path, exc.reason)
            return Outcome(f"refused: {exc.reason}; kept in history as a rejected edit",
                           current, recorded=path is not None)
        if not changes:
            return Outcome("already on the server", current)
        recorded = False
        if _changed_since(current, base) and not _ours(current, contents):
            where = path or entry_path
            if self.remote.on_conflict == "reject":
                if path is not None:
                    self.state.conflict(path, current, rejected=parsed, node=node)
                self.note_conflict(f"{where}: changed on the server while the write was "
                                      f"journaled; the write was rejected (both versions are "
                                      f"in history)")
                return Outcome("rejected: the server changed first", current,
                               recorded=path is not None)
            if path is not None:
                self.state.conflict(path, current)
                recorded = True
            self.note_conflict(f"{where}: changed on the server while the write was "
                                  f"journaled; the journaled version was written over it "
                                  f"(both versions are in history)")
        written = await self.remote.update(current, parsed, budget=WRITE_BUDGET)
        return Outcome("sent", written.block, sent=True, recorded=recorded)
