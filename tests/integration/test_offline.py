"""The server away, for real: a loopback TCP proxy between the mount and the Letta server is
cut and restored while programs read and write: reads never wait on the dead server, writes
are journaled (durably, through kill -9 and unmount) and replayed when it answers again."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from urllib.parse import urlparse

import pytest

from .conftest import block_by_label, start_mount, stop_mount, wait_for
from .proxy import Proxy

pytestmark = pytest.mark.integration

HUMAN = "---\ndescription: About the human\nlimit: 2000\n---\nThe human.\n"


@pytest.fixture
def proxy(letta_url):
    url = urlparse(letta_url)
    p = Proxy((url.hostname, url.port))
    yield p
    p.close()


@pytest.fixture
def proxied(agent, home, proxy):
    """A mount of `agent` that reaches the server through `proxy`."""
    m = start_mount(agent, home, "--base-url", proxy.url)
    yield m
    stop_mount(m)


def timed_cat(mount) -> tuple[float, str]:
    started = time.monotonic()
    out = mount.sh("cat system/human.md").stdout
    return time.monotonic() - started, out


def test_reads_serve_the_cache_at_once_while_the_server_is_cut_off(proxied, proxy, api):
    m = proxied
    assert m.sh("cat system/human.md").stdout == HUMAN
    time.sleep(0.6)  # past the revalidation window: the next open asks the server
    proxy.cut()
    first, out = timed_cat(m)
    assert out == HUMAN
    assert first < 3  # one refused connect, never the 10 s retry budget
    started = time.monotonic()
    for _ in range(20):
        assert timed_cat(m)[1] == HUMAN
    assert time.monotonic() - started < 10  # was 20 x 9 s
    status = wait_for(lambda: "UNREACHABLE since" in (s := m.memfuse("status", m.agent_id)
                                                       .stdout) and s, 10)
    assert "serving the last known state" in status
    proxy.restore()
    wait_for(lambda: ": reachable" in m.memfuse("status", m.agent_id).stdout, 15)
    human = block_by_label(api, m.agent_id, "human")
    api.patch(f"/v1/blocks/{human['id']}", json={"value": "Back online.\n"})
    time.sleep(0.6)  # the revalidation window
    assert m.sh("cat system/human.md").stdout.endswith("Back online.\n")


def git_log(mount) -> list[str]:
    return mount.sh("git log --format='%an|%s'").stdout.splitlines()


def test_a_write_during_an_outage_is_journaled_then_replayed(proxied, proxy, api):
    m = proxied
    proxy.cut()
    started = time.monotonic()
    m.sh("echo 'Written while the server was away.' > system/human.md")  # exit 0: journaled
    assert time.monotonic() - started < 6  # a 2 s budget, not 10 s and EIO
    assert m.sh("cat system/human.md").stdout.endswith("Written while the server was away.\n")
    # the status file is published every second: wait for the one after the write
    wait_for(lambda: "1 write(s) waiting for the server" in m.memfuse("status", m.agent_id)
             .stdout, 10)
    journal = m.state / "memory.journal"  # beside the history, never in the mount
    entry = json.loads(journal.read_text().splitlines()[0])
    assert base64.b64decode(entry["content"]) == b"Written while the server was away.\n"
    proxy.restore()
    wait_for(lambda: block_by_label(api, m.agent_id, "human")["value"]
             == "Written while the server was away.\n", 20)
    wait_for(lambda: "journal        empty" in m.memfuse("status", m.agent_id).stdout, 10)
    user = m.sh("id -un").stdout.strip()
    wait_for(lambda: f"{user}|Local edit: system/human.md" in git_log(m), 10)


def test_a_journaled_write_survives_kill_9_and_is_sent_at_the_next_mount(agent, home, proxy,
                                                                        api):
    m = start_mount(agent, home, "--base-url", proxy.url)
    try:
        proxy.cut()
        m.sh("echo 'Journaled, then the daemon died.' > system/human.md")
        os.kill(json.loads((m.state / "memfuse.pid").read_text())["pid"], 9)
        subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False)
        m.memfuse("umount", agent, check=False)
        proxy.restore()
        m = start_mount(agent, home, "--base-url", proxy.url)
        assert m.sh("cat system/human.md").stdout.endswith("Journaled, then the daemon died.\n")
        wait_for(lambda: block_by_label(api, agent, "human")["value"]
                 == "Journaled, then the daemon died.\n", 20)
    finally:
        stop_mount(m)


def test_umount_during_an_outage_keeps_the_journal_and_says_so(agent, home, proxy, api):
    m = start_mount(agent, home, "--base-url", proxy.url)
    proxy.cut()
    m.sh("echo 'Kept for later.' > system/human.md")
    started = time.monotonic()
    result = m.memfuse("umount", agent)
    assert time.monotonic() - started < 40
    assert "1 write(s) the server did not take yet are kept in" in result.stdout
    assert not os.path.ismount(m.path)
    proxy.restore()
    m = start_mount(agent, home, "--base-url", proxy.url)
    try:
        wait_for(lambda: block_by_label(api, agent, "human")["value"] == "Kept for later.\n", 20)
    finally:
        stop_mount(m)
