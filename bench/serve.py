"""Serve benchmark (issue 20 points 3 and 9): `memfuse serve` in front of the real Letta server,
each figure side by side with its floor, measured in the same run with interleaved samples.

The agent is bench/scale.py's population `memfuse-scale-<N>` (3 attached blocks of about 2 KB,
N detached owned notes of about 5 KB: N + 3 files in the classic layout), made when missing.
serve runs as the real CLI (`memfuse serve --listen 127.0.0.1:0`) in a private HOME, so its
history starts empty; git is the real `git` CLI.

- first clone: the first `git clone` through serve (every block taken into a new history).
- clone: `git clone` through serve once the history exists. Each clone takes the live blocks
  first (the listings, then a commit of what changed: from the second round on, the raw
  PATCH of the round before). Floors: `git clone file://` of a bare copy of
  the same history (git's own pack transport, no server), and the raw listings that the take
  needs (`GET /v1/agents/{id}/core-memory/blocks` and `GET /v1/blocks/?tags=owner:<id>`, one
  page each, httpx).
- pull after an API edit: `PATCH /v1/blocks/{id}` of one note through the API (not timed),
  then `git pull --ff-only` through serve, timed; the clone then holds the new value (checked).
  Floor: `git pull --ff-only` from the bare copy after another clone pushed one changed file
  to it (not timed).
- push to live: one note changed in the clone and committed (not timed), then `git push`
  through serve, timed; the server holds the new value when it returns (checked). Floors: the
  calls that change needs, raw (`GET` the block, then `PATCH` its value: httpx on one
  keep-alive connection), and `git push` of the same kind of commit to the bare copy.

Writes the section "serve" of bench/results.md (between its markers).

Usage: LETTA_BASE_URL=... python bench/serve.py [--blocks 1000] [--rounds 10]
       [--results bench/results.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from scale import BASE, MEMFUSE, ensure_population, note_label
from sections import replace_section

HERE = Path(__file__).resolve().parent
NOTE = 1  # the note the edits change: note-00001.md


def git(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    result = subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=b@b", *args],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr}")
    return result


def timed(fn) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


class Serve:
    """`memfuse serve` on a free loopback port with HOME `home`."""

    def __init__(self, home: Path):
        env = dict(os.environ, HOME=str(home), LETTA_BASE_URL=BASE)
        env.pop("LETTA_API_KEY", None)
        self.proc = subprocess.Popen([MEMFUSE, "serve", "--listen", "127.0.0.1:0"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        if match is None:
            self.proc.kill()
            raise RuntimeError(f"memfuse serve printed no URL: {line!r}")
        self.url = match[0]

    def git_url(self, agent_id: str) -> str:
        return f"{self.url}/v1/git/{agent_id}/state.git"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=30)


@dataclass
class Figures:
    """Seconds per sample of each measure (lists) and what the run was."""

    blocks: int
    rounds: int
    first_clone: float = 0.0
    clone: list[float] = field(default_factory=list)
    clone_bare: list[float] = field(default_factory=list)
    listing: list[float] = field(default_factory=list)
    pull: list[float] = field(default_factory=list)
    pull_bare: list[float] = field(default_factory=list)
    push: list[float] = field(default_factory=list)
    push_bare: list[float] = field(default_factory=list)
    push_raw: list[float] = field(default_factory=list)


def listing_s(api: httpx.Client, agent_id: str, n: int) -> float:
    """The two listings a take needs, one page each."""
    def both() -> None:
        api.get(f"/v1/agents/{agent_id}/core-memory/blocks").raise_for_status()
        api.get("/v1/blocks/", params={"tags": f"owner:{agent_id}", "limit": n + 100},
                timeout=300).raise_for_status()
    return timed(both)


def note_block(api: httpx.Client, agent_id: str) -> dict:
    found = api.get("/v1/blocks/", params={"tags": f"owner:{agent_id}",
                                          "label": note_label(NOTE)}).json()
    return next(b for b in found if b["label"] == note_label(NOTE))


def edit_file(path: Path, text: str) -> None:
    """Replace the value (after the frontmatter) of the block file `path` with `text`."""
    head, _, _ = path.read_text().partition("\n---\n")
    path.write_text(f"{head}\n---\n{text}")


def measure(api: httpx.Client, agent_id: str, n: int, rounds: int, work: Path) -> Figures:
    figures = Figures(n, rounds)
    serve = Serve(work / "home")
    try:
        url = serve.git_url(agent_id)
        figures.first_clone = timed(lambda: git("clone", "-q", url, str(work / "first")))
        bare = work / "bare.git"
        git("clone", "-q", "--bare", str(work / "first"), str(bare))
        git("clone", "-q", f"file://{bare}", str(work / "bare-a"))  # pulls from the bare copy
        git("clone", "-q", f"file://{bare}", str(work / "bare-b"))  # pushes to it
        block = note_block(api, agent_id)
        original = block["value"]
        note = f"{note_label(NOTE)}.md"
        try:
            for r in range(rounds):
                for d in (work / "c", work / "b"):
                    shutil.rmtree(d, ignore_errors=True)
                figures.clone.append(timed(lambda: git("clone", "-q", url, str(work / "c"))))
                figures.clone_bare.append(timed(lambda: git(
                    "clone", "-q", f"file://{bare}", str(work / "b"))))
                figures.listing.append(listing_s(api, agent_id, n))
                # pull after an API edit, and its floor
                value = f"API edit {r} {time.time()}\n"
                api.patch(f"/v1/blocks/{block['id']}", json={"value": value}).raise_for_status()
                figures.pull.append(timed(lambda: git("pull", "-q", "--ff-only",
                                                      cwd=work / "first")))
                if not (work / "first" / note).read_text().endswith(f"\n{value}"):
                    raise RuntimeError(f"the pull after the API edit does not show it ({r})")
                edit_file(work / "bare-b" / note, value)
                git("commit", "-qam", f"edit {r}", cwd=work / "bare-b")
                git("push", "-q", "origin", "HEAD:main", cwd=work / "bare-b")
                figures.pull_bare.append(timed(lambda: git("pull", "-q", "--ff-only",
                                                           cwd=work / "bare-a")))
                # push to live, and its floors
                value = f"pushed {r} {time.time()}\n"
                edit_file(work / "first" / note, value)
                git("commit", "-qam", f"push {r}", cwd=work / "first")
                figures.push.append(timed(lambda: git("push", "-q", "origin", "main",
                                                      cwd=work / "first")))
                if api.get(f"/v1/blocks/{block['id']}").json()["value"] != value:
                    raise RuntimeError(f"the server does not hold the pushed value ({r})")
                edit_file(work / "bare-a" / note, value)
                git("commit", "-qam", f"push {r}", cwd=work / "bare-a")
                figures.push_bare.append(timed(lambda: git("push", "-q", "origin", "HEAD:main",
                                                           cwd=work / "bare-a")))
                git("pull", "-q", "--rebase", cwd=work / "bare-b")
                raw = f"raw {r} {time.time()}\n"
                figures.push_raw.append(timed(lambda: (
                    api.get(f"/v1/blocks/{block['id']}").raise_for_status(),
                    api.patch(f"/v1/blocks/{block['id']}", json={"value": raw}
                              ).raise_for_status())))
                print(f"[serve] round {r + 1}/{rounds}: clone {figures.clone[-1]:.2f} s "
                      f"(bare {figures.clone_bare[-1]:.2f} s), pull {figures.pull[-1]:.2f} s, "
                      f"push {figures.push[-1]:.2f} s", flush=True)
        finally:
            api.patch(f"/v1/blocks/{block['id']}", json={"value": original})
    finally:
        serve.stop()
    return figures


def med(samples: list[float]) -> float:
    return statistics.median(samples)


def render(f: Figures) -> str:
    def row(what: str, samples: list[float], floor: str, floor_samples: list[float]) -> str:
        return (f"| {what} | {med(samples):.2f} s (max {max(samples):.2f}) | {floor} | "
                f"{med(floor_samples):.3f} s | {med(samples) / med(floor_samples):.1f}× |")
    return "\n".join([
        "## `memfuse serve` (`python bench/serve.py`; issue 20 points 3 and 9)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}: the agent "
        f"`memfuse-scale-{f.blocks}` ({f.blocks} detached notes of 5 KB + 3 attached blocks, "
        f"classic layout), the real `memfuse serve` and `git` against the real Letta server on "
        f"loopback; {f.rounds} interleaved rounds, medians (and the slowest sample). Floors in "
        f"the same run.",
        "",
        "| measure | memfuse serve | floor | floor time | ratio |",
        "|---|---|---|---|---|",
        f"| first clone (history made from {f.blocks + 3} blocks) | {f.first_clone:.2f} s | | | |",
        row("clone", f.clone, "`git clone file://` of a bare copy", f.clone_bare),
        row("clone", f.clone, "the take's two listings (raw httpx)", f.listing),
        row("pull after an API edit", f.pull, "`git pull` of one changed file from the bare "
            "copy", f.pull_bare),
        row("push of one changed block, live when it returns", f.push,
            "`git push` of one changed file to the bare copy", f.push_bare),
        row("push of one changed block, live when it returns", f.push,
            "the calls it needs, raw (`GET` + `PATCH`)", f.push_raw),
        "",
        "Target (issue 20 point 3): a clone of an agent with 1,000 blocks in at most 2 s. A "
        "clone, a pull and a push each list the agent's blocks first (the take), so each pays "
        "the listings; a push also reads each block it changes before its `PATCH` (the "
        "conflict base).",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=1000, help="N detached notes")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--results", type=Path, default=HERE / "results.md")
    args = parser.parse_args()
    api = httpx.Client(base_url=BASE, timeout=120)
    agent_id = ensure_population(api, args.blocks)
    with tempfile.TemporaryDirectory(prefix="memfuse-serve-bench-") as work:
        figures = measure(api, agent_id, args.blocks, args.rounds, Path(work))
    text = render(figures)
    print(text)
    replace_section(args.results, "serve", text)
    print(f"wrote the serve section of {args.results}")


if __name__ == "__main__":
    main()
