"""The journal: changes the server could not take yet, on local disk until they are replayed.

A change made while the server is away (or while earlier changes still wait for it) is appended
here, fsync'd, before the program's call returns: a write to a block file (close, fsync,
truncate), a new block file (create), a rename (relocate: a new label, attach or detach) and an
unlink (the block's retirement). The mount shows the change at once and history has it. When the
server answers again the entries are replayed block by block (replay.Replayer.replay). The file
is one record a line beside the history repository (`<history>.journal`, mode 0600), never
inside the mount, and never holds the API key; the records' JSON (each line also starts with
its checksum, below):

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
emptied.

Each record is one line: its JSON after the CRC-32 of that JSON's bytes (8 lowercase hex digits
and a space), so a reader can tell a whole record from a torn or damaged one:

    3f1c0a9e {"seq": 1, "kind": "write", ...}

A line that starts with `{` is a record of the format before records carried a checksum: read
as it is, so a journal an older memfuse left replays after an upgrade.

An append either adds whole records or leaves the file exactly as it was: each starts at the
length the journal had after the last append that returned, and one that fails (ENOSPC in the
middle of a record, a failed fsync) cuts the file back to that length before the OSError is
raised (`Journal._append`). At load, what cannot be read is never dropped silently: a last line
with no newline (a crash cut its append short: that call never returned) is logged as a WARNING,
any other record that cannot be read (a bad checksum, JSON or fields: it may have been
acknowledged) as an ERROR, and both are copied to `<journal>.corrupt-<UTC time>` (0600) beside
the journal before the journal is rewritten without them (`Journal._set_aside`). A record an
older memfuse glued onto the fragment of a failed append is found again behind the fragment
(the fragment is kept aside, with a WARNING). When even the copy cannot be written (the disk
is full at mount) the lines stay in the journal, skipped, with an ERROR.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import time
import zlib
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


def encode(item: dict[str, Any]) -> bytes:
    """One record as the journal stores it: `<crc32 of the JSON, 8 hex> <JSON>\\n` (bytes)."""
    body = json.dumps(item).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


_STARTS = (b'{"seq": ', b'{"done": ')  # how a record's JSON begins (json.dumps, keys in order)
_CRC = re.compile(rb"[0-9a-f]{8} ")


def _decode(line: bytes) -> dict[str, Any] | None:
    """The record a whole `line` (no newline) holds, checked (checksum, JSON, fields), in
    either format (with the checksum, or a bare JSON object as older memfuse wrote); None when
    it holds none."""
    if line[:1] == b"{":
        body = line
    elif len(line) > 9 and line[8:9] == b" ":
        body = line[9:]
        try:
            if int(line[:8], 16) != zlib.crc32(body):
                return None
        except ValueError:
            return None
    else:
        return None
    try:
        item = json.loads(body)
        if not isinstance(item, dict):
            return None
        if "done" in item:
            int(item["done"])
            if item.get("block") is not None and not isinstance(item["block"], str):
                return None
        else:
            Entry.from_json(item)
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    return item


def read_records(data: bytes
                 ) -> tuple[list[dict[str, Any]], list[bytes], list[bytes], bytes]:
    """The journal's bytes `data` read: (the records, in order, as JSON objects; the lines
    that hold none, each with its newline; the fragments found before a record on its line;
    the last line when it has no newline, b"" when it does). A fragment is what an older
    memfuse left of an append that failed (ENOSPC) and then appended the next record to:
    that record is read, the fragment (never acknowledged) is not."""
    items: list[dict[str, Any]] = []
    bad: list[bytes] = []
    fragments: list[bytes] = []
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when data ends with a newline
    for line in lines:
        if not line.strip():
            continue
        item = _decode(line)
        if item is None:
            item, start = _salvage(line)
            if item is None:
                bad.append(line + b"\n")
                continue
            fragments.append(line[:start] + b"\n")
        items.append(item)
    return items, bad, fragments, torn


def _salvage(line: bytes) -> tuple[dict[str, Any] | None, int]:
    """A record at the end of a `line` that holds none as a whole, and where it starts:
    (None, len(line)) when there is none. Only a record's own beginning can hold `{"seq": `
    or `{"done": ` (inside a JSON string a quote is escaped), and only a checksum ends in 8
    hex digits and a space just before one."""
    for i in sorted(i for marker in _STARTS for i in _finditer(line, marker) if i > 0):
        # a checksum before it is the record's own: never read such a record unchecked
        start = i - 9 if i >= 9 and _CRC.fullmatch(line, i - 9, i) else i
        item = _decode(line[start:]) if start > 0 else None
        if item is not None:
            return item, start
    return None, len(line)


def _finditer(data: bytes, marker: bytes) -> Iterable[int]:
    i = data.find(marker)
    while i >= 0:
        yield i
        i = data.find(marker, i + 1)


def _write_new(path: Path, data: bytes, replace: bool = False) -> None:
    """Write `data` to `path` (mode 0600), a new file, and fsync it and its directory;
    replace: through a temporary file renamed over `path` (atomic). Raises OSError
    (FileExistsError when `path` exists and not `replace`); a file this made is removed when
    it fails."""
    target = path.with_name(path.name + ".tmp") if replace else path
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(target, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:
        os.close(fd)
        target.unlink(missing_ok=True)
        raise
    os.close(fd)
    if replace:
        os.replace(target, path)
    dir_fd = os.open(path.parent, os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def base_of(block: Block) -> dict[str, Any]:
    """The fields of `block` a replay compares with the server's: value, description, limit."""
    return {"value": block.value, "description": block.description, "limit": block.limit}


class Journal:
    """The journal file at `path` (created at the first append). Appends are fsync'd before
    they return and add whole records or nothing: OSError when the disk refuses (ENOSPC,
    EDQUOT, EIO...), and then neither the file nor anything in memory changed. Loading it
    (here) may log a WARNING or an ERROR and keep unreadable records aside (see the module's
    docstring); it raises nothing for the file's contents, OSError only when the file exists
    and cannot be read."""

    def __init__(self, path: Path):
        self.path = path
        self._pending: dict[int, Entry] = {}  # seq -> entry, in seq order
        self._real: dict[str, str] = {}  # provisional block id -> the server's id
        self._next = 1
        self._size = 0  # bytes of whole records: where the next append starts
        self._torn_left = False  # the bytes past _size are a torn last line (a crash's)
        self._load()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        items, bad, fragments, torn = read_records(data)
        self._size = len(data)
        if bad or fragments or torn:
            self._set_aside(data, items, bad, fragments, torn)
        for item in items:  # each checked by read_records
            if "done" in item:
                self._settle(int(item["done"]), item.get("block"))
                continue
            entry = Entry.from_json(item)
            entry.block_id = self._real.get(entry.block_id, entry.block_id)
            self._pending[entry.seq] = entry
            self._next = max(self._next, entry.seq + 1)

    def _set_aside(self, data: bytes, items: list[dict[str, Any]], bad: list[bytes],
                   fragments: list[bytes], torn: bytes) -> None:
        """Copy the unreadable lines `bad`, the `fragments` of failed appends and the torn last
        line `torn` of the journal's bytes `data` (read_records) to a `.corrupt-<UTC time>` file
        beside it, then rewrite the journal with `items` alone (a torn line only: cut off).
        Logs what was found (ERROR for `bad`: they may have been acknowledged); when the copy
        cannot be made (the disk is full) the journal is left as it is, an ERROR says so, and
        the next append starts on a line of its own."""
        aside = self._aside_path()
        try:
            _write_new(aside, b"".join(bad + fragments) + torn)
        except OSError as exc:
            log.error("journal %s: %d unreadable line(s) could not be kept aside in %s (%s); "
                      "they are left in the journal and skipped", self.path,
                      len(bad) + len(fragments) + bool(torn), aside, exc.strerror or exc)
            if torn:  # the next append keeps it aside when it can, else starts a new line
                self._size, self._torn_left = len(data) - len(torn), True
            return
        if bad:
            log.error("journal %s: %d record(s) cannot be read (a bad checksum or a damaged "
                      "line: changes that may have been acknowledged); kept in %s, not "
                      "replayed", self.path, len(bad), aside)
        if fragments:
            log.warning("journal %s: %d record(s) found behind the fragment of an append that "
                        "failed (an older memfuse left it); the fragments are kept in %s",
                        self.path, len(fragments), aside)
        if torn:
            log.warning("journal %s: its last line was cut short (a crash in the middle of an "
                        "append, whose call never returned); kept in %s", self.path, aside)
        try:
            if bad or fragments:
                keep = b"".join(encode(item) for item in items)
                _write_new(self.path, keep, replace=True)
            else:
                keep = data[:len(data) - len(torn)]
                fd = os.open(self.path, os.O_WRONLY)
                try:
                    os.ftruncate(fd, len(keep))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._size = len(keep)
        except OSError as exc:
            log.error("journal %s: could not be rewritten without the records kept in %s (%s); "
                      "they stay in it and are skipped", self.path, aside, exc.strerror or exc)
            if torn:  # kept aside already: the next append cuts it
                self._size, self._torn_left = len(data) - len(torn), True

    def _aside_path(self) -> Path:
        """A new `<journal>.corrupt-<UTC time>[-n]` path beside the journal."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside, n = self.path.with_name(f"{self.path.name}.corrupt-{stamp}"), 1
        while aside.exists():  # set aside earlier in the same second
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        return aside

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
        """Add `items` as whole records at the end of the whole records, fsync'd; on OSError
        the file is cut back to where it was before it is raised."""
        data = b"".join(encode(item) for item in items)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
            size = os.fstat(fd).st_size
            if size < self._size:
                log.warning("journal %s: %d byte(s) shorter than this daemon wrote it (changed "
                            "by something else); appending at its end", self.path,
                            self._size - size)
                self._size = size
            start = self._size
            if size > self._size and not self._cut_extra(fd, size):
                data, start = b"\n" + data, size  # they stay: this starts a line of its own
            try:
                view, offset = memoryview(data), start
                while view:  # a short write (a nearly full disk) must not pass for durable
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
                os.fsync(fd)
            except OSError:
                self._cut_back(fd, start)
                raise
        finally:
            os.close(fd)
        self._size = start + len(data)
        self._torn_left = False
        if created:  # the new file's directory entry must survive a crash too
            dir_fd = os.open(self.path.parent, os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _cut_extra(self, fd: int, size: int) -> bool:
        """The file `fd` holds `size` bytes, more than its whole records: a torn last line
        the load could not keep aside, or what remains of a failed append whose cut failed
        too (neither ever acknowledged). Copy them to a `.corrupt-` file and cut them off;
        returns False, leaving them, when the copy cannot be written (logged either way)."""
        what = ("a torn last line (a crash in the middle of an append)" if self._torn_left
                else "what an append that failed and could not be cut back left")
        try:
            with open(self.path, "rb") as f:
                f.seek(self._size)
                extra = f.read()
            aside = self._aside_path()
            _write_new(aside, extra)
        except OSError as exc:
            log.warning("journal %s: %d byte(s) past its last whole record, %s, cannot be kept "
                        "aside (%s); they stay, and the next record starts a line of its own",
                        self.path, size - self._size, what, exc.strerror or exc)
            return False
        log.warning("journal %s: %d byte(s) past its last whole record, %s, are kept in %s and "
                    "cut off", self.path, size - self._size, what, aside)
        os.ftruncate(fd, self._size)
        return True

    def _cut_back(self, fd: int, length: int) -> None:
        """An append that started at `length` failed: cut the file `fd` back to it (a
        shrinking truncate needs no free space). A cut that fails too is logged; the next
        append retries it."""
        try:
            os.ftruncate(fd, length)
            os.fsync(fd)
        except OSError as exc:
            log.error("journal %s: a failed append could not be cut back (%s); the next append "
                      "cuts it, and a load sets it aside", self.path, exc.strerror or exc)

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
                self._size = 0
                os.fsync(fd)
            finally:
                os.close(fd)
