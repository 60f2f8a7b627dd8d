"""Scale benchmark: memfuse mounts of N detached blocks (N = 100, 1,000, 10,000), side by side
with the same files on tmpfs, against the real Letta server (loopback). Issue 10, points 3-4.

Population (reused across runs): an agent named `memfuse-scale-<N>` with 3 attached blocks of
about 2 KB and N detached blocks `note-00001` ... of about 5 KB, tagged `owner:<agent-id>`,
created through `POST /v1/blocks/` with a few concurrent requests and topped up when some are
missing. The text is varied; `WORD` appears in every `WORD_EVERY`-th note only.

Measured for each N, one mount at a time, each in a private HOME (nothing touches ~/.letta):
- mount: wall time of `memfuse mount` until it returns (then the mount is checked usable: the
  root lists and a block file reads), and the daemon's RSS (/proc/<pid>/status VmRSS) after it;
- readable: every block file is read once (wall time), and a sample of them is compared byte
  for byte with the server's values;
- idle: from 5 s after the mount, over an idle window (30 s; --idle), the daemon's CPU
  (utime+stime from /proc/<pid>/stat, as % of one core) and the requests and received bytes
  per second (the `requests` and `received_bytes` counters of memfuse.status.json);
- grep: `grep -rl WORD` over the mount, cold (after 3 s without reads) and warm (again at
  once), and over a copy of the same files on a tmpfs (/dev/shm) in the same run, cold and warm;
  capped at --grep-timeout seconds (120), reported as "> 120 s".
- floors, in the same run once the mount is gone: the raw listing (one GET of every owned
  block), bare polling (bench/pollfloor.py: httpx on the poller's schedule, nothing else) and
  a minimal pyfuse3 filesystem serving the same files (bench/minimalfs.py --tree): its mount
  time, RSS, idle CPU and grep.
At N = 1,000 (or the size given by --latency-at) also, with interleaved samples:
- warm open+read+close of a 2 KB block file against the minimal pyfuse3 filesystem and tmpfs;
- server -> file: PATCH a block through the API, then read the file every 10 ms until it shows
  the new value; attached and detached blocks, p50/p95 over --edits edits (20) each; once with
  default flags (an open revalidates after 1 s) and once with --revalidate 3600 (poller only);
- write acknowledgement: open/write/close through the mount, a raw PATCH, a GET + PATCH
  (httpx, one keep-alive connection), medians;
- edit -> commit: a write through the mount until `git log` of the history shows a new commit.

Writes the section "Scale" of bench/results.md (between its markers, leaving the rest alone) and
plots bench/scale.png (matplotlib, the `bench` extra).

Usage: LETTA_BASE_URL=... python bench/scale.py [--sizes 100,1000,10000] [--idle 30]
       [--populate-only] [--results bench/results.md] [--plot bench/scale.png]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from sections import replace_section
from warm_read import per_op_us

BASE = os.environ.get("LETTA_BASE_URL", "http://127.0.0.1:8385")
MEMFUSE = str(Path(sys.executable).parent / "memfuse")
HERE = Path(__file__).resolve().parent

NOTE_BYTES = 5000        # characters of a detached note's value
ATTACHED_BYTES = 2000    # characters of an attached block's value
ATTACHED = ("human", "persona", "scale/context")
WORD = "quetzalcoatl"    # the grep target
WORD_EVERY = 97          # WORD is in notes whose number is a multiple of this
LIMIT = 20000            # each block's character limit
PAGE = 100               # blocks per list page
WORKERS = 8              # concurrent POSTs while populating

WORDS = ("memory block agent letta server mount kernel cache page poll list fuse python trio "
         "httpx dulwich commit history journal replay conflict value label limit tag owner "
         "detached attached system prompt editor grep latency throughput note river mountain "
         "harbor lantern copper violet orchard meadow glacier canyon ember thistle falcon "
         "granite saffron willow cobalt juniper marble quartz tundra velvet").split()


# --- population -----------------------------------------------------------------------------

def note_label(i: int) -> str:
    """The label of note number `i` (1-based): `note-00001`."""
    return f"note-{i:05d}"


def note_value(i: int, size: int = NOTE_BYTES) -> str:
    """Deterministic, varied text of about `size` characters for note `i`; contains WORD iff
    `i % WORD_EVERY == 0`."""
    rng = random.Random(i)
    lines = [f"# Note {i}", ""]
    if i % WORD_EVERY == 0:
        lines.append(f"This note mentions {WORD} on purpose.")
    length = sum(len(line) + 1 for line in lines)
    while length < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
        lines.append(line)
        length += len(line) + 1
    return "\n".join(lines)[:size].rstrip() + "\n"


def find_agent(api: httpx.Client, name: str) -> str | None:
    """The id of the agent named `name`, or None."""
    response = api.get("/v1/agents/", params={"name": name, "limit": 10})
    response.raise_for_status()
    matches = [a["id"] for a in response.json() if a.get("name") == name]
    return matches[0] if matches else None


def create_agent(api: httpx.Client, name: str) -> str:
    """Create `name` with the attached blocks of ATTACHED (about ATTACHED_BYTES each); its id."""
    blocks = [{"label": label, "value": note_value(10_000_000 + k, ATTACHED_BYTES),
               "description": f"attached block {label}", "limit": LIMIT}
              for k, label in enumerate(ATTACHED)]
    response = api.post("/v1/agents/", json={
        "name": name, "model": "letta/letta-free", "embedding": "letta/letta-free",
        "include_base_tools": False, "memory_blocks": blocks})
    response.raise_for_status()
    return response.json()["id"]


def owned_blocks(api: httpx.Client, agent_id: str) -> list[dict]:
    """Every block tagged `owner:<agent_id>` (paginated by PAGE)."""
    blocks: list[dict] = []
    after = None
    while True:
        params = {"tags": f"owner:{agent_id}", "limit": PAGE, **({"after": after} if after else {})}
        response = api.get("/v1/blocks/", params=params, timeout=120)
        response.raise_for_status()
        page = response.json()
        blocks.extend(page)
        if len(page) < PAGE:
            return blocks
        after = page[-1]["id"]


def ensure_population(api: httpx.Client, n: int) -> str:
    """The id of agent `memfuse-scale-<n>`, created if missing, with notes 1..n all present
    (the missing ones created with WORKERS concurrent POSTs; progress on stdout)."""
    name = f"memfuse-scale-{n}"
    agent_id = find_agent(api, name) or create_agent(api, name)
    have = {b["label"] for b in owned_blocks(api, agent_id)}
    missing = [i for i in range(1, n + 1) if note_label(i) not in have]
    print(f"[populate] {name} ({agent_id}): {n - len(missing)} of {n} notes present", flush=True)
    if not missing:
        return agent_id
    started = time.monotonic()
    done = 0
    lock = threading.Lock()
    local = threading.local()

    def create(i: int) -> None:
        nonlocal done
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=BASE, timeout=120)
        for attempt in range(5):
            try:
                response = client.post("/v1/blocks/", json={
                    "label": note_label(i), "value": note_value(i), "limit": LIMIT,
                    "description": f"scale note {i}", "tags": [f"owner:{agent_id}"]})
                response.raise_for_status()
                break
            except httpx.HTTPError:
                if attempt == 4:
                    raise
                time.sleep(1 + attempt)
        with lock:
            done += 1
            if done % 250 == 0 or done == len(missing):
                rate = done / (time.monotonic() - started)
                print(f"[populate] {name}: created {done} of {len(missing)} "
                      f"({rate:.0f}/s, {(len(missing) - done) / rate:.0f} s left)", flush=True)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(create, missing))
    return agent_id


# --- one mount -----------------------------------------------------------------------------

@dataclass
class Mount:
    """A running memfuse mount in a private HOME."""

    agent_id: str
    home: str
    mountpoint: str
    env: dict
    seconds: float        # wall time of `memfuse mount` until it returned
    stderr: str           # what `memfuse mount` printed on stderr (progress, notices)
    listed: int           # block files (`*.md`) listed at once after it returned

    @property
    def state_dir(self) -> Path:
        """`$HOME/.letta/agents/<id>`: log, pid and status files."""
        return Path(self.home) / ".letta" / "agents" / self.agent_id

    @property
    def history_dir(self) -> Path:
        """The history repository (config.py: `memory.git` beside the mount)."""
        return self.state_dir / "memory.git"

    def status(self) -> dict:
        """memfuse.status.json as a dict (retried while the daemon rewrites it)."""
        for _ in range(50):
            try:
                return json.loads((self.state_dir / "memfuse.status.json").read_text())
            except (OSError, ValueError):
                time.sleep(0.1)
        raise RuntimeError("no status file")

    def pid(self) -> int:
        """The daemon's process id (from its status file)."""
        return int(self.status()["pid"])


def mount(agent_id: str, *flags: str) -> Mount:
    """`memfuse mount` of `agent_id` in a fresh private HOME; raises when it fails or returns
    before the mount is usable."""
    home = tempfile.mkdtemp(prefix="memfuse-scale-", dir=os.path.expanduser("~/.cache"))
    mountpoint = os.path.join(home, "memory")
    env = dict(os.environ, HOME=home, LETTA_BASE_URL=BASE)
    started = time.monotonic()
    done = subprocess.run([MEMFUSE, "mount", agent_id, mountpoint, *flags], env=env,
                          capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"memfuse mount failed: {done.stderr.strip()}")
    if not os.path.ismount(mountpoint) or "system" not in os.listdir(mountpoint):
        raise RuntimeError("memfuse mount returned before the mount was usable")
    listed = sum(name.endswith(".md") for name in os.listdir(mountpoint)) + sum(
        name.endswith(".md") for _, _, names in os.walk(os.path.join(mountpoint, "system"))
        for name in names)
    return Mount(agent_id, home, mountpoint, env, seconds, done.stderr.strip(), listed)


def umount(m: Mount) -> None:
    """`memfuse umount`, then remove the private HOME."""
    subprocess.run([MEMFUSE, "umount", m.mountpoint], env=m.env, capture_output=True,
                   timeout=300)
    shutil.rmtree(m.home, ignore_errors=True)


def log_problems(m: Mount) -> list[str]:
    """The WARNING/ERROR/Traceback lines of the daemon's log."""
    try:
        lines = (m.state_dir / "memfuse.log").read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if "ERROR" in line or "WARNING" in line or "Traceback" in line]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process `pid` (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def idle(m: Mount, seconds: float) -> tuple[float, float, float]:
    """Over `seconds` of no file access: (% of one core, requests/s, kB/s received) of the
    daemon; request counts from memfuse.status.json (rates over its own timestamps)."""
    pid = m.pid()
    s0, c0, t0 = m.status(), cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    s1, c1, t1 = m.status(), cpu_seconds(pid), time.monotonic()
    span = (s1["updated_at"] - s0["updated_at"]) or (t1 - t0)
    return ((c1 - c0) / (t1 - t0) * 100, (s1["requests"] - s0["requests"]) / span,
            (s1["received_bytes"] - s0["received_bytes"]) / span / 1000)


def read_all(root: str, copy_to: str) -> tuple[int, float]:
    """Read every block file (`*.md`) under `root` once, writing a copy under `copy_to`;
    (files read, wall seconds)."""
    count = 0
    started = time.monotonic()
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        target = os.path.join(copy_to, os.path.relpath(directory, root))
        os.makedirs(target, exist_ok=True)
        for name in files:
            if name.endswith(".md"):
                with open(os.path.join(directory, name), "rb") as f:
                    data = f.read()
                with open(os.path.join(target, name), "wb") as f:
                    f.write(data)
                count += 1
    return count, time.monotonic() - started


def compare_sample(api: httpx.Client, m: Mount, agent_id: str, k: int = 10) -> int:
    """Compare `k` random notes' files with the server's values; the number that differ."""
    blocks = {b["label"]: b for b in owned_blocks(api, agent_id)}
    bad = 0
    for label in random.Random(0).sample(sorted(blocks), min(k, len(blocks))):
        text = Path(m.mountpoint, label + ".md").read_text()
        if text.split("---\n", 2)[-1] != blocks[label]["value"]:
            bad += 1
    return bad


def grep(root: str, timeout: float) -> tuple[float | None, set[str]]:
    """`grep -rl WORD root`: (wall seconds, or None past `timeout`; the matching paths
    relative to `root`)."""
    started = time.monotonic()
    try:
        done = subprocess.run(["grep", "-rl", WORD, root], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, set()
    return (time.monotonic() - started,
            {os.path.relpath(p, root) for p in done.stdout.splitlines()})


def raw_list_s(api: httpx.Client, agent_id: str, n: int) -> float:
    """Wall seconds of one GET of every block the agent owns (`limit` past N, one page),
    the median of 3: the floor of a mount's load and of the listing a burst of opens waits
    for."""
    times = []
    for _ in range(3):
        started = time.monotonic()
        api.get("/v1/blocks/", params={"tags": f"owner:{agent_id}", "limit": n + 100},
                timeout=300).raise_for_status()
        times.append(time.monotonic() - started)
    return statistics.median(times)


def poll_floor(agent_id: str, seconds: float) -> dict:
    """bench/pollfloor.py over `seconds`: {"cpu_pct", "req_s"} of a bare httpx client on the
    poller's schedule."""
    done = subprocess.run([sys.executable, str(HERE / "pollfloor.py"), BASE, agent_id,
                           str(seconds)], capture_output=True, text=True, check=True,
                          timeout=seconds + 300)
    return json.loads(done.stdout)


def minimal_floor(src: str, idle_s: float, grep_timeout: float) -> dict:
    """bench/minimalfs.py --tree `src` (the same files as the mount): seconds from start until
    mounted, RSS (MB), idle CPU (% of a core over `idle_s`), grep -rl cold (its first pass)
    and warm."""
    mountpoint = tempfile.mkdtemp(prefix="memfuse-minimal-", dir=os.path.expanduser("~/.cache"))
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(HERE / "minimalfs.py"), mountpoint, "--tree",
                             src])
    try:
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() - started > 300:
                raise RuntimeError("minimalfs.py did not mount")
            time.sleep(0.01)
        figures = {"mount_s": time.monotonic() - started, "rss_mb": rss_mb(proc.pid)}
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(idle_s)
        figures["idle_cpu_pct"] = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0) * 100
        figures["grep_cold_s"], _ = grep(mountpoint, grep_timeout)
        figures["grep_warm_s"], _ = grep(mountpoint, grep_timeout)
        return figures
    finally:
        subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True)
        proc.wait(timeout=60)
        os.rmdir(mountpoint)


@dataclass
class ScaleRow:
    """The figures of one N. Seconds, MB, % of one core, requests/s, kB/s; None: not reached."""

    n: int
    run_at: str
    mount_s: float
    rss_mount_mb: float
    listed_at_mount: int | None = None  # block files listed right after `memfuse mount` returned
    mount_stderr: str = ""  # the last line `memfuse mount` printed on stderr
    rss_end_mb: float = 0.0
    idle_cpu_pct: float = 0.0
    idle_req_s: float = 0.0
    idle_kb_s: float = 0.0
    idle_window_s: float = 0.0
    files_read: int = 0
    read_all_s: float = 0.0
    sample_mismatches: int = 0
    grep_cold_s: float | None = None
    grep_warm_s: float | None = None
    tmpfs_cold_s: float = 0.0
    tmpfs_warm_s: float = 0.0
    grep_same_files: bool = False
    grep_timeout_s: float = 120.0
    log_problems: list[str] = field(default_factory=list)
    # floors measured in the same run (None: a row from a run before they were measured)
    raw_list_s: float | None = None        # one raw GET of every owned block (httpx), median of 3
    poll_floor_cpu_pct: float | None = None  # bare httpx on the poller's schedule (pollfloor.py)
    poll_floor_req_s: float | None = None
    minimal_mount_s: float | None = None   # minimalfs.py --tree over the same files: start..mounted
    minimal_rss_mb: float | None = None
    minimal_idle_cpu_pct: float | None = None
    minimal_grep_cold_s: float | None = None  # its first pass (nothing in the kernel yet)
    minimal_grep_warm_s: float | None = None


def measure_scale(api: httpx.Client, agent_id: str, n: int, idle_s: float,
                  grep_timeout: float) -> ScaleRow:
    """Mount `agent_id` (N notes) and measure mount time, RSS, the idle window, reading every
    file, and grep against a tmpfs copy; see the module docstring."""
    m = mount(agent_id)
    mounted_at = time.monotonic()
    shm = tempfile.mkdtemp(prefix="memfuse-scale-", dir="/dev/shm")
    unmounted = False
    try:
        pid = m.pid()
        row = ScaleRow(n=n, run_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       mount_s=m.seconds, rss_mount_mb=rss_mb(pid), grep_timeout_s=grep_timeout,
                       listed_at_mount=m.listed,
                       mount_stderr=m.stderr.splitlines()[-1] if m.stderr else "")
        print(f"[N={n}] mount {row.mount_s:.2f} s ({m.listed} files listed at return; stderr: "
              f"{row.mount_stderr or 'nothing'}), RSS {row.rss_mount_mb:.0f} MB", flush=True)
        time.sleep(max(0.0, mounted_at + 5 - time.monotonic()))
        row.idle_cpu_pct, row.idle_req_s, row.idle_kb_s = idle(m, idle_s)
        row.idle_window_s = idle_s
        print(f"[N={n}] idle over {idle_s:.0f} s: {row.idle_cpu_pct:.1f} % CPU, "
              f"{row.idle_req_s:.1f} requests/s, {row.idle_kb_s:.0f} kB/s", flush=True)
        row.files_read, row.read_all_s = read_all(m.mountpoint, shm)
        row.sample_mismatches = compare_sample(api, m, agent_id)
        print(f"[N={n}] read {row.files_read} files in {row.read_all_s:.2f} s; "
              f"{row.sample_mismatches} of 10 sampled differ from the server", flush=True)
        time.sleep(3)  # cold: nothing read for 3 s
        row.grep_cold_s, found_cold = grep(m.mountpoint, grep_timeout)
        row.grep_warm_s, found_warm = grep(m.mountpoint, grep_timeout)
        row.tmpfs_cold_s, found_tmpfs = grep(shm, grep_timeout)
        row.tmpfs_warm_s, _ = grep(shm, grep_timeout)
        expected = {note_label(i) + ".md" for i in range(WORD_EVERY, n + 1, WORD_EVERY)}
        row.grep_same_files = found_tmpfs == expected and (
            row.grep_cold_s is None or found_cold == expected) and (
            row.grep_warm_s is None or found_warm == expected)
        print(f"[N={n}] grep -rl mount cold {fmt_s(row.grep_cold_s, grep_timeout)}, warm "
              f"{fmt_s(row.grep_warm_s, grep_timeout)}; tmpfs {row.tmpfs_cold_s:.3f} s, "
              f"{row.tmpfs_warm_s:.3f} s; {len(expected)} files expected, "
              f"{'all found' if row.grep_same_files else 'MISMATCH'}", flush=True)
        row.rss_end_mb = rss_mb(pid)
        row.log_problems = log_problems(m)[:20]
        umount(m)  # the floors run alone: nothing else polls the server meanwhile
        unmounted = True
        # the floors, in the same run: the raw listing, bare polling, a minimal pyfuse3 tree
        row.raw_list_s = raw_list_s(api, agent_id, n)
        floor = poll_floor(agent_id, idle_s)
        row.poll_floor_cpu_pct, row.poll_floor_req_s = floor["cpu_pct"], floor["req_s"]
        minimal = minimal_floor(shm, idle_s, grep_timeout)
        row.minimal_mount_s, row.minimal_rss_mb = minimal["mount_s"], minimal["rss_mb"]
        row.minimal_idle_cpu_pct = minimal["idle_cpu_pct"]
        row.minimal_grep_cold_s = minimal["grep_cold_s"]
        row.minimal_grep_warm_s = minimal["grep_warm_s"]
        print(f"[N={n}] floors: raw listing {row.raw_list_s:.3f} s; bare polling "
              f"{row.poll_floor_cpu_pct:.2f} % CPU, {row.poll_floor_req_s:.1f} requests/s; "
              f"minimal pyfuse3 mount {row.minimal_mount_s:.2f} s, RSS {row.minimal_rss_mb:.0f} "
              f"MB, idle {row.minimal_idle_cpu_pct:.2f} %, grep "
              f"{fmt_s(row.minimal_grep_cold_s, grep_timeout)} / "
              f"{fmt_s(row.minimal_grep_warm_s, grep_timeout)}", flush=True)
        return row
    finally:
        if not unmounted:
            umount(m)
        shutil.rmtree(shm, ignore_errors=True)


def fmt_s(seconds: float | None, timeout: float) -> str:
    """`1.234 s`, or `> 120 s` when it timed out."""
    return f"> {timeout:.0f} s" if seconds is None else f"{seconds:.3f} s"


# --- latencies at one N --------------------------------------------------------------------

def pct(samples: list[float], q: float) -> float:
    """The q-quantile (0..1) of `samples`, nearest rank, in milliseconds."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000


def wait_for(path: str, value: str, limit: float = 60) -> float:
    """Read `path` every 10 ms until its value (after the frontmatter) is `value`; seconds."""
    started = time.monotonic()
    while True:
        with open(path) as f:
            if f.read().split("---\n", 2)[-1] == value:
                return time.monotonic() - started
        if time.monotonic() - started > limit:
            raise RuntimeError(f"{path}: the new value did not show within {limit} s")
        time.sleep(0.01)


def server_to_file(api: httpx.Client, m: Mount, blocks: dict[str, str], edits: int
                   ) -> dict[str, list[float]]:
    """For each kind ("attached", "detached") -> its block id in `blocks`: `edits` PATCHes
    through the API, interleaved, each timed until the file shows it; seconds per kind."""
    paths = {"attached": os.path.join(m.mountpoint, "system", "human.md"),
             "detached": os.path.join(m.mountpoint, note_label(1) + ".md")}
    delays: dict[str, list[float]] = {kind: [] for kind in blocks}
    rng = random.Random(1)
    for i in range(edits):
        for kind, block_id in blocks.items():
            value = f"server edit {i} {uuid.uuid4().hex}\n"
            api.patch(f"/v1/blocks/{block_id}", json={"value": value}).raise_for_status()
            delays[kind].append(wait_for(paths[kind], value))
            time.sleep(rng.uniform(0, 1))  # spread the edits over the poll phase
    return delays


def write_ack(api: httpx.Client, m: Mount, block_id: str, rounds: int) -> dict[str, list[float]]:
    """Interleaved, `rounds` each: open/write/close of system/human.md through the mount; one
    raw PATCH and a GET + PATCH (httpx, keep-alive) of block `block_id` (another attached block
    of the same size, so the API writes never make the mount's writes conflicts). Seconds per
    way."""
    path = os.path.join(m.mountpoint, "system", "human.md")
    times: dict[str, list[float]] = {"mount": [], "patch": [], "get+patch": []}
    for i in range(rounds):
        started = time.monotonic()
        with open(path, "w") as f:
            f.write(f"mount write {i}\n")
        times["mount"].append(time.monotonic() - started)
        started = time.monotonic()
        api.patch(f"/v1/blocks/{block_id}", json={"value": f"api write {i}\n"}).raise_for_status()
        times["patch"].append(time.monotonic() - started)
        started = time.monotonic()
        api.get(f"/v1/blocks/{block_id}").raise_for_status()
        api.patch(f"/v1/blocks/{block_id}", json={"value": f"api rw {i}\n"}).raise_for_status()
        times["get+patch"].append(time.monotonic() - started)
        time.sleep(0.2)
    return times


def head(m: Mount) -> str:
    """The history's newest commit id ("" when none)."""
    done = subprocess.run(["git", "--git-dir", str(m.history_dir), "log", "-1", "--format=%H"],
                          capture_output=True, text=True)
    return done.stdout.strip()


def edit_to_commit(m: Mount, rounds: int) -> list[float]:
    """`rounds` writes of system/human.md through the mount, each timed from open until the
    history shows a new commit (polled every 20 ms); seconds."""
    path = os.path.join(m.mountpoint, "system", "human.md")
    delays = []
    for i in range(rounds):
        time.sleep(1.5)  # let the previous quiet period end
        before = head(m)
        started = time.monotonic()
        with open(path, "w") as f:
            f.write(f"commit me {i} {uuid.uuid4().hex}\n")
        while head(m) == before:
            if time.monotonic() - started > 60:
                raise RuntimeError("no commit within 60 s")
            time.sleep(0.02)
        delays.append(time.monotonic() - started)
    return delays


@dataclass
class LatencyRow:
    """Latencies at one N, in milliseconds."""

    n: int
    run_at: str
    edits: int
    visible: dict = field(default_factory=dict)   # "<flags>/<kind>" -> [p50, p95, max]
    write_ms: dict = field(default_factory=dict)  # way -> median
    commit_ms: list = field(default_factory=list)  # [p50, p95, max]
    log_problems: list = field(default_factory=list)
    warm_us: dict = field(default_factory=dict)  # "tmpfs"/"minimal"/"memfuse" -> median µs


def warm_read(m: Mount, rounds: int = 15, per_round: int = 300) -> dict[str, float]:
    """Warm open+read+close of `system/human.md` (an attached block of about 2 KB) through
    the mount, of a copy on tmpfs, and of a copy served by the minimal pyfuse3 filesystem,
    in interleaved rounds (bench/warm_read.py): the median microseconds of each."""
    data = Path(m.mountpoint, "system", "human.md").read_bytes()
    shm = tempfile.mkdtemp(prefix="memfuse-warm-", dir="/dev/shm")
    mountpoint = tempfile.mkdtemp(prefix="memfuse-minimal-", dir=os.path.expanduser("~/.cache"))
    Path(shm, "human.md").write_bytes(data)
    proc = subprocess.Popen([sys.executable, str(HERE / "minimalfs.py"), mountpoint, "--tree",
                             shm])
    try:
        started = time.monotonic()
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() - started > 60:
                raise RuntimeError("minimalfs.py did not mount")
            time.sleep(0.01)
        paths = {"tmpfs": os.path.join(shm, "human.md"),
                 "minimal": os.path.join(mountpoint, "human.md"),
                 "memfuse": os.path.join(m.mountpoint, "system", "human.md")}
        for path in paths.values():
            per_op_us(path, 50)  # warm every cache
        times: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(rounds):
            for kind, path in paths.items():
                times[kind].append(per_op_us(path, per_round))
        return {k: statistics.median(v) for k, v in times.items()}
    finally:
        subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True)
        proc.wait(timeout=60)
        os.rmdir(mountpoint)
        shutil.rmtree(shm, ignore_errors=True)


def measure_latency(api: httpx.Client, agent_id: str, n: int, edits: int) -> LatencyRow:
    """Server -> file (default flags and --revalidate 3600), write acknowledgement and
    edit -> commit on the mount of `agent_id`; the edited note is restored afterwards."""
    row = LatencyRow(n=n, run_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), edits=edits)
    attached = {b["label"]: b["id"] for b in
                api.get(f"/v1/agents/{agent_id}/core-memory/blocks").json()}
    note = next(b for b in owned_blocks(api, agent_id) if b["label"] == note_label(1))
    blocks = {"attached": attached["human"], "detached": note["id"]}
    try:
        for name, flags in (("default", ()), ("revalidate 3600", ("--revalidate", "3600"))):
            m = mount(agent_id, *flags)
            try:
                time.sleep(2)
                if name == "default":
                    row.warm_us = warm_read(m)
                    print(f"[N={n}] warm open+read+close: " + ", ".join(
                        f"{k} {v:.1f} µs" for k, v in row.warm_us.items()), flush=True)
                delays = server_to_file(api, m, blocks, edits)
                for kind, samples in delays.items():
                    row.visible[f"{name}/{kind}"] = [pct(samples, 0.5), pct(samples, 0.95),
                                                     max(samples) * 1000]
                    print(f"[N={n}] server -> file, {name}, {kind}: p50 "
                          f"{pct(samples, 0.5):.0f} ms, p95 {pct(samples, 0.95):.0f} ms",
                          flush=True)
                if name == "default":
                    times = write_ack(api, m, attached["persona"], edits)
                    row.write_ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
                    print(f"[N={n}] write ack medians: " + ", ".join(
                        f"{k} {v:.1f} ms" for k, v in row.write_ms.items()), flush=True)
                    commits = edit_to_commit(m, max(5, edits // 2))
                    row.commit_ms = [pct(commits, 0.5), pct(commits, 0.95), max(commits) * 1000]
                    print(f"[N={n}] edit -> commit p50 {row.commit_ms[0]:.0f} ms", flush=True)
                row.log_problems += log_problems(m)[:10]
            finally:
                umount(m)
    finally:
        api.patch(f"/v1/blocks/{note['id']}", json={"value": note_value(1)})
        for k, label in enumerate(ATTACHED[:2]):
            api.patch(f"/v1/blocks/{attached[label]}",
                      json={"value": note_value(10_000_000 + k, ATTACHED_BYTES)})
    return row


# --- results -------------------------------------------------------------------------------

TARGETS = {  # the targets by N: (mount s, RSS MB, idle % CPU, requests/s, grep s)
    1000: (None, None, 1.0, 3.0, 0.1),
    10000: (15.0, 250.0, None, None, 1.0),
}


def ratio(a: float | None, b: float, timeout: float) -> str:
    """`a / b` as `12.3x`, `> 1234x` when `a` timed out."""
    if a is None:
        return f"> {timeout / b:,.0f}x"
    return f"{a / b:,.1f}x"


def target(value: float | None, unit: str, reached: float | None) -> str:
    """`≤ 15 s (met)`, `≤ 15 s (not met)`, or `—` when the issue sets none."""
    if value is None:
        return "—"
    met = reached is not None and reached <= value
    return f"≤ {value:g} {unit} ({'met' if met else 'not met'})"


def render(data: dict) -> str:
    """The markdown of the Scale section from the stored figures (`data` of scale.json)."""
    rows = [ScaleRow(**r) for _, r in sorted(data["scale"].items(), key=lambda kv: int(kv[0]))]
    out = [
        "## Scale: N detached blocks of 5 KB (`scripts/bench scale`; issue 10)",
        "",
        f"{platform.machine()}, {os.cpu_count()} cores, Letta 0.16.8 on loopback "
        f"({BASE}), default flags (revalidate 1 s; attached listing every 0.5 s, full listing every 3 s). Each N: an agent with N notes "
        f"of {NOTE_BYTES:,} characters (`note-00001.md`, ...) and {len(ATTACHED)} attached "
        f"blocks of {ATTACHED_BYTES:,}; `{WORD}` is in every {WORD_EVERY}th note. Rows are "
        "from the run named in them (a quick run with `--sizes` refreshes its rows only; the "
        "raw figures are in bench/scale.json). Shared machine: read the ratios.",
        "",
        "| N | run | `memfuse mount` (block files listed when it returned) | target | RSS after mount / after reading all | target "
        "| idle CPU (% of a core) | target | idle requests/s | target | idle kB/s received "
        "| read every file once | 10 sampled equal to the server |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = TARGETS.get(r.n, (None,) * 5)
        out.append(
            f"| {r.n:,} | {r.run_at} | {r.mount_s:.2f} s ("
            f"{'—' if r.listed_at_mount is None else format(r.listed_at_mount, ',')}) "
            f"| {target(t[0], 's', r.mount_s)} "
            f"| {r.rss_mount_mb:.0f} / {r.rss_end_mb:.0f} MB "
            f"| {target(t[1], 'MB', max(r.rss_mount_mb, r.rss_end_mb))} "
            f"| {r.idle_cpu_pct:.1f} % (over {r.idle_window_s:.0f} s) "
            f"| {target(t[2], '%', r.idle_cpu_pct)} | {r.idle_req_s:.1f} "
            f"| {target(t[3], '/s', r.idle_req_s)} | {r.idle_kb_s:,.0f} "
            f"| {r.files_read:,} files in {r.read_all_s:.2f} s "
            f"| {10 - r.sample_mismatches} of 10 |")
    out += ["", "`memfuse mount` printed on stderr (its last line): " + "; ".join(
        f"N = {r.n:,}: " + (f"`{r.mount_stderr}`" if r.mount_stderr else "nothing")
        for r in rows) + "."]
    floored = [r for r in rows if r.raw_list_s is not None]
    if floored:
        out += [
            "",
            "Floors, measured in the same run once the mount is gone: the raw listing (one GET "
            "of every owned block, httpx, median of 3: what any mount of these blocks must "
            "receive), bare polling (`bench/pollfloor.py`: httpx making the poller's requests "
            "on its schedule, nothing else), and a minimal pyfuse3 filesystem serving the "
            "same files from memory (`bench/minimalfs.py --tree`).",
            "",
            "| N | `memfuse mount` | raw listing | ratio | minimal pyfuse3 mount | RSS after "
            "mount: memfuse | minimal pyfuse3 | ratio | idle CPU: memfuse | bare polling "
            "| ratio | minimal pyfuse3 idle | idle requests/s: memfuse / bare polling |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in floored:
            out.append(
                f"| {r.n:,} | {r.mount_s:.2f} s | {r.raw_list_s:.2f} s "
                f"| {r.mount_s / r.raw_list_s:.1f}x | {r.minimal_mount_s:.2f} s "
                f"| {r.rss_mount_mb:.0f} MB | {r.minimal_rss_mb:.0f} MB "
                f"| {r.rss_mount_mb / r.minimal_rss_mb:.1f}x | {r.idle_cpu_pct:.2f} % "
                f"| {r.poll_floor_cpu_pct:.2f} % "
                f"| {r.idle_cpu_pct / max(r.poll_floor_cpu_pct, 0.01):.1f}x "
                f"| {r.minimal_idle_cpu_pct:.2f} % "
                f"| {r.idle_req_s:.1f} / {r.poll_floor_req_s:.1f} |")
    out += [
        "",
        f"`grep -rl {WORD}` over the mount, cold (after 3 s without reads) then warm (again at "
        "once), and over a copy of the same files on tmpfs (/dev/shm) in the same run; capped "
        "at the timeout shown.",
        "",
        "| N | grep cold: memfuse | tmpfs | ratio | grep warm: memfuse | tmpfs | ratio "
        "| target | same files found | minimal pyfuse3: first pass / again | memfuse cold / "
        "(raw listing + minimal pyfuse3 again) | memfuse warm / minimal pyfuse3 again |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = TARGETS.get(r.n, (None,) * 5)
        worst = None if r.grep_cold_s is None or r.grep_warm_s is None else max(
            r.grep_cold_s, r.grep_warm_s)
        out.append(
            f"| {r.n:,} | {fmt_s(r.grep_cold_s, r.grep_timeout_s)} | {r.tmpfs_cold_s:.3f} s "
            f"| {ratio(r.grep_cold_s, r.tmpfs_cold_s, r.grep_timeout_s)} "
            f"| {fmt_s(r.grep_warm_s, r.grep_timeout_s)} | {r.tmpfs_warm_s:.3f} s "
            f"| {ratio(r.grep_warm_s, r.tmpfs_warm_s, r.grep_timeout_s)} "
            f"| {target(t[4], 's', worst)} | {'yes' if r.grep_same_files else 'NO'} "
            + (f"| {fmt_s(r.minimal_grep_cold_s, r.grep_timeout_s)} / "
               f"{fmt_s(r.minimal_grep_warm_s, r.grep_timeout_s)} "
               f"| {ratio(r.grep_cold_s, r.raw_list_s + r.minimal_grep_warm_s, r.grep_timeout_s)} "
               f"| {ratio(r.grep_warm_s, r.minimal_grep_warm_s, r.grep_timeout_s)} |"
               if r.raw_list_s is not None and r.minimal_grep_warm_s else "| — | — | — |"))
    lat = data.get("latency")
    if lat:
        lr = LatencyRow(**lat)
        v = lr.visible
        w = lr.write_ms
        out += [
            "",
            f"Latencies at N = {lr.n:,} (run {lr.run_at}), {lr.edits} samples each, "
            "interleaved. Server -> file: a PATCH through the API, then the file read every "
            "10 ms until it shows the new value, with a random 0-1 s pause between edits.",
            "",
            "| measure | memfuse p50 | p95 | max | floor | ratio (p50) | target |",
            "|---|---|---|---|---|---|---|",
        ]
        for flags in ("default", "revalidate 3600"):
            for kind, goal in (("attached", 1000.0), ("detached", 5000.0)):
                p50, p95, worst = v[f"{flags}/{kind}"]
                label = ("default flags (an open revalidates after 1 s)" if flags == "default"
                         else "`--revalidate 3600` (the poller only)")
                out.append(f"| server -> file, {kind} block, {label} | {p50:.0f} ms "
                           f"| {p95:.0f} ms | {worst:.0f} ms | — | — "
                           f"| p95 {target(goal / 1000, 's', p95 / 1000)} |")
        out += [
            f"| write acknowledged: open/write/close of a block file | {w['mount']:.1f} ms | — "
            f"| — | raw PATCH {w['patch']:.1f} ms; GET + PATCH {w['get+patch']:.1f} ms "
            f"| {w['mount'] / w['patch']:.2f}x PATCH; {w['mount'] / w['get+patch']:.2f}x "
            f"GET + PATCH | — |",
            f"| edit -> commit: a write through the mount until `git log` of the history shows "
            f"it | {lr.commit_ms[0]:.0f} ms | {lr.commit_ms[1]:.0f} ms | {lr.commit_ms[2]:.0f} ms "
            f"| quiet period 1 s | — | — |",
        ]
        if lr.warm_us:
            u = lr.warm_us
            out.append(
                f"| warm open+read+close of a 2 KB block file (median of 15 rounds of 300) "
                f"| {u['memfuse']:.1f} µs | — | — | minimal pyfuse3 {u['minimal']:.1f} µs; "
                f"tmpfs {u['tmpfs']:.1f} µs | {u['memfuse'] / u['minimal']:.2f}x minimal "
                f"pyfuse3 | ≤ 1.0x ({'met' if u['memfuse'] <= u['minimal'] else 'not met'}) |")
    problems = sorted({p.split(" ", 2)[-1][:160] for r in rows for p in r.log_problems}
                      | ({p.split(" ", 2)[-1][:160] for p in lat.get("log_problems", [])}
                         if lat else set()))
    out += ["", "Daemon log WARNING/ERROR lines during these runs: " +
            ("none." if not problems else "")]
    out += [f"- `{p}`" for p in problems[:10]]
    out += ["", "![scale curves](scale.png)"]
    return "\n".join(out)


def plot(data: dict, path: Path) -> None:
    """bench/scale.png: log-x N against mount time, RSS, idle CPU, idle requests/s and grep
    (memfuse cold/warm with the tmpfs floor; a timed-out grep is drawn at its timeout)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install -e '.[bench]'); no plot", file=sys.stderr)
        return
    rows = [ScaleRow(**r) for _, r in sorted(data["scale"].items(), key=lambda kv: int(kv[0]))]
    ns = [r.n for r in rows]
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
    panels = [
        ("`memfuse mount` (s)", [r.mount_s for r in rows], 10000, 15.0),
        ("RSS after mount (MB)", [r.rss_mount_mb for r in rows], 10000, 250.0),
        ("idle CPU (% of a core)", [r.idle_cpu_pct for r in rows], 1000, 1.0),
        ("idle requests/s", [r.idle_req_s for r in rows], 1000, 3.0),
    ]
    for ax, (title, ys, tn, tv) in zip(axes, panels):
        ax.plot(ns, ys, "o-", label="memfuse")
        ax.plot([tn], [tv], "r*", markersize=12, label=f"target at N={tn:,}")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
    ax = axes[4]
    for label, key, style in (("memfuse cold", "grep_cold_s", "o-"),
                              ("memfuse warm", "grep_warm_s", "s-"),
                              ("tmpfs", "tmpfs_warm_s", "^--")):
        ax.plot(ns, [getattr(r, key) if getattr(r, key) is not None else r.grep_timeout_s
                     for r in rows], style, label=label)
    ax.plot([1000, 10000], [0.1, 1.0], "r*", markersize=12, label="targets")
    ax.set_yscale("log")
    ax.set_title("grep -rl (s; a timeout is drawn at its cap)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("N blocks of 5 KB")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"memfuse at scale ({rows[-1].run_at if rows else ''}; Letta 0.16.8 loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000", help="comma-separated N")
    parser.add_argument("--idle", type=float, default=30.0, help="idle window, seconds")
    parser.add_argument("--grep-timeout", type=float, default=120.0, help="seconds")
    parser.add_argument("--edits", type=int, default=20, help="samples per latency measure")
    parser.add_argument("--latency-at", type=int, default=1000,
                        help="N whose mount also gets the latency measures (0: none)")
    parser.add_argument("--populate-only", action="store_true")
    parser.add_argument("--results", type=Path, default=HERE / "results.md")
    parser.add_argument("--json", type=Path, default=HERE / "scale.json")
    parser.add_argument("--plot", type=Path, default=HERE / "scale.png")
    args = parser.parse_args()
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s]
    api = httpx.Client(base_url=BASE, timeout=120)
    agents = {n: ensure_population(api, n) for n in sizes}
    if args.populate_only:
        return
    data = json.loads(args.json.read_text()) if args.json.exists() else {"scale": {}}
    for n in sizes:
        data["scale"][str(n)] = asdict(measure_scale(api, agents[n], n, args.idle,
                                                     args.grep_timeout))
        if n == args.latency_at:
            data["latency"] = asdict(measure_latency(api, agents[n], n, args.edits))
        args.json.write_text(json.dumps(data, indent=1) + "\n")  # keep what is done so far
    replace_section(args.results, "scale", render(data))
    print(f"wrote the Scale section of {args.results}")
    plot(data, args.plot)


if __name__ == "__main__":
    main()
