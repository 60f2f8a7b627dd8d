"""The mount daemon: one trio nursery running pyfuse3's loop, the poller, the snapshotter, the
retirer of unlinked blocks, the memory_filesystem keeper and the status publisher.

Start-up checks everything a person can get wrong before the mount appears (mountpoint busy,
server unreachable, unknown agent) and reports it through `on_ready` as one sentence. Shutdown
(SIGINT, SIGTERM, or an external `fusermount3 -u`) sends any unsent writes, unmounts, and takes
a last snapshot.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyfuse3
import trio

from .config import Config, RunningMount
from .fs import MemoryFs
from .history import HistoryRepo, Origin, Snapshotter, gitfile_content
from .letta import Invalid, LettaClient, LettaError, NotFound, Unauthorized, Unreachable
from .errors import FsError
from .memory import AgentMemory
from .namespace import Namespace
from .status import LastProblem, Status
from .sync import KernelInvalidator, Poller, TreeBlockKeeper
from .tree import Tree

log = logging.getLogger("memfuse.daemon")

STATUS_INTERVAL = 1.0  # seconds between status file updates


class MountError(Exception):
    """The mount cannot start; the message is for a person."""


def check_mountpoint(path: Path) -> None:
    """Create `path` if missing; raise MountError when it is mounted, stale or not empty."""
    try:
        if os.path.ismount(path):
            raise MountError(f"{path} is already a mount point (try: memfuse umount {path})")
        path.mkdir(parents=True, exist_ok=True)
        if any(path.iterdir()):
            raise MountError(f"{path} is not empty; memfuse mounts only on an empty directory")
    except OSError as exc:
        raise MountError(f"{path} cannot be used as a mountpoint ({exc.strerror}; a stale mount "
                         f"is cleared by: memfuse umount {path})") from None


async def _connect(client: LettaClient, config: Config) -> None:
    try:
        await client.health()
        await client.get_agent(config.agent_id)
    except Unreachable as exc:
        raise MountError(f"cannot reach the Letta server at {config.base_url} ({exc.detail})"
                         ) from None
    except (NotFound, Invalid):
        raise MountError(f"agent {config.agent_id} not found on {config.base_url}") from None
    except Unauthorized:
        raise MountError(f"the Letta server at {config.base_url} refused the API key "
                         f"(check LETTA_API_KEY)") from None
    except LettaError as exc:
        raise MountError(f"the Letta server at {config.base_url} answered: {exc}") from None


async def _snapshot_at_mount(repo: HistoryRepo, snapshots: Snapshotter, tree: Tree) -> None:
    committed = await trio.to_thread.run_sync(repo.files)
    current = tree.files()
    changes: dict[str, bytes | None] = {p: c for p, c in current.items() if committed.get(p) != c}
    changes.update({p: None for p in committed if p not in current})
    await snapshots.commit_now(changes, Origin.SERVER, "Snapshot at mount")


@dataclass
class Parts:
    """Everything one mount runs."""

    repo: HistoryRepo
    snapshots: Snapshotter
    memory: AgentMemory
    ops: MemoryFs
    poller: Poller
    keeper: TreeBlockKeeper
    problems: LastProblem


async def serve(config: Config, on_ready: Callable[[str | None], None]) -> None:
    """Mount `config.agent_id` at `config.mountpoint` and serve until unmounted or signalled.

    on_ready(None) is called once the mount is usable; on_ready(message) when it cannot start
    (then MountError is raised too).
    """
    problems = LastProblem()
    logging.getLogger("memfuse").addHandler(problems)
    try:
        running = RunningMount.load(config.pid_file)
        if running is not None and running.alive():
            raise MountError(f"agent {config.agent_id} is already mounted at "
                             f"{running.mountpoint} (pid {running.pid})")
        check_mountpoint(config.mountpoint)
        async with LettaClient(config.base_url, config.api_key,
                               retry_budget=config.retry_budget) as client:
            await _connect(client, config)
            repo = HistoryRepo(config.history_dir)
            await trio.to_thread.run_sync(repo.open)
            snapshots = Snapshotter(repo, quiet_period=config.quiet_period)
            tree = Tree(gitfile=gitfile_content(config.history_dir))
            memory = AgentMemory(client, config.agent_id, tree, revalidate=config.revalidate,
                                 record=snapshots.record, on_conflict=config.on_conflict)
            try:
                await memory.load()
            except LettaError as exc:
                raise MountError(f"could not list the agent's blocks: {exc}") from None
            await _snapshot_at_mount(repo, snapshots, tree)
            namespace = Namespace(memory)
            parts = Parts(repo, snapshots, memory, MemoryFs(memory, namespace),
                          Poller(memory, namespace, KernelInvalidator(),
                                 interval=config.poll_interval),
                          TreeBlockKeeper(memory), problems)
            await _serve_mounted(config, parts, on_ready)
    except MountError as exc:
        on_ready(str(exc))
        raise
    finally:
        logging.getLogger("memfuse").removeHandler(problems)


def _status(config: Config, parts: Parts) -> Status:
    snapshots, poller = parts.snapshots, parts.poller
    return Status(
        agent_id=config.agent_id, mountpoint=str(config.mountpoint), base_url=config.base_url,
        pid=os.getpid(), reachable=poller.reachable, last_poll=poller.last_poll,
        pending_writes=len(parts.ops.dirty_handles()),
        pending_unlinks=len(parts.ops.namespace.pending_block_ids()),
        uncommitted=snapshots.pending(),
        last_commit=snapshots.last_commit.decode() if snapshots.last_commit else None,
        last_commit_message=parts.repo.last_message, last_commit_at=snapshots.last_commit_at,
        last_conflict=parts.memory.last_conflict, last_error=parts.problems.message,
        last_error_at=parts.problems.at, updated_at=time.time())


async def _publish_status(config: Config, parts: Parts) -> None:
    while True:
        try:
            _status(config, parts).save(config.status_file)
        except OSError as exc:
            log.warning("could not write %s: %s", config.status_file, exc)
        await trio.sleep(STATUS_INTERVAL)


async def _serve_mounted(config: Config, parts: Parts,
                         on_ready: Callable[[str | None], None]) -> None:
    ops = parts.ops
    options = set(pyfuse3.default_options) | {"fsname=memfuse", "subtype=memfuse"}
    try:
        pyfuse3.init(ops, str(config.mountpoint), options)
    except RuntimeError as exc:
        raise MountError(f"could not mount at {config.mountpoint}: {exc}") from None
    config.state_dir.mkdir(parents=True, exist_ok=True)
    RunningMount(config.agent_id, str(config.mountpoint), os.getpid(), config.base_url,
                 str(config.log_file)).save(config.pid_file)
    unmounted = False
    try:
        async with trio.open_nursery() as nursery:
            async def fuse_loop() -> None:
                nonlocal unmounted
                await pyfuse3.main()
                unmounted = True  # the kernel ended the session (fusermount3 -u)
                nursery.cancel_scope.cancel()

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("%s: unmounting", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()

            nursery.start_soon(fuse_loop)
            nursery.start_soon(parts.snapshots.run)
            nursery.start_soon(ops.namespace.run)
            nursery.start_soon(parts.poller.run)
            nursery.start_soon(parts.keeper.run)
            nursery.start_soon(_publish_status, config, parts)
            nursery.start_soon(watch_signals)
            log.info("mounted agent %s at %s (server %s)", config.agent_id, config.mountpoint,
                     config.base_url)
            on_ready(None)
    finally:
        with trio.CancelScope(shield=True):
            for handle in ops.dirty_handles():
                try:
                    await ops.memory.send(handle.node, bytes(handle.data), handle.base)
                    handle.dirty = False
                except FsError as exc:
                    log.error("%s: unsent write lost at unmount: %s",
                              ops.tree.path(handle.node), exc.reason)
            await ops.namespace.retire_all()
            pyfuse3.close(unmount=not unmounted)
            await parts.snapshots.flush()
            config.pid_file.unlink(missing_ok=True)
            config.status_file.unlink(missing_ok=True)
            log.info("unmounted %s", config.mountpoint)
