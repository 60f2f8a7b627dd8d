"""Times and modes of the mount's files, kept across mounts (`<history>.attrs`, mode 0600).

The server has neither (a block has no mode and no times), so the daemon keeps them: for each
block file, directory and the `.git` file the mount shows, its permission bits and its atime,
mtime and ctime in nanoseconds since the epoch. Scratch files and links are gone at unmount
and are not kept. The file is one JSON object, paths from the mount root (the root is ""):

    {"version": 1, "files": {"system/human.md": [420, atime_ns, mtime_ns, ctime_ns], …}}

It is written atomically (a temporary file, fsync, rename), so a crash leaves the old record or
the new one; the daemon writes it at each snapshot (it then describes the files the snapshot
holds), a second after a chmod, chown or utimens, and at unmount. At the next mount
(`MountState.restore_attrs`) every file gets its mode back, and its times when it is as the
history's head has it (else it changed while unmounted: the mount saw it then).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from .config import write_private

VERSION = 1


class AttrsError(Exception):
    """The record exists but cannot be read (not JSON, not this shape); the message says
    which file and why."""


class Attrs(NamedTuple):
    """One file's kept attributes: `mode` (permission bits, 0o7777), `atime_ns`, `mtime_ns`,
    `ctime_ns` (nanoseconds since the epoch)."""

    mode: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


def save(path: Path, found: dict[str, Attrs]) -> None:
    """Write the record `found` (path -> Attrs) to `path` atomically (mode 0600). Raises
    OSError."""
    data = json.dumps({"version": VERSION, "files": {p: list(a) for p, a in sorted(
        found.items())}}, separators=(",", ":")).encode() + b"\n"
    write_private(path, data)


def load(path: Path) -> dict[str, Attrs]:
    """The record saved at `path` (path -> Attrs); {} when there is none. Raises AttrsError
    when the file cannot be read as one (OSError other than a missing file, bad JSON, wrong
    shape)."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise AttrsError(f"{path}: cannot be read ({exc})") from None
    try:
        if data["version"] != VERSION:
            raise AttrsError(f"{path}: version {data['version']!r}, expected {VERSION}")
        return {str(p): Attrs(*(int(v) for v in values))
                for p, values in data["files"].items()}
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise AttrsError(f"{path}: not a record of times and modes "
                         f"({type(exc).__name__}: {exc})") from None
