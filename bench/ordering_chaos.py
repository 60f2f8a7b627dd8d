"""Ordering under load (issue 22): the long runs against the real Letta server and a real mount.

Each scenario mounts a fresh agent (two attached blocks, `human` and `notes`) through a loopback
TCP proxy (tests/integration/proxy.py), drives the mount with real programs (sh, bash, python,
rsync, tar, cp) at full speed, and checks the mount, the server and the history:

- touch:     behind a proxy that holds each answer 1 s, `touch x.md && echo hi >> x.md`,
             `touch x.md && mv x.md y.md` and `touch x.md && rm x.md`, each REPS times in system/
             and at the root, as `sh -c` commands: each exits 0, gives the right files and
             blocks, and no label has a second block on the server.
- create2:   two processes create one new name at once (O_CREAT|O_TRUNC, released together by a
             pipe), REPS*2.5 names in system/ and as many at the root: one block per label, both
             closes 0, the mount shows what the server holds, and both texts are in history.
- dirrename: for SECONDS, system/dir is renamed to dir2 and back every 0.3 s while 3 processes
             create files in it: every acknowledged file is under the name the directory ended
             in, with its text, and the mount, the server's blocks and the history agree (also
             after unmount).
- append3:   three bash shells each run `echo line >> system/human.md` LINES times: the server
             holds every line, each shell's in order; then again under strace, which counts the
             close() calls that failed (bash ignores them).
- apiedit:   REPS times: open(O_APPEND), write a line, PATCH the block through the API, close:
             the server holds the API's value with the line after it.
- torn:      for SECONDS, one process saves system/human.md in place (open(O_TRUNC), write,
             close), alternating values of 10 and 1,000 bytes, while another reads it in a loop:
             every read is exactly one version a writer closed, or the initial value.
- rsync:     `rsync -a mount/ backup/`, then REPS times: an edit of one file in backup/ dated
             with `touch -d`, `rsync -a backup/ mount/`, and `rsync -ai backup/ mount/` must
             transfer nothing; `tar -x` and `cp -a` of a dated file keep its mtime.

Each scenario prints one line of figures; the run ends with a summary and exits 1 on any failure.
Usage: LETTA_BASE_URL=... python bench/ordering_chaos.py [SCENARIO...] [--reps N]
       [--seconds S] [--lines N]     (defaults: the long form, 20 reps, 30 s/60 s, 100 lines)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaos  # noqa: E402  (bench/chaos.py: the rig, the memfuse runner)

SCENARIOS = ("touch", "create2", "dirrename", "append3", "apiedit", "torn", "rsync")


@dataclass
class Knobs:
    """How long each scenario runs. `reps`: repetitions (touch: each command in each directory;
    create2: 2.5x that many names per directory; apiedit, rsync); `seconds`: the dirrename loop
    (torn runs twice as long); `lines`: lines each shell appends in append3."""

    reps: int = 20
    seconds: float = 30.0
    lines: int = 100


@dataclass
class Outcome:
    """One scenario's figures (name -> number or text) and what went wrong (empty: passed)."""

    name: str
    figures: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.failures.append(what)

    @property
    def ok(self) -> bool:
        return not self.failures

    def line(self) -> str:
        shown = ", ".join(f"{k} {v}" for k, v in self.figures.items())
        return f"{self.name}: {shown}  {'OK' if self.ok else 'FAIL'}"


class Session:
    """A mounted fresh agent: `api` the server (direct), `rig` its proxy, env and state."""

    def __init__(self, api: httpx.Client, setup: chaos.Rig):
        self.api = api
        self.rig = setup
        self.path = setup.mountpoint
        self.agent = setup.agent

    def mount(self) -> None:
        chaos._memfuse(self.rig.env, "mount", self.agent, "--revalidate", "0.5")

    def umount(self) -> None:
        chaos._memfuse(self.rig.env, "umount", self.agent)

    def sh(self, script: str, shell: str = "sh") -> subprocess.CompletedProcess:
        """Run `script` with a real shell in the mount; never raises on its exit status."""
        return subprocess.run([shell, "-c", script], cwd=self.path, capture_output=True,
                              text=True, timeout=600)

    def python(self, script: str, *args: str, timeout: float = 600) -> str:
        """Run `script` with python3 in the mount; its stdout (raises when it exits non-zero)."""
        result = subprocess.run(["python3", "-c", script, *args], cwd=self.path,
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"python3 exited {result.returncode}: {result.stderr[-2000:]}")
        return result.stdout

    def labelled(self, label: str) -> list[dict]:
        """Every block on the server with `label` (any agent's: labels here are unique)."""
        return self.api.get("/v1/blocks/", params={"label": label, "limit": 100}).json()

    def attached(self) -> dict[str, dict]:
        """The agent's attached blocks, by id."""
        blocks = self.api.get(f"/v1/agents/{self.agent}/core-memory/blocks").json()
        return {b["id"]: b for b in blocks}

    def owned(self) -> list[dict]:
        """The blocks tagged owner:<agent>."""
        return self.api.get("/v1/blocks/", params={"tags": f"owner:{self.agent}",
                                                   "limit": 1000}).json()

    def live(self) -> dict[str, list[dict]]:
        """label -> the blocks attached or owned (each once)."""
        found = {**{b["id"]: b for b in self.owned()}, **self.attached()}
        by_label: dict[str, list[dict]] = {}
        for block in found.values():
            by_label.setdefault(block["label"], []).append(block)
        return by_label

    def history(self, *args: str) -> str:
        """`git <args>` on the history repository."""
        return subprocess.run(["git", "--git-dir", str(self.rig.state / "memory.git"), *args],
                              capture_output=True, text=True, timeout=60).stdout

    def history_tree(self) -> dict[str, str]:
        """The history's last snapshot: path -> file text."""
        names = self.history("ls-tree", "-r", "--name-only", "HEAD").split()
        return {n: self.history("show", f"HEAD:{n}") for n in names}

    def idle(self, timeout: float = 60) -> None:
        """Wait until the daemon's journal is empty (every change the server can take, sent)."""
        chaos._wait(lambda: re.search(r"journal\s+empty", chaos._memfuse(
            self.rig.env, "status", self.agent, check=False).stdout), timeout, "the journal drains")

    def log_problems(self) -> list[str]:
        """The daemon log's WARNING and ERROR lines."""
        log = self.rig.state / "memfuse.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]


def value_of(text: str) -> str:
    """A block file's value: its text after the frontmatter."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 3)
        if end != -1:
            return text[end + 5:]
    return text


def mount_files(root: Path) -> dict[str, str]:
    """Every file in the mount (not .git): relative path -> text."""
    found = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if rel == ".git" or rel.startswith(".git/") or not path.is_file():
            continue
        found[rel] = path.read_text(errors="replace")
    return found


def poll(predicate, timeout: float) -> bool:
    """Whether `predicate()` came true within `timeout` seconds (polled every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# --- touch: an operation at once after a create, behind a 1 s delay -----------------------------

def scenario_touch(s: Session, knobs: Knobs, out: Outcome) -> None:
    tok = uuid.uuid4().hex[:4]
    s.rig.proxy.delay = 1.0
    removed: list[str] = []  # labels whose file rm removed: no live block once the grace is over
    counts = {"append": 0, "mv": 0, "rm": 0}
    took: list[float] = []
    try:
        for i in range(knobs.reps):
            for where, d in (("s", "system/"), ("r", "")):
                attach = where == "s"
                for op in ("append", "mv", "rm"):
                    label = f"t{tok}{op[0]}{where}{i}"
                    x, y = f"{d}{label}.md", f"{d}{label}y.md"
                    command = {"append": f"touch {x} && echo hi >> {x}",
                               "mv": f"touch {x} && mv {x} {y}",
                               "rm": f"touch {x} && rm {x}"}[op]
                    started = time.monotonic()
                    result = s.sh(command)
                    took.append(time.monotonic() - started)
                    what = f"`{command}`"
                    if result.returncode != 0:
                        out.fail(f"{what} exited {result.returncode}: {result.stderr.strip()}")
                        continue
                    ok = True
                    if op == "append":
                        ok &= _check(out, (s.path / x).exists() and
                                     value_of((s.path / x).read_text()) == "hi\n",
                                     f"{what}: the file does not read 'hi'")
                        ok &= _one_block(s, out, what, label, "hi\n", attach)
                    elif op == "mv":
                        ok &= _check(out, not (s.path / x).exists() and (s.path / y).exists(),
                                     f"{what}: {x} still there or {y} missing")
                        ok &= _check(out, not s.labelled(label),
                                     f"{what}: the old label {label} has a block")
                        ok &= _one_block(s, out, what, label + "y", "", attach)
                    else:
                        ok &= _check(out, not (s.path / x).exists(), f"{what}: {x} came back")
                        made = s.labelled(label)
                        ok &= _check(out, len(made) <= 1,
                                     f"{what}: {len(made)} blocks labelled {label}")
                        removed.append(label)
                    counts[op] += ok
        # the grace period (2 s) retires an unlinked file's block: detached and untagged
        s.rig.proxy.delay = 0.0
        def retired() -> bool:
            attached = {b["label"] for b in s.attached().values()}
            owned = {b["label"] for b in s.owned()}
            return not (set(removed) & (attached | owned))
        if not poll(retired, 60):
            out.fail("an rm'd file's block is still attached or owned after 60 s")
        listed = {p for p in mount_files(s.path) if tok in p}
        expected = {f"{d}t{tok}{op}{w}{i}{suffix}.md" for i in range(knobs.reps)
                    for w, d in (("s", "system/"), ("r", ""))
                    for op, suffix in (("a", ""), ("m", "y"))}
        if listed != expected:
            out.fail(f"the mount lists {sorted(listed ^ expected)[:6]} wrongly")
    finally:
        s.rig.proxy.delay = 0.0
    dupes = sum(max(0, len(s.labelled(f"t{tok}{op}{w}{i}{sfx}")) - 1)
                for i in range(knobs.reps) for w in "sr" for op, sfx in
                (("a", ""), ("m", "y"), ("m", ""), ("r", "")))
    n = knobs.reps * 2
    out.figures.update({f"{op} right": f"{c}/{n}" for op, c in counts.items()})
    out.figures["duplicate blocks"] = dupes
    out.figures["command s p50/max"] = f"{sorted(took)[len(took) // 2]:.1f}/{max(took):.1f}"
    if dupes:
        out.fail(f"{dupes} duplicate blocks")


def _check(out: Outcome, condition: bool, what: str) -> bool:
    if not condition:
        out.fail(what)
    return condition


def _one_block(s: Session, out: Outcome, what: str, label: str, value: str,
               attach: bool) -> bool:
    """Exactly one block on the server has `label`, holding `value`, attached iff `attach`."""
    found = s.labelled(label)
    if len(found) != 1 or found[0]["value"] != value:
        out.fail(f"{what}: blocks labelled {label}: {[b['value'] for b in found]!r}")
        return False
    if (found[0]["id"] in s.attached()) != attach:
        out.fail(f"{what}: {label} is {'not ' if attach else ''}attached")
        return False
    return True


# --- create2: two processes create one new name at once ----------------------------------------

PAIRS = r"""
import json, os, sys
for path in sys.argv[1:]:
    r, w = os.pipe()
    pids = []
    for text in ("one", "two"):
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.read(r, 1)  # both go when the parent closes the pipe
            stage = "open"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                stage = "write"
                os.write(fd, f"{text} {path}\n".encode())
                stage = "close"
                os.close(fd)
            except OSError as e:
                os.write(2, f"{path} {text}: {stage}: {e}\n".encode())
                os._exit(1 + ("open", "write", "close").index(stage))
            os._exit(0)
        pids.append(pid)
    os.close(r)
    os.close(w)
    print(json.dumps([path, [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]]),
          flush=True)
"""


def scenario_create2(s: Session, knobs: Knobs, out: Outcome) -> None:
    tok = uuid.uuid4().hex[:4]
    count = max(2, knobs.reps * 5 // 2)
    paths = [f"{d}c{tok}{w}{i}.md" for w, d in (("s", "system/"), ("r", ""))
             for i in range(count)]
    result = subprocess.run(["python3", "-c", PAIRS, *paths], cwd=s.path, capture_output=True,
                            text=True, timeout=900)
    statuses = dict(json.loads(line) for line in result.stdout.splitlines())
    failed_closes = sum(code != 0 for codes in statuses.values() for code in codes)
    if failed_closes:
        out.fail(f"{failed_closes} of {2 * len(paths)} writers failed: {result.stderr[:600]}")
    one_block = 0
    for path in paths:
        label = path.removeprefix("system/")[:-3]
        found = s.labelled(label)
        shown = (s.path / path).read_text() if (s.path / path).exists() else None
        texts = {f"one {path}\n", f"two {path}\n"}
        if len(found) != 1:
            out.fail(f"{path}: {len(found)} blocks labelled {label}")
            continue
        if found[0]["value"] not in texts or shown is None or value_of(shown) != found[0]["value"]:
            out.fail(f"{path}: server {found[0]['value']!r}, mount {shown!r}")
            continue
        if (found[0]["id"] in s.attached()) != path.startswith("system/"):
            out.fail(f"{path}: attached wrongly")
            continue
        one_block += 1

    def both_in_history(path: str) -> bool:
        lines = set(s.history("log", "-p", "--format=", "--", path).splitlines())
        return {f"+one {path}", f"+two {path}"} <= lines
    pending = list(paths)
    poll(lambda: not [pending.remove(p) for p in list(pending) if both_in_history(p)] and
         not pending, 30)
    for path in pending:
        out.fail(f"{path}: history lacks a text: "
                 f"{s.history('log', '-p', '--format=%s', '--', path)[-400:]!r}")
    stray = {p for p in mount_files(s.path) if tok in p} - set(paths)
    if stray:
        out.fail(f"files nobody made: {sorted(stray)[:5]}")
    out.figures.update({"names": len(paths), "writers": 2 * len(paths),
                        "failed closes": failed_closes,
                        "one block": f"{one_block}/{len(paths)}",
                        "both texts in history": f"{len(paths) - len(pending)}/{len(paths)}"})


# --- dirrename: a directory renamed every 0.3 s while 3 processes create files in it -----------

CREATOR = r"""
import errno, json, os, sys, time
n, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + seconds
acked, missed, failed = {}, 0, []
i = 0
while time.monotonic() < end:
    i += 1
    name = f"w{n}-{i}.md"
    text = f"writer {n} file {i}\n"
    for where in ("dir", "dir2", "dir", "dir2"):
        stage = "open"
        try:
            fd = os.open(f"system/{where}/{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            stage = "write"
            os.write(fd, text.encode())
            stage = "close"
            os.close(fd)
        except OSError as e:
            if stage == "open" and e.errno == errno.ENOENT:
                continue  # the directory moved between the look-up and the create
            failed.append(f"{where}/{name}: {stage}: {e}")
            break
        acked[name] = text
        break
    else:
        missed += 1
print(json.dumps({"acked": acked, "missed": missed, "failed": failed}))
"""


def scenario_dirrename(s: Session, knobs: Knobs, out: Outcome) -> None:
    system = s.path / "system"
    (system / "dir").mkdir()
    stop = threading.Event()
    renames = [0]
    rename_errors: list[str] = []
    current = ["dir"]

    def renamer() -> None:
        while not stop.is_set():
            old, new = current[0], "dir2" if current[0] == "dir" else "dir"
            try:
                os.rename(system / old, system / new)
            except OSError as e:
                rename_errors.append(f"{old} -> {new}: {e}")
                stop.wait(0.3)
                continue
            current[0] = new
            renames[0] += 1
            stop.wait(0.3)

    writers = [subprocess.Popen(["python3", "-c", CREATOR, str(n), str(knobs.seconds)],
                                cwd=s.path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for n in range(3)]
    thread = threading.Thread(target=renamer, daemon=True)
    thread.start()
    reports = []
    for w in writers:
        stdout, stderr = w.communicate(timeout=knobs.seconds + 600)
        if w.returncode != 0:
            out.fail(f"a creator exited {w.returncode}: {stderr[-600:]}")
            continue
        reports.append(json.loads(stdout))
    stop.set()
    thread.join(30)
    final, other = current[0], "dir2" if current[0] == "dir" else "dir"
    acked = {name: text for r in reports for name, text in r["acked"].items()}
    failed = [f for r in reports for f in r["failed"]]
    for f in failed[:5]:
        out.fail(f"a create failed: {f}")
    for e in rename_errors[:5]:
        out.fail(f"a rename failed: {e}")
    s.idle()
    want = {f"system/{final}/{name}": text for name, text in acked.items()}

    def compare(tag: str, have: dict[str, str], values: bool = True) -> int:
        """Differences between `have` (path -> value) and what was acknowledged."""
        wrong = 0
        for path in sorted(set(have) | set(want)):
            got = have.get(path)
            if got is None or path not in want or (values and got != want[path]):
                wrong += 1
                if wrong <= 3:
                    out.fail(f"{tag}: {path}: has {got!r}, want {want.get(path)!r}")
        return wrong

    in_mount = {p: value_of(t) for p, t in mount_files(s.path).items()
                if p.startswith(("system/dir/", "system/dir2/"))}
    wrong_mount = compare("mount", in_mount)
    live = s.live()
    dupes = sum(len(v) - 1 for v in live.values())
    on_server = {f"system/{label}.md": blocks[0]["value"] for label, blocks in live.items()
                 if label.startswith(("dir/", "dir2/"))}
    wrong_server = compare("server", on_server)
    attached = {b["label"] for b in s.attached().values()}
    detached = [p for p in on_server if p[len("system/"):-3] not in attached]
    if detached:
        out.fail(f"detached: {detached[:3]}")

    def history_files() -> dict[str, str]:
        return {p: value_of(t) for p, t in s.history_tree().items()
                if p.startswith(("system/dir/", "system/dir2/"))}
    poll(lambda: history_files() == want, 30)
    wrong_history = compare("history", history_files())
    s.umount()
    wrong_after = compare("history after umount", history_files())
    if dupes:
        out.fail(f"{dupes} duplicate blocks")
    out.figures.update({"seconds": knobs.seconds, "renames": renames[0],
                        "files acknowledged": len(acked),
                        "creates missed (ENOENT)": sum(r["missed"] for r in reports),
                        "failed": len(failed), "ended as": final,
                        "wrong in mount/server/history/after umount":
                            f"{wrong_mount}/{wrong_server}/{wrong_history}/{wrong_after}",
                        "duplicate blocks": dupes})
    if other and (system / other).exists():
        out.fail(f"system/{other} exists after the run")


# --- append3: three bash shells appending to one file ------------------------------------------

def scenario_append3(s: Session, knobs: Knobs, out: Outcome) -> None:
    path = "system/human.md"
    before = value_of((s.path / path).read_text())
    lost = disorder = 0
    failed_closes = 0
    took = 0.0
    for traced in (False, True):
        tag = "traced" if traced else "plain"
        trace = s.rig.state.parent / f"strace-{uuid.uuid4().hex[:6]}"
        shells = []
        started = time.monotonic()
        for n in range(3):
            loop = (f'for i in $(seq 1 {knobs.lines}); do '
                    f'echo "{tag} {n} line $i" >> {path}; done')
            argv = ["bash", "-c", loop]
            if traced:
                argv = ["strace", "-f", "-qq", "-e", "trace=close", "-e", "status=failed",
                        "-o", f"{trace}.{n}", *argv]
            shells.append(subprocess.Popen(argv, cwd=s.path, stderr=subprocess.PIPE, text=True))
        for p in shells:
            _, err = p.communicate(timeout=900)
            if p.returncode != 0:
                out.fail(f"a {tag} shell exited {p.returncode}: {err[-400:]}")
        if not traced:
            took = time.monotonic() - started
        if traced:
            for n in range(3):
                lines = Path(f"{trace}.{n}").read_text().splitlines()
                Path(f"{trace}.{n}").unlink()
                bad = [x for x in lines if "= -1" in x and "EBADF" not in x]
                failed_closes += len(bad)
                for x in bad[:3]:
                    out.fail(f"a close failed: {x}")
        value = s.api.get(f"/v1/agents/{s.agent}/core-memory/blocks").json()
        value = next(b["value"] for b in value if b["label"] == "human")
        lines = value.splitlines()
        for n in range(3):
            mine = [x for x in lines if x.startswith(f"{tag} {n} ")]
            want = [f"{tag} {n} line {i}" for i in range(1, knobs.lines + 1)]
            lost += len(set(want) - set(mine))
            disorder += mine != [x for x in want if x in set(mine)]
        if not value.startswith(before):
            out.fail(f"{tag}: the value before the appends was not kept")
        shown = value_of((s.path / path).read_text())
        if shown != value:
            out.fail(f"{tag}: the mount shows {len(shown)} characters, the server {len(value)}")
    if lost:
        out.fail(f"{lost} lines lost")
    if disorder:
        out.fail(f"{disorder} shells' lines out of order")
    problems = s.log_problems()
    for line in problems[:3]:
        out.fail(f"log: {line}")
    out.figures.update({"shells": 3, "lines each": knobs.lines, "plain run s": f"{took:.1f}",
                        "lines lost": lost, "out of order": disorder,
                        "failed closes (strace)": failed_closes,
                        "log warnings": len(problems)})


# --- apiedit: an API edit while an appending handle is open -----------------------------------

def scenario_apiedit(s: Session, knobs: Knobs, out: Outcome) -> None:
    path = s.path / "system/human.md"
    block = next(b for b in s.attached().values() if b["label"] == "human")
    kept = 0
    for i in range(knobs.reps):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"appended {i}\n".encode())
            s.api.patch(f"/v1/blocks/{block['id']}",
                        json={"value": f"Edited {i}.\n"}).raise_for_status()
        finally:
            try:
                os.close(fd)
            except OSError as e:
                out.fail(f"round {i}: close failed: {e}")
                continue
        value = s.api.get(f"/v1/blocks/{block['id']}").json()["value"]
        want = f"Edited {i}.\nappended {i}\n"
        shown = value_of(path.read_text())
        if value != want or shown != want:
            out.fail(f"round {i}: server {value!r}, mount {shown!r}, want {want!r}")
        else:
            kept += 1
    out.figures.update({"rounds": knobs.reps, "kept": f"{kept}/{knobs.reps}"})


# --- torn: a reader against a writer saving in place ------------------------------------------

SAVER = r"""
import os, sys, time
versions = [b"a" * 10, b"b" * 1000]
end = time.monotonic() + float(sys.argv[1])
i = failed = 0
while time.monotonic() < end:
    try:
        fd = os.open("system/human.md", os.O_WRONLY | os.O_TRUNC)  # a save in place (nano, >)
        os.write(fd, versions[i % 2])
        os.close(fd)
    except OSError as e:
        failed += 1
        print(e, file=sys.stderr)
    i += 1
    if i == 1:
        print("saving", flush=True)  # the reader starts now
print(i, failed)
"""

READER = r"""
import collections, sys, time
end = time.monotonic() + float(sys.argv[1])
seen = collections.Counter()
errors = 0
while time.monotonic() < end:
    try:
        with open("system/human.md", "rb") as f:
            data = f.read()
    except OSError as e:
        errors += 1
        print("error", e, file=sys.stderr)
        continue
    value = data.split(b"---\n", 2)[-1] if data.startswith(b"---\n") else data
    if value == b"a" * 10:
        seen["10"] += 1
    elif value == b"b" * 1000:
        seen["1000"] += 1
    elif value == b"start\n":
        seen["initial"] += 1
    else:
        seen["torn"] += 1
        if seen["torn"] <= 5:
            print(repr(data[:80]), len(data), file=sys.stderr)
print(seen["10"], seen["1000"], seen["initial"], seen["torn"], errors)
"""


def scenario_torn(s: Session, knobs: Knobs, out: Outcome) -> None:
    seconds = str(knobs.seconds * 2)
    saver = subprocess.Popen(["python3", "-c", SAVER, seconds], cwd=s.path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    saver.stdout.readline()  # its first save is done: a reader opened before it reads through
    # the page cache that save's O_TRUNC empties, as on any filesystem
    reader = subprocess.run(["python3", "-c", READER, seconds], cwd=s.path,
                            capture_output=True, text=True, timeout=knobs.seconds * 2 + 600)
    saved, save_err = saver.communicate(timeout=600)
    saves, failed = map(int, saved.split())
    ten, thousand, initial, torn, errors = map(int, reader.stdout.split())
    if torn:
        out.fail(f"{torn} torn reads: {reader.stderr[:600]}")
    if errors or failed:
        out.fail(f"{errors} reads and {failed} saves failed: {reader.stderr[:300]} "
                 f"{save_err[:300]}")
    out.figures.update({"seconds": float(seconds), "saves": saves, "failed saves": failed,
                        "reads": ten + thousand + initial + torn,
                        "read 10 B/1000 B/initial": f"{ten}/{thousand}/{initial}",
                        "torn": torn, "read errors": errors})


# --- rsync, tar -x, cp -a: the times they rely on ----------------------------------------------

def _run(out: Outcome, *argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        out.fail(f"{' '.join(argv)} exited {result.returncode}: {result.stderr[-300:]}")
    return result.stdout


def scenario_rsync(s: Session, knobs: Knobs, out: Outcome) -> None:
    work = Path(tempfile.mkdtemp(prefix="memfuse-rsync-", dir=s.rig.state.parent))
    try:
        tok = uuid.uuid4().hex[:4]  # labels no other agent has: detached blocks outlive theirs
        files = [f"system/f{k}.md" for k in range(5)] + [f"r{tok}{k}.md" for k in range(5)]
        for k, name in enumerate(files):
            (s.path / name).write_text(f"File {k}.\n")
        backup = work / "backup"
        _run(out, "rsync", "-a", f"{s.path}/", f"{backup}/")
        quiet = 0
        transferred: list[str] = []
        for i in range(knobs.reps):
            name = files[i % len(files)]
            with open(backup / name, "a") as f:
                f.write(f"Edit {i} in the backup.\n")
            _run(out, "touch", "-d", f"{i + 1} days ago", str(backup / name))
            _run(out, "rsync", "-a", f"{backup}/", f"{s.path}/")
            again = _run(out, "rsync", "-ai", f"{backup}/", f"{s.path}/")
            if again.strip():
                transferred.extend(again.splitlines())
            else:
                quiet += 1
            want = (backup / name).read_text()
            label = name.removeprefix("system/")[:-3]
            found = s.labelled(label) if not name.startswith("system/") else [
                b for b in s.attached().values() if b["label"] == label]
            if [b["value"] for b in found] != [value_of(want)]:
                out.fail(f"round {i}: {name} is {[b['value'] for b in found]!r} on the server")
        for line in transferred[:5]:
            out.fail(f"a second rsync transferred: {line}")
        kept = 0
        source = work / "source"
        (source / "system").mkdir(parents=True)
        for i in range(knobs.reps):
            tarred, copied = f"system/tar{i}.md", f"cp{i}.md"
            for name in (tarred, copied):
                (source / name).write_text(f"From {name}.\n")
                os.utime(source / name, ns=(1_500_000_000_123_456_789 + i * 10**9,
                                            1_400_000_000_987_654_321 + i * 10**9))
            _run(out, "tar", "-cf", str(work / f"t{i}.tar"), "-C", str(source), tarred)
            _run(out, "tar", "-xf", str(work / f"t{i}.tar"), "-C", str(s.path))
            _run(out, "cp", "-a", str(source / copied), str(s.path / copied))
            good = True
            for name, exact in ((tarred, False), (copied, True)):
                want = (source / name).stat().st_mtime_ns
                want = want if exact else want // 10**9 * 10**9  # tar keeps whole seconds
                got = (s.path / name).stat().st_mtime_ns
                if got != want:
                    good = False
                    out.fail(f"{name}: mtime {got}, want {want}")
            kept += good
        out.figures.update({"rounds": knobs.reps,
                            "second rsync transferred nothing": f"{quiet}/{knobs.reps}",
                            "tar -x and cp -a kept mtime": f"{kept}/{knobs.reps}"})
    finally:
        shutil.rmtree(work, ignore_errors=True)


RUNNERS = {"touch": scenario_touch, "create2": scenario_create2,
           "dirrename": scenario_dirrename, "append3": scenario_append3,
           "apiedit": scenario_apiedit, "torn": scenario_torn, "rsync": scenario_rsync}


def run_scenario(base_url: str, name: str, knobs: Knobs) -> Outcome:
    """Run scenario `name` on a fresh agent and mount; returns its figures and failures (an
    exception in it is a failure too)."""
    out = Outcome(name)
    started = time.monotonic()
    with httpx.Client(base_url=base_url, timeout=60) as api, \
            chaos.rig(api, base_url, f"memfuse-order-{name}-") as setup:
        s = Session(api, setup)
        try:
            s.mount()
            RUNNERS[name](s, knobs, out)
        except Exception as exc:  # noqa: BLE001  (reported as the scenario's failure)
            out.fail(f"{type(exc).__name__}: {exc}")
            out.figures["log tail"] = repr(_tail(setup.state / "memfuse.log"))
        finally:
            if os.path.ismount(s.path):
                chaos._memfuse(setup.env, "umount", setup.agent, check=False)
    out.figures["took s"] = round(time.monotonic() - started)
    return out


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-1500:] if log.exists() else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"any of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--reps", type=int, default=Knobs.reps)
    parser.add_argument("--seconds", type=float, default=Knobs.seconds)
    parser.add_argument("--lines", type=int, default=Knobs.lines)
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"no scenario {', '.join(sorted(unknown))}; there are {', '.join(SCENARIOS)}")
    knobs = Knobs(args.reps, args.seconds, args.lines)
    names = args.scenarios or list(SCENARIOS)
    base_url = os.environ["LETTA_BASE_URL"]
    print(f"ordering chaos: {', '.join(names)}; reps {knobs.reps}, seconds {knobs.seconds}, "
          f"lines {knobs.lines}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
          flush=True)
    outcomes = []
    for name in names:
        out = run_scenario(base_url, name, knobs)
        outcomes.append(out)
        print(out.line(), flush=True)
        for failure in out.failures[:10]:
            print(f"  - {failure}", flush=True)
        if len(out.failures) > 10:
            print(f"  - ... and {len(out.failures) - 10} more", flush=True)
    failed = [o.name for o in outcomes if not o.ok]
    print(f"summary: {len(outcomes) - len(failed)} of {len(outcomes)} scenarios passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
