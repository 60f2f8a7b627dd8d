"""The block file format (SEMANTICS.md, "Writing a block file"): render, parse, validate, plan the PATCH.

A block file is YAML frontmatter followed by the block value, byte for byte:

    ---
    description: What this block contains
    limit: 20000
    ---
    Block content goes here.

Keys: `description` (non-empty string; a block without one shows `<label> block`, which a
write leaves unsent), `limit` (positive integer, characters of the value), `read_only`
(rendered only when true; a file cannot change it). A file that does not start with
`---\\n` has no frontmatter: its whole content is the value. A key left out of the frontmatter
leaves that field as it is on the server.

Files from Windows editors are understood: a UTF-8 byte order mark before the frontmatter is
dropped, and the frontmatter's own lines may end in CRLF (the value after it is kept byte for
byte). A key given twice is refused, as is anything the server cannot store (a limit past
2**31 - 1, a description with a NUL).
"""
from __future__ import annotations

import dataclasses
import errno
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import FsError
from .model import Block

KEYS = ("description", "limit", "read_only")
DEFAULT_LIMIT = 20000
MAX_LIMIT = 2**31 - 1  # the server keeps `limit` in a 32-bit integer column (500 past it)
OPEN = "---\n"
BOM = "\ufeff"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key (YAML says keys are unique;
    PyYAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice", key_node.start_mark)
                seen.add(key)
            except TypeError:  # an unhashable key: construct_mapping refuses it below
                pass
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _UniqueKeyLoader.construct_mapping)


class BlockFileError(FsError):
    """A file's content cannot become a block: `errno` for the program, `reason` in words."""


@dataclass(frozen=True)
class ParsedFile:
    """A block file taken apart: the value and only the frontmatter keys that were present."""

    value: str
    fields: dict[str, Any]
    has_frontmatter: bool


def default_description(label: str) -> str:
    """What a file shows for a block without a description: `<label> block`, Letta's own
    default for blocks a git push creates (letta/services/block_manager_git.py). letta-code's
    pre-commit hook requires a non-empty description in every `system/` and `reference/` file,
    so every file memfuse renders has one."""
    return f"{label} block"


def _blank(description: str | None) -> bool:
    return not (description or "").strip()


def shown_description(block: Block) -> str:
    """The description `block`'s file shows: its own, or `default_description` for none (or
    only blanks). Two blocks that differ only there read the same as files."""
    return default_description(block.label) if _blank(block.description) else block.description


def conflict_fields(block: Block) -> tuple[str, str, int]:
    """What a conflict compares of a block: (value, the description its file shows, limit).
    A blank description and its default read the same, so a block read back from its file
    (a local-first mount) is no change of one without a description."""
    return block.value, shown_description(block), block.limit


def render(block: Block) -> bytes:
    """The file content for `block`: frontmatter + value, UTF-8 bytes.

    A block without a description (none, or only blanks) shows `default_description`; a write
    that keeps that line leaves the server's description as it is (`applied`, `plan_update`),
    so a round trip sends nothing for it.
    """
    header: dict[str, Any] = {}
    header["description"] = shown_description(block)
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


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def split_frontmatter(text: str) -> tuple[str, str] | None:
    """(frontmatter text, value) of a file's text, or None when it has no frontmatter (does not
    start with `---` on a line of its own, after an optional byte order mark). The frontmatter's
    lines may end in LF or CRLF; the value is everything after the closing `---` line. Raises
    BlockFileError(EINVAL) when the frontmatter is never closed."""
    text = text.removeprefix(BOM)
    if text.startswith(OPEN):
        newline = "\n"
    elif text.startswith("---\r\n"):
        newline = "\r\n"
    else:
        return None
    start = len("---" + newline)
    close = f"{newline}---{newline}"
    end = text.find(close, start - len(newline))
    if end >= 0:
        return text[start:end + len(newline)], text[end + len(close):]
    if text.endswith(f"{newline}---"):
        return text[start:-3], ""
    raise BlockFileError(errno.EINVAL, "frontmatter opened with '---' is never closed")


def _load_yaml(front: str) -> Any:
    """The frontmatter's YAML. Any failure of the parser (a YAML error, and also PyYAML's
    ValueError for an impossible date, RecursionError for deep nesting, OverflowError) is
    EINVAL: a file's bytes must never take the mount down."""
    if not front.strip():
        return {}
    try:
        return yaml.load(front, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (frontmatter line {where.line + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None)
        why = f": {problem}" if problem else ""
        raise BlockFileError(errno.EINVAL, f"frontmatter is not valid YAML{line}{why}") from None
    except (ValueError, RecursionError, OverflowError, TypeError, MemoryError) as exc:
        raise BlockFileError(errno.EINVAL, f"frontmatter cannot be read "
                                           f"({type(exc).__name__}: {_short(str(exc))})") from None


def parse(data: bytes) -> ParsedFile:
    """Split file bytes into the value and the frontmatter fields present.

    Raises BlockFileError(EINVAL) for non-UTF-8 bytes, a NUL byte, an unclosed frontmatter, YAML
    that does not parse or is not a mapping, unknown or repeated keys, an empty description, a
    limit that is not a positive integer the server can store, or a read_only that is not a
    boolean.
    """
    text = _decode(data)
    split = split_frontmatter(text)
    if split is None:
        return ParsedFile(value=text, fields={}, has_frontmatter=False)
    front, value = split
    return ParsedFile(value=value, fields=_fields(front), has_frontmatter=True)


def _fields(front: str) -> dict[str, Any]:
    """The frontmatter's fields, checked. Raises BlockFileError(EINVAL)."""
    fields = _load_yaml(front)
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
        if "\0" in description or not _encodable(description):
            raise BlockFileError(errno.EINVAL, "description holds a NUL or a lone surrogate, "
                                               "which the server cannot store")
    if "limit" in fields:
        limit = fields["limit"]
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_LIMIT:
            raise BlockFileError(errno.EINVAL, f"limit must be a positive integer (at most "
                                               f"{MAX_LIMIT}), not {_short(limit)}")
    if "read_only" in fields and not isinstance(fields["read_only"], bool):
        raise BlockFileError(errno.EINVAL, "read_only must be true or false")
    return fields


def check_partial(data: bytes | bytearray, limit: int, gap: int = 0) -> BlockFileError | None:
    """What already refuses a block file that is still being written, or None: EINVAL when its
    frontmatter is complete and invalid, EFBIG when its value is longer than its limit (in
    characters). What only the whole file can tell (an unclosed frontmatter, bytes that are
    not UTF-8 in the value, a NUL) is left to the check at close. Cheap enough for every
    write(): only the frontmatter is parsed, and characters are counted only past `limit`
    bytes.

    data: the file's bytes so far; limit: the block's limit (the frontmatter's own wins); gap:
    NUL bytes that would follow `data` (a write past the end, a truncate that grows), counted
    without being allocated.
    """
    value = data.removeprefix(BOM.encode())
    if value.startswith((b"---\n", b"---\r\n")):
        try:
            front, text_value = split_frontmatter(value.decode("utf-8", "surrogateescape"))
        except BlockFileError:
            return None  # not closed yet: it may still be being written
        try:
            front.encode("utf-8")
            fields = _fields(front)
        except UnicodeEncodeError:
            fields = {}  # bytes that are not UTF-8: the check at close names them
        except BlockFileError as exc:
            return exc
        limit = fields.get("limit", limit)
        value = text_value.encode("utf-8", "surrogateescape")
    if len(value) + gap <= limit:
        return None  # a character is at least one byte
    chars = len(value.decode("utf-8", "ignore")) + gap
    if chars <= limit:
        return None
    return BlockFileError(errno.EFBIG, f"value is {chars} characters, over the limit of {limit}")


def applied(block: Block, parsed: ParsedFile) -> Block:
    """`block` as the file `parsed` makes it: its value, and the description and limit its
    frontmatter names (a key left out keeps the block's). No checks: see plan_update."""
    fields = {key: parsed.fields[key] for key in ("description", "limit") if key in parsed.fields}
    if _shown_default(block, fields):
        del fields["description"]
    return dataclasses.replace(block, value=parsed.value, **fields)


def shows(data: bytes, block: Block) -> bool:
    """Whether the file `data` says exactly what `block` is, though its bytes may differ from
    `render(block)` (a file pushed over git: its own key order, no `limit`): it parses, its
    value is the block's, `read_only` (absent: false) is the block's, and the description and
    limit it names (a key left out leaves that field as it is) are the block's (a missing
    description shows as `default_description`)."""
    try:
        parsed = parse(data)
    except BlockFileError:
        return False
    fields = parsed.fields
    description = ("description" not in fields or fields["description"] == block.description
                   or _shown_default(block, fields))
    return (parsed.value == block.value and fields.get("read_only", False) == block.read_only
            and description and ("limit" not in fields or fields["limit"] == block.limit))


def _shown_default(block: Block, fields: dict[str, Any]) -> bool:
    """Whether `fields` hold the description a file shows for `block`'s missing one
    (`default_description`): no change to send."""
    return (_blank(block.description)
            and fields.get("description") == default_description(block.label))


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
    if _shown_default(block, fields):
        changes.pop("description", None)
    return changes
