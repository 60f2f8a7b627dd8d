"""The block map: which block each file of the history is, so a mount can start from history
while the server is away (a local-first mount).

History files carry no block ids, so a small sidecar beside the history repository
(`<history>.blocks`, mode 0600) keeps, for each block file the mount shows, the block's id,
label, attachment, read-only flag and tags; no values (the history file at that path is
`blockfile.render(block)`, so `blockfile.parse` of it gives the value, description and limit
back). It also records the layout those paths are in (layout.py: "classic" or "git-memory"),
so a mount started from history shows the files where the history has them; a map without
it (an older memfuse) is classic. The file is one JSON object:

    {"version": 1, "layout": "classic",
     "blocks": [{"path": "system/human.md", "id": "block-…", "label": "human",
                 "attached": true, "read_only": false, "tags": []}, …]}

It is written atomically (a temporary file, fsync, rename), so a crash leaves the old map or
the new one, never half of one.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from . import blockfile
from .config import write_private
from .model import Block, is_provisional

log = logging.getLogger("memfuse.blockmap")

VERSION = 1
CLASSIC = "classic"  # the layout of a map that names none (layout.CLASSIC.name)


class BlockMapError(Exception):
    """The block map exists but cannot be read (not JSON, not this shape); the message says
    which file and why."""


@dataclass(frozen=True)
class Record:
    """One block file of the mount: `path` from the mount root (`system/human.md`), the block's
    `id`, `label`, whether it is `attached` (under `system/`), `read_only` and `tags`."""

    path: str
    id: str
    label: str
    attached: bool
    read_only: bool = False
    tags: tuple[str, ...] = ()

    @classmethod
    def of(cls, path: str, block: Block, attached: bool) -> "Record":
        """The record of `block` shown at `path`."""
        return cls(path, block.id, block.label, attached, block.read_only, tuple(block.tags))


def records(shown: Iterable[tuple[str, Block, bool]]) -> list[Record]:
    """The map of what a mount shows: one record per (path, block, attached), sorted by path.
    Blocks the server has not made yet (`model.is_provisional` ids: the journal re-adds them)
    are left out."""
    return sorted((Record.of(path, block, attached) for path, block, attached in shown
                   if not is_provisional(block.id)), key=lambda r: r.path)


def save(path: Path, found: list[Record], layout: str = CLASSIC) -> None:
    """Write the map to `path` atomically (`<path>.tmp`, fsync, rename; mode 0600) and fsync
    its directory; `layout` names the layout its paths are in (layout.Layout.name). Raises
    OSError."""
    data = json.dumps({"version": VERSION, "layout": layout,
                       "blocks": [asdict(r) for r in found]}, indent=1).encode() + b"\n"
    write_private(path, data)


def load(path: Path) -> list[Record] | None:
    """The map saved at `path`, or None when there is none. Raises BlockMapError when the
    file cannot be read as a map (OSError other than a missing file, bad JSON, wrong shape)."""
    found = read(path)
    return None if found is None else found[1]


def read(path: Path) -> tuple[str, list[Record]] | None:
    """(the layout's name, the records) of the map saved at `path` ("classic" when it names
    none), or None when there is none. Raises BlockMapError as `load` does."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BlockMapError(f"{path}: cannot be read ({exc})") from None
    try:
        if data["version"] != VERSION:
            raise BlockMapError(f"{path}: version {data['version']!r}, expected {VERSION}")
        records = [Record(str(r["path"]), str(r["id"]), str(r["label"]), bool(r["attached"]),
                          bool(r.get("read_only", False)),
                          tuple(str(t) for t in r.get("tags", ())))
                   for r in data["blocks"]]
        return str(data.get("layout") or CLASSIC), records
    except (KeyError, TypeError, AttributeError) as exc:
        raise BlockMapError(f"{path}: not a block map ({type(exc).__name__}: {exc})") from None


def blocks(found: list[Record], files: dict[str, bytes]) -> tuple[list[Block], list[Block]]:
    """(attached, owned) blocks as a listing of the server would give them, built from the
    map and the history's files (`HistoryRepo.files()`: path -> content). A record whose path
    has no file in `files`, or whose file does not parse as a block file, is left out with a
    WARNING naming the path."""
    attached: list[Block] = []
    owned: list[Block] = []
    for record in found:
        content = files.get(record.path)
        if content is None:
            log.warning("%s: block %s is in the block map but not in the history; left out "
                        "until the server lists it", record.path, record.id)
            continue
        try:
            parsed = blockfile.parse(content)
        except blockfile.BlockFileError as exc:
            log.warning("%s: the history's file is not a block file (%s); left out until the "
                        "server lists it", record.path, exc.reason)
            continue
        limit = parsed.fields.get("limit")
        if not isinstance(limit, int):
            log.warning("%s: the history's file has no limit; left out until the server lists "
                        "it", record.path)
            continue
        description = parsed.fields.get("description")
        if description == blockfile.default_description(record.label):
            description = None  # what a file shows for no description (the server's may be
                                # these words: a write of them sends nothing either way)
        block = Block(record.id, record.label, parsed.value, limit, description,
                      record.read_only, record.tags)
        (attached if record.attached else owned).append(block)
    return attached, owned
