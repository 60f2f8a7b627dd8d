"""A mount started while the server is away (local-first), for real: `memfuse mount` with the
network to the server cut (a loopback proxy), and across a real restart of a second Letta
server with kill -9 of the daemon in between. The mount starts from the history, the block
map and the journal, says so, and when the server answers shows (and commits as the
server's) what changed there, then sends the journal."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from .conftest import (DEFAULT_BLOCKS, block_by_label, make_agent, start_mount, stop_mount,
                       wait_for)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# A second server, stopped and started by the tests (never the shared one on 8383).
SECOND_SERVER = {"MEMFUSE_LETTA_HOME": str(Path.home() / ".cache/memfuse/letta-server-flaky"),
                 "MEMFUSE_LETTA_PORT": "8384"}


def git_log(mount) -> list[str]:
    return mount.sh("git log --format='%an|%s'").stdout.splitlines()


def status(mount) -> str:
    return mount.memfuse("status", mount.agent_id).stdout


def local_first_notice(stderr: str, blocks: int, journaled: int) -> bool:
    return bool(re.search(rf"memfuse: the server at \S+ cannot be reached \(.*\); mounted agent "
                          rf"\S+ from its local history \({blocks} blocks, {journaled} journaled "
                          rf"changes\); changes are sent when it answers", stderr))


def test_with_the_server_cut_off_a_mount_starts_from_history_then_reconciles(
        agent, home, proxy, api):
    m = start_mount(agent, home, "--base-url", proxy.url)
    online = m.sh("cat system/human.md system/persona.md").stdout
    stop_mount(m)
    proxy.cut()
    result = m.memfuse("mount", agent, "--revalidate", "0.5", "--base-url", proxy.url)
    try:
        assert local_first_notice(result.stderr, blocks=2, journaled=0), result.stderr
        assert os.path.ismount(m.path)
        assert m.sh("cat system/human.md system/persona.md").stdout == online
        m.sh("echo 'Written while the server was away.' > system/human.md")  # exit 0: journaled
        wait_for(lambda: "local-first (mounted from history at" in status(m)
                 and "1 change(s) waiting for the server" in status(m), 10)
        persona = block_by_label(api, agent, "persona")
        api.patch(f"/v1/blocks/{persona['id']}", json={"value": "Changed on the server.\n"})
        proxy.restore()
        wait_for(lambda: m.sh("cat system/persona.md").stdout.endswith(
            "---\nChanged on the server.\n"), 20)
        wait_for(lambda: block_by_label(api, agent, "human")["value"]
                 == "Written while the server was away.\n", 20)
        wait_for(lambda: "Letta server|Server change: system/persona.md" in git_log(m), 10)
        wait_for(lambda: "journal        empty" in (s := status(m)) and ": reachable" in s
                 and "local-first" not in s, 10)
        user = m.sh("id -un").stdout.strip()
        assert f"{user}|Local edit: system/human.md" in git_log(m)
    finally:
        stop_mount(m)


def letta_server(command: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts/letta-server"), command], capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, **SECOND_SERVER))


def start_second_server() -> str:
    """Start the second server (installing it on a fresh machine) and return its URL; fail
    the test, never skip it, when it does not start."""
    result = letta_server("start")
    if result.returncode != 0:
        pytest.fail(f"the second Letta server (port {SECOND_SERVER['MEMFUSE_LETTA_PORT']}) did "
                    f"not start: {result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def second_server() -> str:
    """A Letta server of this module's own, which its tests may stop and start again."""
    url = start_second_server()
    yield url
    letta_server("stop")


def test_a_journaled_write_survives_a_server_restart_and_kill_9_of_the_daemon(
        second_server, home):
    with httpx.Client(base_url=second_server, timeout=30) as api:
        agent = make_agent(api, DEFAULT_BLOCKS)
    env = dict(home, LETTA_BASE_URL=second_server)
    m = start_mount(agent, env)
    try:
        m.sh("echo 'Before the restart.' > system/human.md")
        result = letta_server("stop")
        assert result.returncode == 0, result.stderr
        m.sh("echo 'Written while the server was stopped.' > system/human.md")  # exit 0
        os.kill(json.loads((m.state / "memfuse.pid").read_text())["pid"], 9)
        subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False)
        m.memfuse("umount", agent, check=False)
        result = m.memfuse("mount", agent, "--revalidate", "0.5")  # the server still stopped
        assert local_first_notice(result.stderr, blocks=2, journaled=1), result.stderr
        assert m.sh("cat system/human.md").stdout.endswith(
            "---\nWritten while the server was stopped.\n")
        assert "local-first (mounted from history at" in status(m)
        start_second_server()
        with httpx.Client(base_url=second_server, timeout=30) as api:
            wait_for(lambda: block_by_label(api, agent, "human")["value"]
                     == "Written while the server was stopped.\n", 60)
        wait_for(lambda: "journal        empty" in (s := status(m)) and ": reachable" in s
                 and "local-first" not in s, 20)
        assert m.sh("cat system/human.md").stdout.endswith(
            "---\nWritten while the server was stopped.\n")
        user = m.sh("id -un").stdout.strip()
        last = m.sh("git log -1 --format='%an|%s' -- system/human.md").stdout.strip()
        # committed before the kill, or at the next mount if the kill came first
        assert last in (f"{user}|Local edit: system/human.md",
                        f"{user}|Local edit (recovered at mount): system/human.md"), last
        assert m.sh("git show HEAD:system/human.md").stdout.endswith(
            "---\nWritten while the server was stopped.\n")
    finally:
        stop_mount(m)
        start_second_server()  # for the module's next test, whatever happened here
        with httpx.Client(base_url=second_server, timeout=30) as api:
            api.delete(f"/v1/agents/{agent}")
