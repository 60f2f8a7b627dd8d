"""Version history: a git repository (dulwich) whose tree mirrors the mount.

The repository lives outside the mountpoint (default `~/.letta/agents/<id>/memory.git`); the
mount's `.git` gitfile points at it, so plain git works inside the mount. Commits are built from
the changed blobs only (`commit_tree_changes`) on top of the branch head, and the branch is moved
compare-and-swap, so a commit someone made with git in between becomes the parent.
"""
from __future__ import annotations

import base64
import contextlib
import getpass
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import trio
from dulwich.diff_tree import tree_changes
from dulwich.file import FileLocked
from dulwich.index import Index, IndexEntry
from dulwich.object_store import commit_tree_changes
from dulwich.objects import Blob, Commit, Tree
from dulwich.repo import Repo

from .model import Origin

log = logging.getLogger("memfuse.history")

BRANCH = b"refs/heads/main"
ORIGIN = b"origin"
TRACKING = b"refs/remotes/origin/main"  # main as `memfuse serve` serves it: main itself
FILE_MODE = 0o100644
SERVER_AUTHOR = b"Letta server <server@letta>"
INDEX_LOCK_WAIT = 5.0  # seconds a snapshot waits for a git command to release index.lock
UNCOMMITTED = "memfuse-uncommitted.jsonl"  # local changes not committed yet (crash recovery)


SUBJECTS = {Origin.LOCAL: "Local edit", Origin.SERVER: "Server change",
            Origin.REJECTED: "Rejected local edit"}  # followed by its reason, when known


def local_author() -> bytes:
    """`user <user@host>` for the mounting user."""
    user = getpass.getuser()
    return f"{user} <{user}@{socket.gethostname()}>".encode()


def gitfile_content(repo_path: Path) -> bytes:
    """The `.git` gitfile at the mount's root: `gitdir: <absolute repo path>\\n`."""
    return f"gitdir: {repo_path.resolve()}\n".encode()


class _ObjectCache:
    """`store[sha]`, each object read once (objects are immutable): `Tree.lookup_path` reads
    every tree on a path from the store again, the root's too, so a commit of n files in one
    directory would parse that directory n times."""

    def __init__(self, store):
        self.store, self.objects = store, {}

    def __call__(self, sha: bytes):
        if sha not in self.objects:
            self.objects[sha] = self.store[sha]
        return self.objects[sha]


class HistoryRepo:
    """The history repository. Blocking (dulwich): call it from a worker thread.

    path: the git directory (a bare layout with `core.bare = false`, so git run in the mount via
    the gitfile treats the mount as its work tree).
    """

    def __init__(self, path: Path):
        self.path = path
        self._repo: Repo | None = None
        self.last_message: str | None = None  # first line of the last commit made here
        self.tracking = False  # `track`ed: refs/remotes/origin/main follows main

    def open(self) -> None:
        """Open the repository, creating it (HEAD -> refs/heads/main) if it does not exist."""
        if (self.path / "HEAD").exists():
            self._repo = Repo(str(self.path))
            return
        self.path.mkdir(parents=True, exist_ok=True)
        repo = Repo.init_bare(str(self.path))
        config = repo.get_config()
        config.set((b"core",), b"bare", False)
        config.write_to_path()
        repo.refs.set_symbolic_ref(b"HEAD", BRANCH)
        self._repo = repo

    def track(self, url: str) -> bool:
        """Make the history the repository letta-code expects in its memory directory (issue
        20 point 6; `src/agent/memory-git.ts`): `origin` is `url` (the agent's `memfuse serve`
        endpoint), `main` tracks `origin/main`, and `refs/remotes/origin/main` is `main` and
        follows it (what serve serves for a mounted agent is this very branch), so its pull,
        its ahead/behind check and its push find nothing to do. git's automatic gc is off: a
        git command in the mount never repacks under the daemon. An `origin` that is no memfs
        endpoint (no `/v1/git/` in it: a person's own) is left alone, and nothing is tracked.
        Returns whether `origin` is the endpoint now. Raises OSError."""
        config = self.repo.get_config()
        try:
            current = config.get((b"remote", ORIGIN), b"url")
        except KeyError:
            current = None
        if current is not None and b"/v1/git/" not in current:
            return False
        config.set((b"remote", ORIGIN), b"url", url.encode())
        config.set((b"remote", ORIGIN), b"fetch", b"+refs/heads/*:refs/remotes/origin/*")
        config.set((b"branch", b"main"), b"remote", ORIGIN)
        config.set((b"branch", b"main"), b"merge", BRANCH)
        config.set((b"gc",), b"auto", b"0")
        config.set((b"maintenance",), b"auto", b"false")
        config.write_to_path()
        self.tracking = True
        head = self.head()
        if head is not None:
            self.repo.refs[TRACKING] = head
        return True

    def _follow(self, commit_id: bytes) -> None:
        if self.tracking:
            self.repo.refs[TRACKING] = commit_id

    def close(self) -> None:
        """Close the repository's files (at unmount); `open` may be called again."""
        if self._repo is not None:
            self._repo.close()
            self._repo = None

    @property
    def repo(self) -> Repo:
        """The open dulwich repository (after `open`)."""
        assert self._repo is not None, "open() first"
        return self._repo

    def head(self) -> bytes | None:
        """The branch's commit id, or None before the first commit."""
        return self.repo.refs.as_dict().get(BRANCH)

    def files(self) -> dict[str, bytes]:
        """Path -> content of every file at the branch head ({} when there is no commit)."""
        head = self.head()
        if head is None:
            return {}
        store = self.repo.object_store
        return {path.decode(): store[sha].as_raw_string()
                for path, _mode, sha in store.iter_tree_contents(store[head].tree)}

    def entries(self, commit_id: bytes | None = None) -> dict[str, tuple[int, bytes]]:
        """Path -> (git mode, object id) of every file of the commit `commit_id` (default:
        the branch head; {} when there is none): its trees are read, no blob is."""
        commit_id = self.head() if commit_id is None else commit_id
        if commit_id is None:
            return {}
        store = self.repo.object_store
        return {path.decode("utf-8", "surrogateescape"): (mode, sha)
                for path, mode, sha in store.iter_tree_contents(store[commit_id].tree)}

    def blob(self, sha: bytes) -> bytes:
        """The bytes of the blob `sha` (hex object id). KeyError when it is not here."""
        return self.repo.object_store[sha].as_raw_string()

    def commit(self, changes: dict[str, bytes | None], author: bytes, subject: str
               ) -> bytes | None:
        """Commit `changes` (path -> new content, None = deleted) on top of the branch head.

        Paths whose content is already there are dropped; returns None when nothing is left,
        else the new commit id. The message is `subject: <paths>` with one `A/M/D path` line per
        file. Retries when the branch moved under it (compare-and-swap).
        """
        store = self.repo.object_store
        lookup = _ObjectCache(store)  # lookup_path reads from the root tree for every path
        while True:
            head = self.head()
            tree = store[store[head].tree] if head else Tree()
            entries, lines, names = [], [], []
            for path, content in sorted(changes.items()):
                try:
                    _mode, old_sha = tree.lookup_path(lookup, path.encode())
                except KeyError:
                    old_sha = None
                if content is None:
                    if old_sha is None:
                        continue
                    entries.append((path.encode(), None, None))
                    lines.append(f"D {path}")
                else:
                    blob = Blob.from_string(content)
                    if blob.id == old_sha:
                        continue
                    store.add_object(blob)
                    entries.append((path.encode(), FILE_MODE, blob.id))
                    lines.append(f"{'M' if old_sha else 'A'} {path}")
                names.append(path)
            if not entries:
                return None
            commit = Commit()
            commit.tree = commit_tree_changes(store, tree, entries)
            commit.parents = [head] if head else []
            commit.author = author
            commit.committer = local_author()
            commit.author_time = commit.commit_time = int(time.time())
            offset = -(time.altzone if time.localtime().tm_isdst > 0 else time.timezone)
            commit.author_timezone = commit.commit_timezone = offset
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            commit.message = f"{subject}: {shown}\n\n" .encode() + "\n".join(lines).encode() + b"\n"
            store.add_object(commit)
            if self.repo.refs.set_if_equals(BRANCH, head, commit.id):
                self._follow(commit.id)
                self._update_index(entries)
                self.last_message = commit.message.decode().splitlines()[0]
                return commit.id
            log.info("branch moved during a snapshot; committing on top of the new head")

    def move(self, expected: bytes | None, commit_id: bytes) -> bool:
        """Point the branch at `commit_id` (a commit already in the object store, a pushed
        one) if it still is at `expected` (compare-and-swap), and the index entries of the
        paths that differ at the new commit. Returns whether the branch moved."""
        store = self.repo.object_store
        old_tree = store[expected].tree if expected else None
        if not self.repo.refs.set_if_equals(BRANCH, expected, commit_id):
            return False
        self._follow(commit_id)
        entries: list[tuple[bytes, int | None, bytes | None]] = []
        for change in tree_changes(store, old_tree, store[commit_id].tree):
            if change.new is None or change.new.path is None:
                entries.append((change.old.path, None, None))
                continue
            if change.old is not None and change.old.path not in (None, change.new.path):
                entries.append((change.old.path, None, None))
            entries.append((change.new.path, change.new.mode, change.new.sha))
        self._update_index(entries)
        return True

    def _update_index(self, entries: list[tuple[bytes, int | None, bytes | None]]) -> None:
        """Point the index entries of the committed paths at their new blobs, so `git status` in
        the mount is clean after a snapshot; other entries (a user's staging) are left alone.

        The entries carry size 0 and no stat data: git then compares the file's content and
        refreshes the stat data itself.

        Every `git status` holds index.lock while it runs, even when it writes nothing, so a
        snapshot often finds the lock taken: it waits for git to let go (re-reading what git
        wrote) instead of giving up, which would leave the index pointing at the previous
        version and `git status` listing the path until it changes again. Only a lock held for
        INDEX_LOCK_WAIT seconds (a git command that hangs, say) is given up on.
        """
        deadline = time.monotonic() + INDEX_LOCK_WAIT
        while True:
            try:
                index = Index(str(self.path / "index"))
                for path, mode, sha in entries:
                    if sha is None:
                        if path in index:
                            del index[path]
                    else:
                        index[path] = IndexEntry(ctime=0, mtime=0, dev=0, ino=0, mode=mode,
                                                 uid=0, gid=0, size=0, sha=sha)
                index.write()
                return
            except FileLocked as exc:
                if time.monotonic() < deadline:
                    time.sleep(0.01)  # a worker thread: the mount keeps serving meanwhile
                    continue
                log.warning("index not updated (%s held for %.0f s); git status may list "
                            "snapshot paths", exc.lockfilename, INDEX_LOCK_WAIT)
                return
            except OSError as exc:
                log.warning("index not updated (%s); git status may list snapshot paths", exc)
                return


@dataclass
class _Change:
    origin: Origin
    path: str
    content: bytes | None
    reason: str | None = None  # why a rejected edit was refused (its commit says so)
    durable: bool = False  # fsync'd to UNCOMMITTED before `record` returned (a kept file)


@dataclass
class Snapshotter:
    """Batches changes and commits them after a quiet period, off the FUSE path.

    `record` is cheap and synchronous (called from file operations). `run` commits once no change
    has come for `quiet_period` seconds, or `max_delay` seconds after the first pending change,
    whichever is first: each change restarts the quiet period, so under writes that never
    stop the history still gets a commit every `max_delay` seconds (3 s). Consecutive changes of one origin become one commit; local edits are
    authored by the mounting user, server changes by SERVER_AUTHOR, in the order they happened.

    Local and rejected changes not committed yet are also appended to UNCOMMITTED in the
    history directory (one JSON line each; the file is rewritten after each commit), so after a
    crash the next mount knows which of the server's values were the person's own edits
    (`recover`) and commits them under the person's name.

    on_commit: called (synchronously) when a flush takes pending changes, at the moment the
    mount's state is what the commits will hold; the coroutine function it returns is awaited
    once they are all committed (not when a commit failed). The daemon saves the block map
    with it (blockmap.py), so the map and the history's head describe the same files.

    on_committed: called (synchronously) with each new commit's id, once it is the branch's
    head; the daemon pokes the git remote's pusher with it (gitremote.py).
    """

    repo: HistoryRepo
    quiet_period: float = 1.0
    max_delay: float = 3.0  # seconds: writes that never stop still commit this often
    _pending: list[_Change] = field(default_factory=list)
    _lock: trio.Lock = field(default_factory=trio.Lock)
    _flushing: trio.Lock = field(default_factory=trio.Lock)  # one flush at a time; `paused`
    _wakeup: trio.Event = field(default_factory=trio.Event)
    _last_change: float = 0.0
    last_commit: bytes | None = None
    last_commit_at: float | None = None  # time.time()
    last_error: str | None = None
    on_commit: Callable[[], Callable[[], Awaitable[None]]] | None = None
    on_committed: Callable[[bytes], None] | None = None

    def pending(self) -> int:
        """Changes recorded and not committed yet."""
        return len(self._pending)

    @property
    def _uncommitted(self) -> Path:
        return self.repo.path / UNCOMMITTED

    def record(self, path: str, content: bytes | None, origin: Origin,
               reason: str | None = None, *, durable: bool = False) -> None:
        """Note that `path` now has `content` (None: gone) because of `origin`; reason: why
        a rejected edit (Origin.REJECTED) was refused, in words, for its commit's subject.

        durable: a change history alone keeps (a kept file's: never sent to the server). It is
        fsync'd to UNCOMMITTED before this returns, so a crash before the commit loses
        nothing: the next mount recovers it (`recover`, state.MountState.load). Raises OSError
        when that file cannot be written (the change is still pending: the next commit takes
        it)."""
        change = _Change(origin, path, content, reason, durable)
        self._pending.append(change)
        self._last_change = trio.current_time()
        self._wakeup.set()
        if origin is not Origin.SERVER:
            self._remember([change], "a")

    def _remember(self, changes: list[_Change], mode: str) -> None:
        """Append (mode "a") or rewrite (mode "w") the uncommitted local changes' file. When
        one of `changes` is durable the file is fsync'd (a rewrite: before it replaces the
        old one), and an OSError is raised; otherwise it is a WARNING."""
        durable = any(c.durable for c in changes)
        lines = "".join(json.dumps({
            "path": c.path, "origin": c.origin.value,
            "content": None if c.content is None else base64.b64encode(c.content).decode(),
            **({"reason": c.reason} if c.reason else {}),
        }) + "\n" for c in changes)
        target = self._uncommitted if mode == "a" else self._uncommitted.with_suffix(".tmp")
        try:
            with open(target, mode) as f:
                f.write(lines)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            if mode == "w":
                os.replace(target, self._uncommitted)
        except OSError as exc:
            if durable:
                raise
            log.warning("could not keep %s (%s): after a crash, uncommitted local edits would "
                        "be committed as the server's", self._uncommitted, exc)

    def recover(self) -> list[tuple[str, bytes | None, Origin, str | None]]:
        """The local and rejected changes a previous daemon recorded and never committed (it
        crashed), in order: (path, content, origin, reason of a rejection or None).
        Unreadable lines are skipped. A kept file's changes are among them (state.MountState.load
        shows them again)."""
        try:
            text = self._uncommitted.read_text()
        except OSError:
            return []
        found = []
        for line in text.splitlines():
            try:
                item = json.loads(line)
                content = None if item["content"] is None else base64.b64decode(item["content"])
                found.append((item["path"], content, Origin(item["origin"]),
                              item.get("reason")))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the crash
        return found

    async def commit_now(self, changes: dict[str, bytes | None], origin: Origin, subject: str
                         ) -> bytes | None:
        """Commit `changes` right away (used for the snapshot at mount)."""
        author = SERVER_AUTHOR if origin is Origin.SERVER else local_author()
        async with self._lock:
            sha = await trio.to_thread.run_sync(self.repo.commit, changes, author, subject)
        if sha:
            self.last_commit, self.last_commit_at = sha, time.time()
            if self.on_committed is not None:
                self.on_committed(sha)
        return sha

    async def flush(self, subjects: dict[Origin, str] | None = None) -> None:
        """Commit everything pending now, in order, one commit per run of one origin; a run
        ends early where a file's next version does not start with its last (so every version
        that is not a prefix of the next is committed), and a rejected edit's subject gives its
        reason. subjects: the commits' subject by origin (default SUBJECTS). Afterwards the
        uncommitted-changes file holds only what was recorded meanwhile. Waits while the
        snapshots are `paused`."""
        async with self._flushing:
            await self._flush(subjects)

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Commit everything pending, then no snapshot until the block exits: a served push
        (mountgit.py) judges the head as the mount shows it and moves the branch itself.
        Changes recorded meanwhile stay pending and are committed after it, on the branch as
        it is then (a change the branch already holds makes no commit)."""
        async with self._flushing:
            await self._flush()
            yield

    async def _flush(self, subjects: dict[Origin, str] | None = None) -> None:
        pending, self._pending = self._pending, []
        after = self.on_commit() if pending and self.on_commit is not None else None
        runs: list[tuple[Origin, str | None, dict[str, bytes | None]]] = []
        for change in pending:
            earlier = runs[-1][2].get(change.path) if runs else None
            if (not runs or runs[-1][0] is not change.origin or runs[-1][1] != change.reason
                    or (earlier is not None and not (change.content or b"").startswith(earlier))):
                # a version that the next one does not extend (another writer's text, a file
                # removed) gets a commit of its own: history keeps every acknowledged byte
                runs.append((change.origin, change.reason, {}))
            runs[-1][2][change.path] = change.content
        failed: list[_Change] = []
        for origin, reason, changes in runs:
            subject = {**SUBJECTS, **(subjects or {})}[origin]
            if reason:
                subject = f"{subject} ({reason})"
            try:
                await self.commit_now(changes, origin, subject)
            except Exception as exc:  # history must never take the mount down
                self.last_error = f"snapshot failed: {exc!r}"
                log.exception("snapshot of %s failed", ", ".join(changes))
                failed.extend(_Change(origin, p, c, reason) for p, c in changes.items())
        if pending:
            try:
                self._remember([c for c in failed + self._pending
                                if c.origin is not Origin.SERVER], "w")
            except OSError as exc:  # durable changes pending: the old file still holds them
                log.warning("could not rewrite %s (%s); it is rewritten after the next commit",
                            self._uncommitted, exc)
        if after is not None and not failed:
            try:
                await after()
            except Exception:  # history must never take the mount down
                log.exception("after the snapshot: on_commit failed")

    async def run(self) -> None:
        """Commit pending changes after each quiet period, forever (cancel to stop)."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            first = trio.current_time()
            while True:
                now = trio.current_time()
                wait = min(self._last_change + self.quiet_period, first + self.max_delay) - now
                if wait <= 0:
                    break
                await trio.sleep(wait)
            await self.flush()

