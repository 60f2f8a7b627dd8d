"""The in-memory namespace of a mount: inodes, directories, block files, scratch files.

No I/O happens here. Attached blocks live under `system/`, detached blocks the agent owns at the
root; a `/` in a label makes directories. Names that are not block names (editor swap files,
backups, temp files, lock links) are scratch nodes that live only in the daemon.

Inode numbers are never reused within a mount. A node removed from its directory stays reachable
by inode while the kernel still holds lookups on it (FUSE `forget` releases them).
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
MEMORY_FILESYSTEM_LABEL = "memory_filesystem"  # kept by memfuse: read-only in the mount


class Kind(enum.Enum):
    """What a node is."""

    DIR = "dir"
    BLOCK = "block"      # a block file; `block` is None until a new file is first sent
    SCRATCH = "scratch"  # a regular file kept only by the daemon
    SYMLINK = "symlink"  # kept only by the daemon (emacs lock links); `content` is the target
    GITFILE = "gitfile"


def is_block_name(name: str) -> bool:
    """Whether a file called `name` is a block: `*.md`, except emacs's `#x.md#`/`.#x.md`."""
    return (name.endswith(blockfile.SUFFIX) and name != blockfile.SUFFIX
            and not name.startswith(("#", ".#")))


@dataclass(eq=False)
class Node:
    """One inode. `content`: the rendered file (BLOCK, GITFILE), the bytes (SCRATCH), the link
    target (SYMLINK). `children` maps names to inodes (DIR). `parent` is 0 once unlinked. Times
    are nanoseconds since the epoch; `checked_at` is the trio clock (seconds) of the server view
    the block shows (see `Tree.bind`); `lookups` is the kernel's lookup count."""

    inode: int
    kind: Kind
    parent: int
    name: str
    mtime_ns: int
    ctime_ns: int
    children: dict[str, int] = field(default_factory=dict)
    block: Block | None = None
    content: bytes | bytearray = b""
    checked_at: float = 0.0
    lookups: int = 0
    mode: int = 0o644

    @property
    def read_only(self) -> bool:
        """The .git file, a read-only block, or the memory_filesystem block memfuse keeps."""
        return self.kind is Kind.GITFILE or (self.block is not None and (
            self.block.read_only or self.block.label == MEMORY_FILESYSTEM_LABEL))

    def touch(self) -> None:
        """The content or the entries changed: mtime and ctime move to now."""
        self.mtime_ns = self.ctime_ns = time.time_ns()


class Tree:
    """The namespace: build it with `load`, change it with `add`, `move`, `unlink`, `bind`."""

    def __init__(self, gitfile: bytes | None = None):
        now = time.time_ns()
        self._nodes: dict[int, Node] = {}
        self._next_inode = ROOT_INODE + 1
        self._by_block: dict[str, int] = {}
        self.root = Node(ROOT_INODE, Kind.DIR, ROOT_INODE, "", now, now, mode=0o755)
        self._nodes[ROOT_INODE] = self.root
        self.system = self.add(Kind.DIR, self.root, SYSTEM_DIR)
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

    def load(self, attached: list[Block], detached: list[Block], checked_at: float) -> None:
        """Place every block: attached ones under `system/`, detached ones at the root.

        A block whose label cannot be a path, or whose path is already taken, is left out with a
        warning in the log (labels are unique only among one agent's attached blocks).
        """
        for block, top in [(b, (SYSTEM_DIR,)) for b in attached] + [(b, ()) for b in detached]:
            path = self.block_path(block.label, attached=bool(top))
            if path is None:
                log.warning("block %s: label %r cannot be shown as a file; left out", block.id,
                            block.label)
                continue
            parent = self.makedirs(path[:-1])
            if parent is None or path[-1] in parent.children:
                log.warning("block %s: %s is already taken; left out", block.id, "/".join(path))
                continue
            node = self.add(Kind.BLOCK, parent, path[-1])
            self.bind(node, block, checked_at)

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

    @staticmethod
    def block_path(label: str, attached: bool) -> tuple[str, ...] | None:
        """Where a block with `label` is shown, or None when it cannot be shown."""
        parts = blockfile.label_to_parts(label)
        if parts is None or not is_block_name(parts[-1]):
            return None
        if not attached and parts[0] == SYSTEM_DIR and len(parts) > 1:
            return None  # would land inside system/
        if not attached and parts == [GITFILE_NAME]:
            return None
        return ((SYSTEM_DIR,) if attached else ()) + tuple(parts)

    @staticmethod
    def location(parts: tuple[str, ...]) -> tuple[bool, str] | None:
        """(attached, label) for a block file at `parts`, or None when that path is no block."""
        if not parts or not is_block_name(parts[-1]):
            return None
        attached = parts[0] == SYSTEM_DIR and len(parts) > 1
        label = blockfile.parts_to_label(list(parts[1:] if attached else parts))
        if label is None or blockfile.label_to_parts(label) != list(parts[1:] if attached
                                                                    else parts):
            return None
        return attached, label

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
        """Path -> content of every block file: what the history's tree mirrors."""
        return {self.path(n): bytes(n.content) for n in self.blocks()}

    def inode_count(self) -> int:
        """How many inodes exist (for statfs)."""
        return len(self._nodes)

    # -- changing ------------------------------------------------------------------------------

    def bind(self, node: Node, block: Block, checked_at: float) -> bool:
        """Make `node` show the server's `block`; returns True when the content changed (and
        then moves mtime/ctime to now).

        checked_at: when the server read that returned `block` started, or when the write that
        returned it completed (trio clock). A read older than what the node already shows of
        the same block is ignored: reads and writes overlap, and the newest view must win.
        """
        if (node.block is not None and node.block.id == block.id
                and checked_at < node.checked_at):
            return False
        if node.block is not None and node.block.id != block.id:
            self._by_block.pop(node.block.id, None)
        node.kind, node.block, node.checked_at = Kind.BLOCK, block, checked_at
        if node.parent:  # an unlinked node shows no block in the mount
            self._by_block[block.id] = node.inode
        content = blockfile.render(block)
        if content == node.content:
            return False
        node.content = content
        node.touch()
        return True

    def unbind(self, node: Node) -> Block | None:
        """Turn a block file into a scratch file with the same bytes; returns the block it
        showed (None if it had none)."""
        block, node.block = node.block, None
        if block is not None:
            self._by_block.pop(block.id, None)
        node.kind = Kind.SCRATCH
        node.content = bytearray(node.content)
        return block

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
        node.ctime_ns = time.time_ns()

    def unlink(self, node: Node) -> None:
        """Take `node` out of its directory; it is dropped once the kernel forgets it."""
        if node.block is not None:
            self._by_block.pop(node.block.id, None)
        parent = self._nodes[node.parent]
        del parent.children[node.name]
        parent.touch()
        node.parent = 0
        if node.lookups <= 0:
            self._nodes.pop(node.inode, None)

    def looked_up(self, node: Node) -> None:
        """The kernel got an entry for `node` (lookup, create, mkdir, symlink, readdirplus)."""
        node.lookups += 1

    def forget(self, inode: int, count: int) -> None:
        """FUSE forget: drop `count` lookups; an unlinked node with none left is gone."""
        node = self._nodes.get(inode)
        if node is None or inode == ROOT_INODE:
            return
        node.lookups -= count
        if node.lookups <= 0 and not node.parent:
            del self._nodes[inode]
