"""Server -> mount: the poller, kernel cache invalidation, and the memory_filesystem block.

Every poll interval the poller lists the agent's attached and owned blocks (two paginated GETs)
and applies the difference to the tree: changed values and metadata, blocks created, deleted,
attached, detached or relabelled on the server. The kernel is told (`invalidate_inode`,
`invalidate_entry_async`), so `cat` and `ls` see the change within about one interval, and each
change is recorded to history under the server's author.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Protocol

import pyfuse3
import trio

from .history import Origin
from .letta import Block, LettaError
from .memory import AgentMemory
from .namespace import Namespace
from .tree import MEMORY_FILESYSTEM_LABEL, Kind, Node, Tree

log = logging.getLogger("memfuse.sync")



class Invalidator(Protocol):
    """Tells the kernel to drop what it cached (FUSE notify calls)."""

    def entry(self, parent_inode: int, name: str) -> None:
        """Forget the directory entry `name` (it moved, appeared or went away)."""

    async def inode(self, inode: int) -> None:
        """Forget the attributes and cached pages of `inode` (its content changed)."""


class KernelInvalidator:
    """The real one: pyfuse3's notify calls. `invalidate_inode` may wait for the kernel, which
    may wait for this daemon, so it runs in a worker thread; entries go through pyfuse3's own
    asynchronous queue."""

    def entry(self, parent_inode: int, name: str) -> None:
        """`pyfuse3.invalidate_entry_async`; a name the kernel never saw is fine."""
        pyfuse3.invalidate_entry_async(parent_inode, os.fsencode(name), ignore_enoent=True)

    async def inode(self, inode: int) -> None:
        """`pyfuse3.invalidate_inode` in a worker thread; an inode the kernel forgot is fine."""
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode)
        except OSError:  # the kernel never looked it up, or forgot it: nothing cached
            pass


class Poller:
    """Keeps the tree in step with the server. `last_poll` is the time.time() of the last
    listing that answered; `last_error` the last failure (None once a poll succeeds)."""

    def __init__(self, memory: AgentMemory, namespace: Namespace, invalidator: Invalidator, *,
                 interval: float = 1.0):
        self.memory, self.namespace, self.tree = memory, namespace, memory.tree
        self.invalidator = invalidator
        self.interval = interval
        self.last_poll: float | None = None
        self.last_error: str | None = None
        self.reachable = True
        self._warned: set[str] = set()

    async def run(self) -> None:
        """Poll forever (cancel to stop)."""
        while True:
            await self.poll_once()
            await trio.sleep(self.interval)

    async def poll_once(self) -> bool:
        """One listing and, unless a local change raced it, its application. Returns whether it
        was applied."""
        generation = self.memory.generation
        started = trio.current_time()
        try:
            attached = await self.memory.client.list_attached_blocks(self.memory.agent_id)
            owned = await self.memory.client.list_owned_blocks(self.memory.agent_id)
        except LettaError as exc:
            if self.reachable:
                log.warning("poll failed: %s; serving the last known state", exc)
            self.reachable, self.last_error = False, f"poll failed: {exc}"
            return False
        if not self.reachable:
            log.info("server reachable again")
        self.reachable, self.last_poll, self.last_error = True, time.time(), None
        if self.memory.in_flight or self.memory.generation != generation:
            return False  # a local change raced the listing: it may not show it yet
        await self.apply(attached, owned, started)
        return True

    def _desired(self, attached: list[Block], owned: list[Block], hidden: set[str]
                 ) -> dict[str, tuple[tuple[str, ...], Block]]:
        attached_ids = {b.id for b in attached}
        desired = {}
        for block, is_attached in [(b, True) for b in attached] + [
                (b, False) for b in owned if b.id not in attached_ids]:
            if block.id in hidden or block.id in desired:
                continue
            parts = Tree.block_path(block.label, is_attached)
            if parts is None:
                self._warn_once(block.id, f"block {block.id}: label {block.label!r} cannot be "
                                          f"shown as a file; left out")
                continue
            desired[block.id] = (parts, block)
        return desired

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    async def apply(self, attached: list[Block], owned: list[Block], listed_at: float) -> None:
        """Make the tree show `attached` (under system/) and `owned` minus attached (at the
        root), invalidating the kernel's caches and recording each change. listed_at: when the
        listing started (trio clock)."""
        hidden = self.namespace.pending_block_ids()  # unlinked here, not retired yet
        desired = self._desired(attached, owned, hidden)
        now = listed_at
        changed_inodes: list[int] = []
        for node in self.tree.blocks():
            if node.block.id not in desired and node.block.id not in hidden:
                path = self.tree.path(node)
                parent = node.parent
                self.tree.unbind(node)  # a descriptor still open on it now writes to scratch
                self.tree.unlink(node)
                self.invalidator.entry(parent, node.name)
                self.memory.record(path, None, Origin.SERVER)
                log.info("%s: gone on the server (deleted or detached)", path)
        for block_id, (parts, block) in desired.items():
            node = self.tree.block_node(block_id)
            if node is None:
                node = self._place(parts, block_id)
                if node is None:
                    continue
                self.tree.bind(node, block, now)
                self.memory.record(self.tree.path(node), bytes(node.content), Origin.SERVER)
                log.info("%s: new on the server", self.tree.path(node))
                continue
            if self.tree.parts(node) != parts:
                old_path, old_parent, old_name = self.tree.path(node), node.parent, node.name
                parent = self._free_parent(parts, block_id)
                if parent is None:
                    continue
                self.tree.move(node, parent, parts[-1])
                self.invalidator.entry(old_parent, old_name)
                self.invalidator.entry(parent.inode, parts[-1])
                self.memory.record(old_path, None, Origin.SERVER)
                self.memory.record(self.tree.path(node), bytes(node.content), Origin.SERVER)
                log.info("%s: moved on the server to %s", old_path, self.tree.path(node))
            if self.tree.bind(node, block, now):
                changed_inodes.append(node.inode)
                self.memory.record(self.tree.path(node), bytes(node.content), Origin.SERVER)
        for inode in changed_inodes:
            await self.invalidator.inode(inode)

    def _free_parent(self, parts: tuple[str, ...], block_id: str) -> Node | None:
        parent = self.tree.makedirs(parts[:-1])
        if parent is None or parts[-1] in parent.children:
            self._warn_once(block_id, f"block {block_id}: {'/'.join(parts)} is taken in the "
                                      f"mount; not shown there until it is free")
            return None
        return parent

    def _place(self, parts: tuple[str, ...], block_id: str) -> Node | None:
        parent = self._free_parent(parts, block_id)
        if parent is None:
            return None
        node = self.tree.add(Kind.BLOCK, parent, parts[-1])
        self.invalidator.entry(parent.inode, parts[-1])
        return node


def render_memory_filesystem(tree: Tree) -> str:
    """The mount's tree in letta-code's `memory_filesystem` format: `/memory/`, then one
    `├── `/`└── ` line per entry, directories first, then files, by name; `system/` always.
    Scratch files and `.git` are not part of the memory and are left out."""
    lines = ["/memory/"]

    def shown(node: Node) -> list[Node]:
        entries = [tree.node(i) for i in node.children.values()]
        entries = [n for n in entries if n.kind in (Kind.DIR, Kind.BLOCK)]
        return sorted(entries, key=lambda n: (n.kind is not Kind.DIR, n.name.casefold(), n.name))

    def walk(node: Node, prefix: str) -> None:
        entries = shown(node)
        for index, child in enumerate(entries):
            last = index == len(entries) - 1
            is_dir = child.kind is Kind.DIR
            lines.append(f"{prefix}{'└── ' if last else '├── '}{child.name}{'/' if is_dir else ''}")
            if is_dir:
                walk(child, prefix + ("    " if last else "│   "))

    walk(tree.root, "")
    return "\n".join(lines)


def memory_filesystem_node(tree: Tree) -> Node | None:
    """The attached `memory_filesystem` block's file, when the agent has one."""
    node = tree.child(tree.system, f"{MEMORY_FILESYSTEM_LABEL}.md")
    return node if node is not None and node.block is not None else None


class TreeBlockKeeper:
    """Keeps the `memory_filesystem` block's value equal to the mount's tree (letta-code's
    format), checking every `interval` seconds (rendering is in memory and cheap)."""

    def __init__(self, memory: AgentMemory, *, interval: float = 0.2):
        self.memory, self.tree, self.interval = memory, memory.tree, interval

    async def refresh(self) -> None:
        """PATCH the block's value when it differs from the rendered tree."""
        node = memory_filesystem_node(self.tree)
        if node is None:
            return
        value = render_memory_filesystem(self.tree)
        if node.block.value != value:
            await self.memory.set_value(node, value)

    async def run(self) -> None:
        """Refresh forever (cancel to stop)."""
        while True:
            await self.refresh()
            await trio.sleep(self.interval)
