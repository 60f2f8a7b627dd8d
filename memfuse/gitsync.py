"""The fetch side of `memfuse serve`: an agent's live blocks taken into its history.

Before `memfuse serve` answers a ref advertisement (`GET .../info/refs?service=git-upload-pack`),
it lists the agent's blocks with the request's key and commits the difference from the
history's head, so a `git pull` sees an API edit at once. The files are what a mount shows
(`blockfile.render`), at the paths of the agent's layout (`layout.layout_for_tags`): a classic
agent as the mount has it (`system/<label>.md` attached, `<label>.md` for the blocks it owns),
an agent tagged `git-memory-enabled` with its labels as paths (`system/human.md`), every block
attached. The commit is authored `Letta server`, subject `Server change`, as the mount commits
a change it finds on the server (history.SERVER_AUTHOR).

The caller holds the history's one-writer lock (writerlock.py). Nothing here knows HTTP or git's
protocol: gitserve.py does.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from dulwich.objects import Blob

from . import blockfile, blockmap
from .history import SERVER_AUTHOR, SUBJECTS, HistoryRepo
from .layout import GIT_MEMORY, Layout, PathKind
from .model import Block, Location, Origin
from .remote import Remote

log = logging.getLogger("memfuse.gitsync")

SUBJECT = SUBJECTS[Origin.SERVER]  # "Server change", as the mount's commits of server changes
RENDER_CACHE = 8192  # blocks whose rendering is remembered (about 80 MB at 5 KB values)


@functools.lru_cache(maxsize=RENDER_CACHE)
def _rendered(block: Block) -> bytes:
    """blockfile.render, remembered by the block (id, label, value, fields and tags): every
    request renders every block of its agent, and most are as they were (profiled at 1,000
    blocks: YAML's dump was 14 % of serve's busy time). Thread-safe (lru_cache)."""
    return blockfile.render(block)


@functools.lru_cache(maxsize=RENDER_CACHE)
def _rendered_id(block: Block) -> bytes:
    """The git object id of `_rendered(block)`: a take compares a block's file with the
    committed one by id, reading no blob (at 1,000 blocks, reading each committed blob was
    a third of a take)."""
    return Blob.from_string(_rendered(block)).id


@dataclass
class Live:
    """The agent's blocks as files: `files` (path -> `blockfile.render` bytes), `shown` the
    (path, block, attached) of each for the block map, and `left_out` one line per block no
    file can show (a label its layout cannot map, or a path another block or a directory has
    taken)."""

    files: dict[str, bytes] = field(default_factory=dict)
    ids: dict[str, bytes] = field(default_factory=dict)  # path -> the git object id of its file
    shown: list[tuple[str, Block, bool]] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    _dirs: set[str] = field(default_factory=set)

    def add(self, block: Block, attached: bool, layout: Layout) -> None:
        """Show `block` at its path in `layout`, unless that path cannot hold it: a block
        listed earlier keeps a path (the listing's order, attached first, as the mount's
        first load), and a file and a directory never share one."""
        parts = layout.parts(Location(attached, block.label))
        if parts is None:
            self.left_out.append(f"{block.id}: label {block.label!r} cannot be a file")
            return
        path = "/".join(parts)
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if path in self.files or path in self._dirs or any(p in self.files for p in prefixes):
            self.left_out.append(f"{block.id}: {path} is taken")
            return
        self.files[path] = _rendered(block)
        self.ids[path] = _rendered_id(block)
        self.shown.append((path, block, attached))
        self._dirs.update(prefixes)


    def over(self, committed: dict[str, bytes]) -> dict[str, bytes]:
        """`files`, except that a file whose committed bytes say exactly what its block is
        (`blockfile.shows`: a file pushed with its own frontmatter, say) keeps those bytes:
        the server's answer is no change, and no commit normalises what was pushed."""
        kept = {path: committed[path] for path, block, _attached in self.shown
                if path in committed and committed[path] != self.files[path]
                and blockfile.shows(committed[path], block)}  # parsed only where they differ
        return {**self.files, **kept}


async def live(remote: Remote, layout: Layout) -> Live:
    """The agent's blocks now, as the files of `layout`. Classic: the attached listing and the
    blocks tagged `owner:<agent>` (`Remote.listing`: `GET /v1/agents/{id}/core-memory/blocks`,
    `GET /v1/blocks/?tags=owner:<id>`); git memory: the attached listing alone (every file of
    that layout is an attached block: Letta's post-push sync reads the repository as the
    attached set). Raises ServerCallError."""
    if layout is GIT_MEMORY:
        attached, owned = await remote.attached(), []
    else:
        attached, owned = await remote.listing()
    found = Live()
    attached_ids = {block.id for block in attached}
    for block in attached:
        found.add(block, True, layout)
    for block in owned:
        if block.id not in attached_ids:
            found.add(block, False, layout)
    return found


def changes(committed: dict[str, bytes], files: dict[str, bytes],
            layout: Layout) -> dict[str, bytes | None]:
    """What makes the history's head (`committed`, path -> bytes) show `files`: each file of
    `files` whose bytes differ from the committed ones, and None for each committed path that
    is no live file, except the files `layout` keeps (PathKind.KEPT: a skill's scripts,
    images; the repository holds them, the server never reads them)."""
    result: dict[str, bytes | None] = {path: data for path, data in files.items()
                                       if committed.get(path) != data}
    return {**result, **removed(committed.keys() - files.keys(), layout)}


def removed(paths: Iterable[str], layout: Layout) -> dict[str, None]:
    """The committed `paths` no live file shows, as removals (path -> None), except the files
    `layout` keeps (PathKind.KEPT)."""
    return {path: None for path in paths
            if layout.kind(tuple(path.split("/"))) is not PathKind.KEPT}


def take(repo: HistoryRepo, found: Live, layout: Layout, block_map_file: Path) -> bytes | None:
    """Commit `found` on the history's head as the server's change (author `Letta server`,
    subject `Server change: <paths>`) and save the block map (`block_map_file`, blockmap.py)
    that describes it, so a mount started later, even while the server is away, continues
    from it. Returns the new commit's id, or None when the history already showed it all.
    Blocking (dulwich): call it from a worker thread. Raises OSError."""
    entries = repo.entries()  # compared by object id: a blob is read only where they differ
    committed = {path: repo.blob(entries[path][1]) for path, sha in found.ids.items()
                 if path in entries and entries[path][1] != sha}
    files = {path: data for path, data in found.over(committed).items()
             if entries.get(path, (0, b""))[1] != found.ids[path]}
    sha = repo.commit({**changes(committed, files, layout),
                       **removed(entries.keys() - found.files.keys(), layout)},
                      SERVER_AUTHOR, SUBJECT)
    remember(found.shown, block_map_file, layout)
    return sha


def remember(shown: Iterable[tuple[str, Block, bool]], block_map_file: Path, layout: Layout
             ) -> None:
    """Save the block map (`block_map_file`, blockmap.py) of the files `shown` ((path, block,
    attached) each) in `layout`, which the map records (a mount started while the server is
    away uses it), unless it holds that already. Raises OSError."""
    records = blockmap.records(shown)
    try:
        if blockmap.read(block_map_file) == (layout.name, records):
            return
    except blockmap.BlockMapError as exc:
        log.warning("%s; it is written anew", exc)
    blockmap.save(block_map_file, records, layout.name)
