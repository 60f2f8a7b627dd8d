"""The journal: changes the server could not take yet, on local disk until they are replayed.

A change made while the server is away (or while earlier changes still wait for it) is appended
here, fsync'd, before the program's call returns: a write to a block file (close, fsync,
truncate), a new block file (create), a rename (relocate: a new label, attach or detach) and an
unlink (the block's retirement). The mount shows the change at once and history has it. When the
server answers again the entries are replayed block by block (files.BlockFiles.replay). The file
is JSON lines beside the history repository (`<history>.journal`, mode 0600), never inside the
mount, and never holds the API key:

    {"seq": 1, "kind": "write", "block": "block-…", "path": "system/human.md", "at": 1.7e9,
     "content": "<base64 of the file's bytes>", "base": {"value": …, "description": …,
                                                          "limit": …}}
    {"seq": 2, "kind": "create", "block": "local-…", "path": "notes.md", "at": …,
     "content": "<base64>", "to": {"label": "notes", "attached": false}}
    {"seq": 3, "kind": "relocate", "block": "block-…", "path": "system/a.md", "at": …,
     "from": {"label": "b", "attached": false}, "to": {"label": "a", "attached": true}}
    {"seq": 4, "kind": "unlink", "block": "block-…", "path": "old.md", "at": …,
     "from": {"label": "old", "attached": false}}
    {"done": 1, "outcome": "sent"}
    {"done": 2, "outcome": "created", "block": "block-…"}

A create's block has a provisional id (model.is_provisional) until the server made it; its `done`
line names the real one, and entries journaled meanwhile are read as the real block's. An unlink
is journaled at once but waits out its grace period (grace.py) before it is *queued*: re-creating
the file within it settles the entry ("claimed back"). After a restart every entry is queued.
An entry counts as pending until a `done` line names it; when nothing is pending the file is
emptied. A line cut short by a crash is ignored (its call never returned).
"""
from __future__ import annotations

import base64
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .blockfile import DEFAULT_LIMIT
from .model import Block, Location

log = logging.getLogger("memfuse.journal")

WRITE, CREATE, RELOCATE, UNLINK = "write", "create", "relocate", "unlink"
KINDS = (WRITE, CREATE, RELOCATE, UNLINK)


def _location(data: dict[str, Any] | None) -> Location | None:
    return None if data is None else Location(bool(data["attached"]), str(data["label"]))


def _location_json(location: Location | None) -> dict[str, Any] | None:
    return None if location is None else {"label": location.label, "attached": location.attached}


@dataclass
class Entry:
    """One journaled change of block `block_id`, shown at `path` when it was made; `at` when it
    was journaled (time.time()), `kind` one of KINDS:

    - write: `content` (bytes of the file) made on `base` (the block's value, description and
      limit as the writer read them: the conflict check at replay compares the server's with it);
    - create: a new block (provisional id) at `to`, with `content`;
    - relocate: the block moves from `frm` to `to` (label, attachment);
    - unlink: the block's file was removed at `frm`; the block is retired (detached, untagged).
      `queued` is False while its grace period runs (a file at the path may claim it back).
    """

    seq: int
    kind: str
    block_id: str
    path: str
    content: bytes | None = None
    base: dict[str, Any] | None = None
    frm: Location | None = None
    to: Location | None = None
    at: float = field(default_factory=time.time)
    queued: bool = True

    def base_block(self) -> Block:
        """The block as a write found it (its `base`; id kept, no label: for rendering); for a
        create, an empty block with the default limit."""
        if self.base is None:
            return Block(self.block_id, "", "", DEFAULT_LIMIT)
        return Block(self.block_id, "", self.base["value"], self.base["limit"],
                     self.base["description"])

    def to_json(self) -> dict[str, Any]:
        """The entry's JSON line (without the newline)."""
        item: dict[str, Any] = {"seq": self.seq, "kind": self.kind, "block": self.block_id,
                                "path": self.path, "at": self.at}
        if self.content is not None:
            item["content"] = base64.b64encode(self.content).decode()
        if self.base is not None:
            item["base"] = self.base
        if self.frm is not None:
            item["from"] = _location_json(self.frm)
        if self.to is not None:
            item["to"] = _location_json(self.to)
        return item

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> "Entry":
        """An entry from its JSON line (an old line without `kind` is a write). Raises
        ValueError, KeyError, TypeError for a line that is not one."""
        kind = item.get("kind", WRITE)
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        content = item.get("content")
        entry = cls(int(item["seq"]), kind, str(item["block"]), str(item["path"]),
                    None if content is None else base64.b64decode(content),
                    None if item.get("base") is None else dict(item["base"]),
                    _location(item.get("from")), _location(item.get("to")), float(item["at"]))
        if (kind in (WRITE, CREATE)) != (entry.content is not None) or (
                (kind == WRITE) != (entry.base is not None)):
            raise ValueError(f"a {kind} entry without its fields")
        return entry


def base_of(block: Block) -> dict[str, Any]:
    """The fields of `block` a replay compares with the server's: value, description, limit."""
    return {"value": block.value, "description": block.description, "limit": block.limit}


class Journal:
    """The journal file at `path`. Appends are fsync'd before they return. Raises OSError when
    the disk refuses (nothing is then changed in memory)."""

    def __init__(self, path: Path):
        self.path = path
        self._pending: dict[int, Entry] = {}  # seq -> entry, in seq order
        self._real: dict[str, str] = {}  # provisional block id -> the server's id
        self._next = 1
        self._load()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if data and not data.endswith(b"\n"):
            # A crash cut the last append short (its call never returned): drop that partial
            # line, so the next append starts on a line of its own.
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
                    self._settle(int(item["done"]), item.get("block"))
                    continue
                entry = Entry.from_json(item)
            except (ValueError, KeyError, TypeError):
                continue  # cut short by a crash before the append returned
            entry.block_id = self._real.get(entry.block_id, entry.block_id)
            self._pending[entry.seq] = entry
            self._next = max(self._next, entry.seq + 1)

    def _settle(self, seq: int, real_id: str | None) -> None:
        entry = self._pending.pop(seq, None)
        if entry is not None and real_id and real_id != entry.block_id:
            self._real[entry.block_id] = real_id
            for other in self._pending.values():  # journaled while the create was in flight
                if other.block_id == entry.block_id:
                    other.block_id = real_id

    # -- queries -------------------------------------------------------------------------------

    def pending(self) -> list[Entry]:
        """Entries not replayed yet, oldest first (unlinks in their grace period included)."""
        return list(self._pending.values())

    def is_pending(self, entry: Entry) -> bool:
        """Whether `entry` is not settled yet."""
        return self._pending.get(entry.seq) is entry

    def queued(self) -> list[Entry]:
        """Entries waiting for the server, oldest first (not unlinks in their grace period)."""
        return [e for e in self._pending.values() if e.queued]

    def waiting(self) -> bool:
        """Whether anything waits for the server: a new change must then queue behind it."""
        return any(e.queued for e in self._pending.values())

    def pinned(self) -> set[str]:
        """Blocks the mount shows as the journal makes them, whatever the server lists: those
        with a pending write, create or relocate and no pending unlink."""
        return {e.block_id for e in self._pending.values()} - self.hidden()

    def hidden(self) -> set[str]:
        """Blocks whose file was unlinked and whose retirement is pending: not shown."""
        return {e.block_id for e in self._pending.values() if e.kind == UNLINK}

    def real_id(self, block_id: str) -> str:
        """The server's id of a block created through the journal (`block_id` itself when it was
        never provisional, or is still)."""
        return self._real.get(block_id, block_id)

    # -- appends -------------------------------------------------------------------------------

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

    def _add(self, *entries: Entry) -> list[Entry]:
        for entry in entries:  # a caller that read the block before its create was replayed
            entry.block_id = self._real.get(entry.block_id, entry.block_id)
        self._append(*(e.to_json() for e in entries))
        for entry in entries:
            self._pending[entry.seq] = entry
        self._next = entries[-1].seq + 1 if entries else self._next
        return list(entries)

    def _entry(self, offset: int = 0, **fields) -> Entry:
        return Entry(self._next + offset, **fields)

    def add(self, block: Block, path: str, content: bytes, base: Block) -> Entry:
        """Journal a write of `content` to `block` (shown at `path`), made on `base`. Durable
        (fsync'd) when it returns. Raises OSError when the disk refuses."""
        return self._add(self._entry(kind=WRITE, block_id=block.id, path=path, content=content,
                                     base=base_of(base)))[0]

    def add_create(self, block_id: str, path: str, location: Location, content: bytes
                   ) -> Entry:
        """Journal a new block `block_id` (provisional) at `location` with the file `content`.
        Raises OSError."""
        return self._add(self._entry(kind=CREATE, block_id=block_id, path=path,
                                     content=content, to=location))[0]

    def add_relocations(self, moves: Iterable[tuple[str, str, Location, Location]]
                        ) -> list[Entry]:
        """Journal renames, one append: (block id, old path, old location, new location) each.
        Raises OSError."""
        return self._add(*(self._entry(i, kind=RELOCATE, block_id=block_id, path=path, frm=frm,
                                       to=to)
                           for i, (block_id, path, frm, to) in enumerate(moves)))

    def add_unlink(self, block_id: str, path: str, location: Location) -> Entry:
        """Journal the unlink of block `block_id`'s file at `location`; not queued until its
        grace period ends (`queue`). Raises OSError."""
        entry = self._entry(kind=UNLINK, block_id=block_id, path=path, frm=location)
        entry.queued = False
        return self._add(entry)[0]

    def queue(self, entry: Entry) -> None:
        """An unlink's grace period ended without the server taking it: it waits for the
        server now (in memory only: after a restart every entry is queued)."""
        entry.queued = True

    def done(self, entry: Entry, outcome: str, superseded: list[Entry] = (),
             block_id: str | None = None) -> None:
        """Mark `entry` settled (`outcome` in words: sent, already on the server, refused: …)
        and the earlier entries of its block it `superseded` (one append, one fsync); empty
        the file once nothing is pending. block_id: the server's id of a block the entry's
        create made (later entries of the provisional id are read as that block's). Raises
        OSError."""
        items: list[dict[str, Any]] = [{"done": e.seq, "outcome": "superseded by a later change"}
                                       for e in superseded]
        items.append({"done": entry.seq, "outcome": outcome,
                      **({"block": block_id} if block_id else {})})
        self._append(*items)
        for settled in superseded:
            self._pending.pop(settled.seq, None)
        self._settle(entry.seq, block_id)
        if not self._pending:
            fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
