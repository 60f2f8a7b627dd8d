"""`memfuse git-memory enable|disable AGENT`: move an agent to Letta's git-memory model on a
stock server, as Letta Cloud does when it tags one, and back (docs/git-memory.md, "Enabling").

A stock 0.16.8 server only sets the tag `git-memory-enabled`; its prompt then shows nothing
but the labels under `system/`, so a classic agent's `human` and `persona` drop out of it.
`enable` does what Cloud's `enable_git_memory_for_agent` does, in this order:

1. every attached label that lacks `system/` gets it (`human` -> `system/human`), except a
   block attached to other agents too (its label is theirs as well: listed, and renamed only
   when named with `--include-shared`) and memfuse's `memory_filesystem` block;
2. the tag is set (the prompt now shows `system/*` as before, in the git-memory format);
3. the agent's owned detached blocks (the classic layout's root files, tagged `owner:<id>`)
   are attached under their own labels: outside `system/` they stay out of the prompt and
   are files of the git-memory layout;
4. the system message is recompiled, so the stored prompt is the new one at once.

Renaming before tagging keeps every value in the prompt at every step (a classic prompt shows
`system/human` too); attaching after tagging keeps the root files out of it throughout.
What is done is recorded, before it is done, in `~/.letta/agents/<id>/git-memory.json`;
`disable` undoes exactly that, in the reverse order (detach, remove the tag, rename back), each
step only where the block is still as `enable` left it. Both are idempotent.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .config import agent_dir, write_private
from .layout import GIT_MEMORY_TAG
from .model import CREATE_MARKER, MEMORY_FILESYSTEM_LABEL, Block
from .remote import Remote

PROMPT_DIR = "system/"  # only labels under it are in a git-memory agent's prompt
RECORD_NAME = "git-memory.json"


def record_file(agent_id: str) -> Path:
    """Where `enable` records what it did: `~/.letta/agents/<id>/git-memory.json`."""
    return agent_dir(agent_id) / RECORD_NAME


def out_of_prompt(labels: list[str]) -> list[str]:
    """The classic core blocks among an agent's attached `labels` that a git-memory prompt no
    longer shows: labels outside `system/` without a `/` (`human`, `persona`), memfuse's
    `memory_filesystem` left out. Sorted."""
    return sorted(label for label in labels
                  if "/" not in label and label != MEMORY_FILESYSTEM_LABEL)


@dataclass
class Record:
    """What `enable` did to one agent (the JSON in `record_file`). `renamed`: `{"block",
    "from", "to"}` per label moved; `attached`: `{"block", "label"}` per owned block attached;
    `tagged_before`: the tag was there before the first `enable`."""

    agent_id: str
    base_url: str
    renamed: list[dict] = field(default_factory=list)
    attached: list[dict] = field(default_factory=list)
    tagged_before: bool = False
    enabled_at: float | None = None

    @classmethod
    def load(cls, agent_id: str) -> Record | None:
        """The agent's record, or None when there is none. Raises ValueError for one that
        cannot be read (a person should look at it, not have it overwritten)."""
        try:
            data = json.loads(record_file(agent_id).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ValueError(f"{record_file(agent_id)} cannot be read: {exc}") from None
        try:
            return cls(**data)
        except TypeError:
            raise ValueError(f"{record_file(agent_id)} is not a record of memfuse "
                             f"git-memory enable") from None

    def save(self) -> None:
        """Write it atomically, mode 0600 (the agent's state directory is made if missing)."""
        path = record_file(self.agent_id)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, (json.dumps(asdict(self), indent=1) + "\n").encode())

    def kept(self) -> frozenset[str]:
        """The ids of the blocks it attached as files (never moved into the prompt later)."""
        return frozenset(a["block"] for a in self.attached)

    def add(self, plan: Plan) -> None:
        """Take `plan`'s moves in (a block already recorded keeps its first entry)."""
        renamed = {r["block"] for r in self.renamed}
        self.renamed += [{"block": b.id, "from": b.label, "to": to} for b, to in plan.renames
                         if b.id not in renamed]
        attached = {a["block"] for a in self.attached}
        self.attached += [{"block": b.id, "label": b.label} for b in plan.attaches
                          if b.id not in attached]


@dataclass
class Plan:
    """What `enable` is to do: `renames` (block, new label), `attaches`, `shared` (block, the
    other agents it is attached to: not renamed), `left` (block, why it is left alone)."""

    renames: list[tuple[Block, str]] = field(default_factory=list)
    attaches: list[Block] = field(default_factory=list)
    shared: list[tuple[Block, list[str]]] = field(default_factory=list)
    left: list[tuple[Block, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.renames or self.attaches)


def rename_candidates(attached: list[Block], tagged: bool,
                      kept: frozenset[str] = frozenset()) -> list[Block]:
    """The attached blocks `enable` moves under `system/`: of an agent without the tag, every
    label that lacks `system/` (as Cloud does); of one that has it already, only the classic
    core labels (no `/`: out_of_prompt), since its other labels are its files
    (`notes/todo`). Never memory_filesystem, nor the blocks of `kept` (ids a recorded
    enable attached as files)."""
    return [b for b in attached
            if not b.label.startswith(PROMPT_DIR) and b.label != MEMORY_FILESYSTEM_LABEL
            and b.id not in kept and (not tagged or "/" not in b.label)]


def plan_enable(attached: list[Block], owned: list[Block], sharers: dict[str, list[str]],
                include_shared: frozenset[str] = frozenset(), tagged: bool = False,
                kept: frozenset[str] = frozenset()) -> Plan:
    """What `enable` does for an agent with the `attached` blocks and the `owned` ones (tagged
    `owner:<id>`, attached or not); sharers: block id -> the other agents it is attached to
    (for the rename candidates); tagged, kept: as for rename_candidates. Pure."""
    plan = Plan()
    taken = {b.label for b in attached}
    candidates = {b.id for b in rename_candidates(attached, tagged, kept)}
    for block in sorted(attached, key=lambda b: b.label):
        if block.label == MEMORY_FILESYSTEM_LABEL:
            plan.left.append((block, "memfuse's tree block, kept as it is (docs/git-memory.md)"))
        elif block.id not in candidates:
            continue
        elif sharers.get(block.id) and block.label not in include_shared:
            plan.shared.append((block, sharers[block.id]))
        elif PROMPT_DIR + block.label in taken:
            plan.left.append((block, f"another attached block is labelled "
                                     f"{PROMPT_DIR}{block.label} already"))
        else:
            plan.renames.append((block, PROMPT_DIR + block.label))
            taken.add(PROMPT_DIR + block.label)
    taken -= {b.label for b, _ in plan.renames}
    attached_ids = {b.id for b in attached}
    for block in sorted(owned, key=lambda b: b.label):
        if block.id in attached_ids:
            continue
        why = _why_not_attached(block, taken)
        if why is not None:
            plan.left.append((block, why))
        else:
            plan.attaches.append(block)
            taken.add(block.label)
    return plan


def _why_not_attached(block: Block, taken: set[str]) -> str | None:
    """Why the owned detached `block` is not attached by `enable`, or None."""
    if any(t.startswith(CREATE_MARKER) for t in block.tags):
        return "an unfinished create's block (mount the agent once to settle it)"
    if block.label.startswith(PROMPT_DIR):
        return "its label would put it into the prompt; attach it yourself if that is meant"
    if block.label in taken:
        return "an attached block has its label already"
    return None


Say = Callable[[str], None]


async def enable(remote: Remote, base_url: str, say: Say,
                 include_shared: frozenset[str] = frozenset(), dry_run: bool = False) -> Plan:
    """Move the agent to git memory (the module's steps), saying each move. Returns the plan
    it carried out. Raises ServerCallError, ValueError (a record that cannot be read)."""
    attached, owned = await remote.listing()
    tags = await remote.agent_tags(budget=None)
    tagged = GIT_MEMORY_TAG in tags
    record = Record.load(remote.agent_id) or Record(remote.agent_id, base_url,
                                                   tagged_before=tagged)
    kept = record.kept()
    sharers = {b.id: await remote.sharers(b.id)
               for b in rename_candidates(attached, tagged, kept)}
    plan = plan_enable(attached, owned, sharers, include_shared, tagged, kept)
    _report(plan, say, remote.agent_id, dry_run, tagged)
    if dry_run:
        return plan
    record.add(plan)
    record.save()  # before any move: a disable after a crash finds what may have been done
    for block, label in plan.renames:
        await remote.relabel(block, label)
    if GIT_MEMORY_TAG not in tags:
        await remote.set_tags([*tags, GIT_MEMORY_TAG])
    for block in plan.attaches:
        await remote.attach(block)
    await remote.recompile()
    record.enabled_at = record.enabled_at or time.time()
    record.save()
    return plan


def _report(plan: Plan, say: Say, agent_id: str, dry_run: bool, tagged: bool) -> None:
    would = "would be " if dry_run else ""
    for block, label in plan.renames:
        say(f"{would}moved {block.label} -> {label} (in the prompt, as before)")
    for block in plan.attaches:
        say(f"{would}attached {block.label} ({block.id}): a file, out of the prompt")
    for block, others in plan.shared:
        say(f"NOT moved: {block.label} ({block.id}) is attached to {len(others)} other "
            f"agent(s) too ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}): its "
            f"label is theirs as well, and it drops out of this agent's prompt. To include it, "
            f"run again with --include-shared {block.label} (renames it for them too)")
    for block, why in plan.left:
        say(f"left as it is: {block.label} ({block.id}): {why}")
    if not tagged:
        say(f"{would}tagged {GIT_MEMORY_TAG}")
    if plan.empty and tagged:
        say(f"agent {agent_id} uses git memory already; nothing to do")


async def disable(remote: Remote, record: Record | None, say: Say) -> None:
    """Undo what `record` says `enable` did, in the reverse order: detach the blocks it
    attached, remove the tag, rename the labels back; each only where the block is still as
    `enable` left it (else said and left). The tag stays when the record says the agent had
    it before the first `enable` (that tag was not enable's to remove). The record is removed
    at the end. Without a record, only the tag is removed. Raises ServerCallError."""
    attached = await remote.attached()
    by_id = {b.id: b for b in attached}
    detached = await _detach_attached(remote, record.attached if record else [], by_id, say)
    tags = await remote.agent_tags(budget=None)
    if GIT_MEMORY_TAG in tags and record is not None and record.tagged_before:
        say(f"kept the tag {GIT_MEMORY_TAG}: the agent had it before memfuse git-memory "
            f"enable")
    elif GIT_MEMORY_TAG in tags:
        await remote.set_tags([t for t in tags if t != GIT_MEMORY_TAG])
        say(f"removed the tag {GIT_MEMORY_TAG}")
    taken = {b.label for b in attached if b.id not in detached}
    for entry in record.renamed if record else []:
        block = by_id.get(entry["block"])
        if block is None or block.label != entry["to"] or entry["from"] in taken:
            say(f"left as it is: {entry['to']} ({entry['block']}): not attached under that "
                f"label any more, or {entry['from']} is taken")
            continue
        await remote.relabel(block, entry["from"])
        taken.add(entry["from"])
        say(f"moved {entry['to']} -> {entry['from']}")
    await remote.recompile()
    if record is None:
        say("no record of memfuse git-memory enable for this agent: labels left as they are")
    else:
        record_file(remote.agent_id).unlink(missing_ok=True)


async def _detach_attached(remote: Remote, entries: list[dict], by_id: dict[str, Block],
                           say: Say) -> set[str]:
    """Detach the blocks `enable` attached (`entries`) that are still attached under their
    label; returns their ids."""
    detached = set()
    for entry in entries:
        block = by_id.get(entry["block"])
        if block is None or block.label != entry["label"]:
            say(f"left as it is: {entry['label']} ({entry['block']}): not attached under "
                f"that label any more")
            continue
        await remote.detach(block)
        detached.add(block.id)
        say(f"detached {block.label} (a root file of the classic layout again)")
    return detached
