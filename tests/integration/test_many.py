"""Many agents on the real server with real mounts: `mount --all --tag`, `list`, `umount --all`,
and a block attached to two agents, live in both mounts.

The server is shared with other tests: every `--all` here selects a tag made for the test, and
`umount --all` acts on the test's own HOME only.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from .conftest import MEMFUSE, Mount, start_mount, wait_for

pytestmark = pytest.mark.integration


def memfuse(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MEMFUSE, *args], env=env, capture_output=True, text=True,
                          timeout=240)


def tagged_agent(api, name: str, tags: list[str], value: str = "The human.\n") -> str:
    response = api.post("/v1/agents/", json={
        "name": name, "model": "letta/letta-free", "embedding": "letta/letta-free",
        "include_base_tools": False, "tags": tags,
        "memory_blocks": [{"label": "human", "value": value, "limit": 2000}]})
    response.raise_for_status()
    return response.json()["id"]


@pytest.fixture
def agents(api):
    """Makes agents (tagged_agent's arguments) and deletes them after the test."""
    made = []

    def make(*args, **kw) -> str:
        made.append(tagged_agent(api, *args, **kw))
        return made[-1]

    yield make
    for agent_id in made:
        api.delete(f"/v1/agents/{agent_id}")


@pytest.fixture
def home_mounts(home):
    """The test's HOME; every mount left in it is unmounted after the test."""
    yield home
    result = memfuse(home, "umount", "--all")
    agents = Path(home["HOME"]) / ".letta" / "agents"
    left = [p for p in agents.glob("*/memory") if os.path.ismount(p)]
    for path in left:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)
    assert not left, f"umount --all left mounts: {result.stdout}{result.stderr}"


def mountpoint(env: dict, agent_id: str) -> Path:
    return Path(env["HOME"]) / ".letta" / "agents" / agent_id / "memory"


def list_rows(env: dict) -> dict[str, str]:
    result = memfuse(env, "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["AGENT", "NAME", "MOUNTPOINT", "SERVER", "STATE", "PENDING"]
    return {line.split()[0]: " ".join(line.split()) for line in lines[1:]}


def test_mount_all_with_a_tag_list_and_umount_all(api, agents, home_mounts, letta_url):
    env = home_mounts
    tag = f"memfuse-test-{uuid.uuid4().hex[:8]}"
    first = agents("many one", [tag, "other"])
    second = agents("many two", [tag])
    third = agents("many three", [tag])
    broken = agents("many broken", [tag])
    only_other = agents("not selected", ["other"])  # one of the two tags: not all of them
    untagged = agents("untagged", [])
    start_mount(first, env)  # mounted by hand before: skipped
    mountpoint(env, broken).mkdir(parents=True)
    (mountpoint(env, broken) / "stray.txt").write_text("x")  # not empty: that mount fails

    result = memfuse(env, "mount", "--all", "--tag", tag, "--tag", "other")
    assert result.returncode == 0, result.stderr
    assert "1 skipped" in result.stdout and "0 mounted" in result.stdout

    result = memfuse(env, "mount", "--all", "--tag", tag)
    assert result.returncode == 1  # one failed
    assert f"skipped {first} ('many one'): already mounted" in result.stdout
    for agent_id, name in ((second, "many two"), (third, "many three")):
        assert f"mounted {agent_id} ('{name}') at {mountpoint(env, agent_id)}" in result.stdout
        assert os.path.ismount(mountpoint(env, agent_id))
        assert (mountpoint(env, agent_id) / "system/human.md").read_text().endswith(
            "---\nThe human.\n")
    assert f"FAILED {broken} ('many broken'): " in result.stderr
    assert "is not empty" in result.stderr
    assert "2 mounted, 1 skipped (already mounted), 1 failed, of 4 agents" in result.stdout
    for agent_id in (broken, only_other, untagged):
        assert not os.path.ismount(mountpoint(env, agent_id))

    (mountpoint(env, second) / "system/human.md").write_text("Edited through the mount.\n")
    rows = list_rows(env)
    assert sorted(rows) == sorted([first, second, third])
    for agent_id, name in ((first, "many one"), (second, "many two"), (third, "many three")):
        assert rows[agent_id].startswith(f"{agent_id} {name} {mountpoint(env, agent_id)} "
                                         f"{letta_url} ")
    wait_for(lambda: all(row.endswith(" serving none") for row in list_rows(env).values()),
             timeout=30)

    result = memfuse(env, "umount", "--all")
    assert result.returncode == 0, result.stderr
    for agent_id in (first, second, third):
        assert f"memfuse: unmounted {mountpoint(env, agent_id)}" in result.stdout
        assert not os.path.ismount(mountpoint(env, agent_id))
    assert "no mounts are running" in memfuse(env, "list").stdout
    log = subprocess.run(["git", "-C", str(mountpoint(env, second).with_suffix(".git")), "log",
                          "-p", "--format=%s"], capture_output=True, text=True).stdout
    assert "+Edited through the mount." in log  # umount --all flushed and snapshotted


def test_a_block_attached_to_two_agents_is_live_in_both_mounts(api, agents, home_mounts):
    env = home_mounts
    tag = f"memfuse-test-{uuid.uuid4().hex[:8]}"
    ada, bob = agents("shared a", [tag]), agents("shared b", [tag])
    block = api.post("/v1/blocks/", json={"label": "team", "value": "Both see this.\n",
                                          "limit": 2000, "description": "Shared"})
    block.raise_for_status()
    block_id = block.json()["id"]
    for agent_id in (ada, bob):
        api.patch(f"/v1/agents/{agent_id}/core-memory/blocks/attach/{block_id}"
                  ).raise_for_status()
    result = memfuse(env, "mount", "--all", "--tag", tag)
    assert result.returncode == 0, result.stderr
    a = Mount(ada, mountpoint(env, ada), env, mountpoint(env, ada).parent)
    b = Mount(bob, mountpoint(env, bob), env, mountpoint(env, bob).parent)
    for m in (a, b):
        assert m.sh("cat system/team.md").stdout.endswith("---\nBoth see this.\n")

    a.sh('echo "Written through the first mount." > system/team.md')
    assert api.get(f"/v1/blocks/{block_id}").json()["value"] == "Written through the first mount.\n"
    wait_for(lambda: b.sh("cat system/team.md").stdout.endswith(
        "---\nWritten through the first mount.\n"), timeout=30)

    b.sh('echo "And back through the second." > system/team.md')
    wait_for(lambda: a.sh("cat system/team.md").stdout.endswith(
        "---\nAnd back through the second.\n"), timeout=30)

    # A conflict is per mount: a file opened in the second mount before the first mount's
    # write, written after it, wins (overwrite), the first mount's version kept before it.
    held = open(b.path / "system/team.md", "w")
    a.sh('echo "Third, from the first mount." > system/team.md')
    held.write("Fourth, from the second mount.\n")
    held.close()
    assert api.get(f"/v1/blocks/{block_id}").json()["value"] == "Fourth, from the second mount.\n"
    assert "system/team.md" in b.memfuse("status").stdout.split("last conflict")[1]
    wait_for(lambda: a.sh("cat system/team.md").stdout.endswith(
        "---\nFourth, from the second mount.\n"), timeout=30)

    # History is per agent: each has its own writes as the person's and the other mount's as
    # the server's, in order.
    expected = ["Written through the first mount.", "And back through the second.",
                "Third, from the first mount.", "Fourth, from the second mount."]
    mine = {a.agent_id: {0, 2}, b.agent_id: {1, 3}}  # which of them each mount wrote

    def versions(m: Mount) -> list[tuple[bool, str]]:  # (by the server, value) oldest first
        log = m.sh("git log --reverse -p --format='AUTHOR %an' -- system/team.md").stdout
        found = []
        for chunk in log.split("AUTHOR ")[1:]:
            added = [line[1:] for line in chunk.splitlines()
                     if line.startswith("+") and not line.startswith("+++")]
            if added and not added[-1].startswith(("description:", "limit:", "---")):
                found.append((chunk.startswith("Letta server"), added[-1]))
        return found

    for m in (a, b):
        wait_for(lambda: [v for _, v in versions(m)][-4:] == expected, timeout=30)
        for i, (by_server, value) in enumerate(versions(m)[-4:]):
            assert by_server == (i not in mine[m.agent_id]), (m.agent_id, versions(m))

    # mv relabels the block: its file is renamed in the other mount too; rm detaches it from
    # that agent only.
    a.sh("mv system/team.md system/crew.md")
    wait_for(lambda: b.sh("ls system").stdout.split() == ["crew.md", "human.md"], timeout=30)
    a.sh("rm system/crew.md")
    wait_for(lambda: block_id not in [x["id"] for x in api.get(
        f"/v1/agents/{ada}/core-memory/blocks").json()], timeout=30)
    assert block_id in [x["id"] for x in api.get(f"/v1/agents/{bob}/core-memory/blocks").json()]
    assert b.sh("cat system/crew.md").stdout.endswith("---\nFourth, from the second mount.\n")
    api.patch(f"/v1/agents/{bob}/core-memory/blocks/detach/{block_id}")
    api.delete(f"/v1/blocks/{block_id}")


def test_list_shows_a_dead_daemon_and_umount_all_clears_its_mount(api, agents, home_mounts):
    env = home_mounts
    tag = f"memfuse-test-{uuid.uuid4().hex[:8]}"
    alive, killed = agents("many alive", [tag]), agents("many killed", [tag])
    assert memfuse(env, "mount", "--all", "--tag", tag).returncode == 0
    pid = int(json.loads((mountpoint(env, killed).parent / "memfuse.pid").read_text())["pid"])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: "dead daemon" in list_rows(env)[killed], timeout=30)
    rows = list_rows(env)
    assert rows[killed].endswith(f"dead daemon (stale mount: memfuse umount {killed}) ?")
    assert " serving " in rows[alive]

    result = memfuse(env, "umount", "--all")
    assert result.returncode == 0, result.stderr
    for agent_id in (alive, killed):
        assert f"memfuse: unmounted {mountpoint(env, agent_id)}" in result.stdout
        assert not os.path.ismount(mountpoint(env, agent_id))
        assert not (mountpoint(env, agent_id).parent / "memfuse.pid").exists()
    # the killed agent mounts again from where it was
    assert memfuse(env, "mount", "--all", "--tag", tag).returncode == 0
    assert (mountpoint(env, killed) / "system/human.md").read_text().endswith("The human.\n")
