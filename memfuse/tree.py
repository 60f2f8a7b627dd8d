"""The in-memory namespace of a mount: inodes, directories, block files, scratch files.

No I/O happens here. Attached blocks live under `system/`, detached blocks the agent owns at the
root; a `/` in a label makes directories. Names that are not block names (editor swap files,
backups, temp files, lock links) are scratch nodes that live only in the daemon; in the
git-memory layout the other files that are no block are kept nodes, in history like block
files (state.MountState decides which, by the layout).

Inode numbers are never reused within a mount. A node removed from its directory stays reachable
by inode while the kernel still holds lookups on it (FUSE `forget` releases them).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable

from . import blockfile
from .model import GITFILE_NAME, MEMORY_FILESYSTEM_LABEL, SYSTEM_DIR, Block

ROOT_INODE = 1  # the FUSE root inode (pyfuse3.ROOT_INODE)


class Kind(enum.Enum):
    """What a node is."""

    DIR = "dir"
    BLOCK = "block"      # a block file; `block` is None until a new file is first sent
    SCRATCH = "scratch"  # a regular file kept only by the daemon (bytes in scratch.ScratchStore)
    KEPT = "kept"  # a file that is no block but is kept in history (git-memory layout: a
    # skill's extract.py, an image); `content` holds its bytes, it has no `block`
    SYMLINK = "symlink"  # kept only by the daemon (emacs lock links); `content` is the target
    GITFILE = "gitfile"


@dataclass(eq=False)
class Node:
    """One inode. `content`: the rendered file (BLOCK, GITFILE), the file's bytes (KEPT), the
    link target (SYMLINK);
    empty for SCRATCH (its bytes are in the scratch store) and DIR. `children` maps names to
    inodes (DIR). `parent` is 0 once unlinked. Times (`atime_ns`, `mtime_ns`, `ctime_ns`) are
    nanoseconds since the epoch, as POSIX keeps them: the content (or a directory's entries)
    moves mtime and ctime, every change of metadata moves ctime, atime moves only by utimens
    (the mount is noatime); `mtime_given`: the mtime was given by utimens and no write came
    since, so the close that sends earlier writes keeps it (`tar -x`, `cp -a`). `mode`: the
    permission bits (0o7777) a chmod gave, kept in the daemon. `checked_at` is the trio clock
    (seconds) of the server view the block shows (see `Tree.bind`); `lookups` is the kernel's
    lookup count; `version` counts the changes of what a block file shows (content or mode),
    so a cached copy can be told apart from the current one."""

    inode: int
    kind: Kind
    parent: int
    name: str
    mtime_ns: int
    ctime_ns: int
    children: dict[str, int] = field(default_factory=dict)
    block: Block | None = None
    content: bytes = b""
    checked_at: float = 0.0
    lookups: int = 0
    mode: int = 0o644
    version: int = 0
    atime_ns: int = 0  # 0 when made: the mtime
    mtime_given: bool = False

    def __post_init__(self) -> None:
        if not self.atime_ns:
            self.atime_ns = self.mtime_ns

    @property
    def read_only(self) -> bool:
        """The .git file, a read-only block, or the memory_filesystem block memfuse keeps."""
        return self.kind is Kind.GITFILE or (self.block is not None and (
            self.block.read_only or self.block.label == MEMORY_FILESYSTEM_LABEL))

    def touch(self) -> None:
        """The content or the entries changed: mtime and ctime move to now, and an mtime given
        by utimens no longer holds."""
        self.mtime_ns = self.ctime_ns = time.time_ns()
        self.mtime_given = False

    def changed(self) -> None:
        """Metadata changed (mode, owner, times, name, links): ctime moves to now."""
        self.ctime_ns = time.time_ns()


class Tree:
    """The namespace data: nodes by inode, and blocks by id. Only state.MountState changes it;
    every other module only reads it. `on_change(node)` is called whenever what a block file
    shows changes (its content or mode, or it stops being a block file), after the change."""

    def __init__(self, gitfile: bytes | None = None, gitlink: bool = False):
        now = time.time_ns()
        self.on_change: Callable[[Node], None] = lambda node: None
        self._nodes: dict[int, Node] = {}
        self._next_inode = ROOT_INODE + 1
        self._by_block: dict[str, int] = {}
        # block id -> the file bytes a served git push gave it (mountgit.py): its next `bind`
        # shows them instead of the rendering when they say exactly what the block is
        self.pushed: dict[str, bytes] = {}
        self.root = Node(ROOT_INODE, Kind.DIR, ROOT_INODE, "", now, now, mode=0o755)
        self._nodes[ROOT_INODE] = self.root
        self.system = self.add(Kind.DIR, self.root, SYSTEM_DIR)
        # `.git` at the root: a gitfile (`gitdir: <history>`), or with `gitlink` a symbolic
        # link to the history (`gitfile` is then its target): letta-code writes its hooks
        # through `<memory>/.git/hooks/`, which must be a directory
        self.gitlink = gitlink
        if gitfile is not None:
            self.add(Kind.GITFILE, self.root, GITFILE_NAME, content=gitfile)

    # -- building ------------------------------------------------------------------------------

    def add(self, kind: Kind, parent: Node, name: str, **fields) -> Node:
        """A new node `name` in directory `parent` (which must not have that name yet)."""
        assert name not in parent.children, name
        inode, self._next_inode = self._next_inode, self._next_inode + 1
        now = time.time_ns()
        fields.setdefault("mode", 0o755 if kind is Kind.DIR else 0o644)
        node = Node(inode, kind, parent.inode, name, now, now, **fields)
        self._nodes[inode] = node
        parent.children[name] = inode
        parent.touch()
        return node

    def makedirs(self, parts: tuple[str, ...]) -> Node | None:
        """The directory at `parts` from the root, created with its parents; None if a
        non-directory is in the way."""
        node = self.root
        for name in parts:
            child = self.child(node, name)
            if child is None:
                child = self.add(Kind.DIR, node, name)
            elif child.kind is not Kind.DIR:
                return None
            node = child
        return node

    # -- queries -------------------------------------------------------------------------------

    def node(self, inode: int) -> Node:
        """The node for `inode`. Raises KeyError when there is none."""
        return self._nodes[inode]

    def child(self, parent: Node, name: str) -> Node | None:
        """The entry `name` in directory `parent`, or None."""
        inode = parent.children.get(name)
        return None if inode is None else self._nodes[inode]

    def parts(self, node: Node) -> tuple[str, ...] | None:
        """Path components from the root, or None for an unlinked node."""
        names = []
        while node.inode != ROOT_INODE:
            if not node.parent:
                return None
            names.append(node.name)
            node = self._nodes[node.parent]
        return tuple(reversed(names))

    def path(self, node: Node) -> str:
        """The path relative to the mount root (`system/human.md`; root: ""; unlinked: the name
        in angle brackets)."""
        parts = self.parts(node)
        return f"<unlinked {node.name}>" if parts is None else "/".join(parts)

    def block_node(self, block_id: str) -> Node | None:
        """The linked node showing block `block_id`, or None."""
        inode = self._by_block.get(block_id)
        return None if inode is None else self._nodes.get(inode)

    def walk(self, node: Node):
        """`node` and every node below it, parents first."""
        yield node
        for inode in list(node.children.values()):
            yield from self.walk(self._nodes[inode])

    def blocks(self) -> list[Node]:
        """Every linked block file node that has a block on the server."""
        return [self._nodes[i] for i in self._by_block.values()]

    def files(self) -> dict[str, bytes]:
        """Path -> content of every block file and kept file: what the history's tree
        mirrors."""
        found = {self.path(n): bytes(n.content) for n in self.blocks()}
        found.update((self.path(n), bytes(n.content)) for n in self.kept())
        return found

    def kept(self) -> list[Node]:
        """Every linked kept file (Kind.KEPT), by a walk of the whole tree."""
        return [n for n in self.walk(self.root) if n.kind is Kind.KEPT]

    def inode_count(self) -> int:
        """How many inodes exist (for statfs)."""
        return len(self._nodes)

    # -- changing ------------------------------------------------------------------------------

    def bind(self, node: Node, block: Block, checked_at: float) -> bool:
        """Make `node` show the server's `block`; returns True when the content changed (and
        then moves mtime/ctime to now). The content is `blockfile.render(block)`, or the bytes
        a git push gave the block (`pushed`) when they say exactly what it is.

        checked_at: when the server read that returned `block` started, or when the write that
        returned it completed (trio clock). A read older than what the node already shows of
        the same block is ignored: reads and writes overlap, and the newest view must win.
        """
        if (node.block is not None and node.block.id == block.id
                and checked_at < node.checked_at):
            return False
        pushed = self.pushed.pop(block.id, None)
        if pushed is not None and not blockfile.shows(pushed, block):
            pushed = None  # the block is not what was pushed (changed since): rendered
        if (node.block == block and node.kind is Kind.BLOCK
                and pushed in (None, node.content)):  # unchanged: nothing to render
            node.checked_at = checked_at
            return False
        if node.block is not None and node.block.id != block.id:
            self._by_block.pop(node.block.id, None)
        was_read_only = node.read_only
        node.kind, node.block, node.checked_at = Kind.BLOCK, block, checked_at
        if node.parent:  # an unlinked node shows no block in the mount
            self._by_block[block.id] = node.inode
        content = pushed if pushed is not None else blockfile.render(block)
        if content == node.content:
            if node.read_only != was_read_only:  # the mode changed: attributes must follow
                node.version += 1
                node.changed()
                self.on_change(node)
            return False
        node.content = content
        node.version += 1
        node.touch()
        self.on_change(node)
        return True

    def unbind(self, node: Node) -> tuple[Block | None, bytes]:
        """Turn a block file into a scratch node; returns the block it showed (None if it had
        none) and the bytes it had, which the caller keeps as the scratch file's content."""
        block, node.block = node.block, None
        if block is not None:
            self._by_block.pop(block.id, None)
        content, node.kind, node.content = bytes(node.content), Kind.SCRATCH, b""
        node.version += 1
        self.on_change(node)
        return block, content

    def move(self, node: Node, parent: Node, name: str) -> None:
        """Put `node` at `name` in `parent` (the name must be free)."""
        assert name not in parent.children, name
        if node.parent:
            old = self._nodes[node.parent]
            del old.children[node.name]
            old.touch()
        node.parent, node.name = parent.inode, name
        parent.children[name] = node.inode
        parent.touch()
        node.changed()

    def unlink(self, node: Node) -> bool:
        """Take `node` out of its directory; it is dropped once the kernel forgets it. Returns
        whether it was dropped now (no lookups held)."""
        if node.block is not None:
            self._by_block.pop(node.block.id, None)
        parent = self._nodes[node.parent]
        del parent.children[node.name]
        parent.touch()
        node.parent = 0
        node.changed()  # its link count went to 0
        if node.lookups <= 0:
            self._nodes.pop(node.inode, None)
            return True
        return False

    def looked_up(self, node: Node) -> None:
        """The kernel got an entry for `node` (lookup, create, mkdir, symlink, readdirplus)."""
        node.lookups += 1

    def forget(self, inode: int, count: int) -> bool:
        """FUSE forget: drop `count` lookups. Returns whether an unlinked node is now gone."""
        node = self._nodes.get(inode)
        if node is None or inode == ROOT_INODE:
            return False
        node.lookups -= count
        if node.lookups <= 0 and not node.parent:
            del self._nodes[inode]
            return True
        return False

    def problems(self) -> list[str]:
        """Broken invariants, in words (an empty list when the tree is sound): every linked
        node is its parent's child under its name; the block index holds exactly the linked
        block files that have a block; no block is shown twice. For tests and `fsck`-style
        checks; O(nodes)."""
        found = []
        shown: dict[str, int] = {}
        for node in self.walk(self.root):
            for name, inode in node.children.items():
                child = self._nodes.get(inode)
                if child is None:
                    found.append(f"{self.path(node)}/{name}: inode {inode} does not exist")
                elif (child.parent, child.name) != (node.inode, name):
                    found.append(f"{self.path(node)}/{name}: child says it is "
                                 f"{child.name!r} in {child.parent}")
            if node.kind is Kind.BLOCK and node.block is not None:
                if node.block.id in shown:
                    found.append(f"block {node.block.id} is shown twice")
                shown[node.block.id] = node.inode
            elif node.block is not None:
                found.append(f"{self.path(node)}: a {node.kind.value} node holds a block")
        if shown != self._by_block:
            found.append(f"block index {self._by_block} != linked block files {shown}")
        return found
