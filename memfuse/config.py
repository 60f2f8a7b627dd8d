"""Settings of one mount, from command-line flags and the environment.

Environment: LETTA_BASE_URL (default http://localhost:8283), LETTA_API_KEY (sent as a Bearer
token; never logged or written to disk), MEMFUSE_GIT_REMOTE (the git remote the history is
pushed to, when `--git-remote` is not given; it may hold credentials, so like the API key it is
never logged or written to disk, and memfuse puts it on no command line: the background daemon
gets it in its environment). Paths default under
`~/.letta/agents/<agent-id>/`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import procs

DEFAULT_BASE_URL = "http://localhost:8283"  # the Letta server, without --base-url or LETTA_BASE_URL

GIT_REMOTE_ENV = "MEMFUSE_GIT_REMOTE"
MEMFS_BASE_URL_ENV = "LETTA_MEMFS_BASE_URL"  # where letta-code finds the git endpoint: `memfuse serve`
DEFAULT_SERVE_LISTEN = "127.0.0.1:8285"  # `memfuse serve` without --listen
DEFAULT_MEMFS_BASE_URL = f"http://{DEFAULT_SERVE_LISTEN}"
AGENT_PLACEHOLDER = "{agent}"  # in a git remote URL: the agent id (one repository per agent)
AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")  # one path component, never ..


class ConfigError(ValueError):
    """A setting cannot be used; the message is for a person."""


def check_agent_id(agent_id: str) -> str:
    """`agent_id` when it can name a directory under `~/.letta/agents` (letters, digits, `-`,
    `_`, `.`, starting with a letter or digit: Letta's ids look like `agent-<uuid>`); else
    ConfigError, before any path is made from it."""
    if not AGENT_ID.fullmatch(agent_id):
        raise ConfigError(f"{agent_id!r} is not an agent id (expected something like "
                          f"agent-1234abcd-...; letters, digits, '-', '_', '.')")
    return agent_id


def private_dir(path: Path) -> Path:
    """Create `path` (and its parents) if missing and make it 0700: memfuse's state (history,
    log, pid and status files) is the mounting user's alone, whatever the umask."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> None:
    """Make an existing file 0600 (nothing happens when it does not exist)."""
    try:
        os.chmod(path, 0o600)
    except FileNotFoundError:
        pass


def write_private(path: Path, data: bytes) -> None:
    """Replace the file `path` with `data` atomically: `<path>.tmp` (mode 0600) written whole,
    fsync'd and renamed over `path`, then its directory fsync'd, so a crash leaves the old
    file or the new one. Raises OSError."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:  # a short write (a nearly full disk) must not pass for a whole file
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def letta_home(home: Path | None = None) -> Path:
    """`~/.letta` (`home`/.letta when given): where Letta tools keep per-agent state."""
    return (home or Path(os.path.expanduser("~"))) / ".letta"


def agent_dir(agent_id: str) -> Path:
    """`~/.letta/agents/<agent_id>`: the default mountpoint's parent, history, log and pid file.
    Raises ConfigError for an id that is not one path component (check_agent_id)."""
    return letta_home() / "agents" / check_agent_id(agent_id)


@dataclass
class Config:
    """One mount. Times are in seconds."""

    agent_id: str
    mountpoint: Path
    history_dir: Path
    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = field(default=None, repr=False)
    revalidate: float = 1.0
    poll_interval: float = 0.5  # attached listing
    full_poll_interval: float = 3.0  # full listing, at least (poller.FULL_COST_FACTOR)
    on_conflict: str = "overwrite"
    quiet_period: float = 1.0
    retry_budget: float = 10.0
    debug: bool = False
    git_remote: str | None = field(default=None, repr=False)  # may hold credentials
    memfs_base_url: str = DEFAULT_MEMFS_BASE_URL  # `memfuse serve` (LETTA_MEMFS_BASE_URL)

    @classmethod
    def build(cls, agent_id: str, mountpoint: str | None = None, *, base_url: str | None = None,
              history_dir: str | None = None, git_remote: str | None = None,
              **settings) -> "Config":
        """Fill the defaults: mountpoint `~/.letta/agents/<id>/memory`, history next to it as
        `memory.git`, base URL from `--base-url`, else LETTA_BASE_URL, else localhost:8283;
        git remote from `--git-remote`, else MEMFUSE_GIT_REMOTE, else none, with `{agent}` in
        it replaced by the agent id (one repository per agent: `mount --all`, the systemd unit);
        `memfuse serve`'s URL from LETTA_MEMFS_BASE_URL (letta-code's own variable), else
        serve's default (`memfs_url`)."""
        home = agent_dir(agent_id)
        return cls(
            agent_id=agent_id,
            mountpoint=Path(mountpoint).expanduser().absolute() if mountpoint else home / "memory",
            history_dir=(Path(history_dir).expanduser().absolute() if history_dir
                         else home / "memory.git"),
            base_url=base_url or os.environ.get("LETTA_BASE_URL") or DEFAULT_BASE_URL,
            api_key=os.environ.get("LETTA_API_KEY") or None,
            memfs_base_url=(os.environ.get(MEMFS_BASE_URL_ENV) or DEFAULT_MEMFS_BASE_URL
                            ).rstrip("/"),
            git_remote=(git_remote or os.environ.get(GIT_REMOTE_ENV) or "").replace(
                AGENT_PLACEHOLDER, agent_id) or None,
            **settings,
        )

    @property
    def memfs_url(self) -> str:
        """The agent's git endpoint, as letta-code builds it (`src/agent/memory-git.ts`):
        `<memfs_base_url>/v1/git/<agent-id>/state.git`. The mount's history names it as its
        `origin` (HistoryRepo.track), so letta-code finds the repository it expects."""
        return f"{self.memfs_base_url}/v1/git/{self.agent_id}/state.git"

    @property
    def state_dir(self) -> Path:
        """The agent's state directory: `~/.letta/agents/<id>`."""
        return agent_dir(self.agent_id)

    @property
    def journal_file(self) -> Path:
        """Writes the server could not take yet: beside the history, `<history>.journal`."""
        return self.history_dir.with_suffix(".journal")

    @property
    def block_map_file(self) -> Path:
        """Which block each history file is (blockmap.py), for a mount started while the
        server is away: beside the history, `<history>.blocks`."""
        return self.history_dir.with_suffix(".blocks")

    @property
    def attrs_file(self) -> Path:
        """The times and modes of the mount's files across mounts (fileattrs.py): beside the
        history, `<history>.attrs`."""
        return self.history_dir.with_suffix(".attrs")

    @property
    def writer_lock_file(self) -> Path:
        """The history's one-writer lock (writerlock.py), held by the mount daemon while it
        runs and by `memfuse serve` during a request: beside the history, `<history>.lock`."""
        return self.history_dir.with_suffix(".lock")

    @property
    def handoff_socket(self) -> Path:
        """Where the mount daemon answers `memfuse serve`'s requests for its agent (handoff.py):
        `<state_dir>/git.sock`, beside the pid file `serve` finds the mount by."""
        return self.state_dir / "git.sock"

    @property
    def log_file(self) -> Path:
        """The daemon's log: `<state_dir>/memfuse.log`."""
        return self.state_dir / "memfuse.log"

    @property
    def pid_file(self) -> Path:
        """The running daemon's record: `<state_dir>/memfuse.pid` (JSON)."""
        return self.state_dir / "memfuse.pid"

    @property
    def status_file(self) -> Path:
        """The status report: `<state_dir>/memfuse.status.json`."""
        return self.state_dir / "memfuse.status.json"


class JsonRecord:
    """A dataclass kept as one JSON object in a file (pid and status files)."""

    def save(self, path: Path) -> None:
        """Write atomically (tmp + rename), so a reader never sees half a file; mode 0600."""
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)
            f.write(json.dumps(asdict(self)) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path):
        """The record in `path`, or None when there is none or it cannot be read."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


@dataclass
class RunningMount(JsonRecord):
    """What a running daemon writes to its pid file so `umount`/`status` can find it."""

    agent_id: str
    mountpoint: str
    pid: int
    base_url: str
    log_file: str
    journal_file: str = ""  # "": written by a memfuse without a journal
    agent_name: str = ""  # the agent's `name` from `GET /v1/agents/{id}` at start-up; "" when
                          # unknown (a local-first start, or an older memfuse)

    def alive(self) -> bool:
        """Whether the daemon still runs: its pid exists and is a memfuse daemon (a pid taken
        by another program after a crash is not). When /proc hides the command line, a pid
        that exists counts as live: no mount is cleared behind a daemon that may be serving."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            pass
        return procs.is_memfuse_daemon(self.pid) is not False


def running_mounts(home: Path | None = None) -> list[tuple[Path, RunningMount]]:
    """Every pid file under `~/.letta/agents/*/memfuse.pid` (`home`/.letta/... when given)
    with its record; those that cannot be read are left out."""
    found = []
    for pid_file in sorted((letta_home(home) / "agents").glob("*/memfuse.pid")):
        record = RunningMount.load(pid_file)
        if record is not None:
            found.append((pid_file, record))
    return found
