"""Each name has one order, for real (SEMANTICS.md, "Ordering"): shells and Python at full speed
on a real mount of a real Letta server, at the server's own speed and behind a loopback proxy
that holds each answer back 1 s. A label has one block, whatever the timing; no command that
exits 0 loses its text. The long form (20 runs each) is in scripts/chaos --ordering.
"""
from __future__ import annotations

import errno
import re
import subprocess

import pytest

from .conftest import start_mount, stop_mount, wait_for

pytestmark = pytest.mark.integration


def blocks_labelled(api, agent_id: str, label: str) -> list[dict]:
    """Every block with `label` the agent has: attached, or tagged owner:<agent>."""
    attached = api.get(f"/v1/agents/{agent_id}/core-memory/blocks").json()
    owned = api.get("/v1/blocks/", params={"tags": f"owner:{agent_id}"}).json()
    found = {b["id"]: b for b in attached + owned if b["label"] == label}
    return list(found.values())


def attached_ids(api, agent_id: str) -> set[str]:
    return {b["id"] for b in api.get(f"/v1/agents/{agent_id}/core-memory/blocks").json()}


@pytest.fixture(params=["direct", "slow"])
def m(request, agent, home, proxy):
    """A mount straight to the server, or through a proxy that adds 1 s to every answer."""
    if request.param == "slow":
        proxy.delay = 1.0
        mount = start_mount(agent, home, "--base-url", proxy.url)
    else:
        mount = start_mount(agent, home)
    yield mount
    proxy.delay = 0.0
    stop_mount(mount)


def test_touch_then_append_lands_in_the_one_block(m, api):
    script = "; ".join(f'touch {d}s{n}.md && echo "shell {n}" >> {d}s{n}.md'
                       for d in ("system/", "") for n in range(2))
    m.sh(script)
    for d in ("system/", ""):
        for n in range(2):
            assert (m.path / f"{d}s{n}.md").read_text().endswith(f"shell {n}\n")
    attached = attached_ids(api, m.agent_id)
    for n in range(2):
        found = blocks_labelled(api, m.agent_id, f"s{n}")
        # one attached block (system/sN.md) and one detached (sN.md): one block per path
        assert sorted((b["id"] in attached, b["value"]) for b in found) == [
            (False, f"shell {n}\n"), (True, f"shell {n}\n")]


def test_python_create_then_append_never_gives_eexist(mount, api):
    m = mount
    script = ("import sys\n"
              "for n in range(5):\n"
              "    p = f'system/py{n}.md'\n"
              "    open(p, 'w').close()\n"
              "    with open(p, 'a') as f:\n"
              "        f.write(f'line {n}\\n')\n")
    subprocess.run(["python3", "-c", script], cwd=m.path, check=True, timeout=120)
    for n in range(5):
        assert [b["value"] for b in blocks_labelled(api, m.agent_id, f"py{n}")] == [
            f"line {n}\n"]


def test_touch_then_mv_and_touch_then_rm(m, api):
    m.sh("touch system/m.md && mv system/m.md system/m2.md && touch k.md && rm k.md && "
         "touch n.md && rm n.md && echo test > n.md && stat n.md >/dev/null")
    assert blocks_labelled(api, m.agent_id, "m") == []
    [moved] = blocks_labelled(api, m.agent_id, "m2")
    assert moved["id"] in attached_ids(api, m.agent_id)
    assert not (m.path / "system/m.md").exists() and (m.path / "system/m2.md").exists()
    assert not (m.path / "k.md").exists()
    assert [b["value"] for b in blocks_labelled(api, m.agent_id, "n")] == ["test\n"]
    assert (m.path / "n.md").read_text().endswith("test\n")


def test_two_processes_creating_one_name_make_one_block(mount, api):
    m = mount
    names = [f"{d}c{n}.md" for d in ("system/", "") for n in range(3)]
    script = "\n".join(
        f"python3 -c \"open('{p}', 'w').write('one\\n')\" & "
        f"python3 -c \"open('{p}', 'w').write('two\\n')\" & wait" for p in names)
    result = m.sh("set -e\n" + script)
    assert result.returncode == 0
    for n in range(3):
        found = blocks_labelled(api, m.agent_id, f"c{n}")
        assert len(found) == 2, found  # system/cN.md and cN.md: one block each
        assert {b["value"] for b in found} <= {"one\n", "two\n"}
    for p in names:  # the later close wins; both texts are in history
        wait_for(lambda: {"+one", "+two"} <= set(
            m.sh(f"git log -p --format= -- {p}").stdout.splitlines()), timeout=15)


def _marker_drop(request: bytes) -> bool:
    return (request.startswith(b"PATCH /v1/blocks/") and b'"tags"' in request
            and b"memfuse-create:" not in request)


def test_a_lost_answer_to_a_creates_last_step_stalls_nothing(agent, home, proxy, api):
    """Issue 17's repro: the PATCH that drops a create's marker tag takes effect, its answer is
    lost and the link is down for 5 s. The create is journaled; at replay it finds its block
    by its label (the 409 of the attach), the journal empties, and one block has the label."""
    m = start_mount(agent, home, "--base-url", proxy.url)
    try:
        proxy.lose_answer = _marker_drop
        m.sh("echo x > system/new.md; echo y > system/human.md")
        assert proxy.lost == 1
        wait_for(lambda: block_value(api, agent, "human") == "y\n", timeout=30)
        wait_for(lambda: re.search(r"journal\s+empty", m.memfuse("status").stdout), timeout=30)
        [block] = blocks_labelled(api, agent, "new")
        assert block["value"] == "x\n" and block["id"] in attached_ids(api, agent)
        assert not any(t.startswith("memfuse-create:") for t in block["tags"])
        assert (m.path / "system/new.md").read_text().endswith("x\n")
    finally:
        stop_mount(m)


def block_value(api, agent_id: str, label: str) -> str | None:
    found = blocks_labelled(api, agent_id, label)
    return found[0]["value"] if found else None


APPENDER = """
import os, sys
n, count = sys.argv[1], int(sys.argv[2])
for i in range(count):
    fd = os.open("system/human.md", os.O_WRONLY | os.O_APPEND)
    os.write(fd, f"shell {n} line {i}\\n".encode())
    os.close(fd)  # raises if the close failed
"""


def test_three_appenders_keep_every_line(mount, api):
    m = mount
    count = 20  # scripts/chaos --ordering runs 100 each
    procs = [subprocess.Popen(["python3", "-c", APPENDER, str(n), str(count)], cwd=m.path,
                              stderr=subprocess.PIPE, text=True) for n in range(3)]
    for p in procs:
        assert p.wait(timeout=240) == 0, p.stderr.read()
    lines = block_value(api, m.agent_id, "human").splitlines()
    assert len(lines) == 1 + 3 * count
    for n in range(3):
        assert [x for x in lines if x.startswith(f"shell {n} ")] == [
            f"shell {n} line {i}" for i in range(count)]


def test_an_api_edit_while_an_append_is_open_is_kept(mount, api):
    block = blocks_labelled(api, mount.agent_id, "human")[0]
    with open(mount.path / "system/human.md", "a") as f:
        f.write("appended\n")
        f.flush()  # the bytes reach the daemon's handle; the close sends them
        api.patch(f"/v1/blocks/{block['id']}", json={"value": "Edited.\n"}).raise_for_status()
    assert block_value(api, mount.agent_id, "human") == "Edited.\nappended\n"


SAVER = """
import os, sys, time
versions = [b"a" * 10, b"b" * 1000]
end = time.monotonic() + float(sys.argv[1])
i = 0
while time.monotonic() < end:
    fd = os.open("system/human.md", os.O_WRONLY | os.O_TRUNC)  # a save in place (nano, >)
    os.write(fd, versions[i % 2])
    os.close(fd)
    i += 1
    if i == 1:
        print("saving", flush=True)  # the reader starts now
print(i)
"""

READER = """
import sys, time
end = time.monotonic() + float(sys.argv[1])
torn = reads = 0
while time.monotonic() < end:
    with open("system/human.md", "rb") as f:
        data = f.read()
    value = data.split(b"---\\n", 2)[-1]
    reads += 1
    if value not in (b"a" * 10, b"b" * 1000, b"The human.\\n"):
        torn += 1
        print(repr(data[:80]), len(data), file=sys.stderr)
print(reads, torn)
"""


def test_a_reader_during_saves_in_place_never_reads_a_torn_file(mount):
    seconds = "4"  # scripts/chaos --ordering runs 60 s
    saver = subprocess.Popen(["python3", "-c", SAVER, seconds], cwd=mount.path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # a reader that opened before any save began reads through the kernel's page cache, and
    # the first O_TRUNC empties that for it as on any filesystem: readers *during* saves
    assert saver.stdout.readline() == "saving\n", saver.stderr.read()
    reader = subprocess.run(["python3", "-c", READER, seconds], cwd=mount.path,
                            capture_output=True, text=True, timeout=120)
    assert saver.wait(timeout=120) == 0, saver.stderr.read()
    reads, torn = map(int, reader.stdout.split())
    assert int(saver.stdout.read()) > 10 and reads > 10
    assert torn == 0, reader.stderr[:2000]


def test_a_close_after_the_server_deleted_the_block_fails_and_keeps_the_bytes(mount, api):
    """Issue 17's repro: a file open for writing, its block deleted through the API, the
    poller shows it gone, then the close: ESTALE, and the bytes are in history."""
    block = blocks_labelled(api, mount.agent_id, "human")[0]
    f = open(mount.path / "system/human.md", "w")
    f.write("UNIQUE\n")
    f.flush()
    api.delete(f"/v1/blocks/{block['id']}").raise_for_status()
    wait_for(lambda: not (mount.path / "system/human.md").exists(), timeout=15)
    with pytest.raises(OSError) as caught:
        f.close()
    assert caught.value.errno == errno.ESTALE
    wait_for(lambda: "+UNIQUE" in mount.sh("git log -p --all --format=").stdout.splitlines(),
             timeout=15)
