"""The journal: writes the server could not take yet, on local disk until they are replayed.

A write to a block file (close, fsync, truncate) that finds the server away is appended here,
fsync'd, before the program's `close()` returns 0; the mount shows it at once and history has it.
When the server answers again the entries are replayed in order (files.BlockFiles.replay). The
file is JSON lines beside the history repository (`<history>.journal`, mode 0600), never inside
the mount, and never holds the API key:

    {"seq": 1, "kind": "write", "block": "block-…", "path": "system/human.md", "at": 1700000000.0,
     "content": "<base64 of the file's bytes>", "base": {"value": …, "description": …,
                                                          "limit": …}}
    {"done": 1, "outcome": "sent"}

An entry counts as pending until a `done` line names it. When nothing is pending the file is
emptied. A line cut short by a crash is ignored (its write's close() never returned 0).
"""
from __future__ import annotations

import base64
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model import Block

log = logging.getLogger("memfuse.journal")


@dataclass
class Entry:
    """One journaled write: `content` (bytes of the file) for block `block_id` shown at `path`;
    `base` the block's value, description and limit as the writer read them (the conflict check
    at replay compares the server's block with it); `at` when it was journaled (time.time())."""

    seq: int
    block_id: str
    path: str
    content: bytes
    base: dict[str, Any]
    at: float = field(default_factory=time.time)

    def base_block(self) -> Block:
        """The block as the write found it (its `base`; id kept, no label: for rendering)."""
        return Block(self.block_id, "", self.base["value"], self.base["limit"],
                     self.base["description"])

    def to_json(self) -> dict[str, Any]:
        """The entry's JSON line (without the newline)."""
        return {"seq": self.seq, "kind": "write", "block": self.block_id, "path": self.path,
                "at": self.at, "content": base64.b64encode(self.content).decode(),
                "base": self.base}


def base_of(block: Block) -> dict[str, Any]:
    """The fields of `block` a replay compares with the server's: value, description, limit."""
    return {"value": block.value, "description": block.description, "limit": block.limit}


class Journal:
    """The journal file at `path`. Appends are fsync'd before they return."""

    def __init__(self, path: Path):
        self.path = path
        self._pending: dict[int, Entry] = {}
        self._next = 1
        self._load()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if data and not data.endswith(b"\n"):
            # A crash cut the last append short (its close() never returned 0): drop that
            # partial line, so the next append starts on a line of its own.
            keep = data[:data.rfind(b"\n") + 1]
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.ftruncate(fd, len(keep))
                os.fsync(fd)
            finally:
                os.close(fd)
            data = keep
        for line in data.decode("utf-8", "replace").splitlines():
            try:
                item = json.loads(line)
                if "done" in item:
                    self._pending.pop(int(item["done"]), None)
                    continue
                entry = Entry(int(item["seq"]), item["block"], item["path"],
                              base64.b64decode(item["content"]), dict(item["base"]),
                              float(item["at"]))
            except (ValueError, KeyError, TypeError):
                continue  # cut short by a crash before the append returned
            self._pending[entry.seq] = entry
            self._next = max(self._next, entry.seq + 1)

    def pending(self) -> list[Entry]:
        """Entries not replayed yet, oldest first."""
        return [self._pending[seq] for seq in sorted(self._pending)]

    def pending_block_ids(self) -> set[str]:
        """Blocks with a journaled write not replayed yet (the mount shows the journal's)."""
        return {entry.block_id for entry in self._pending.values()}

    def _append(self, *items: dict[str, Any]) -> None:
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.fchmod(fd, 0o600)
            data = memoryview("".join(json.dumps(item) + "\n" for item in items).encode())
            while data:  # a short write (a nearly full disk) must not pass for durable
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # the new file's directory entry must survive a crash too
            dir_fd = os.open(self.path.parent, os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def add(self, block: Block, path: str, content: bytes, base: Block) -> Entry:
        """Journal a write of `content` to `block` (shown at `path`), made on `base`. Durable
        (fsync'd) when it returns. Raises OSError when the disk refuses."""
        entry = Entry(self._next, block.id, path, content, base_of(base))
        self._append(entry.to_json())
        self._next += 1
        self._pending[entry.seq] = entry
        return entry

    def done(self, entry: Entry, outcome: str, superseded: list[Entry] = ()) -> None:
        """Mark `entry` replayed (`outcome` in words: sent, already on the server, refused: …)
        and the earlier writes to its block it `superseded` (one append, one fsync); empty the
        file once nothing is pending. Raises OSError."""
        self._append(*[{"done": e.seq, "outcome": "superseded by a later write"}
                       for e in superseded], {"done": entry.seq, "outcome": outcome})
        for settled in (*superseded, entry):
            self._pending.pop(settled.seq, None)
        if not self._pending:
            fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
