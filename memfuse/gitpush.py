"""The push side of `memfuse serve`: a pushed commit checked against the live server, applied
as block changes, and the branch moved to what is on the server.

gitserve.PushHandler calls `Receiver.receive` for each ref a `git push` updates, from inside
dulwich's receive-pack (`ReceivePackHandler._on_update`), once the pack's objects are in the
history's object store and while the request holds the history's one-writer lock. The live
blocks were taken into the history just before (gitsync.take), so the branch head is the
server as it is now, and the push is the difference between that head and the pushed commit:

1. **Refs.** Only `refs/heads/main` is taken; it is never deleted; the pushed commit must
   descend from the head (merge commits do), else `non-fast-forward`, as git's receive-pack
   says it (a push made on a base the server has moved past is one).
2. **Checks**, every changed file, before any call that changes a block (`plan`): the
   layout's `kind` of its path (a block file, a kept file of the git-memory layout; anything
   else is refused with the reason), a regular file, a kept file's size (the mount's caps:
   KEPT_FILE_LIMIT each, KEPT_LIMIT in all), the frontmatter (blockfile.parse), the
   limit (the pushed `limit`, else the block's on the server; a new block's default), a
   `read_only` block unchanged and never removed, and at least one block file left.
3. **Apply** (`apply`), with the request's key, through Remote, the seam the mount's writes
   use, under `reject`: relabels (a removed block file whose value a new one holds: its fields
   by `Remote.update`, then `Remote.relocate`), updates (`Remote.update`: a GET, then one PATCH
   when the block is still as judged), creates (`Remote.create`: POST tagged `owner:<agent>`,
   attached as the layout says), removals (`Remote.retire`: detach and drop the owner tag,
   when the block is still as judged; never a delete). A block changed on the server since
   it was judged is Stale: that step fails and the push is taken in part (4).
4. **The ref.** All applied: the branch moves to the pushed commit itself (same id; no
   commit on top). A call that fails: the branch moves to a commit on the old head holding the
   files applied so far (and the kept files), and the ref's status is `ng`, naming the applied
   and the unapplied files.

Nothing here speaks git's protocol or HTTP: a `Verdict` says what the ref's status and the
`remote:` lines are.
"""
from __future__ import annotations

import errno
import logging
import stat
from dataclasses import dataclass, field
from typing import Callable

import trio
from dulwich.graph import can_fast_forward

from . import blockfile
from .errors import FsError
from .history import BRANCH, HistoryRepo
from .layout import GIT_MEMORY, KEPT_FILE_LIMIT, KEPT_LIMIT, Layout, PathKind
from .model import Block, Location
from .remote import Client, Remote, Stale

log = logging.getLogger("memfuse.push")

ZERO = b"0" * 40
SUBJECT = "Part of a push"  # the commit of a push the server took in part
MAX_STATUS = 1000  # characters of a ref's `ng` reason (one pkt-line; the rest is in the remote lines)

@dataclass(frozen=True)
class Unread:
    """A file both sides of a push hold alike (same mode, same object id `sha`): its bytes
    are never read, and it compares equal on both sides, so `plan` passes over it."""

    sha: bytes


# path -> (git mode, bytes; None: no blob here; Unread: alike on both sides)
Files = dict[str, tuple[int, "bytes | Unread | None"]]


def pushed_files(repo: HistoryRepo, head: bytes | None, new: bytes, layout: Layout
                 ) -> tuple[Files, Files]:
    """The files of the commits `head` (None: no commit) and `new`, as `plan` takes them: the
    bytes of a file are read where the two differ, and of every kept file (PathKind.KEPT:
    their total size is checked); any other file alike on both sides is Unread (at 1,000
    blocks, reading every blob of both trees was a tenth of a push)."""
    old_entries = repo.entries(head) if head is not None else {}
    new_entries = repo.entries(new)

    def read(path: str, mode: int, sha: bytes, other: dict) -> tuple[int, bytes | Unread | None]:
        if other.get(path) == (mode, sha) and layout.kind(_parts(path)) is not PathKind.KEPT:
            return mode, Unread(sha)
        return mode, repo.blob(sha) if stat.S_ISREG(mode) or stat.S_ISLNK(mode) else None

    return ({path: read(path, *entry, new_entries) for path, entry in old_entries.items()},
            {path: read(path, *entry, old_entries) for path, entry in new_entries.items()})


def _errno_name(exc: FsError) -> str:
    return errno.errorcode.get(exc.errno, str(exc.errno))


@dataclass(frozen=True)
class Step:
    """One server change of a push: `kind` update, create, relabel or retire; `path` the file
    it comes from (a relabel's new path; `old_path` its old one); `block` the live block it
    changes and whether it is `attached` now; `location` and `parsed` what the file says."""

    kind: str
    path: str
    block: Block | None = None
    attached: bool = False
    location: Location | None = None
    parsed: blockfile.ParsedFile | None = None
    old_path: str | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.old_path, self.path) if self.old_path else (self.path,)

    def words(self) -> str:
        if self.kind == "relabel":
            return f"{self.old_path} -> {self.path}"
        return f"{self.path} ({self.kind})"


ORDER = ("relabel", "update", "create", "retire")  # labels freed first, blocks removed last


@dataclass
class Plan:
    """What a push asks of the server: `steps` in the order they are applied, `changes` every
    changed path (path -> pushed bytes, None: removed), `kept` the changed paths that need no
    server call (kept files), `refusals` one `path: reason` line per file refused."""

    steps: list[Step] = field(default_factory=list)
    changes: dict[str, bytes | None] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)


def _parts(path: str) -> tuple[str, ...]:
    return tuple(path.split("/"))


def _not_a_block(kind: PathKind, layout: Layout) -> str:
    """Why a file of `kind` (not BLOCK or KEPT) cannot be pushed in `layout`."""
    if kind is PathKind.REFUSED:
        return ("Letta would read it as a block whose label memfuse cannot show (a control "
                "character, an empty or `.git` name, a path over 4,095 bytes)")
    if layout is GIT_MEMORY:
        return "an editor's temporary file: never kept in history"
    return ("not a block file: in this agent's layout only system/<label>.md (attached) and "
            "<label>.md (detached, owned) are blocks, and no other file is kept")


class _Planner:
    """Builds a Plan from the head's files, the pushed files and the live blocks by path."""

    def __init__(self, live: dict[str, tuple[Block, bool]], layout: Layout):
        self.live, self.layout, self.plan = live, layout, Plan()
        self.creates: list[Step] = []
        self.retires: list[Step] = []

    def refuse(self, path: str, reason: str) -> None:
        self.plan.refusals.append(f"{path}: {reason}")

    def added_or_changed(self, path: str, mode: int, data: bytes | None) -> None:
        kind = self.layout.kind(_parts(path))
        if kind not in (PathKind.BLOCK, PathKind.KEPT):
            return self.refuse(path, _not_a_block(kind, self.layout))
        if not stat.S_ISREG(mode) or data is None:
            return self.refuse(path, "not a regular file (a symlink or a submodule): memfuse "
                                     "keeps regular files only")
        if kind is PathKind.KEPT:
            if len(data) > KEPT_FILE_LIMIT:
                return self.refuse(path, f"a file that is no block is kept up to "
                                         f"{KEPT_FILE_LIMIT >> 20} MiB ({KEPT_FILE_LIMIT} "
                                         f"bytes); it has {len(data)} (EFBIG)")
            return self.plan.kept.append(path)
        try:
            parsed = blockfile.parse(data)
        except FsError as exc:
            return self.refuse(path, f"{exc.reason} ({_errno_name(exc)})")
        location = self.layout.location_at(_parts(path))
        assert location is not None  # kind BLOCK
        if path in self.live:
            return self.update(path, parsed, *self.live[path])
        try:
            Remote.new_block("", location, parsed)  # read_only set, over the limit
        except FsError as exc:
            return self.refuse(path, f"{exc.reason} ({_errno_name(exc)})")
        self.creates.append(Step("create", path, location=location, parsed=parsed))

    def update(self, path: str, parsed: blockfile.ParsedFile, block: Block,
               attached: bool) -> None:
        if block.read_only:
            return self.refuse(path, "the block is read_only: its file cannot change (EACCES)")
        try:
            blockfile.plan_update(block, parsed)
        except FsError as exc:
            return self.refuse(path, f"{exc.reason} ({_errno_name(exc)})")
        self.plan.steps.append(Step("update", path, block, attached, parsed=parsed))

    def removed(self, path: str) -> None:
        if self.layout.kind(_parts(path)) is not PathKind.BLOCK or path not in self.live:
            return self.plan.kept.append(path)  # a kept file, or no block on the server
        block, attached = self.live[path]
        if block.read_only:
            return self.refuse(path, "the block is read_only: its file cannot be removed "
                                     "(EACCES)")
        self.retires.append(Step("retire", path, block, attached))

    def pair_renames(self) -> None:
        """A new block file holding the value of a removed one is that block relabelled."""
        for create in list(self.creates):
            retire = next((r for r in self.retires
                           if r.block is not None and create.parsed is not None
                           and r.block.value == create.parsed.value), None)
            if retire is None:
                continue
            self.creates.remove(create)
            self.retires.remove(retire)
            self.plan.steps.append(Step("relabel", create.path, retire.block, retire.attached,
                                        create.location, create.parsed, retire.path))

    def finish(self, new: Files) -> Plan:
        self.pair_renames()
        self.plan.steps += self.creates + self.retires
        self.plan.steps.sort(key=lambda step: ORDER.index(step.kind))
        if not any(self.layout.kind(_parts(p)) is PathKind.BLOCK for p in new):
            self.plan.refusals.append("the push leaves no block file (Letta's own sync refuses "
                                      "to empty an agent's memory the same way)")
        kept = sum(len(data) for p, (_mode, data) in new.items()
                   if data is not None and self.layout.kind(_parts(p)) is PathKind.KEPT)
        if kept > KEPT_LIMIT:
            self.plan.refusals.append(f"the files that are no block come to {kept} bytes, over "
                                      f"the {KEPT_LIMIT >> 20} MiB ({KEPT_LIMIT} bytes) a "
                                      f"mount keeps of them (ENOSPC)")
        return self.plan


def plan(old: Files, new: Files, live: dict[str, tuple[Block, bool]], layout: Layout) -> Plan:
    """What turns the head's files `old` into the pushed files `new`, for the live blocks
    `live` (path -> (block, attached), the files the head shows) in `layout`. Pure."""
    planner = _Planner(live, layout)
    for path in sorted(old.keys() | new.keys()):
        if old.get(path) == new.get(path):
            continue
        if path in new:
            mode, data = new[path]
            planner.plan.changes[path] = data
            planner.added_or_changed(path, mode, data)
        else:
            planner.plan.changes[path] = None
            planner.removed(path)
    return planner.finish(new)


@dataclass
class Outcome:
    """What `apply` did: the steps `done`, and the step that `failed` with its `reason`
    (None: all done)."""

    done: list[Step] = field(default_factory=list)
    failed: Step | None = None
    reason: str = ""
    blocks: dict[str, Block] = field(default_factory=dict)  # path -> the block it made, as
    # the server answered (the updates, creates and relabels done)

    def shown(self, live: dict[str, tuple[Block, bool]]) -> dict[str, tuple[Block, bool]]:
        """What the files show once the steps done are applied to `live` (path -> (block,
        attached), as the push was judged): an updated file its block as the server answered,
        a created or relabelled one its new block where it now is, a retired one nothing."""
        result = dict(live)
        for step in self.done:
            if step.kind == "relabel":
                result.pop(step.old_path, None)
            if step.kind == "retire":
                result.pop(step.path, None)
            elif step.path in self.blocks:
                attached = step.location.attached if step.location is not None else step.attached
                result[step.path] = (self.blocks[step.path], attached)
        return result

    def applied(self, pushed: Plan) -> dict[str, bytes | None]:
        """The changes of `pushed` that are on the server now, and its kept files: path ->
        pushed bytes (None: removed)."""
        paths = [p for step in self.done for p in step.paths] + pushed.kept
        return {p: pushed.changes[p] for p in paths}


async def _step(remote: Remote, step: Step) -> Block | None:
    """One step through `remote` (under `reject`): an update, relabel or removal is sent
    with the block as the push was judged against as the conflict base, so an edit that
    reached the server since (an agent's tool call after the take) is never overwritten nor
    detached; it is Stale. A relabel sends its fields before the new label, so a file still
    showing the old label's default description sends none. Returns the block as the server
    has it after the step (None for a removal)."""
    assert step.parsed is not None or step.kind == "retire"
    if step.kind == "update":
        return (await remote.update(step.block, step.parsed, base=step.block)).block
    if step.kind == "create":
        return await remote.create(step.location, step.parsed)
    if step.kind == "relabel":
        written = await remote.update(step.block, step.parsed, base=step.block)
        return await remote.relocate(written.block, step.attached, step.location)
    await remote.retire(step.block, step.attached, base=step.block)
    return None


async def apply(remote: Remote, steps: list[Step]) -> Outcome:
    """Apply `steps` in order through `remote` (made with `on_conflict="reject"`), stopping
    at the first that fails (a Stale one too: the block changed on the server after the push
    was judged)."""
    outcome = Outcome()
    for step in steps:
        try:
            block = await _step(remote, step)
        except Stale:
            outcome.failed, outcome.reason = step, (
                "its block changed on the server while the push was applied (ESTALE); the "
                "server's version is kept")
        except FsError as exc:
            outcome.failed, outcome.reason = step, f"{exc.reason} ({_errno_name(exc)})"
        if outcome.failed is not None:
            log.warning("agent %s: push: %s failed: %s", remote.agent_id, step.words(),
                        outcome.reason)
            return outcome
        outcome.done.append(step)
        if block is not None:
            outcome.blocks[step.path] = block
    return outcome


@dataclass(frozen=True)
class Verdict:
    """A ref update's answer: `ok`, else the `ng` `reason`; `lines` the `remote:` lines."""

    ok: bool
    reason: str = ""
    lines: tuple[str, ...] = ()

    @property
    def status(self) -> bytes | None:
        """The `ng` reason dulwich reports, None for `ok`."""
        if self.ok:
            return None
        text = " ".join(self.reason.split())
        return (text if len(text) <= MAX_STATUS else text[:MAX_STATUS - 3] + "...").encode()


def _listed(paths: list[str]) -> str:
    return ", ".join(paths) if paths else "none"


class Receiver:
    """Takes a push for one agent's history `repo` (its one-writer lock held by the caller)
    in `layout`, `live` being the files the head shows (path -> (block, attached)), through
    `client` (the request's key) for agent `agent_id`. Blocking (dulwich, and trio.run for the
    server calls): call it from a thread that runs no trio loop."""

    def __init__(self, repo: HistoryRepo, layout: Layout, live: dict[str, tuple[Block, bool]],
                 client: Callable[[], Client], agent_id: str):
        self.repo, self.layout, self.live = repo, layout, live
        self.client, self.agent_id = client, agent_id
        self.moved = False  # whether a push moved the branch (the block map is then saved)
        self.shown = live  # path -> (block, attached) of what the branch shows now

    def receive(self, ref: bytes, old: bytes, new: bytes) -> Verdict:
        """Check, apply and acknowledge the update of `ref` from `old` to `new`."""
        judged = self.judge(ref, old, new)
        if isinstance(judged, Verdict):
            return judged
        head, pushed = judged
        return self.settle(head, new, pushed, trio.run(self.apply, pushed.steps))

    def judge(self, ref: bytes, old: bytes, new: bytes) -> Verdict | tuple[bytes | None, Plan]:
        """The checks of an update of `ref` from `old` to `new`, before any server call: the
        refusal's Verdict, or (the head it was judged on, the Plan to apply). Blocking
        (dulwich)."""
        if ref != BRANCH:
            return Verdict(False, f"memfuse serve takes pushes to {BRANCH.decode()} only")
        if new == ZERO:
            return Verdict(False, f"{BRANCH.decode()} cannot be deleted")
        head = self.repo.head()
        if head is not None and head != new and not can_fast_forward(self.repo.repo, head, new):
            return Verdict(False, "non-fast-forward", (
                "the server's memory changed since your last fetch (or the push is no "
                "descendant of main): pull (git pull --rebase), then push again",))
        pushed = plan(*pushed_files(self.repo, head, new, self.layout), self.live,
                      self.layout)
        if pushed.refusals:
            return Verdict(False, f"refused, nothing applied: {'; '.join(pushed.refusals)}",
                           ("push refused; nothing was applied:",
                            *(f"  {line}" for line in pushed.refusals)))
        return head, pushed

    async def apply(self, steps: list[Step]) -> Outcome:
        """Send `steps` to the server with the request's key (`apply`)."""
        async with self.client() as client:  # reject: a push never overwrites a newer block
            return await apply(Remote(client, self.agent_id, on_conflict="reject"), steps)

    def settle(self, head: bytes | None, new: bytes, pushed: Plan, outcome: Outcome) -> Verdict:
        """Move the branch for what `outcome` applied of `pushed` (judged on `head`): to
        `new` when all of it, else to a commit of the part applied; `shown` then says what
        its block files show. Blocking (dulwich)."""
        self.shown = outcome.shown(self.live)
        if outcome.failed is None:
            return self._acknowledge(head, new, pushed)
        return self._in_part(new, pushed, outcome)

    def _acknowledge(self, head: bytes | None, new: bytes, pushed: Plan) -> Verdict:
        if not self.repo.move(head, new):
            return Verdict(False, "failed to update ref: main moved under the push (its "
                                  "changes are on the server; pull, then push again)")
        self.moved = True
        done = [step.words() for step in pushed.steps]
        log.info("agent %s: push applied: %s", self.agent_id, _listed(done))
        return Verdict(True, lines=(f"memfuse: on the server: {_listed(done)}",) if done else ())

    def _in_part(self, new: bytes, pushed: Plan, outcome: Outcome) -> Verdict:
        applied = [p for step in outcome.done for p in step.paths]
        changes = outcome.applied(pushed)
        author = self.repo.repo[new].author
        if changes:
            self.repo.commit(changes, author, f"{SUBJECT} ({outcome.reason})")
            self.moved = True
        rest = [p for step in pushed.steps if step not in outcome.done for p in step.paths]
        failed = outcome.failed.words() if outcome.failed else ""
        return Verdict(False, f"applied in part: {failed} failed: {outcome.reason}; applied: "
                              f"{_listed(applied)}; not applied: {_listed(rest)}", (
            f"push applied in part: {failed} failed: {outcome.reason}",
            f"  applied (main now holds these): {_listed(applied)}",
            f"  not applied: {_listed(rest)}",
            "  pull (git pull --rebase), then push again to finish it"))
