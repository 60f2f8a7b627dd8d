"""What the other modules talk about: a block, who made a change, and where a block is shown.

Imported by the file format, the tree, the client and the owner of the mount's state; it imports
nothing of memfuse. The layout (SEMANTICS.md, "Names"): attached blocks live under `system/`, detached
blocks the agent owns at the root, and a `/` in a label makes directories.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Any

SYSTEM_DIR = "system"
GITFILE_NAME = ".git"
SUFFIX = ".md"
MEMORY_FILESYSTEM_LABEL = "memory_filesystem"  # kept by memfuse: read-only in the mount
MAX_NAME = 255   # bytes of one path component (NAME_MAX)
MAX_PATH = 4095  # bytes of a path from the mount root: git's index cannot hold a longer one
PROVISIONAL_PREFIX = "local-"  # id of a block created while the server was away (journal.py)


def is_provisional(block_id: str) -> bool:
    """Whether `block_id` names a block the journal created locally and the server has not
    made yet (its create is pending): no server call may use it."""
    return block_id.startswith(PROVISIONAL_PREFIX)


CREATE_MARKER = "memfuse-create:"  # + a provisional id: the tag of a create not complete yet


def create_marker(provisional_id: str) -> str:
    """The tag a create for the provisional block `provisional_id` marks its block with until
    it is complete (attached where it belongs), so that an attempt after a lost answer finds
    it (`Remote.find_marked`) and a listing does not show it as a file of its own."""
    return CREATE_MARKER + provisional_id


@dataclass(frozen=True)
class Block:
    """One memory block as the server returned it.

    `limit` is in characters of `value`. `description` may be None for blocks created without one.
    `tags` is the block's tag set (owner tags look like `owner:<agent-id>`).
    """

    id: str
    label: str
    value: str
    limit: int
    description: str | None = None
    read_only: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Block":
        """Build a Block from a block object of the Letta API (`GET /v1/blocks/{id}` and lists)."""
        return cls(
            id=data["id"],
            label=data["label"],
            value=data.get("value") or "",
            limit=int(data.get("limit") or 0),
            description=data.get("description"),
            read_only=bool(data.get("read_only")),
            tags=tuple(data.get("tags") or ()),
        )


class Origin(enum.Enum):
    """Who made a change: the mounting user through the mount, or someone on the server; or a
    local write refused because the server changed first (kept so nothing is lost)."""

    LOCAL = "local"
    SERVER = "server"
    REJECTED = "rejected"


def is_block_name(name: str) -> bool:
    """Whether a file called `name` is a block: `*.md`, except emacs's `#x.md#`/`.#x.md`."""
    return name.endswith(SUFFIX) and name != SUFFIX and not name.startswith(("#", ".#"))


def can_be_file(parts: tuple[str, ...]) -> bool:
    """Whether a block file can be at path `parts` (from the mount root), in any layout: no
    control characters (they would break the prompt and git paths), UTF-8, at most MAX_PATH
    bytes in all, no component empty, `.`, `..` or `.md`, none over MAX_NAME bytes, no `.git`
    directory in any case (git refuses such paths: `hasDotgit`), and a block name last."""
    if any(ord(c) < 32 or ord(c) == 127 for name in parts for c in name):
        return False
    try:
        size = len("/".join(parts).encode("utf-8"))
    except UnicodeEncodeError:
        return False
    if not parts or size > MAX_PATH:
        return False
    for name in parts:
        if name in ("", SUFFIX, ".", "..") or len(name.encode()) > MAX_NAME:
            return False
    if any(name.casefold() == GITFILE_NAME for name in parts[:-1]):
        return False
    return is_block_name(parts[-1])


@functools.lru_cache(maxsize=1 << 16)
def _label_parts(attached: bool, label: str) -> tuple[str, ...] | None:
    """Location.parts, memoized: every listing maps each of thousands of labels again, and
    this check was two thirds of a poll's reconciliation (7.4 ms at 1,000 blocks)."""
    names = label.split("/")
    names[-1] += SUFFIX
    if not attached and names[0] == SYSTEM_DIR and len(names) > 1:
        return None
    parts = ((SYSTEM_DIR,) if attached else ()) + tuple(names)
    return parts if can_be_file(parts) else None


@dataclass(frozen=True)
class Location:
    """Where a block is in the mount: attached (under `system/`) or not, and its label.

    The one mapping between paths and blocks: `Location.at(parts)` reads a path,
    `location.parts()` gives it back; `Location.at(loc.parts()) == loc` whenever `parts()` is
    not None.
    """

    attached: bool
    label: str

    def parts(self) -> tuple[str, ...] | None:
        """Path components of the block's file from the mount root (`("system", "human.md")`),
        or None when the label cannot be shown as a file: empty, `.`/`..` components, control
        characters (they would break the prompt and git paths), characters that are not
        UTF-8, a component over MAX_NAME bytes, a path over MAX_PATH bytes, a `.git` directory
        in any case (git refuses such paths: `hasDotgit`), an emacs lock/autosave name, or
        (detached) a path inside `system/`."""
        if len(self.label) > MAX_PATH:  # too long in any encoding; and kept out of the cache
            return None
        return _label_parts(self.attached, self.label)

    @classmethod
    def at(cls, parts: tuple[str, ...]) -> "Location | None":
        """The block a file at path `parts` (from the mount root) stands for, or None when that
        path cannot be a block file."""
        if not parts or not is_block_name(parts[-1]):
            return None
        attached = parts[0] == SYSTEM_DIR and len(parts) > 1
        rel = parts[1:] if attached else parts
        location = cls(attached, "/".join(rel[:-1] + (rel[-1][: -len(SUFFIX)],)))
        return location if location.parts() == tuple(parts) else None
