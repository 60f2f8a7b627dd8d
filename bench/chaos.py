"""Chaos trials against a real mount and the real Letta server: nothing acknowledged is lost.

Each trial mounts one agent through a loopback TCP proxy (tests/integration/proxy.py), runs a
writer that writes numbered values to two block files, and every few writes creates a new
file or removes one it created (a change counts as acknowledged when close() or unlink()
returned 0), kills the daemon with SIGKILL at a random moment, and in half of the trials cuts
the proxy first so that changes are journaled. It then clears the dead mount, restores the
proxy, mounts again, waits for the journal to drain and checks:

- every block on the server holds the last acknowledged value for it, or a later one (the
  write in flight when the daemon died may have landed);
- every acknowledged new file is exactly one block the agent owns, with its value (or none,
  when an unlink of it got no answer: it may have been done, as the write in flight may have
  landed), and every acknowledged removal left no block the agent owns under that label;
- `git fsck --strict` of the history reports nothing.

Prints `acknowledged writes: N, lost: L, fsck errors: F` and returns the counts.
With `--outage SECONDS` it instead runs one outage of that length with a reader and a writer
going on and prints its figures (reads served and their latency, writes journaled, replay time).
Usage: LETTA_BASE_URL=... python bench/chaos.py [TRIALS] [--seed N] | --outage SECONDS
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.integration.proxy import Proxy  # noqa: E402  (the same proxy the tests cut)

MEMFUSE = str(Path(sys.executable).parent / "memfuse")
FILES = ("system/human.md", "system/notes.md")
VALUE = re.compile(r"trial (\d+) write (\d+)")


@dataclass
class Result:
    """What the trials saw: acknowledged writes, the ones lost, git fsck complaints."""

    acknowledged: int = 0
    lost: int = 0
    fsck_errors: int = 0
    details: list[str] = field(default_factory=list)


def _memfuse(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([MEMFUSE, *args], env=env, capture_output=True, text=True,
                            timeout=240)
    if check and result.returncode != 0:
        raise RuntimeError(f"memfuse {' '.join(args)}: {result.stderr.strip()}")
    return result


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def make_agent(api: httpx.Client) -> str:
    """A fresh agent with the two blocks the writer writes."""
    response = api.post("/v1/agents/", json={
        "name": f"memfuse-chaos-{uuid.uuid4().hex[:8]}", "model": "letta/letta-free",
        "embedding": "letta/letta-free", "include_base_tools": False,
        "memory_blocks": [{"label": "human", "value": "start\n", "description": "d"},
                          {"label": "notes", "value": "start\n", "description": "d"}]})
    response.raise_for_status()
    return response.json()["id"]


@dataclass
class Rig:
    """A fresh agent to mount with a HOME of its own, reaching the server through `proxy`:
    `env` for the memfuse commands, `state` the agent's state directory."""

    proxy: Proxy
    env: dict
    agent: str
    state: Path

    @property
    def mountpoint(self) -> Path:
        """The agent's default mountpoint."""
        return self.state / "memory"


@contextlib.contextmanager
def rig(api: httpx.Client, base_url: str, prefix: str, proxy=None):
    """A Rig for the server at `base_url` (through `proxy`, anything with `url` and `close()`;
    default: a new TCP Proxy); afterwards the proxy is closed, a mount left behind cleared,
    the agent deleted and the HOME removed."""
    url = urlparse(base_url)
    proxy = proxy or Proxy((url.hostname, url.port))
    home = tempfile.mkdtemp(prefix=prefix, dir=os.path.expanduser("~/.cache"))
    env = dict(os.environ, HOME=home, LETTA_BASE_URL=proxy.url)
    env.pop("LETTA_API_KEY", None)
    agent = make_agent(api)
    setup = Rig(proxy, env, agent, Path(home) / ".letta" / "agents" / agent)
    try:
        yield setup
    finally:
        proxy.close()
        if os.path.ismount(setup.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(setup.mountpoint)],
                           capture_output=True)
        api.delete(f"/v1/agents/{agent}")
        shutil.rmtree(home, ignore_errors=True)


def trial(api: httpx.Client, base_url: str, number: int, offline: bool, rng: random.Random,
          result: Result) -> None:
    """One trial (see the module's docstring); adds to `result`."""
    with rig(api, base_url, "memfuse-chaos-") as setup:
        _trial(api, setup, number, offline, rng, result)


class Writer:
    """A thread that writes numbered values (`{tag} write {seq}`) to the two block files of
    the mount at `mountpoint`, and every 10th change creates a new file or removes the oldest
    one it created. A change counts as acknowledged when close() or unlink() returned 0:
    `acked` file -> last acknowledged write's number, `created` new file -> its content,
    `removed` the new files whose unlink returned 0, `unlink_failed` those whose unlink failed
    (it may still have been done: the daemon killed after it, before its answer), `count` the
    acknowledged changes and
    `errors` errno -> how many calls failed with it. `pause` s between changes; new files go
    to `create_dirs` in turn ("": the mount's root, a detached block; "system/": attached)."""

    def __init__(self, mountpoint: Path, tag: str, pause: float = 0.0,
                 create_dirs: tuple[str, ...] = ("",)):
        self.mountpoint, self.tag, self.pause = mountpoint, tag, pause
        self.create_dirs = create_dirs
        self.acked: dict[str, int] = {}
        self.created: dict[str, str] = {}
        self.removed: set[str] = set()
        self.unlink_failed: set[str] = set()  # unlinks not acknowledged: may have taken effect
        self.count = 0
        self.errors: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Writer":
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        """Stop after the change in progress (waits up to `timeout` s for it)."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        mountpoint, seq = self.mountpoint, 0
        while not self._stop.is_set():
            seq += 1
            try:
                if seq % 10 == 0:  # a new file
                    folder = self.create_dirs[seq // 10 % len(self.create_dirs)]
                    name, value = f"{folder}new-{seq}.md", f"{self.tag} create {seq}\n"
                    with open(mountpoint / name, "w") as f:
                        f.write(value)
                    self.created[name] = value
                elif seq % 10 == 5 and self.created:  # remove the oldest new file
                    name = next(iter(self.created))  # the oldest
                    try:
                        os.unlink(mountpoint / name)
                    except OSError:  # no answer: it may have been done (the daemon killed
                        self.unlink_failed.add(name)  # after journaling it, before replying)
                        raise
                    del self.created[name]
                    self.removed.add(name)
                else:
                    name = FILES[seq % len(FILES)]
                    with open(mountpoint / name, "w") as f:
                        f.write(f"{self.tag} write {seq}\n")
                    self.acked[name] = seq
            except OSError as exc:  # not acknowledged
                self.errors[exc.errno] = self.errors.get(exc.errno, 0) + 1
                time.sleep(0.01)
                continue
            self.count += 1
            if self.pause:
                time.sleep(self.pause)


def check_server(api: httpx.Client, agent: str, writer: Writer, label: str, result: Result,
                 refused=lambda name, value: False) -> None:
    """Add `writer`'s acknowledged changes to `result` and count as lost each one the server
    does not hold: a block file without its last acknowledged value (or a later one), a new
    file that is not exactly one owned block with its value, a removed file the agent still
    owns. refused(name, value) -> True excuses a change reported refused (not lost)."""
    blocks = {b["label"]: b["value"] for b in
              api.get(f"/v1/agents/{agent}/core-memory/blocks").json()}
    result.acknowledged += writer.count
    for name, seq in writer.acked.items():
        found = VALUE.search(blocks[name.removeprefix("system/").removesuffix(".md")])
        if (found is None or int(found[2]) < seq) and \
                not refused(name, f"{writer.tag} write {seq}\n"):
            result.lost += 1
            result.details.append(f"{label}: {name} holds {found and found[0]!r}, "
                                  f"acknowledged write {seq}")
    owned: dict[str, list[str]] = {}
    for block in api.get("/v1/blocks/", params={"tags": f"owner:{agent}",
                                                 "limit": 1000}).json():
        owned.setdefault(block["label"], []).append(block["value"])
    for name, value in writer.created.items():
        if Path(name).stem not in owned and name in writer.unlink_failed:
            continue  # its unlink got no answer, as a write in flight may have landed
        if owned.get(Path(name).stem) != [value] and not refused(name, value):
            result.lost += 1
            result.details.append(f"{label}: new file {name} is "
                                  f"{owned.get(Path(name).stem)!r} on the server, not "
                                  f"[{value!r}]")
    for name in writer.removed:
        if Path(name).stem in owned and not refused(name, ""):
            result.lost += 1
            result.details.append(f"{label}: {name} was removed, yet the agent "
                                  f"still owns {owned[Path(name).stem]!r}")


def fsck(state: Path, label: str, result: Result) -> None:
    """`git fsck --strict` of the agent's history at `state`: a complaint adds to
    result.fsck_errors. Dangling objects are not complaints (a commit whose ref update failed,
    ENOSPC, and was made again is one)."""
    out = subprocess.run(["git", "--git-dir", str(state / "memory.git"), "fsck", "--strict",
                          "--no-dangling"],
                         capture_output=True, text=True)
    if out.returncode != 0 or out.stdout.strip():
        result.fsck_errors += 1
        result.details.append(f"{label}: git fsck: {out.stdout}{out.stderr}")


def wait_drained(env: dict, agent: str, state: Path, timeout: float = 60) -> float:
    """Seconds until `memfuse status` says the journal is empty; RuntimeError (after printing
    the status and the log's tail) when not within `timeout` s."""
    started = time.monotonic()
    try:
        _wait(lambda: "journal        empty" in _memfuse(env, "status", agent).stdout, timeout,
              "the journal drains")
    except RuntimeError:
        print(_memfuse(env, "status", agent, check=False).stdout, file=sys.stderr)
        print((state / "memfuse.log").read_text()[-3000:], file=sys.stderr)
        raise
    return time.monotonic() - started


def _trial(api: httpx.Client, setup: Rig, number: int, offline: bool, rng: random.Random,
           result: Result) -> None:
    proxy, env, agent, state = setup.proxy, setup.env, setup.agent, setup.state
    mountpoint = setup.mountpoint
    writer = Writer(mountpoint, f"trial {number}")
    try:
        _memfuse(env, "mount", agent)
        writer.start()
        time.sleep(rng.uniform(0.3, 1.5))
        if offline:
            proxy.cut()
            time.sleep(rng.uniform(0.5, 3.0))  # writes are journaled meanwhile
        pid = json.loads((state / "memfuse.pid").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        writer.stop(30)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        _memfuse(env, "umount", agent, check=False)
        if offline:
            proxy.restore()
        _memfuse(env, "mount", agent)
        wait_drained(env, agent, state)
        lost = len(result.details)
        check_server(api, agent, writer, f"trial {number}", result)
        _memfuse(env, "umount", agent)
        fsck(state, f"trial {number}", result)
        if len(result.details) > lost:
            result.details.append(evidence(setup, result.details[lost:]))
    finally:
        writer.stop(0)


def evidence(setup: Rig, complaints: list[str]) -> str:
    """What a failed trial leaves to explain it: the daemon log's lines that name a file the
    `complaints` name (both daemons' runs), and where a copy of the agent's state directory
    (log, journal, history) is kept for reading, `~/.cache/memfuse-chaos-kept/<agent>`."""
    names = set(re.findall(r"(?:new-\d+|human|notes)\.md", " ".join(complaints)))
    log = setup.state / "memfuse.log"
    lines = [line for line in (log.read_text(errors="replace").splitlines()
                               if log.exists() else [])
             if any(name in line for name in names) or "journal" in line
             or "Traceback" in line or "ERROR" in line]
    kept = Path(os.path.expanduser("~/.cache/memfuse-chaos-kept")) / setup.agent
    shutil.copytree(setup.state, kept, symlinks=True, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("memory"))
    return f"kept in {kept}; log lines:\n" + "\n".join(lines[-80:])


def outage(base_url: str, seconds: float = 60.0) -> dict:
    """One outage of `seconds` with a reader and a writer going on: the proxy is cut, then
    restored, and the journal left to drain. Returns the figures: reads served during the
    outage and their latency (ms, p50/p99/max), reads failed, writes acknowledged and
    journaled, and the replay time (s, from the restore until the journal is empty)."""
    with httpx.Client(base_url=base_url, timeout=30) as api, \
            rig(api, base_url, "memfuse-outage-") as setup:
        proxy, env, agent, state = setup.proxy, setup.env, setup.agent, setup.state
        mountpoint = setup.mountpoint
        reads: list[float] = []
        failed_reads = [0]
        writes = [0]
        last_ack = [0]
        stop, cut = threading.Event(), threading.Event()

        def reader() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    (mountpoint / FILES[0]).read_bytes()
                except OSError:
                    failed_reads[0] += 1
                    continue
                if cut.is_set():
                    reads.append(time.monotonic() - started)
                time.sleep(0.01)

        def writer() -> None:
            seq = 0
            while not stop.is_set():
                seq += 1
                try:
                    (mountpoint / FILES[1]).write_text(f"outage write {seq}\n")
                except OSError:
                    continue
                last_ack[0] = seq
                if cut.is_set():
                    writes[0] += 1
                time.sleep(0.05)

        try:
            _memfuse(env, "mount", agent, "--revalidate", "0.5")
            threads = [threading.Thread(target=f, daemon=True) for f in (reader, writer)]
            for thread in threads:
                thread.start()
            time.sleep(2)
            proxy.cut()
            cut.set()
            time.sleep(seconds)
            cut.clear()
            stop.set()
            for thread in threads:
                thread.join(30)
            journaled = len((state / "memory.journal").read_text().splitlines())
            restored = time.monotonic()
            proxy.restore()
            _wait(lambda: "journal        empty" in _memfuse(env, "status", agent).stdout, 120,
                  "the journal drains")
            replay = time.monotonic() - restored
            value = block_value(api, agent, "notes")
            _memfuse(env, "umount", agent)
        finally:
            stop.set()
    ms = sorted(r * 1000 for r in reads)
    return {"seconds": seconds, "reads": len(ms), "failed_reads": failed_reads[0],
            "read_p50_ms": ms[len(ms) // 2] if ms else None,
            "read_p99_ms": ms[int(len(ms) * 0.99)] if ms else None,
            "read_max_ms": ms[-1] if ms else None, "writes": writes[0],
            "journal_lines": journaled, "replay_s": replay,
            "last_acknowledged_write_on_server": value == f"outage write {last_ack[0]}\n"}


def block_value(api: httpx.Client, agent: str, label: str) -> str:
    """The value of the agent's attached block `label`."""
    blocks = api.get(f"/v1/agents/{agent}/core-memory/blocks").json()
    return next(b["value"] for b in blocks if b["label"] == label)


def run(base_url: str, trials: int, seed: int | None = None) -> Result:
    """`trials` trials, alternating online and offline; returns what they saw."""
    rng = random.Random(seed)
    result = Result()
    with httpx.Client(base_url=base_url, timeout=30) as api:
        for number in range(trials):
            trial(api, base_url, number, offline=number % 2 == 1, rng=rng, result=result)
    return result


def main() -> int:
    if "--outage" in sys.argv:
        seconds = float(sys.argv[sys.argv.index("--outage") + 1])
        figures = outage(os.environ["LETTA_BASE_URL"], seconds)
        print(json.dumps(figures, indent=1))
        return 0 if figures["failed_reads"] == 0 else 1
    trials = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 10
    seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else None
    started = time.monotonic()
    result = run(os.environ["LETTA_BASE_URL"], trials, seed)
    for line in result.details:
        print(line)
    print(f"trials: {trials} ({trials - trials // 2} online, {trials // 2} offline) in "
          f"{time.monotonic() - started:.0f} s")
    print(f"acknowledged writes: {result.acknowledged}, lost: {result.lost}, "
          f"fsck errors: {result.fsck_errors}")
    return 0 if result.lost == 0 and result.fsck_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
