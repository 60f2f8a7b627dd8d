"""Latency benchmark of a real mount against the real Letta server (loopback).

Measures, side by side in one run:
- server -> mount: a PATCH through the API until a read in the mount returns the new value,
  with revalidation on open switched off (--revalidate 3600), so only the poller counts;
- a write through the mount (open, write, close: one PATCH) against the same PATCH made
  directly with httpx;
- a read through the mount (`open`/`read`/`close` within the revalidation window) against a
  GET of the block.
Writes its markdown tables into its own section of the file given as the first argument
(bench/sections.py), leaving the other sections alone.
Usage: LETTA_BASE_URL=... python bench/latency.py bench/results.md [ROUNDS]
"""
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from sections import replace_section

BASE = os.environ["LETTA_BASE_URL"]
MEMFUSE = str(Path(sys.executable).parent / "memfuse")


def agent(api) -> str:
    response = api.post("/v1/agents/", json={
        "name": f"memfuse-bench-{uuid.uuid4().hex[:8]}", "model": "letta/letta-free",
        "embedding": "letta/letta-free", "include_base_tools": False,
        "memory_blocks": [{"label": "human", "value": "start\n", "description": "d"}]})
    response.raise_for_status()
    return response.json()["id"]


def mount(agent_id, home, mountpoint, *args):
    env = dict(os.environ, HOME=home)
    subprocess.run([MEMFUSE, "mount", agent_id, mountpoint, *args], env=env, check=True,
                   capture_output=True)
    return env


def umount(mountpoint, env):
    subprocess.run([MEMFUSE, "umount", mountpoint], env=env, check=True, capture_output=True)


def summary(samples):
    ms = [s * 1000 for s in samples]
    return statistics.median(ms), max(ms)


def main():
    out = Path(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    api = httpx.Client(base_url=BASE, timeout=30)
    agent_id = agent(api)
    block_id = api.get(f"/v1/agents/{agent_id}/core-memory/blocks").json()[0]["id"]
    home = tempfile.mkdtemp(prefix="memfuse-bench-", dir=os.path.expanduser("~/.cache"))
    mountpoint = os.path.join(home, "memory")
    path = os.path.join(mountpoint, "system", "human.md")

    # 1. server -> mount, poller only.
    env = mount(agent_id, home, mountpoint, "--revalidate", "3600")
    delays = []
    try:
        for i in range(rounds):
            value = f"server edit {i} {uuid.uuid4().hex}\n"
            api.patch(f"/v1/blocks/{block_id}", json={"value": value}).raise_for_status()
            start = time.monotonic()
            while not open(path).read().endswith(value):
                if time.monotonic() - start > 30:
                    raise SystemExit(f"edit {i} not seen within 30 s")
                time.sleep(0.005)
            delays.append(time.monotonic() - start)
            time.sleep(0.3)  # let the poll phase drift so the samples spread over the interval
    finally:
        umount(mountpoint, env)

    # 2. and 3. writes and reads through the mount against the API directly, interleaved.
    env = mount(agent_id, home, mountpoint)
    mount_writes, api_writes, mount_reads, api_reads = [], [], [], []
    try:
        for i in range(rounds):
            start = time.monotonic()
            with open(path, "w") as f:
                f.write(f"mount write {i}\n")
            mount_writes.append(time.monotonic() - start)
            start = time.monotonic()
            api.patch(f"/v1/blocks/{block_id}", json={"value": f"api write {i}\n"})
            api_writes.append(time.monotonic() - start)
            open(path).read()  # revalidate now, so the timed read below is inside the window
            start = time.monotonic()
            open(path).read()
            mount_reads.append(time.monotonic() - start)
            start = time.monotonic()
            api.get(f"/v1/blocks/{block_id}").json()
            api_reads.append(time.monotonic() - start)
    finally:
        umount(mountpoint, env)
        api.delete(f"/v1/agents/{agent_id}")

    d_med, d_max = summary(delays)
    mw, aw, mr, ar = (summary(x)[0] for x in (mount_writes, api_writes, mount_reads, api_reads))
    replace_section(out, "latency", f"""Run `scripts/bench` to refresh. Last run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())},
{platform.machine()}, {os.cpu_count()} cores, Letta server 0.16.8 on loopback, {rounds} rounds
each, default poll intervals (attached blocks every 0.5 s, all blocks every 3 s). Shared machine: compare the ratios, not the absolute times.

| measure | median | worst | target |
|---|---|---|---|
| server -> mount delay (API PATCH until a read in the mount shows it; poller only) | {d_med:.0f} ms | {d_max:.0f} ms | within 2 s |

| operation | through the mount (median) | API directly (median) | ratio |
|---|---|---|---|
| write a block (open/write/close = GET + PATCH, vs one PATCH) | {mw:.1f} ms | {aw:.1f} ms | {mw / aw:.2f}x |
| read a block (cached, inside the revalidation window, vs one GET) | {mr:.2f} ms | {ar:.1f} ms | {mr / ar:.3f}x |
""", first=True)
    print(out.read_text())


if __name__ == "__main__":
    main()
