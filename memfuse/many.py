"""Many agents at once: `memfuse mount --all`, `memfuse list` and what `umount --all` covers.

Each agent is still one daemon with its own state directory (`~/.letta/agents/<id>/`); this
module only chooses the agents (from the server's listing), starts their daemons side by side
through the command's own `launch` (so a mount started here is the one `memfuse mount AGENT`
starts), and reads back what every daemon writes (its pid file and its status file).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import ConfigError, RunningMount, agent_dir, check_agent_id, running_mounts
from .daemon import is_mounted
from .remote import list_agents
from .status import STALE_AFTER, Status

MOUNT_WORKERS = 8  # daemons started at the same time: each lists its agent's blocks at start


@dataclass(frozen=True)
class Agent:
    """An agent as the server lists it (`GET /v1/agents/`): id, name, tags."""

    id: str
    name: str
    tags: tuple[str, ...] = ()


async def server_agents(base_url: str, api_key: str | None, tags: list[str] | None = None,
                        *, retry_budget: float = 10.0) -> list[Agent]:
    """The agents on the server at `base_url`, oldest first; with `tags`, only those having
    all of them (remote.list_agents). Agents whose id cannot name a directory here
    (config.check_agent_id) are left out: no path is ever made from them. Raises
    ServerCallError (NoAnswer when no answer came within `retry_budget` seconds)."""
    listed = await list_agents(base_url, api_key, tags, retry_budget=retry_budget)
    agents = []
    for item in listed:
        try:
            agent_id = check_agent_id(str(item.get("id", "")))
        except ConfigError:
            continue
        agents.append(Agent(agent_id, str(item.get("name") or ""),
                            tuple(str(t) for t in item.get("tags") or ())))
    return agents


def live_mount(agent_id: str) -> RunningMount | None:
    """The record of a live daemon serving `agent_id` here (its pid file names a process that
    exists), else None."""
    record = RunningMount.load(agent_dir(agent_id) / "memfuse.pid")
    return record if record is not None and record.alive() else None


@dataclass
class Launched:
    """What starting one agent's daemon came to: `error` None when its mount is ready;
    `notices` are the sentences it sent before (a local-first start says so)."""

    agent: Agent
    error: str | None
    notices: tuple[str, ...] = ()


def mount_all(agents: list[Agent], launch: Callable[[Agent], Launched],
              workers: int = MOUNT_WORKERS) -> tuple[list[Launched], list[tuple[Agent,
                                                                               RunningMount]]]:
    """Mount each of `agents` not mounted yet (no live pid file; live_mount), `workers` at a
    time: `launch(agent)` starts one daemon and waits for its ready report (blocking; it runs
    in a thread, so the daemons load side by side). Returns (launched in `agents`' order,
    skipped with the record of the daemon already serving each)."""
    skipped, todo = [], []
    for agent in agents:
        record = live_mount(agent.id)
        if record is not None:
            skipped.append((agent, record))
        else:
            todo.append(agent)
    if not todo:
        return [], skipped
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        launched = list(pool.map(launch, todo))
    return launched, skipped


def describe(agent_id: str, name: str) -> str:
    """`agent-1 ("Ada's helper")`, or the bare id when the name is unknown."""
    return f"{agent_id} ({name!r})" if name else agent_id


def mount_report(launched: list[Launched], skipped: list[tuple[Agent, RunningMount]],
                 where: str) -> tuple[list[str], int]:
    """The lines `memfuse mount --all` prints (one per agent, then a count) and its exit
    status: 1 when any mount failed, else 0. `where` names the selection ("on <url> with the
    tags ...")."""
    lines = []
    for item in launched:
        who = describe(item.agent.id, item.agent.name)
        lines += [f"{who}: {notice}" for notice in item.notices]
        lines.append(f"mounted {who} at {agent_dir(item.agent.id) / 'memory'}"
                     if item.error is None else f"FAILED {who}: {item.error}")
    for agent, record in skipped:
        lines.append(f"skipped {describe(agent.id, agent.name)}: already mounted at "
                     f"{record.mountpoint} (pid {record.pid})")
    failed = sum(item.error is not None for item in launched)
    if not launched and not skipped:
        lines.append(f"no agents {where}")
    else:
        lines.append(f"{len(launched) - failed} mounted, {len(skipped)} skipped (already "
                     f"mounted), {failed} failed, of {len(launched) + len(skipped)} agents "
                     f"{where}")
    return lines, 1 if failed else 0


@dataclass
class MountRow:
    """One line of `memfuse list`: a pid file under `~/.letta/agents/*/` and what its daemon
    last wrote to its status file (None when it wrote none)."""

    record: RunningMount
    alive: bool
    status: Status | None
    stale_mount: bool = False  # the daemon is gone and its FUSE mount is still there

    def state(self, now: float) -> str:
        """serving, server unreachable, local-first, starting, not responding (no status for
        STALE_AFTER seconds) or dead daemon."""
        if not self.alive:
            return ("dead daemon (stale mount: memfuse umount " + self.record.agent_id + ")"
                    if self.stale_mount else "dead daemon")
        if self.status is None:
            return "starting"
        if now - self.status.updated_at > STALE_AFTER:
            return f"not responding for {now - self.status.updated_at:.0f} s"
        if self.status.local_first_at is not None:
            return "local-first"
        if not self.status.reachable:
            return "server unreachable"
        return "serving"

    def pending(self) -> str:
        """Unsent writes, unlinks in their grace period, journaled changes and changes not
        committed yet; `none` when there are none, `?` without a status."""
        if self.status is None or not self.alive:
            return "?"
        s = self.status
        parts = [f"{n} {what}" for n, what in ((s.pending_writes, "unsent"),
                                               (s.pending_unlinks, "unlinking"),
                                               (s.journal_pending, "journaled"),
                                               (s.uncommitted, "uncommitted")) if n]
        return ", ".join(parts) or "none"


def mount_rows() -> list[MountRow]:
    """A row for every pid file under `~/.letta/agents/*/memfuse.pid`, by agent id."""
    rows = []
    for pid_file, record in running_mounts():
        alive = record.alive()
        rows.append(MountRow(record, alive,
                             Status.of(pid_file.with_name("memfuse.status.json"), record.pid)
                             if alive else None,
                             stale_mount=not alive and is_mounted(Path(record.mountpoint))))
    return rows


COLUMNS = ("AGENT", "NAME", "MOUNTPOINT", "SERVER", "STATE", "PENDING")


def render_list(rows: list[MountRow], now: float | None = None) -> str:
    """`memfuse list`: a header and one line per mount, columns aligned (agent id, name,
    mountpoint, server base URL, state, pending work)."""
    now = time.time() if now is None else now
    table = [COLUMNS] + [tuple(_cell(c) for c in (
        r.record.agent_id, r.record.agent_name or "-", r.record.mountpoint, r.record.base_url,
        r.state(now), r.pending())) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join([cell.ljust(w) for cell, w in zip(line, widths)] + [line[-1]])
                     for line in table)


def _cell(text: str) -> str:
    # a name is the server's free text: a newline or escape in it must not break the table
    return "".join(c if c.isprintable() else "?" for c in text)
