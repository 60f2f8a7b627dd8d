"""`memfuse status`: what a running mount is doing, in words a person reads at a glance.

The daemon writes a small JSON file next to its pid file every second
(`~/.letta/agents/<id>/memfuse.status.json`); `memfuse status` reads it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from .config import JsonRecord

STALE_AFTER = 10.0  # seconds without an update before the daemon is called unresponsive
SLOW_ANSWER = 1.0  # seconds: a server whose answers take this long (median) is called slow


def _ago(t: float | None, now: float) -> str:
    """`t` (epoch seconds) as "12.5 s ago", "3 min ago", "1.2 h ago", or "never"."""
    if t is None:
        return "never"
    seconds = max(0.0, now - t)
    if seconds < 60:
        return f"{seconds:.1f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


@dataclass
class Status(JsonRecord):
    """One snapshot of a mount's state. Times are time.time() seconds; None when never."""

    agent_id: str
    mountpoint: str
    base_url: str
    pid: int
    reachable: bool
    last_poll: float | None
    pending_writes: int
    pending_unlinks: int
    uncommitted: int
    last_commit: str | None
    last_commit_message: str | None
    last_commit_at: float | None
    last_conflict: str | None
    last_error: str | None
    last_error_at: float | None
    updated_at: float
    unexpected_errors: int = 0  # caught at the safe boundary (bugs): EIO to a call, or a restart
    unreachable_since: float | None = None  # when the server stopped answering (None: it answers)
    journal_pending: int = 0  # journaled changes waiting for the server
    journal_oldest_at: float | None = None  # when the oldest of them was journaled
    last_replay: str | None = None  # the last journal entry replayed and its outcome
    local_first_at: float | None = None  # mounted from history then; None once the server listed
    requests: int = 0  # HTTP requests sent to the server since the mount started
    received_bytes: int = 0  # bytes of the server's answers since the mount started
    started_at: float | None = None  # time.time() the daemon started
    git_remote: str | None = None  # where the history is pushed (credentials shown as ***)
    last_push: str | None = None  # the commit the remote's main was last set to (or found at)
    last_push_at: float | None = None
    last_push_error: str | None = None  # the last failed push's reason (kept after a success)
    last_push_error_at: float | None = None
    push_diverged: bool = False  # the remote's main has commits this history lacks: not forced
    push_failing: bool = False  # the last attempt failed; retried with backoff
    next_push_retry_at: float | None = None  # when the next retry is due, while backing off
    pushing_since: float | None = None  # when the push under way began (None: none is)
    latency: float | None = None  # seconds: median time of the server's last answers
    journal_stuck: str | None = None  # a journaled change waiting too long, or a refused key
    agent_gone_since: float | None = None  # when a listing found the agent deleted
    duplicates: list[str] | None = None  # "<path>: shows <id>; also <id>, ..." per such path
    layout: str = "classic"  # where the blocks are shown (layout.py): classic or git-memory
    layout_changed: str | None = None  # the layout the agent's tags choose now, if not this one
    out_of_prompt: list[str] | None = None  # git memory: attached labels like `human` that its
                                            # prompt no longer shows (gitmemory.out_of_prompt)

    @classmethod
    def of(cls, path: Path, pid: int) -> "Status | None":
        """The report the daemon `pid` wrote to `path`, or None: no report yet, or one another
        daemon wrote. A daemon killed with SIGKILL leaves its last report behind, and the next
        mount's daemon replaces it only at its first publish; until then that report speaks of
        a journal the new daemon has not replayed, so it must not pass for the new one's."""
        report = cls.load(path)
        return report if report is not None and report.pid == pid else None

    def render(self, now: float | None = None) -> str:
        """The human-readable report."""
        now = time.time() if now is None else now
        ago = partial(_ago, now=now)
        server = self._server(ago)
        pending = (f"{self.pending_writes} unsent write(s), {self.pending_unlinks} unlink(s) in "
                   f"their grace period, {self.uncommitted} change(s) not yet committed")
        commit = (f"{self.last_commit[:7]} {ago(self.last_commit_at)}: {self.last_commit_message}"
                  if self.last_commit else "none since mount")
        error = f"{self.last_error} ({ago(self.last_error_at)})" if self.last_error else "none"
        lines = [
            f"agent {self.agent_id} mounted at {self.mountpoint} (pid {self.pid})",
            f"  server         {self.base_url}: {server}",
            f"  last poll      {ago(self.last_poll)}",
            f"  pending        {pending}",
            f"  last commit    {commit}",
            f"  last conflict  {self.last_conflict or 'none'}",
            "  journal        " + (f"{self.journal_pending} change(s) waiting for the server, "
                                    f"the oldest from {ago(self.journal_oldest_at)}"
                                    if self.journal_pending else "empty")
            + (f"; last replayed: {self.last_replay}" if self.last_replay else "")
            + (f"; {self.journal_stuck.upper()[:5]}{self.journal_stuck[5:]}"
               if self.journal_stuck else ""),
            f"  last error     {error}",
            f"  server load    {self._load(now)}",
            f"  unexpected     {self.unexpected_errors} (bugs caught: the call got EIO or the "
            f"task was restarted; see the log)" if self.unexpected_errors else
            "  unexpected     none",
        ]
        lines[-2:-2] = self._duplicate_lines() + self._layout_lines()
        if self.git_remote is not None:
            lines[-2:-2] = self._push_lines(ago, now)
        if self.local_first_at is not None:
            at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.local_first_at))
            lines.insert(2, f"  started        local-first (mounted from history at {at}); "
                            f"the server's changes show once it answers")
        if now - self.updated_at > STALE_AFTER:
            lines.insert(1, f"  WARNING        the daemon has not reported for "
                            f"{now - self.updated_at:.0f} s")
        return "\n".join(lines)

    def _server(self, ago: Callable[[float | None], str]) -> str:
        """How the server is: reachable (and how fast), slow, unreachable, or the agent gone."""
        server = "reachable" if self.reachable else "UNREACHABLE (serving the last known state)"
        if self.agent_gone_since is not None:
            server = (f"reachable, but the AGENT IS GONE from it since "
                      f"{ago(self.agent_gone_since).removesuffix(' ago')} (deleted?): serving "
                      f"the last known state; new files are refused")
        elif self.reachable and self.latency is not None:
            server += (f", SLOW: its answers take {self.latency:.1f} s (median of the last "
                       f"ones); a close that waits past its deadline is journaled"
                       if self.latency >= SLOW_ANSWER else
                       f" (answers in {self.latency * 1000:.0f} ms)")
        if not self.reachable and self.unreachable_since is not None:
            server = (f"UNREACHABLE since {ago(self.unreachable_since).removesuffix(' ago')} "
                      f"(serving the last known state)")
        return server

    def _layout_lines(self) -> list[str]:
        lines = []
        if self.layout != "classic" or self.layout_changed is not None:
            lines.append(f"  layout         {self.layout}")
        if self.out_of_prompt:
            lines.append(f"  OUT OF PROMPT  {', '.join(self.out_of_prompt)}: classic core "
                         f"blocks, attached outside system/, which a git-memory agent's prompt "
                         f"does not show; to put them back in it: memfuse umount "
                         f"{self.agent_id} && memfuse git-memory enable {self.agent_id} && "
                         f"memfuse mount {self.agent_id}")
        if self.layout_changed is not None:
            lines.append(f"  MODEL CHANGED  the agent's memory model changed on the server (its "
                         f"tags now choose the {self.layout_changed} layout); remount to show "
                         f"it in its new layout")
        return lines

    def _duplicate_lines(self) -> list[str]:
        if not self.duplicates:
            return []
        return ([("  duplicates     " if number == 0 else " " * 17) + line
                 for number, line in enumerate(self.duplicates)]
                + [" " * 17 + "(several blocks with one label: README, "
                              "\"Duplicate labels\", says how to resolve them)"])

    def _push_lines(self, ago: Callable[[float | None], str], now: float) -> list[str]:
        pushed = (f"{self.last_push[:7]} {ago(self.last_push_at)}" if self.last_push
                  else "nothing yet")
        if self.push_diverged:
            state = "DIVERGED (not forced; the remote's main must be fixed)"
        elif self.push_failing:
            state = "FAILING" + (f", next try in {max(0.0, self.next_push_retry_at - now):.0f} s"
                                 if self.next_push_retry_at is not None else "")
        else:
            state = "ok"
        if self.pushing_since is not None and now - self.pushing_since >= 1:
            state += f"; a push under way for {now - self.pushing_since:.0f} s"
        error = "none"
        if self.last_push_error:
            error = f"{self.last_push_error} ({ago(self.last_push_error_at)}" + (
                "; pushed since)" if not self.push_failing else ")")
        return [f"  git remote     {self.git_remote}: {state}",
                f"  last push      {pushed}",
                f"  push error     {error}"]

    def _load(self, now: float) -> str:
        made = f"{self.requests} request(s), {self.received_bytes / 1e6:.1f} MB received"
        if self.started_at is None or now - self.started_at < 1:
            return made + " since mount"
        seconds = now - self.started_at
        return (f"{made} in {seconds:.0f} s since mount ({self.requests / seconds:.2f} "
                f"requests/s, {self.received_bytes / seconds / 1e3:.1f} kB/s)")


class LastProblem(logging.Handler):
    """Remembers the last WARNING or ERROR logged by memfuse (every refusal is one)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.message: str | None = None
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the record's message and time."""
        self.message, self.at = record.getMessage(), record.created
