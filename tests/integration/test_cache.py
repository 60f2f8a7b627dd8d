"""The kernel's caches, for real: warm reads come from the page cache and attributes are kept,
yet no stale byte or size is ever seen, whatever changed the file (the server through the
poller, a write through the mount, a write through another open file)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from .conftest import block_by_label, start_mount, stop_mount, wait_for

pytestmark = pytest.mark.integration

HUMAN = "---\ndescription: About the human\nlimit: 2000\n---\nThe human.\n"


@pytest.fixture
def cached(agent, home):
    """A mount whose opens never ask the server (revalidation window of an hour): only the
    poller brings the server's changes, so the kernel's caches are what is tested."""
    m = start_mount(agent, home, "--revalidate", "3600")
    yield m
    stop_mount(m)


@pytest.mark.parametrize("new_value", ["A much longer value than the one before it.\n" * 3,
                                       "short\n"])
def test_a_server_change_reaches_a_warm_cache_exactly(cached, api, new_value):
    m = cached
    for _ in range(3):  # warm: pages and attributes in the kernel
        assert m.sh("cat system/human.md").stdout == HUMAN
    # a reader holding the file open keeps its pages alive across the change
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "f = open(sys.argv[1]); f.read(); time.sleep(30)",
                               str(m.path / "system/human.md")])
    try:
        block = block_by_label(api, m.agent_id, "human")
        api.patch(f"/v1/blocks/{block['id']}", json={"value": new_value}).raise_for_status()
        expected = HUMAN.replace("The human.\n", new_value)
        wait_for(lambda: m.sh("cat system/human.md").stdout == expected, 10)
        assert (m.path / "system/human.md").stat().st_size == len(expected.encode())
        assert m.sh("wc -c < system/human.md").stdout.strip() == str(len(expected.encode()))
        with open(m.path / "system/human.md", "rb") as f:  # mmap-free, read to EOF
            assert f.read() == expected.encode()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("new_value", ["A much longer value than the one before it.\n" * 3,
                                       "short\n"])
def test_an_open_that_revalidates_drops_the_cached_size_and_pages(agent, home, api, new_value):
    # no poller in the way: the open's own read of the server is what changes the file
    m = start_mount(agent, home, "--revalidate", "0.5", "--poll-interval", "3600",
                    "--full-poll-interval", "3600")
    try:
        for _ in range(3):
            assert m.sh("cat system/human.md").stdout == HUMAN
        (m.path / "system/human.md").stat()  # the kernel holds the attributes (60 s)
        block = block_by_label(api, m.agent_id, "human")
        api.patch(f"/v1/blocks/{block['id']}", json={"value": new_value}).raise_for_status()
        time.sleep(0.7)  # past the revalidation window
        expected = HUMAN.replace("The human.\n", new_value)
        assert m.sh("cat system/human.md").stdout == expected
        assert (m.path / "system/human.md").stat().st_size == len(expected.encode())
    finally:
        stop_mount(m)


def test_an_old_open_file_refilling_the_pages_never_shows_through_a_new_open(cached, api):
    m = cached
    path = m.path / "system/human.md"
    with open(path, "rb", buffering=0) as old:
        assert old.read() == HUMAN.encode()  # this open file reads the version it opened
        block = block_by_label(api, m.agent_id, "human")
        api.patch(f"/v1/blocks/{block['id']}", json={"value": "New.\n"}).raise_for_status()
        expected = HUMAN.replace("The human.\n", "New.\n").encode()
        wait_for(lambda: path.stat().st_size == len(expected), 10)  # the poller saw it
        old.seek(0)
        old.read()  # the old open file refills the kernel's pages with its own version
        assert m.sh("cat system/human.md").stdout.encode() == expected
        with open(path, "rb") as new:
            assert new.read() == expected


def test_a_write_through_the_mount_is_read_back_rendered_at_once(cached):
    m = cached
    assert m.sh("cat system/human.md").stdout == HUMAN
    for value in ("one\n", "a longer second value\n", "3\n"):
        m.sh(f"printf '{value}' > system/human.md")
        shown = m.sh("cat system/human.md").stdout  # no wait: close-to-open
        assert shown == HUMAN.replace("The human.\n", value)
        assert (m.path / "system/human.md").stat().st_size == len(shown.encode())


def test_a_file_read_while_another_process_writes_it(cached):
    m = cached
    path = m.path / "system/human.md"
    with open(path, "rb") as reader:
        assert reader.read() == HUMAN.encode()
        with open(path, "w") as writer:  # another open file description writes meanwhile
            writer.write("written while a reader had it open\n")
        after = HUMAN.replace("The human.\n", "written while a reader had it open\n")
        with open(path, "rb") as fresh:  # close-to-open: a new open sees the close
            assert fresh.read() == after.encode()
        assert os.fstat(reader.fileno()).st_size == len(after.encode())
    assert m.sh("cat system/human.md").stdout == after


def test_server_side_relabel_detach_and_delete_leave_cached_entries_at_once(cached, api):
    """The kernel keeps directory entries (fs.ENTRY_TIMEOUT: a minute). A block file the server
    relabels, detaches or deletes leaves its old path as soon as the mount shows the change,
    not when the kernel's entry expires: each such change invalidates the entry."""
    m = cached
    system = m.path / "system"
    human = block_by_label(api, m.agent_id, "human")
    persona = block_by_label(api, m.agent_id, "persona")
    note = api.post("/v1/blocks/", json={"label": "note", "value": "n\n",
                                         "tags": [f"owner:{m.agent_id}"]}).json()
    wait_for(lambda: (m.path / "note.md").exists(), 10)
    old = [system / "human.md", system / "persona.md", m.path / "note.md"]
    for path in old:
        path.stat()  # the kernel now holds each entry and its attributes
    api.patch(f"/v1/blocks/{human['id']}", json={"label": "renamed"}).raise_for_status()
    api.patch(f"/v1/agents/{m.agent_id}/core-memory/blocks/detach/{persona['id']}"
              ).raise_for_status()
    api.delete(f"/v1/blocks/{note['id']}").raise_for_status()
    # readdir is never cached: once it shows the changes, the mount has made them
    wait_for(lambda: os.listdir(system) == ["renamed.md"]
             and "note.md" not in os.listdir(m.path), 10)
    # the entries' notifications reach the kernel a moment later; without them the old
    # paths would stay for the entry timeout
    wait_for(lambda: not any(path.exists() for path in old), 5)
    assert (system / "renamed.md").read_text() == HUMAN
