"""The server away, for real: a loopback TCP proxy between the mount and the Letta server is
cut and restored while programs read and write: reads never wait on the dead server, writes
are journaled (durably, through kill -9 and unmount) and replayed when it answers again."""
from __future__ import annotations

import base64
import errno
import json
import os
import subprocess
import time

import pytest

from .conftest import block_by_label, start_mount, stop_mount, wait_for

pytestmark = pytest.mark.integration

HUMAN = "---\ndescription: About the human\nlimit: 2000\n---\nThe human.\n"


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
    wait_for(lambda: "1 change(s) waiting for the server" in m.memfuse("status", m.agent_id)
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
    assert "1 change(s) the server did not take yet are kept in" in result.stdout
    assert not os.path.ismount(m.path)
    proxy.restore()
    m = start_mount(agent, home, "--base-url", proxy.url)
    try:
        wait_for(lambda: block_by_label(api, agent, "human")["value"] == "Kept for later.\n", 20)
    finally:
        stop_mount(m)


def owned_labels(api, agent_id: str) -> list[str]:
    return sorted(b["label"] for b in api.get("/v1/blocks/", params={
        "tags": f"owner:{agent_id}", "limit": 100}).json())


def test_create_rename_and_unlink_during_an_outage_are_journaled_then_replayed(proxied, proxy,
                                                                               api):
    m = proxied
    m.sh("echo 'Notes.' > notes.md")  # online: a detached block
    wait_for(lambda: "notes" in owned_labels(api, m.agent_id), 10)
    proxy.cut()
    m.sh("echo 'Made while the server was away.' > system/todo.md")  # exit 0: journaled create
    m.sh("mv notes.md system/notes.md")  # attach
    m.sh("rm system/persona.md")  # its retirement comes after the 2 s grace period
    assert m.sh("ls system").stdout.split() == ["human.md", "notes.md", "todo.md"]
    assert m.sh("cat system/todo.md").stdout.endswith("---\nMade while the server was away.\n")
    time.sleep(3)  # the grace period ends with the server away: the unlink is queued
    status = wait_for(lambda: "3 change(s) waiting for the server" in (
        s := m.memfuse("status", m.agent_id).stdout) and s, 10)
    assert "UNREACHABLE" in status
    assert m.sh("ls system").stdout.split() == ["human.md", "notes.md", "todo.md"]
    proxy.restore()
    wait_for(lambda: "journal        empty" in m.memfuse("status", m.agent_id).stdout, 20)
    attached = {b["label"]: b for b in api.get(
        f"/v1/agents/{m.agent_id}/core-memory/blocks").json()}
    assert sorted(attached) == ["human", "notes", "todo"]  # persona detached, notes attached
    assert attached["todo"]["value"] == "Made while the server was away.\n"
    assert owned_labels(api, m.agent_id).count("todo") == 1  # one block, never two
    assert m.sh("ls system").stdout.split() == ["human.md", "notes.md", "todo.md"]
    time.sleep(1.5)  # a poll after the replay changes nothing
    assert m.sh("ls system").stdout.split() == ["human.md", "notes.md", "todo.md"]
    assert m.sh("git status --porcelain").stdout == ""


def test_journaled_namespace_changes_survive_kill_9(agent, home, proxy, api):
    m = start_mount(agent, home, "--base-url", proxy.url)
    try:
        proxy.cut()
        m.sh("echo 'Created, then the daemon died.' > system/later.md")
        m.sh("rm system/persona.md")  # killed within its grace period
        pid = json.loads((m.state / "memfuse.pid").read_text())["pid"]
        os.kill(pid, 9)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10)
        proxy.restore()
        m = start_mount(agent, home, "--base-url", proxy.url)  # clears the dead mount itself
        assert "the mount of a daemon that died" in m.log()
        assert m.sh("ls system").stdout.split() == ["human.md", "later.md"]
        wait_for(lambda: "journal        empty" in m.memfuse("status", agent).stdout, 20)
        attached = {b["label"]: b for b in api.get(
            f"/v1/agents/{agent}/core-memory/blocks").json()}
        assert sorted(attached) == ["human", "later"]
        assert attached["later"]["value"] == "Created, then the daemon died.\n"
    finally:
        stop_mount(m)


def test_a_failed_close_keeps_its_bytes_in_history_and_leaves_no_phantom_file(mount, api):
    m = mount
    big, bigger = "x" * 2001, "y" * 20001  # human's limit is 2000; a new file's is 20000
    for name, data in (("system/human.md", big), ("new.md", bigger)):
        with pytest.raises(OSError) as caught:
            with open(m.path / name, "w") as f:
                f.write(data)
        assert caught.value.errno == errno.EFBIG
    assert "new.md" not in m.sh("ls").stdout.split()  # no file the server does not know
    assert block_by_label(api, m.agent_id, "human")["value"] == "The human.\n"
    wait_for(lambda: "Rejected local edit" in m.sh("git log --format=%s").stdout, 10)
    shown = m.sh("git log -p --format=%s").stdout
    assert big in shown and bigger in shown  # a person gets the bytes back with git
    wait_for(lambda: m.sh("git status --porcelain").stdout == "", 10)
