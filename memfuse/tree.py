"""The in-memory namespace of a mount: inodes, directories, block files and their cached content.

No I/O happens here. Attached blocks live under `system/`, detached blocks the agent owns at the
root; a `/` in a label makes directories. Inode numbers are stable for the life of the mount: a
block keeps its inode (keyed by block id) and a directory keeps its inode (keyed by its path).
"""
from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field

from . import blockfile
from .letta import Block

log = logging.getLogger("memfuse.tree")

ROOT_INODE = 1  # the FUSE root inode (pyfuse3.ROOT_INODE)
SYSTEM_DIR = "system"
GITFILE_NAME = ".git"


class Kind(enum.Enum):
    DIR = "dir"
    BLOCK = "block"
    GITFILE = "gitfile"


@dataclass(eq=False)
class Node:
    """One inode. `content` is the rendered file (BLOCK, GITFILE); `children` maps names to inodes
    (DIR). Times are nanoseconds since the epoch; `checked_at` is the trio clock (seconds) of the
    last time the block was read from the server."""

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

    @property
    def read_only(self) -> bool:
        return self.kind is Kind.GITFILE or (self.block is not None and self.block.read_only)


class Tree:
    """The namespace. Build it with `load`; look nodes up with `node`, `child`, `path`."""

    def __init__(self, gitfile: bytes | None = None):
        now = time.time_ns()
        self._nodes: dict[int, Node] = {}
        self._next_inode = ROOT_INODE + 1
        self._block_inodes: dict[str, int] = {}
        self._dir_inodes: dict[tuple[str, ...], int] = {}
        self.root = Node(ROOT_INODE, Kind.DIR, ROOT_INODE, "", now, now)
        self._nodes[ROOT_INODE] = self.root
        self._dir_inodes[()] = ROOT_INODE
        self._mkdirs((SYSTEM_DIR,), now)
        if gitfile is not None:
            git = self._new_node(Kind.GITFILE, self.root, GITFILE_NAME, now)
            git.content = gitfile

    def _new_node(self, kind: Kind, parent: Node, name: str, now: int, inode: int | None = None
                  ) -> Node:
        if inode is None:
            inode, self._next_inode = self._next_inode, self._next_inode + 1
        node = Node(inode, kind, parent.inode, name, now, now)
        self._nodes[inode] = node
        parent.children[name] = inode
        parent.mtime_ns = parent.ctime_ns = now
        return node

    def _mkdirs(self, parts: tuple[str, ...], now: int) -> Node | None:
        """The directory at `parts`, created with its parents; None if a file is in the way."""
        node = self.root
        for depth in range(1, len(parts) + 1):
            name = parts[depth - 1]
            inode = node.children.get(name)
            if inode is None:
                node = self._new_node(Kind.DIR, node, name, now, self._dir_inodes.get(parts[:depth]))
                self._dir_inodes[parts[:depth]] = node.inode
            else:
                node = self._nodes[inode]
                if node.kind is not Kind.DIR:
                    return None
        return node

    def load(self, attached: list[Block], detached: list[Block], checked_at: float) -> None:
        """Place every block: attached ones under `system/`, detached ones at the root.

        A block whose label cannot be a path, or whose path is already taken, is left out with a
        warning in the log (labels are unique only among one agent's attached blocks).
        """
        now = time.time_ns()
        for block, top in [(b, (SYSTEM_DIR,)) for b in attached] + [(b, ()) for b in detached]:
            parts = blockfile.label_to_parts(block.label)
            if parts is None:
                log.warning("block %s: label %r cannot be a file name; not shown", block.id,
                            block.label)
                continue
            path = top + tuple(parts)
            if not top and parts[0] == SYSTEM_DIR and len(parts) > 1:
                log.warning("block %s: detached label %r would land inside system/; not shown",
                            block.id, block.label)
                continue
            parent = self._mkdirs(path[:-1], now)
            if parent is None or path[-1] in parent.children:
                log.warning("block %s: path %s is already taken; not shown", block.id,
                            "/".join(path))
                continue
            node = self._new_node(Kind.BLOCK, parent, path[-1], now,
                                  self._block_inodes.get(block.id))
            self._block_inodes[block.id] = node.inode
            node.block, node.content, node.checked_at = block, blockfile.render(block), checked_at

    def node(self, inode: int) -> Node:
        """The node for `inode`. Raises KeyError when there is none."""
        return self._nodes[inode]

    def child(self, parent: Node, name: str) -> Node | None:
        """The entry `name` in directory `parent`, or None."""
        inode = parent.children.get(name)
        return None if inode is None else self._nodes[inode]

    def path(self, node: Node) -> str:
        """The node's path relative to the mount root, e.g. `system/human.md` (root: "")."""
        names = []
        while node.inode != ROOT_INODE:
            names.append(node.name)
            node = self._nodes[node.parent]
        return "/".join(reversed(names))

    def blocks(self) -> list[Node]:
        """Every block file node."""
        return [n for n in self._nodes.values() if n.kind is Kind.BLOCK]

    def files(self) -> dict[str, bytes]:
        """Path -> content of every block file: what the history's tree mirrors."""
        return {self.path(n): n.content for n in self.blocks()}

    def set_block(self, node: Node, block: Block, checked_at: float) -> bool:
        """Store the server's `block` in `node`; returns True when the file content changed
        (and then moves mtime/ctime to now)."""
        content = blockfile.render(block)
        node.block, node.checked_at = block, checked_at
        if content == node.content:
            return False
        node.content = content
        node.mtime_ns = node.ctime_ns = time.time_ns()
        return True

    def inode_count(self) -> int:
        """How many inodes exist (for statfs)."""
        return len(self._nodes)
