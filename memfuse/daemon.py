"""The mount daemon: one trio nursery running pyfuse3's loop, the poller, the snapshotter, the
retirer of unlinked blocks, the memory_filesystem keeper and the status publisher.

Start-up checks everything a person can get wrong before the mount appears (mountpoint busy,
server unreachable, unknown agent) and reports it through `on_ready` as one sentence. When the
server cannot be reached but a local history exists, the mount starts from it (local-first:
the history's head, the block map beside it and the journal) and says so through `on_notice`;
the poller then reconciles once the server answers, and only after that the journal replays.
The lifecycle is one `contextlib.AsyncExitStack` (as in s3ql's mount.py): each resource registers
its teardown where it is acquired, so shutdown (SIGINT, SIGTERM, an external `fusermount3 -u`,
or a crash of any task) runs them all in reverse: send unsent writes and retire unlinked blocks,
remove the pid and status files, unmount, take the last snapshot, push it to the git remote
(a few seconds at most), close the history and the client, and let the history's one-writer
lock (writerlock.py, taken first at start-up) go. A teardown step that fails is
logged and the others still run.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Awaitable, Callable

import httpx
import pyfuse3
import trio

from . import blockmap, fileattrs, gitmemory, handoff, mounttable
from .config import Config, RunningMount, private_dir, private_file
from .errors import AgentGone, Faults, KeyRefused, NoAnswer, ServerCallError
from .files import BlockFiles
from .fs import MemoryFs
from .gitremote import GitRemote, Pusher
from .history import HistoryRepo, Snapshotter, gitfile_content
from .journal import Journal
from .keeper import TreeBlockKeeper
from .layout import GIT_MEMORY, Layout, PathKind, by_name, layout_for_tags
from .model import Block, Location, Origin
from .mountgit import MountGit
from .namespace import Namespace
from .poller import Poller
from .remote import AgentFacts, Client, Remote, agent_facts, check_server, make_client
from .replay import Replayer
from .state import KernelInvalidator, MountState
from .status import LastProblem, Status
from .tree import Tree
from .writerlock import WriterLock

log = logging.getLogger("memfuse.daemon")

STATUS_INTERVAL = 1.0  # seconds between status file updates
RESTART_DELAY = 1.0    # seconds before a background task that failed is started again
UMOUNT_REPLAY = 10.0   # seconds an unmount tries to send journaled changes before keeping them
START_BUDGET = 2.0     # seconds of retries at mount before starting from the local history
PROGRESS_FROM = 1000   # owned blocks from which a mount reports how its load goes
UMOUNT_PUSH = 5.0      # seconds an unmount tries to push the last snapshot to the git remote
ATTRS_DELAY = 1.0      # seconds from a chmod, chown or utimens to saving the times and modes
WRITER_WAIT = 10.0     # seconds a mount waits for `memfuse serve` to let the agent's history go
MOUNT_SUBJECT = "Snapshot at mount"  # the server's changes found at mount (then `: <paths>`)
SWITCH_SUBJECT = "Layout switch {old} -> {new} at mount"  # the same when the layout changed


class MountError(Exception):
    """The mount cannot start; the message is for a person."""


class ServerUnreachable(MountError):
    """The server at `base_url` gave no answer at start-up (NoAnswer; `detail` says how):
    the mount may start from its local history instead."""

    def __init__(self, base_url: str, detail: str):
        super().__init__(f"cannot reach the Letta server at {base_url} ({detail})")
        self.detail = detail


def is_mounted(path: Path) -> bool:
    """Whether something is mounted at `path` (absolute), by any user, a FUSE mount whose
    daemon is gone included: the kernel's mount table says, so a path this user cannot reach
    is not taken for a mount. Raises OSError when /proc cannot be read."""
    return mounttable.mount_at(path) is not None


def answers(path: Path) -> bool | None:
    """Whether the mount at `path` is served: True when it answers (a live daemon serves it),
    False when its FUSE connection is gone (ENOTCONN: its daemon died), None when this user
    cannot tell (FUSE refuses every other user, root included, and a directory on the way
    may be private)."""
    try:
        os.lstat(path)
    except OSError as exc:
        return False if exc.errno == errno.ENOTCONN else None
    return True


def clear_dead_mount(path: Path) -> bool:
    """Lazily unmount `path` (`fusermount3 -u -z`) when something is mounted there that does
    not answer for certain; only for a mount whose daemon is gone (the caller checks its
    record when `answers` cannot tell). A mount that answers is never cleared: its daemon
    serves it. Returns whether there was one to clear."""
    if not is_mounted(path) or answers(path):
        return False
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)
    return True


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


def _make_private(config: Config) -> None:
    """The state directory and history 0700, the journal, block map, log, pid and status
    files 0600: tightened at every mount, so state an older memfuse left readable is private
    again."""
    private_dir(config.state_dir)
    if config.history_dir.exists():
        private_dir(config.history_dir)
    for path in (config.journal_file, config.block_map_file, config.attrs_file, config.log_file,
                 config.pid_file, config.status_file, config.writer_lock_file):
        private_file(path)


def clear_stale_locks(history_dir: Path) -> None:
    """Remove git lock files a dead daemon left in the history (a crash in the middle of a ref
    or index update leaves `refs/heads/main.lock`, `index.lock`, ...; git and dulwich then
    refuse to write). Called only when no live daemon serves this agent."""
    if not history_dir.is_dir():
        return
    for lock in [*history_dir.glob("*.lock"), *history_dir.glob("refs/**/*.lock")]:
        log.warning("%s: a git lock left by a daemon that is gone; removed", lock)
        lock.unlink(missing_ok=True)


async def _connect(client: Client, config: Config, budget: float | None = None) -> AgentFacts:
    """Check that `config.base_url` is a Letta server that knows the agent, with `budget`
    seconds of retries (None: the client's; `client` from remote.make_client); returns the
    agent's name and tags (`GET /v1/agents/{id}`). Raises MountError; ServerUnreachable when
    no answer came."""
    try:
        await check_server(client, budget)
    except ServerCallError as exc:
        raise _not_connected(exc, config, f"{config.base_url} does not look like a Letta "
                                          f"server (GET /v1/health/ answered "
                                          f"{exc.status or ''} {exc.detail})") from None
    try:
        return await agent_facts(client, config.agent_id, budget)
    except AgentGone:
        raise MountError(f"agent {config.agent_id} not found on {config.base_url}") from None
    except ServerCallError as exc:
        raise _not_connected(exc, config, f"the Letta server at {config.base_url} answered: "
                                          f"{exc.failure}") from None


def _not_connected(exc: ServerCallError, config: Config, otherwise: str) -> MountError:
    """The start-up error for a check that failed with `exc`: no answer (ServerUnreachable: a
    history may stand in), a refused key, else `otherwise`."""
    if isinstance(exc, NoAnswer):
        return ServerUnreachable(config.base_url, exc.detail)
    if isinstance(exc, KeyRefused):
        return MountError(f"the Letta server at {config.base_url} refused the API key "
                          f"(check LETTA_API_KEY)")
    return MountError(otherwise)


@dataclass
class Mount:
    """Everything one mount runs (built by `_start`)."""

    config: Config
    repo: HistoryRepo
    snapshots: Snapshotter
    state: MountState
    files: BlockFiles
    replayer: Replayer
    ops: MemoryFs
    poller: Poller
    keeper: TreeBlockKeeper
    problems: LastProblem
    faults: Faults = field(default_factory=Faults)
    unmounted: bool = False  # the kernel ended the session itself (fusermount3 -u)
    local_first_at: float | None = None  # time.time() it was mounted from history (server away)
    notice: str | None = None  # what a person should read as it starts (a local-first mount)
    started_at: float = field(default_factory=time.time)  # time.time() the mount was built
    agent_name: str = ""  # from the server at start-up ("" when it started from history)
    pusher: Pusher | None = None  # with --git-remote
    attrs: _AttrsSaver | None = None  # keeps the files' times and modes across mounts
    enabled_files: frozenset[str] | None = None  # blocks `git-memory enable` attached as files
    git: MountGit | None = None  # answers `memfuse serve` for the agent (handoff.py)

    @property
    def local_first(self) -> bool:
        """Mounted from history and the server not listed since: it shows the history's view."""
        return self.local_first_at is not None and not self.poller.applied.is_set()

    def status(self) -> Status:
        """The status report as of now."""
        config, snapshots, poller = self.config, self.snapshots, self.poller
        pending = self.state.journal.queued() if self.state.journal is not None else []
        return Status(
            agent_id=config.agent_id, mountpoint=str(config.mountpoint),
            base_url=config.base_url, pid=os.getpid(), reachable=poller.reachable,
            last_poll=poller.last_poll, pending_writes=self.ops.unsent(),
            pending_unlinks=len(self.state.graveyard.pending_block_ids()),
            uncommitted=snapshots.pending(),
            last_commit=snapshots.last_commit.decode() if snapshots.last_commit else None,
            last_commit_message=self.repo.last_message, last_commit_at=snapshots.last_commit_at,
            last_conflict=self.files.last_conflict, last_error=self.problems.message,
            last_error_at=self.problems.at, unexpected_errors=self.faults.count,
            unreachable_since=(None if poller.reachable else poller.remote.reachable_since),
            journal_pending=len(pending), journal_oldest_at=pending[0].at if pending else None,
            last_replay=self.replayer.last_replay, journal_stuck=self.replayer.stuck(),
            duplicates=self._duplicates(), layout=self.state.layout.name,
            layout_changed=poller.model_changed, out_of_prompt=self._out_of_prompt(),
            local_first_at=self.local_first_at if self.local_first else None,
            **(self._push_status() if self.pusher is not None else {}),
            latency=poller.remote.latency(), agent_gone_since=poller.remote.agent_gone_since,
            requests=poller.remote.client.requests,
            received_bytes=poller.remote.client.received_bytes,
            started_at=self.started_at, updated_at=time.time())

    def _out_of_prompt(self) -> list[str] | None:
        """In the git-memory layout, the classic core blocks its prompt does not show (attached
        labels outside system/ without a `/`, gitmemory.out_of_prompt); else None."""
        if self.state.layout is not GIT_MEMORY:
            return None
        if self.enabled_files is None:  # the record cannot change while mounted: read once
            try:
                record = gitmemory.Record.load(self.config.agent_id)
            except ValueError:
                record = None
            self.enabled_files = record.kept() if record is not None else frozenset()
        return gitmemory.out_of_prompt([n.block.label for n in self.state.tree.blocks()
                                        if n.block.id not in self.enabled_files]) or None

    def _duplicates(self) -> list[str]:
        """One line per path several of the agent's blocks would show: which one it shows."""
        lines = []
        for path, ids in sorted(self.state.duplicates.items()):
            shown = self.state.shown_at(path)
            others = [i for i in ids if i != shown]
            lines.append(f"{path}: shows {shown or 'none of them'}; also "
                         f"{', '.join(others)}")
        return lines

    def _push_status(self) -> dict:
        pusher = self.pusher
        waiting = (None if pusher.retry_at is None
                   else time.time() + max(0.0, pusher.retry_at - trio.current_time()))
        return dict(git_remote=pusher.remote.shown,
                    last_push=pusher.last_push.decode() if pusher.last_push else None,
                    last_push_at=pusher.last_push_at, last_push_error=pusher.last_error,
                    last_push_error_at=pusher.last_error_at, push_diverged=pusher.diverged,
                    push_failing=pusher.failures > 0, next_push_retry_at=waiting,
                    pushing_since=pusher.pushing_since)


def _teardown(stack: contextlib.AsyncExitStack, what: str,
              step: Callable[[], Awaitable[None] | None]) -> None:
    """Register `step` to run at exit, shielded from cancellation; a failure is logged with its
    traceback and does not stop the steps registered before it."""
    async def run(*_exc) -> None:
        with trio.CancelScope(shield=True):
            try:
                result = step()
                if result is not None:
                    await result
            except Exception:
                log.exception("unmount: %s failed", what)

    stack.push_async_exit(run)


async def _start(stack: contextlib.AsyncExitStack, config: Config, problems: LastProblem,
                 transport: httpx.AsyncBaseTransport | None,
                 on_progress: Callable[[str], None] | None = None) -> Mount:
    """Acquire everything up to a loaded tree, each teardown registered on `stack`; tell
    on_progress how a large load goes (`serve`). Raises MountError."""
    _claim_mountpoint(config)
    await _hold_history(stack, config)
    client = await stack.enter_async_context(make_client(
        config.base_url, config.api_key, retry_budget=config.retry_budget, transport=transport))
    has_history = (config.history_dir / "HEAD").exists()  # checked before open() makes one
    agent, away = await _reach(client, config, has_history)
    layout, switched_from = _layout(config, agent)
    repo = await _open_history(stack, config)
    pusher = _pusher(stack, config)
    snapshots = Snapshotter(repo, quiet_period=config.quiet_period,
                            on_committed=pusher and (lambda _sha: pusher.poke()))
    _teardown(stack, "the last snapshot", snapshots.flush)
    journal = Journal(config.journal_file)
    # git memory: `.git` links to the history, so letta-code can write its hooks through it
    gitlink = layout is GIT_MEMORY
    gitfile = (os.fsencode(config.history_dir.resolve()) if gitlink
               else gitfile_content(config.history_dir))
    state = MountState(Tree(gitfile=gitfile, gitlink=gitlink), snapshots.record,
                       journal=journal, layout=layout)
    remote = Remote(client, config.agent_id, on_conflict=config.on_conflict)
    away = await _load(config, repo, snapshots, state, remote, away, on_progress)
    attrs = await _commit_at_mount(stack, config, snapshots, state, SWITCH_SUBJECT.format(
        old=switched_from, new=layout.name) if switched_from else MOUNT_SUBJECT)
    files = BlockFiles(state, remote, revalidate=config.revalidate)
    namespace = Namespace(state, remote, files)
    faults = Faults()
    poller = Poller(state, remote, interval=config.poll_interval,
                    full_interval=config.full_poll_interval)
    files.listed_since = poller.listed_since
    replayer = Replayer(state, remote, files.block_order, files.note_conflict)
    mount = Mount(config, repo, snapshots, state, files, replayer,
                  MemoryFs(state, files, namespace, faults), poller,
                  TreeBlockKeeper(state, remote), problems, faults, agent_name=agent.name,
                  pusher=pusher, attrs=attrs)
    mount.git = MountGit(config, repo, snapshots, state, poller, transport)
    if away is not None:
        mount.local_first_at = time.time()
        mount.notice = (f"the server at {config.base_url} cannot be reached ({away.detail}); "
                        f"mounted agent {config.agent_id} from its local history "
                        f"({len(state.tree.blocks())} blocks, {len(journal.pending())} "
                        f"journaled changes); changes are sent when it answers")
    return mount


def _claim_mountpoint(config: Config) -> None:
    """Refuse a second daemon for the agent, clear the dead mount of an earlier one, check the
    mountpoint and make the state directory private. Raises MountError."""
    running = RunningMount.load(config.pid_file)
    if running is not None and running.alive():
        raise MountError(f"agent {config.agent_id} is already mounted at "
                         f"{running.mountpoint} (pid {running.pid})")
    if (running is not None and Path(running.mountpoint) == config.mountpoint
            and clear_dead_mount(config.mountpoint)):
        log.warning("%s: the mount of a daemon that died (pid %d) was still there; cleared",
                    config.mountpoint, running.pid)
    check_mountpoint(config.mountpoint)
    _make_private(config)


async def _hold_history(stack: contextlib.AsyncExitStack, config: Config) -> None:
    """Take the history's one-writer lock (writerlock.py) for the daemon's life, waiting up to
    WRITER_WAIT seconds for `memfuse serve` to finish a request for the agent; then clear the
    git lock files a dead writer left. Let go after everything else at unmount. Raises
    MountError when another process keeps it."""
    lock = WriterLock(config.writer_lock_file)
    if not await trio.to_thread.run_sync(lock.acquire, WRITER_WAIT):
        raise MountError(f"the history of agent {config.agent_id} ({config.history_dir}) is "
                         f"being written by another memfuse process (memfuse serve answering a "
                         f"request for it?), which did not let it go within {WRITER_WAIT:g} s; "
                         f"try again")
    _teardown(stack, "letting the history go", lock.release)
    clear_stale_locks(config.history_dir)


async def _reach(client: Client, config: Config,
                 has_history: bool) -> tuple[AgentFacts, ServerUnreachable | None]:
    """(the agent's facts, None), or (no facts, why the server is away) when a history can
    stand in for it; with a history to fall back on the wait is short, since the mount works
    from it meanwhile. Raises MountError when the server is away and there is no history."""
    try:
        return await _connect(client, config, START_BUDGET if has_history else None), None
    except ServerUnreachable as exc:
        if not has_history:
            raise _no_history(exc, config) from None
        return AgentFacts(), exc


def _layout(config: Config, agent: AgentFacts) -> tuple[Layout, str | None]:
    """The layout of this mount (layout.py): the one the agent's tags choose when the server
    answered, else the one the history's block map recorded (classic for a map that names
    none, or no map: `_from_history` then refuses the mount); and the recorded layout's name
    when the tags chose another (a switch: the snapshot at mount then moves the files, in
    one commit, so `git log --follow` finds each file's past), else None. Raises MountError
    for a layout this memfuse does not know (a newer memfuse recorded it)."""
    try:
        saved = blockmap.read(config.block_map_file)
    except blockmap.BlockMapError:
        saved = None  # _from_history says so when it needs the map; a listing replaces it
    recorded = by_name(saved[0] if saved is not None else None)
    if agent.tags is None:
        if recorded is None:
            raise MountError(f"the local history at {config.history_dir} is in the layout "
                             f"{saved[0]!r}, which this memfuse does not know")
        log.info("agent %s: mounted in the %s layout its history recorded", config.agent_id,
                 recorded.name)
        return recorded, None
    layout = layout_for_tags(agent.tags)
    switched_from = None
    if saved is not None and recorded is not layout:
        switched_from = saved[0]
        log.info("the agent's memory model changed since the last mount (%s -> %s layout): "
                 "the snapshot at mount moves its files", saved[0], layout.name)
    log.info("agent %s: mounted in the %s layout", config.agent_id, layout.name)
    return layout, switched_from


async def _open_history(stack: contextlib.AsyncExitStack, config: Config) -> HistoryRepo:
    """The agent's history repository, opened (made if new) and private, closed at unmount,
    with `origin` the agent's `memfuse serve` endpoint (HistoryRepo.track: letta-code's memory
    directory is the mount)."""
    repo = HistoryRepo(config.history_dir)
    await trio.to_thread.run_sync(repo.open)
    private_dir(config.history_dir)
    _teardown(stack, "closing the history", repo.close)
    if not await trio.to_thread.run_sync(repo.track, config.memfs_url):
        log.info("the history's origin is not a memfuse serve endpoint; left as it is (letta-"
                 "code would not find its memory repository here)")
    return repo


def _pusher(stack: contextlib.AsyncExitStack, config: Config) -> Pusher | None:
    """The git remote's pusher (None without --git-remote), its last push registered for
    unmount. Registered before the last snapshot, so it runs after it (the stack unwinds); it
    does nothing unless the pusher ran, which it does only once the mount is up."""
    if not config.git_remote:
        return None
    remote = GitRemote(config.git_remote)
    pusher = Pusher(remote, partial(trio.to_thread.run_sync, remote.push, config.history_dir,
                                    abandon_on_cancel=True))
    _teardown(stack, "the last push", partial(pusher.last_push_now, UMOUNT_PUSH))
    return pusher


async def _load(config: Config, repo: HistoryRepo, snapshots: Snapshotter, state: MountState,
                remote: Remote, away: ServerUnreachable | None,
                on_progress: Callable[[str], None] | None) -> ServerUnreachable | None:
    """Load the tree: from the server's listing, or from the history when the server is away
    (then also when it goes away during the listing); the journal and the kept times and modes
    on top. Returns why the server is away, or None. Raises MountError."""
    committed = await trio.to_thread.run_sync(repo.files)
    listed_at = trio.current_time()
    total = await remote.owned_count() if away is None and on_progress is not None else None
    progress = on_progress if total is not None and total >= PROGRESS_FROM else None
    if away is None:
        try:
            attached, owned = await remote.listing(on_page=progress and (
                lambda n: progress(f"loading agent {config.agent_id}: {n:,} of {total:,} "
                                   f"blocks listed")))
        except NoAnswer as exc:  # it went away between the checks and the listing
            away = ServerUnreachable(config.base_url, exc.detail)
        except ServerCallError as exc:
            raise MountError(f"could not list the agent's blocks: {exc.failure}") from None
    recovered = snapshots.recover()
    if away is not None:
        attached, owned, committed = _from_history(config, away, repo, committed, recovered,
                                                   state.layout)
        remote.mark_unreachable(away.detail)
    state.load(attached, owned, listed_at, committed, recovered)
    state.show_journal()
    try:
        kept = await trio.to_thread.run_sync(fileattrs.load, config.attrs_file)
    except fileattrs.AttrsError as exc:
        log.warning("%s; the files' times and modes start afresh", exc)
        kept = {}
    state.restore_attrs(kept, committed)
    pending = len(state.journal.pending()) if state.journal is not None else 0
    if pending:
        log.info("%d journaled change(s) from an earlier mount; replaying them", pending)
    if progress is not None:
        progress(f"loading agent {config.agent_id}: {len(state.tree.blocks()):,} files shown; "
                 f"the snapshot at mount is being committed")
    return away


async def _commit_at_mount(stack: contextlib.AsyncExitStack, config: Config,
                           snapshots: Snapshotter, state: MountState,
                           subject: str) -> _AttrsSaver:
    """Commit the snapshot at mount (`subject`: MOUNT_SUBJECT, or SWITCH_SUBJECT when the
    layout changed), save the block map and the times and modes with each commit from now
    on, and save the times and modes again after the unmount."""
    saver = _BlockMapSaver(config.block_map_file, state)
    attrs = _AttrsSaver(config.attrs_file, state)
    state.on_attributes = attrs.changed
    snapshots.on_commit = _together(saver.capture, attrs.capture)
    await snapshots.flush({Origin.SERVER: subject,
                           Origin.LOCAL: "Local edit (recovered at mount)"})
    await saver.capture()()  # also when nothing was committed (a map from an older memfuse)
    await attrs.capture()()
    # after the unmount (registered later, so run earlier): the times and modes as they end
    _teardown(stack, "saving the times and modes", lambda: attrs.capture()())
    return attrs


def disk_full(exc: OSError, config: Config) -> MountError:
    """The start-up error for `exc`, an ENOSPC or EDQUOT met while writing the state directory,
    the history, the journal or the pid file: it names the disk's state and the path (the
    file `exc` names, else the agent's state directory)."""
    where = exc.filename or config.state_dir
    what = "the disk quota for" if exc.errno == errno.EDQUOT else "the disk holding"
    full = "used up" if exc.errno == errno.EDQUOT else "full"
    return MountError(f"{what} {where} is {full} ({exc.strerror}): memfuse cannot write the "
                      f"agent's history, journal and state there; free some space and mount "
                      f"again")


def _no_history(away: ServerUnreachable, config: Config) -> MountError:
    return MountError(f"{away}, and there is no local history of agent {config.agent_id} to "
                      f"mount from ({config.history_dir})")


def _from_history(config: Config, away: ServerUnreachable, repo: HistoryRepo,
                  committed: dict[str, bytes],
                  recovered: list[tuple[str, bytes | None, Origin]] = (),
                  layout: Layout | None = None
                  ) -> tuple[list[Block], list[Block], dict[str, bytes]]:
    """(attached, owned, committed) for a mount started while the server cannot be reached:
    the blocks as the history's head (`committed`, path -> content) and the block map have
    them, with the local edits the server accepted but a dead daemon never committed
    (`recovered`, Snapshotter.recover) on top (state.load then commits them as the
    person's), and the part of `committed` they show in `layout` (the mount's: the one the
    map recorded; a file left out is no server delete, so `state.load` must not see it go;
    kept files are part of it: `state.load` shows them). Raises MountError when there is no
    history (no commit)
    or no block map (a history an older memfuse made), or the map cannot be read."""
    if repo.head() is None:
        raise _no_history(away, config)
    try:
        found = blockmap.load(config.block_map_file)
    except blockmap.BlockMapError as exc:
        raise MountError(f"{away}, and the local history cannot be mounted: {exc}") from None
    if found is None:
        raise MountError(f"{away}, and the local history at {config.history_dir} has no block "
                         f"map ({config.block_map_file.name}; a memfuse before local-first "
                         f"mounts made it): mount once with the server reachable")
    files = dict(committed)
    for path, content, origin, *_why in recovered:
        if origin is Origin.LOCAL and content is not None and path in files:
            files[path] = content
    attached, owned = blockmap.blocks(found, files)
    layout = layout or by_name(None)
    shown = {"/".join(layout.parts(Location(is_attached, block.label)) or ())
             for blocks, is_attached in ((attached, True), (owned, False)) for block in blocks}
    return attached, owned, {p: c for p, c in committed.items()
                             if p in shown or layout.kind(tuple(p.split("/"))) is PathKind.KEPT}


class _BlockMapSaver:
    """Keeps the block map (`path`, blockmap.py) describing what `state` shows as of the last
    snapshot: `capture` is Snapshotter.on_commit. Written only when it changed."""

    def __init__(self, path: Path, state: MountState):
        self.path, self.state = path, state
        self._saved: list[blockmap.Record] | None = None
        self._taken = 0    # captures so far
        self._written = 0  # the capture last written: an older one never overwrites it

    def capture(self) -> Callable[[], Awaitable[None]]:
        """The map of the mount as it is now; returns the coroutine function that saves it."""
        tree = self.state.tree
        found = blockmap.records((tree.path(node), node.block,
                                  self.state.location(node).attached)
                                 for node in tree.blocks())
        self._taken += 1
        taken = self._taken

        async def save() -> None:
            if taken < self._written or found == self._saved:
                return
            try:
                await trio.to_thread.run_sync(blockmap.save, self.path, found,
                                              self.state.layout.name)
            except OSError as exc:
                log.warning("could not save the block map %s (%s): a mount while the server is "
                            "away would use an older one", self.path, exc)
                return
            self._saved, self._written = found, taken

        return save


class _AttrsSaver:
    """Keeps the record of the mount's times and modes (`path`, fileattrs.py) describing what
    `state` shows: `capture` at each snapshot (Snapshotter.on_commit, with the block map), at
    mount and at unmount; `changed` (MountState.on_attributes) after a change of times or
    modes alone, saved ATTRS_DELAY seconds later by `run`. Written only when it changed; saves
    run one at a time, and an older capture never overwrites a newer one."""

    def __init__(self, path: Path, state: MountState):
        self.path, self.state = path, state
        self._saved: dict[str, fileattrs.Attrs] | None = None
        self._taken = 0    # captures so far
        self._written = 0  # the capture last written
        self._changed = trio.Event()
        self._lock = trio.Lock()

    def changed(self) -> None:
        """Times or modes changed with no snapshot to come: `run` saves them soon."""
        self._changed.set()

    def capture(self) -> Callable[[], Awaitable[None]]:
        """The times and modes as they are now; returns the coroutine function that saves
        them (a failure to write is a WARNING: the next mount would start from older ones)."""
        found = self.state.attrs()
        self._taken += 1
        taken = self._taken

        async def save() -> None:
            async with self._lock:
                if taken < self._written or found == self._saved:
                    return
                try:
                    await trio.to_thread.run_sync(fileattrs.save, self.path, found)
                except OSError as exc:
                    log.warning("could not save the times and modes in %s (%s): the next mount "
                                "would show older ones", self.path, exc)
                    return
                self._saved, self._written = found, taken

        return save

    async def run(self) -> None:
        """Save ATTRS_DELAY seconds after each burst of `changed`, forever (cancel to stop)."""
        while True:
            await self._changed.wait()
            self._changed = trio.Event()
            await trio.sleep(ATTRS_DELAY)
            await self.capture()()


def _together(*captures: Callable[[], Callable[[], Awaitable[None]]]
              ) -> Callable[[], Callable[[], Awaitable[None]]]:
    """One Snapshotter.on_commit made of several: each captures at once, and their saves run
    in order."""
    def capture() -> Callable[[], Awaitable[None]]:
        saves = [c() for c in captures]

        async def save() -> None:
            for one in saves:
                await one()

        return save

    return capture


async def serve(config: Config, on_ready: Callable[[str | None], None], *,
                on_notice: Callable[[str], None] | None = None,
                on_progress: Callable[[str], None] | None = None,
                transport: httpx.AsyncBaseTransport | None = None) -> None:
    """Mount `config.agent_id` at `config.mountpoint` and serve until unmounted, signalled, or
    a task fails (its exception propagates after the teardown).

    on_ready(None) is called once the mount is usable; on_ready(message) when it cannot start
    (then MountError is raised too; a full disk or a used-up quota is one: `disk_full`).
    on_notice(sentence), just before on_ready(None), when a person should know how it started
    (mounted from the local history, the server away).
    on_progress(sentence) while a large memory (PROGRESS_FROM blocks or more) loads: blocks
    listed of the total, then the snapshot at mount. transport: an httpx transport for the
    client (tests).
    """
    problems = LastProblem()
    logger = logging.getLogger("memfuse")
    logger.addHandler(problems)
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                try:
                    mount = await _start(stack, config, problems, transport, on_progress)
                    await _mount(stack, mount)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    raise disk_full(exc, config) from None
            except MountError as exc:
                on_ready(str(exc))
                raise
            await _serve(mount, on_ready, on_notice)
    finally:
        logger.removeHandler(problems)


async def _mount(stack: contextlib.AsyncExitStack, mount: Mount) -> None:
    """Mount the filesystem and write the pid file, registering their teardown. Raises
    MountError."""
    config, ops = mount.config, mount.ops
    options = set(pyfuse3.default_options) | {"fsname=memfuse", "subtype=memfuse"}
    try:
        pyfuse3.init(ops, str(config.mountpoint), options)
    except RuntimeError as exc:
        raise MountError(f"could not mount at {config.mountpoint}: {exc}") from None
    mount.state.invalidator = KernelInvalidator()
    _teardown(stack, "unmounting", lambda: pyfuse3.close(unmount=not mount.unmounted))
    private_dir(config.state_dir)

    def remove_records() -> None:
        config.pid_file.unlink(missing_ok=True)
        config.status_file.unlink(missing_ok=True)
        log.info("unmounted %s", config.mountpoint)

    _teardown(stack, "removing the pid file", remove_records)
    RunningMount(config.agent_id, str(config.mountpoint), os.getpid(), config.base_url,
                 str(config.log_file), str(config.journal_file),
                 agent_name=mount.agent_name).save(config.pid_file)

    async def send_pending() -> None:
        await ops.shutdown()
        await ops.namespace.retire_all()
        journal = mount.state.journal
        if journal is not None and journal.pending():
            with trio.move_on_after(UMOUNT_REPLAY):  # the server may be away: bounded
                await mount.replayer.replay()
            if journal.pending():
                log.warning("%d journaled change(s) not sent yet; kept in %s and sent at the "
                            "next mount", len(journal.pending()), journal.path)

    _teardown(stack, "sending unsent writes", send_pending)


def _save_status(mount: Mount) -> None:
    try:
        mount.status().save(mount.config.status_file)
    except OSError as exc:
        log.warning("could not write %s: %s", mount.config.status_file, exc)


async def _publish_status(mount: Mount) -> None:
    while True:
        _save_status(mount)
        await trio.sleep(STATUS_INTERVAL)


async def _supervised(name: str, task: Callable[[], Awaitable[None]], faults: Faults) -> None:
    """Run a background task forever: an unexpected exception is logged with its traceback,
    counted, and the task restarted after RESTART_DELAY seconds (the safe boundary of the
    daemon's own work)."""
    while True:
        try:
            await task()
            return
        except Exception:
            faults.caught(log, f"{name} failed unexpectedly; restarting it in "
                               f"{RESTART_DELAY:g} s")
        await trio.sleep(RESTART_DELAY)


async def _replay_when_listed(mount: Mount) -> None:
    """The journal replayer. A mount started from history first waits for a listing to be
    applied, so the server's changes made meanwhile are shown (and committed as the server's)
    before the journal is sent on top of them."""
    if mount.local_first_at is not None and not mount.poller.applied.is_set():
        await mount.poller.applied.wait()
        log.info("the server answered and its blocks are shown (the mount started from "
                 "history); the journal is sent now")
    await mount.replayer.run_replay()


async def _serve(mount: Mount, on_ready: Callable[[str | None], None],
                 on_notice: Callable[[str], None] | None = None) -> None:
    """Run the FUSE loop and the background tasks until unmounted or signalled."""
    async with trio.open_nursery() as nursery:
        async def fuse_loop() -> None:
            await pyfuse3.main()
            mount.unmounted = True  # the kernel ended the session (fusermount3 -u)
            nursery.cancel_scope.cancel()

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("%s: unmounting", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()

        nursery.start_soon(fuse_loop)
        nursery.start_soon(watch_signals)
        try:
            await nursery.start(handoff.serve, mount.config.handoff_socket, mount.git.handle)
        except OSError as exc:  # the mount works without it; `memfuse serve` cannot hand off
            log.warning("the hand-off socket %s cannot be made (%s): memfuse serve cannot "
                        "answer for this agent while it is mounted", mount.config.handoff_socket,
                        exc)
        for name, task in (("the snapshotter", mount.snapshots.run),
                           ("the retirer", mount.ops.namespace.run),
                           ("the poller", mount.poller.run),
                           ("the memory_filesystem keeper", mount.keeper.run),
                           ("the journal replayer", partial(_replay_when_listed, mount)),
                           ("the status publisher", partial(_publish_status, mount)),
                           *([("the times and modes saver", mount.attrs.run)]
                             if mount.attrs is not None else []),
                           *([("the git remote's pusher", mount.pusher.run)]
                             if mount.pusher is not None else [])):
            nursery.start_soon(_supervised, name, task, mount.faults)
        log.info("mounted agent %s at %s (server %s%s)", mount.config.agent_id,
                 mount.config.mountpoint, mount.config.base_url,
                 f"; history pushed to {mount.pusher.remote.shown}" if mount.pusher else "")
        if mount.notice is not None:
            log.warning("%s", mount.notice)
            if on_notice is not None:
                on_notice(mount.notice)
        try:  # a `memfuse status` right after `mount` returns reads this one
            _save_status(mount)
        except Exception:  # a bug in a report: the publisher tries again, the mount serves on
            mount.faults.caught(log, "the first status report failed unexpectedly")
        on_ready(None)
