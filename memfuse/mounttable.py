"""The kernel's mount table (`/proc/self/mountinfo`): what is mounted at a path, and by whom.

Every user can read it, whoever made the mounts, so `memfuse umount PATH` and `memfuse status
PATH` find a mount here rather than only in the caller's own records; a FUSE mount names the
user who made it (`user_id=` in its options).
"""
from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass, field
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
FSTYPE = "fuse.memfuse"  # the daemon mounts with subtype=memfuse
_ESCAPE = re.compile(rb"\\([0-7]{3})")  # the kernel writes space, tab, newline, \ as \ooo


@dataclass(frozen=True)
class KernelMount:
    """One line of mountinfo: where, which filesystem type, its source and its
    filesystem-wide options (`user_id=0` -> {"user_id": "0"}; a flag maps to "")."""

    mountpoint: str
    fstype: str
    source: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def is_memfuse(self) -> bool:
        """Whether a memfuse daemon made it (fuse, subtype memfuse)."""
        return self.fstype == FSTYPE

    @property
    def owner_uid(self) -> int | None:
        """The uid that made a FUSE mount (its `user_id`); None for other filesystems."""
        try:
            return int(self.options["user_id"])
        except (KeyError, ValueError):
            return None


def unescape(field_: bytes) -> str:
    """A mountinfo field as a path: `\\040` -> space, `\\011` tab, `\\012` newline, `\\134`
    backslash (any `\\ooo`); bytes that are not UTF-8 are kept as os.fsdecode keeps them."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field_))


def parse(text: bytes) -> list[KernelMount]:
    """The mounts of mountinfo `text`, in its order (a later line is mounted over an earlier
    one at the same path). Lines that do not parse are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(b" ")
        try:
            dash = fields.index(b"-", 6)  # after the optional fields
            fstype, source, options = fields[dash + 1:dash + 4]
        except ValueError:
            continue
        pairs = (o.split(b"=", 1) for o in options.split(b","))
        mounts.append(KernelMount(unescape(fields[4]), unescape(fstype), unescape(source),
                                  {unescape(p[0]): unescape(p[1]) if len(p) > 1 else ""
                                   for p in pairs}))
    return mounts


def mounts() -> list[KernelMount]:
    """The mounts this process sees. Raises OSError when /proc cannot be read."""
    return parse(MOUNTINFO.read_bytes())


def canonical(path: str | Path) -> str:
    """`path` (absolute) with the symlinks of its parent resolved, as far as this user can see,
    as the kernel's table writes it. The last component is not touched: it may be a mount
    whose daemon hangs or is gone."""
    head, tail = os.path.split(os.fspath(path))
    return os.path.join(os.path.realpath(head), tail)


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether the absolute paths `a` and `b` name the same place (canonical)."""
    return os.fspath(a) == os.fspath(b) or canonical(a) == canonical(b)


def mount_at(path: Path, table: list[KernelMount] | None = None) -> KernelMount | None:
    """The mount on top at `path` (an absolute path), or None when nothing is mounted
    there. Never touches the path itself, so a dead or unreadable mount is found too.
    Raises OSError when /proc cannot be read (and `table` is not given)."""
    table = mounts() if table is None else table
    wanted = {os.fspath(path), canonical(path)}
    return next((m for m in reversed(table) if m.mountpoint in wanted), None)


def user_name(uid: int) -> str:
    """The login name of `uid`, or `uid N` when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
