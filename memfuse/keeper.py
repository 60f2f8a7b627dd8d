"""The `memory_filesystem` block: letta-code's view of the memory layout, kept equal to the
mount's tree by memfuse (read-only in the mount), in the classic layout only.

A git-memory agent's block is not kept (issue 19 point 4): 0.16.8 renders such an agent with
`_render_memory_blocks_git`, which never calls `_render_memory_filesystem` and draws the tree
itself (`<external_projection>` from the labels, a `<projection>` path per `system/` block);
a `memory_filesystem` label there is outside `system/`, so its value is in no part of the
prompt. Keeping it would cost a PATCH and a history commit (pulled by every letta-code clone)
per tree change, for a value nobody reads. An existing one is left as it is (read-only, as
letta-code's READ_ONLY_BLOCK_LABELS has it); none is ever made."""
from __future__ import annotations

import logging

import trio

from .errors import FsError
from .layout import CLASSIC
from .remote import Remote
from .state import MountState
from .tree import Kind, Node, Tree

log = logging.getLogger("memfuse.keeper")


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


class TreeBlockKeeper:
    """Keeps the `memory_filesystem` block's value equal to the mount's tree, checking every
    `interval` seconds (rendering is in memory and cheap)."""

    def __init__(self, state: MountState, remote: Remote, *, interval: float = 0.2):
        self.state, self.remote, self.interval = state, remote, interval

    async def refresh(self) -> None:
        """PATCH the block's value when it differs from the rendered tree; the new version is
        recorded to history as a local change. Failures are logged (the next refresh retries).
        Nothing in the git-memory layout (the module's docstring)."""
        if self.state.layout is not CLASSIC:
            return
        node = self.state.memory_filesystem_node()
        if node is None:
            return
        value = render_memory_filesystem(self.state.tree)
        if node.block.value == value:
            return
        try:
            block = await self.remote.set_value(node.block, value)
        except FsError as exc:
            log.warning("%s: could not update: %s", self.state.tree.path(node), exc.reason)
            return
        log.debug("%s: kept up to date (%d lines)", self.state.tree.path(node),
                  value.count("\n") + 1)
        self.state.written(node, block)

    async def run(self) -> None:
        """Refresh forever (cancel to stop)."""
        while True:
            await self.refresh()
            await trio.sleep(self.interval)
