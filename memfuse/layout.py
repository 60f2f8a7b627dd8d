"""Where an agent's blocks are in the mount, in each of Letta's two memory models.

A *layout* maps paths (tuples of names from the mount root) to blocks and back, and says what
every other file is. Two exist (docs/git-memory.md):

- `ClassicLayout`: today's mount (SEMANTICS.md, "Names"): `system/<label>.md` is an attached
  block, `<label>.md` elsewhere a detached block the agent owns, every other name scratch.
  It is model.py's `Location.at` / `Location.parts` / `is_block_name`, unchanged.
- `GitMemoryLayout`: an agent tagged `git-memory-enabled`, whose labels are paths
  (`system/human`, `notes/todo`, `skills/pdf`). Every block is attached, and a path is a block
  exactly when Letta's `memory_block_label_from_markdown_path`
  (letta/services/memory_repo/path_mapping.py) gives it a label that memfuse can show. Other
  files (a skill's `extract.py`, `skills/pdf/notes.md`, `.letta/config.json`, images) are
  *kept*: the repository holds them but the server never reads them. Editors' temporary names
  stay scratch.

`layout_for_tags(agent_tags)` picks one, `by_name` gives back the one a history recorded
(blockmap.py). Pure: no I/O. state.MountState holds the mount's layout and is the only module
that maps paths to blocks through it.
"""
from __future__ import annotations

import abc
import enum
import functools
import re
from collections.abc import Iterable

from .model import MAX_PATH, SUFFIX, SYSTEM_DIR, Location, can_be_file, is_block_name

# letta/services/block_manager_git.py: GIT_MEMORY_ENABLED_TAG; letta/orm/agent.py sets
# Memory.git_enabled from it, which switches the prompt to _render_memory_blocks_git.
GIT_MEMORY_TAG = "git-memory-enabled"
SKILLS_DIR = "skills"
SKILL_FILE = "SKILL.md"
# Files that are no block (PathKind.KEPT, git-memory layout) are kept in history, in the
# daemon's memory while mounted: a cap on each and on all, checked before any byte is taken
# (by a mount, and by a push of `memfuse serve`).
KEPT_FILE_LIMIT = 1 << 20  # bytes of one kept file (EFBIG past it)
KEPT_LIMIT = 32 << 20  # bytes of all the kept files of a mount or a pushed tree (ENOSPC past it)


class PathKind(enum.Enum):
    """What a file at a path is, in a layout.

    BLOCK: a block file (`location_at` gives its Location). KEPT: a real file that is no block:
    committed to history, never sent to the server (git-memory layout only). SCRATCH: an
    editor's or tool's temporary file, kept in the daemon's memory only, as today. REFUSED: a
    name the server would read as a block whose label memfuse cannot show (a control
    character, `.md` alone, a path over MAX_PATH bytes, ...): creating it is refused, as today.
    """

    BLOCK = "block"
    KEPT = "kept"
    SCRATCH = "scratch"
    REFUSED = "refused"


def label_from_path(path: str) -> str | None:
    """Letta's block label for the repository path `path` (`"notes/todo.md"` -> `"notes/todo"`,
    `"skills/pdf/SKILL.md"` -> `"skills/pdf"`), or None when the server does not read that file
    as a block (`"skills/pdf/notes.md"`, `"profile.png"`).

    Mirrors `memory_block_label_from_markdown_path` in letta/services/memory_repo/path_mapping.py
    (Letta 0.16.8) rule for rule, including what memfuse cannot show (`".md"` -> `""`);
    tests/test_layout.py compares the two on generated paths. memfuse's own limits are
    `GitMemoryLayout.location_at`'s.
    """
    if not path.endswith(SUFFIX):
        return None
    if path.startswith(SKILLS_DIR + "/"):
        parts = path.split("/")
        if len(parts) == 3 and parts[1] and parts[2] == SKILL_FILE:
            return f"{SKILLS_DIR}/{parts[1]}"
        return None
    return path[: -len(SUFFIX)]


# Temporary names of the tools memfuse's tests drive, exactly as they make them; a name that is
# wrongly scratch is lost at unmount, so the patterns are narrow and everything else is kept.
_SCRATCH_PATTERNS = re.compile(
    r"""\#.*\#          # emacs auto-save
      | \.\#.*          # emacs lock (a symlink)
      | .*~             # vim and emacs backups (x~, x.~1~)
      | \..+\.sw[a-px]  # vim and nano swap files (.x.swp, .x.swo, ..., .x.swx)
      | sed[A-Za-z0-9]{6}      # GNU sed -i (template sedXXXXXX)
      | XX[A-Za-z0-9]{6}       # perl -i (template XXXXXXXX, last six replaced)
      | tmp[a-z0-9_]{8}        # Python tempfile (prefix tmp, 8 characters)
      | tmp\.[A-Za-z0-9]{10}   # mktemp (template tmp.XXXXXXXXXX)
    """, re.VERBOSE)


def is_scratch_name(name: str) -> bool:
    """Whether a file called `name` is an editor's or tool's temporary file in the git-memory
    layout: emacs `#x#`, `.#x`; backups `x~`; vim/nano swap `.x.swp` (`.sw[a-p]`, `.swx`);
    vim's probe `4913` (then 5036, 5159, ...: vim's bufwrite.c adds 123); GNU sed's
    `sedXXXXXX`; perl -i's `XXxxxxxx`; Python tempfile's `tmpxxxxxxxx`; mktemp's
    `tmp.XXXXXXXXXX`."""
    if name.isdigit() and name.isascii() and int(name) >= 4913 and (int(name) - 4913) % 123 == 0:
        return True
    return _SCRATCH_PATTERNS.fullmatch(name) is not None


class Layout(abc.ABC):
    """Where an agent's blocks are in the mount, and what every other file is.

    Shapes: a path is a tuple of names from the mount root (`("system", "human.md")`); a
    block's place is a `Location(attached, label)`. For every location `loc`,
    `location_at(parts(loc)) == loc` when `parts(loc)` is not None, and for every path `p`,
    `parts(location_at(p)) == p` when `location_at(p)` is not None.
    """

    name: str  # "classic" or "git-memory": recorded with a history (blockmap.py)
    # the directory (from the mount root) that holds every attached block's file: the
    # attached listing's files are found by walking it alone
    attached_dir: tuple[str, ...]
    shows_detached: bool  # whether a detached block the agent owns is a file
    keeps_files: bool  # whether `kind` ever says KEPT (files history keeps that are no block)

    @abc.abstractmethod
    def location_at(self, parts: tuple[str, ...]) -> Location | None:
        """The block a file at `parts` stands for, or None when no block file can be there."""

    @abc.abstractmethod
    def parts(self, location: Location) -> tuple[str, ...] | None:
        """The path of `location`'s block file, or None when that block cannot be shown."""

    @abc.abstractmethod
    def kind(self, parts: tuple[str, ...]) -> PathKind:
        """What a file at `parts` is. The namespace's own files (the root `.git`) are its
        business, never asked here."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class ClassicLayout(Layout):
    """Today's layout, model.py's: `system/<label>.md` attached, `<label>.md` elsewhere
    detached; a block name (`*.md` but emacs's) that maps to no label is refused, every other
    name is scratch. No kept files."""

    name = "classic"
    attached_dir = (SYSTEM_DIR,)
    shows_detached = True
    keeps_files = False

    def location_at(self, parts: tuple[str, ...]) -> Location | None:
        return Location.at(parts)

    def parts(self, location: Location) -> tuple[str, ...] | None:
        return location.parts()

    def kind(self, parts: tuple[str, ...]) -> PathKind:
        if not parts or not is_block_name(parts[-1]):
            return PathKind.SCRATCH
        return PathKind.BLOCK if Location.at(parts) is not None else PathKind.REFUSED


@functools.lru_cache(maxsize=1 << 16)
def _git_parts(label: str) -> tuple[str, ...] | None:
    """GitMemoryLayout.parts of an attached label, memoized as model._label_parts is (a
    listing maps every label again)."""
    names = label.split("/")
    if names[0] == SKILLS_DIR and len(names) > 1:
        # Only skills/<name> is a block under skills/, and its file is skills/<name>/SKILL.md
        # (path_mapping.py; memory.py's compile_available_skills points the agent there).
        if len(names) != 2:
            return None
        parts = (SKILLS_DIR, names[1], SKILL_FILE)
    else:
        parts = tuple(names[:-1]) + (names[-1] + SUFFIX,)
    if not can_be_file(parts) or label_from_path("/".join(parts)) != label:
        return None
    return parts


class GitMemoryLayout(Layout):
    """An agent tagged `git-memory-enabled`: the label is the path, every block attached.

    `notes/todo` is `notes/todo.md`, `system/human` is `system/human.md`, `skills/pdf` is
    `skills/pdf/SKILL.md` (letta/services/memory_repo/path_mapping.py,
    `memory_block_label_from_markdown_path`, mirrored by `label_from_path`). A label no path
    maps to (`skills/pdf/extra`, the legacy `skills/pdf/SKILL`) or that model.py's
    `can_be_file` refuses (control characters, `.`/`..`/empty components, `.git`, over
    MAX_PATH) cannot be shown. A detached block is not one of the agent's files: Letta's
    post-push sync treats the repository as the attached set (git_http.py, `_sync_after_push`).
    """

    name = "git-memory"
    attached_dir = ()
    shows_detached = False
    keeps_files = True

    def location_at(self, parts: tuple[str, ...]) -> Location | None:
        if not parts:
            return None
        label = label_from_path("/".join(parts))
        if label is None or _git_parts(label) != tuple(parts):
            return None
        return Location(True, label)

    def parts(self, location: Location) -> tuple[str, ...] | None:
        if not location.attached or len(location.label) > MAX_PATH:  # kept out of the cache
            return None
        return _git_parts(location.label)

    def kind(self, parts: tuple[str, ...]) -> PathKind:
        # Scratch first: emacs's lock `.#x.md` is a label to Letta but a symlink to emacs.
        if not parts or is_scratch_name(parts[-1]):
            return PathKind.SCRATCH
        if not _keepable(parts):
            return PathKind.REFUSED
        if label_from_path("/".join(parts)) is None:
            return PathKind.KEPT
        return PathKind.BLOCK if self.location_at(parts) is not None else PathKind.REFUSED


def _keepable(parts: tuple[str, ...]) -> bool:
    """Whether a file may be at `parts` at all: no `.git` in any case (a nested repository in
    the mount, or in a pushed tree, would let its config run commands for whoever uses git
    there; git itself refuses such paths), no empty, `.` or `..` name, no control character,
    at most MAX_PATH bytes."""
    if any(name.casefold() == ".git" or name in ("", ".", "..")
           or any(ord(c) < 32 or ord(c) == 127 for c in name) for name in parts):
        return False
    return len("/".join(parts).encode("utf-8", "surrogateescape")) <= MAX_PATH


CLASSIC = ClassicLayout()
GIT_MEMORY = GitMemoryLayout()


LAYOUTS = {CLASSIC.name: CLASSIC, GIT_MEMORY.name: GIT_MEMORY}


def by_name(name: str | None) -> Layout | None:
    """The layout called `name` ("classic", "git-memory"), CLASSIC for None (a history made
    before layouts were recorded was classic), or None for a name this memfuse does not
    know."""
    return CLASSIC if name is None else LAYOUTS.get(name)


def layout_for_tags(tags: Iterable[str] | None) -> Layout:
    """The layout of an agent with tags `tags` (the agent object's `tags`, None for none):
    GIT_MEMORY when it has `git-memory-enabled` (the tag letta/orm/agent.py turns into
    `Memory.git_enabled`), CLASSIC otherwise."""
    return GIT_MEMORY if tags is not None and GIT_MEMORY_TAG in tags else CLASSIC
