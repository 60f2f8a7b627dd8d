"""The block file format (DESIGN.md §1): render, parse, validate, plan the PATCH.

A block file is YAML frontmatter followed by the block value, byte for byte:

    ---
    description: What this block contains
    limit: 20000
    ---
    Block content goes here.

Keys: `description` (non-empty string), `limit` (positive integer, characters of the value),
`read_only` (rendered only when true; a file cannot change it). A file that does not start with
`---\\n` has no frontmatter: its whole content is the value. A key left out of the frontmatter
leaves that field as it is on the server.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import FsError
from .model import SUFFIX, Block

KEYS = ("description", "limit", "read_only")
DEFAULT_LIMIT = 20000
OPEN = "---\n"


class BlockFileError(FsError):
    """A file's content cannot become a block: `errno` for the program, `reason` in words."""


@dataclass(frozen=True)
class ParsedFile:
    """A block file taken apart: the value and only the frontmatter keys that were present."""

    value: str
    fields: dict[str, Any]
    has_frontmatter: bool


def render(block: Block) -> bytes:
    """The file content for `block`: frontmatter + value, UTF-8 bytes.

    The description is left out when the server has none, so a round trip sends nothing for it.
    """
    header: dict[str, Any] = {}
    if block.description:
        header["description"] = block.description
    header["limit"] = block.limit
    if block.read_only:
        header["read_only"] = True
    front = yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=1 << 30)
    return (OPEN + front + "---\n" + block.value).encode("utf-8")


def _decode(data: bytes) -> str:
    nul = data.find(b"\0")
    if nul >= 0:
        raise BlockFileError(errno.EINVAL, f"contains a NUL byte at offset {nul}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BlockFileError(errno.EINVAL, f"is not valid UTF-8 (byte offset {exc.start})") from None


def parse(data: bytes) -> ParsedFile:
    """Split file bytes into the value and the frontmatter fields present.

    Raises BlockFileError(EINVAL) for non-UTF-8 bytes, a NUL byte, an unclosed frontmatter, YAML
    that does not parse or is not a mapping, unknown keys, an empty description, a limit that is
    not a positive integer, or a read_only that is not a boolean.
    """
    text = _decode(data)
    if not text.startswith(OPEN):
        return ParsedFile(value=text, fields={}, has_frontmatter=False)
    end = text.find("\n---\n", len(OPEN) - 1)
    if end >= 0:
        front, value = text[len(OPEN):end + 1], text[end + 5:]
    elif text.endswith("\n---"):
        front, value = text[len(OPEN):-3], ""
    else:
        raise BlockFileError(errno.EINVAL, "frontmatter opened with '---' is never closed")
    try:
        fields = yaml.safe_load(front) if front.strip() else {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (frontmatter line {where.line + 1})" if where is not None else ""
        raise BlockFileError(errno.EINVAL, f"frontmatter is not valid YAML{line}") from None
    if not isinstance(fields, dict):
        raise BlockFileError(errno.EINVAL, "frontmatter must be a mapping of keys to values")
    unknown = sorted(str(key) for key in fields if key not in KEYS)
    if unknown:
        raise BlockFileError(errno.EINVAL, f"unknown frontmatter key(s): {', '.join(unknown)} "
                                           f"(allowed: {', '.join(KEYS)})")
    if "description" in fields:
        description = fields["description"]
        if not isinstance(description, str) or not description.strip():
            raise BlockFileError(errno.EINVAL, "description must be a non-empty string")
    if "limit" in fields:
        limit = fields["limit"]
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise BlockFileError(errno.EINVAL, f"limit must be a positive integer, not {limit!r}")
    if "read_only" in fields and not isinstance(fields["read_only"], bool):
        raise BlockFileError(errno.EINVAL, "read_only must be true or false")
    return ParsedFile(value=value, fields=fields, has_frontmatter=True)


def plan_update(block: Block, parsed: ParsedFile) -> dict[str, Any]:
    """The PATCH body that turns `block` into what `parsed` says; `{}` when nothing changes.

    Raises BlockFileError: EINVAL when the file tries to change `read_only`, EFBIG when the value
    is longer (in characters) than the limit it would have.
    """
    fields = parsed.fields
    if "read_only" in fields and fields["read_only"] != block.read_only:
        raise BlockFileError(errno.EINVAL, "read_only cannot be changed from a file")
    limit = fields.get("limit", block.limit)
    if len(parsed.value) > limit:
        raise BlockFileError(errno.EFBIG, f"value is {len(parsed.value)} characters, over the "
                                          f"limit of {limit}")
    changes: dict[str, Any] = {}
    if parsed.value != block.value:
        changes["value"] = parsed.value
    for key in ("description", "limit"):
        if key in fields and fields[key] != getattr(block, key):
            changes[key] = fields[key]
    return changes
