"""Fault modes for scripts/chaos (issue 17 point 7): a real mount of a fresh agent and the real
Letta server, a writer (bench/chaos.py's Writer: writes, creates and removals) going on while
one fault is made, then the fault ends and the journal must drain. Modes:

- flapping: the TCP proxy cuts and restores every 1-2 s (random) for SECONDS;
- slow: every answer held back 2-5 s (random, per answer) for SECONDS;
- errors: an HTTP-aware proxy (tests/integration/httpproxy.py) answers 30 % of requests with
  500, 503 + Retry-After, 429 + Retry-After, or 504 after forwarding, for SECONDS;
- lost: for each request a create or a write makes (POST block, PATCH value, the PATCH that
  drops the create marker, attach, the GET pre-check of a write), the first one is acted on by
  the server and its answer lost, the link down 2 s after it;
- tmpfs: HOME is a 4 MB tmpfs; with the server cut off (writes journaled) it is filled up until
  the journal hits ENOSPC, left full for SECONDS, then freed and the server restored.

Each run reports: acknowledged changes; lost ones (acknowledged, not on the server, and not
refused with an ERROR line naming the file and its bytes in history: must be 0); refused ones;
duplicate blocks per label (must be 0); `git fsck --strict` of the history (must be clean); and
the seconds from the fault's end until the journal is empty (must be under 60).

Usage: LETTA_BASE_URL=... python bench/faults.py MODE [RUNS] [--seconds S] [--seed N]
       [--pause S]   (S between the writer's changes, default 0.05)
"""
from __future__ import annotations

import errno
import os
import random
import shutil
import contextlib
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import chaos  # noqa: E402  (make_agent, rig, Writer, checks: one copy of each)
from tests.integration.httpproxy import HttpProxy  # noqa: E402

MODES = ("flapping", "slow", "errors", "lost", "tmpfs")
DEFAULT_SECONDS = {"flapping": 60.0, "slow": 20.0, "errors": 20.0, "lost": 20.0, "tmpfs": 5.0}
PAUSE = 0.05  # s between the writer's changes: a busy program, not a flood
DRAIN_BOUND = 60.0  # s: the journal must be empty this soon after the fault ends
LOGS = "/tmp/memfuse-faults-logs"  # where a failed run keeps its daemon log (MEMFUSE_FAULTS_LOGS)


def _request(method: bytes, path: bytes, *body: bytes):
    return lambda req: (req.startswith(method + b" " + path)
                        and all(part in req for part in body))


# the requests a create or a write makes (tests/integration/proxy.py's lose_answer rules)
LOST_KINDS = {
    "POST block": _request(b"POST", b"/v1/blocks/"),
    "PATCH value": lambda r: _request(b"PATCH", b"/v1/blocks/", b'"value"')(r)
    and b'"tags"' not in r,
    "PATCH marker drop": _request(b"PATCH", b"/v1/blocks/", b'"tags"'),
    "PATCH attach": _request(b"PATCH", b"/v1/agents/", b"/attach/"),
    "GET pre-check": _request(b"GET", b"/v1/blocks/block-"),
}


@dataclass
class Run:
    """One run's figures: see the module's docstring. `notes` says what the fault did."""

    mode: str
    acknowledged: int = 0
    lost: int = 0
    refused: int = 0
    duplicates: int = 0
    fsck_errors: int = 0
    drain_s: float = 0.0
    notes: str = ""
    faults: int = 0  # faults made: cuts, slow answers, injected errors, answers lost, ENOSPC
    missed: list[str] = field(default_factory=list)  # lost mode: kinds never sent
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.lost, self.duplicates, self.fsck_errors) == (0, 0, 0) and \
            self.drain_s < DRAIN_BOUND


class _Failed(Exception):
    """A run that found a loss, a duplicate or an fsck complaint (its log is kept)."""


def duplicates(api: httpx.Client, agent: str) -> tuple[int, list[str]]:
    """Blocks beyond the first per label among the agent's attached and owned blocks, and a
    line for each label that has more than one."""
    by_label: dict[str, set[str]] = {}
    blocks = api.get(f"/v1/agents/{agent}/core-memory/blocks").json() + \
        api.get("/v1/blocks/", params={"tags": f"owner:{agent}", "limit": 1000}).json()
    for block in blocks:
        by_label.setdefault(block["label"], set()).add(block["id"])
    extra = {label: ids for label, ids in by_label.items() if len(ids) > 1}
    return (sum(len(ids) - 1 for ids in extra.values()),
            [f"{len(ids)} blocks labelled {label!r}: {sorted(ids)}" for label, ids in extra.items()])


def _refused(state: Path, run: Run):
    """refused(name, value): the daemon logged an ERROR naming `name` and `value` is in the
    history (a change reported refused, not lost); counts them in run.refused."""
    log = (state / "memfuse.log").read_text(errors="replace")
    history = subprocess.run(["git", "--git-dir", str(state / "memory.git"), "log", "--all",
                              "-p"], capture_output=True, text=True, errors="replace").stdout
    errors = [line for line in log.splitlines() if "ERROR" in line]

    def refused(name: str, value: str) -> bool:
        if any(name in line for line in errors) and value in history:
            run.refused += 1
            return True
        return False
    return refused


def _fill(path: Path) -> None:
    """Write `path` until the file system is full (ENOSPC)."""
    with open(path, "wb", buffering=0) as f:  # unbuffered: close() has nothing left to write
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


def run_mode(api: httpx.Client, base_url: str, mode: str, seconds: float, number: int,
             rng: random.Random) -> Run:
    """One run of `mode` whose fault lasts `seconds` (see the module's docstring)."""
    run = Run(mode)
    proxy = HttpProxy(base_url, seed=rng.randrange(1 << 30)) if mode == "errors" else None
    with chaos.rig(api, base_url, f"memfuse-{mode}-", proxy=proxy) as setup:
        env, agent, state, home = setup.env, setup.agent, setup.state, Path(setup.env["HOME"])
        if mode == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(home)],
                           check=True)
        writer = chaos.Writer(setup.mountpoint, f"trial {number}", pause=PAUSE,
                              create_dirs=("", "system/"))
        try:
            chaos._memfuse(env, "mount", agent)
            writer.start()
            time.sleep(1)
            _fault(setup, mode, seconds, rng, run, writer)
            ended = time.monotonic()
            writer.stop()
            chaos.wait_drained(env, agent, state, DRAIN_BOUND * 2)
            run.drain_s = time.monotonic() - ended
            label = f"{mode} {number}"
            chaos.check_server(api, agent, writer, label, run, _refused(state, run))
            run.duplicates, lines = duplicates(api, agent)
            run.details += [f"{label}: {line}" for line in lines]
            chaos._memfuse(env, "umount", agent)
            chaos.fsck(state, label, run)
            if not run.ok:
                raise _Failed
        except Exception as exc:
            keep = Path(os.environ.get("MEMFUSE_FAULTS_LOGS", LOGS))
            keep.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy(state / "memfuse.log", keep / f"{mode}-{number}-{agent}.log")
            if not isinstance(exc, _Failed):
                raise
        finally:
            writer.stop(0)
            if mode == "tmpfs":
                subprocess.run(["fusermount3", "-u", "-z", str(setup.mountpoint)],
                               capture_output=True)
                subprocess.run(["umount", "-l", str(home)], capture_output=True)
    return run


def _fault(setup: chaos.Rig, mode: str, seconds: float, rng: random.Random, run: Run,
           writer: chaos.Writer) -> None:
    proxy = setup.proxy
    if mode == "flapping":
        cuts, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            proxy.cut()
            cuts += 1
            time.sleep(rng.uniform(1, 2))
            proxy.restore()
            time.sleep(rng.uniform(1, 2))
        run.notes, run.faults = f"{cuts} cuts", cuts
    elif mode == "slow":
        delays = random.Random(rng.random())
        slow = [0]

        def delay() -> float:
            slow[0] += 1
            return delays.uniform(2, 5)
        proxy.delay = delay
        before = writer.count
        time.sleep(seconds)
        proxy.delay = 0.0
        run.notes = f"{writer.count - before} changes, {slow[0]} answers while slow"
        run.faults = slow[0]
    elif mode == "errors":
        proxy.rate = 0.3
        time.sleep(seconds)
        proxy.rate = 0.0
        run.faults = sum(proxy.injected.values())
        run.notes = (f"{sum(proxy.injected.values())} injected "
                     f"({', '.join(f'{k}: {v}' for k, v in sorted(proxy.injected.items()))}) "
                     f"of {sum(proxy.injected.values()) + proxy.forwarded - proxy.injected[504]}")
    elif mode == "lost":
        proxy.outage = 2.0
        missed = []
        for kind, rule in LOST_KINDS.items():
            lost = proxy.lost
            proxy.lose_answer = rule
            deadline = time.monotonic() + seconds / len(LOST_KINDS)
            while proxy.lost == lost and time.monotonic() < deadline:
                time.sleep(0.05)
            if proxy.lost == lost:
                proxy.lose_answer = None
                missed.append(kind)
            else:
                time.sleep(proxy.outage + 0.5)  # restored by then
        run.notes = f"{proxy.lost} answers lost" + (f"; never sent: {missed}" if missed else "")
        run.faults, run.missed = proxy.lost, missed
    elif mode == "tmpfs":
        home = Path(setup.env["HOME"])
        proxy.cut()  # writes go to the journal
        time.sleep(1)
        filler = home / "filler"
        _fill(filler)
        enospc = writer.errors.get(errno.ENOSPC, 0)
        time.sleep(seconds)
        filler.unlink()
        time.sleep(1)  # the writer journals again
        proxy.restore()
        run.faults = writer.errors.get(errno.ENOSPC, 0) - enospc
        run.notes = (f"ENOSPC to the writer: {writer.errors.get(errno.ENOSPC, 0) - enospc}; "
                     f"errors {dict(writer.errors)}")
    else:
        raise ValueError(f"unknown fault mode {mode!r}; one of {MODES}")


def main(argv: list[str]) -> int:
    args = [a for a in argv]
    seconds = seed = None
    if "--seconds" in args:
        i = args.index("--seconds")
        seconds = float(args[i + 1])
        del args[i:i + 2]
    if "--seed" in args:
        i = args.index("--seed")
        seed = int(args[i + 1])
        del args[i:i + 2]
    if "--pause" in args:
        i = args.index("--pause")
        global PAUSE
        PAUSE = float(args[i + 1])
        del args[i:i + 2]
    if not args or args[0] not in MODES:
        print(__doc__, file=sys.stderr)
        return 2
    mode, runs = args[0], int(args[1]) if len(args) > 1 else 1
    seconds = seconds if seconds is not None else DEFAULT_SECONDS[mode]
    rng = random.Random(seed)
    base_url = os.environ["LETTA_BASE_URL"]
    failed = 0
    print("| mode | run | fault s | acknowledged | lost | refused | duplicates | fsck | "
          "drained in s | notes |", flush=True)
    with httpx.Client(base_url=base_url, timeout=30) as api:
        for number in range(runs):
            try:
                run = run_mode(api, base_url, mode, seconds, number, rng)
            except Exception as exc:  # a stall or a broken mount: a failed run, say why
                print(f"| {mode} | {number} | {seconds:g} | - | - | - | - | - | - | "
                      f"FAILED: {exc!r} |", flush=True)
                failed += 1
                continue
            failed += not run.ok
            print(f"| {mode} | {number} | {seconds:g} | {run.acknowledged} | {run.lost} | "
                  f"{run.refused} | {run.duplicates} | "
                  f"{'clean' if not run.fsck_errors else 'ERRORS'} | {run.drain_s:.1f} | "
                  f"{run.notes} |", flush=True)
            for line in run.details:
                print("   ", line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
