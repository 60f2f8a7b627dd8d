"""Live both ways, conflicts, and history used with plain git inside a real mount.

Server-side changes are checked through `stat` and `ls`, which do not revalidate on open: what
they show comes from the poller. The delay itself is measured by scripts/bench (machines here are
shared and noisy, so the tests wait generously and the benchmark reports the figures).
"""
from __future__ import annotations

import errno
import os

import pytest

from .conftest import block_by_label, make_agent, start_mount, stop_mount, wait_for

pytestmark = pytest.mark.integration

FRONT = "---\ndescription: About the human\nlimit: 2000\n---\n"
SEEN = 10.0  # seconds to wait for the poller (target: within 2 s, measured by scripts/bench)


def exists(path) -> bool:
    return os.path.exists(path)


def test_api_side_edit_create_delete_attach_detach_reach_the_mount(mount, api):
    human = block_by_label(api, mount.agent_id, "human")
    api.patch(f"/v1/blocks/{human['id']}", json={"value": "Edited on the server, longer.\n"})
    expected = len((FRONT + "Edited on the server, longer.\n").encode())
    wait_for(lambda: (mount.path / "system/human.md").stat().st_size == expected, SEEN)
    assert mount.sh("cat system/human.md").stdout == FRONT + "Edited on the server, longer.\n"

    block = api.post("/v1/blocks/", json={"label": "from-api", "value": "hello\n",
                                          "tags": [f"owner:{mount.agent_id}"]}).json()
    wait_for(lambda: exists(mount.path / "from-api.md"), SEEN)
    api.patch(f"/v1/agents/{mount.agent_id}/core-memory/blocks/attach/{block['id']}")
    wait_for(lambda: exists(mount.path / "system/from-api.md")
             and not exists(mount.path / "from-api.md"), SEEN)
    api.patch(f"/v1/agents/{mount.agent_id}/core-memory/blocks/detach/{block['id']}")
    wait_for(lambda: exists(mount.path / "from-api.md")
             and not exists(mount.path / "system/from-api.md"), SEEN)
    api.delete(f"/v1/blocks/{block['id']}")
    wait_for(lambda: not exists(mount.path / "from-api.md"), SEEN)
    assert "from-api.md" not in mount.sh("ls -A").stdout


def test_a_label_swap_on_the_server_is_shown_and_a_write_goes_to_the_block_now_there(mount,
                                                                                    api):
    human = block_by_label(api, mount.agent_id, "human")
    persona = block_by_label(api, mount.agent_id, "persona")
    # a swap through a free label, as the server's unique label per agent requires, at once
    api.patch(f"/v1/blocks/{human['id']}", json={"label": "swap-tmp"})
    api.patch(f"/v1/blocks/{persona['id']}", json={"label": "human"})
    api.patch(f"/v1/blocks/{human['id']}", json={"label": "persona"})

    def text(name: str) -> str:
        # a listing taken between the PATCHes shows a label missing for a moment: not yet
        try:
            return (mount.path / "system" / name).read_text()
        except FileNotFoundError:
            return ""

    wait_for(lambda: text("human.md").endswith(persona["value"])
             and text("persona.md").endswith(human["value"]), SEEN)
    mount.sh("echo 'Through the path human.md.' > system/human.md")
    assert api.get(f"/v1/blocks/{persona['id']}").json()["value"] == "Through the path human.md.\n"
    assert api.get(f"/v1/blocks/{human['id']}").json()["value"] == human["value"]
    assert "swap-tmp" not in mount.sh("ls -A system").stdout


def test_server_changes_are_committed_under_the_server_author(mount, api):
    human = block_by_label(api, mount.agent_id, "human")
    api.patch(f"/v1/blocks/{human['id']}", json={"value": "By the agent.\n"})
    wait_for(lambda: "By the agent." in mount.sh("git show HEAD:system/human.md").stdout, SEEN)
    assert mount.sh("git log -1 --format='%an|%s'").stdout.strip() == \
        "Letta server|Server change: system/human.md"
    mount.sh("echo 'By the user.' > system/human.md")
    user = mount.sh("id -un").stdout.strip()
    wait_for(lambda: mount.sh("git log -1 --format=%an").stdout.strip() == user, SEEN)


def test_conflict_overwrite_keeps_both_versions(mount, api):
    human = block_by_label(api, mount.agent_id, "human")
    with open(mount.path / "system/human.md", "w") as f:
        api.patch(f"/v1/blocks/{human['id']}", json={"value": "The server's version.\n"})
        f.write("The file's version.\n")
    assert block_by_label(api, mount.agent_id, "human")["value"] == "The file's version.\n"
    wait_for(lambda: "file's" in mount.sh("git show HEAD:system/human.md").stdout, SEEN)
    # Newest first: the file's version, committed after the server's it replaced.
    assert mount.sh("git log -2 --format='%an|%s'").stdout.splitlines() == [
        f"{mount.sh('id -un').stdout.strip()}|Local edit: system/human.md",
        "Letta server|Server change: system/human.md"]
    assert mount.sh("git show HEAD~1:system/human.md").stdout == FRONT + "The server's version.\n"
    assert "system/human.md: changed on the server after it was opened" in mount.log()
    assert "written over it" in mount.memfuse("status", mount.agent_id).stdout


def test_conflict_reject_fails_with_estale_and_keeps_both_versions(agent, home, api):
    m = start_mount(agent, home, "--on-conflict", "reject")
    try:
        human = block_by_label(api, agent, "human")
        with pytest.raises(OSError) as caught:
            with open(m.path / "system/human.md", "w") as f:
                api.patch(f"/v1/blocks/{human['id']}", json={"value": "The server's version.\n"})
                f.write("The file's version.\n")
        assert caught.value.errno == errno.ESTALE
        assert block_by_label(api, agent, "human")["value"] == "The server's version.\n"
        wait_for(lambda: "Rejected local edit" in m.sh("git log --format=%s").stdout, SEEN)
        wait_for(lambda: "server's" in m.sh("git show HEAD:system/human.md").stdout, SEEN)
        rejected = m.sh("git log --format=%H --grep=Rejected").stdout.split()[0]
        assert m.sh(f"git show {rejected}:system/human.md").stdout.endswith(
            "The file's version.\n")
        assert (m.path / "system/human.md").read_text().endswith("The server's version.\n")
        assert "ESTALE" in m.log()
    finally:
        stop_mount(m)


def test_git_commands_work_inside_the_mount(mount, api):
    mount.sh("echo 'Version two.' > system/human.md")
    wait_for(lambda: len(mount.sh("git log --format=%h").stdout.split()) == 2, SEEN)
    mount.sh("echo 'Version three.' > system/human.md")
    wait_for(lambda: len(mount.sh("git log --format=%h").stdout.split()) == 3, SEEN)
    assert mount.sh("git status --porcelain").stdout == ""
    patch = mount.sh("git log -p system/human.md").stdout
    assert "+Version three." in patch and "+Version two." in patch
    assert "-Version two.\n+Version three." in mount.sh("git diff HEAD~1").stdout
    assert mount.sh("git show HEAD~2:system/human.md").stdout == FRONT + "The human.\n"
    mount.sh("git restore --source=HEAD~2 system/human.md")  # writes through the mount
    assert block_by_label(api, mount.agent_id, "human")["value"] == "The human.\n"
    wait_for(lambda: mount.sh("git status --porcelain").stdout == ""
             and len(mount.sh("git log --format=%h").stdout.split()) == 4, SEEN)


def test_a_commit_made_with_git_is_respected(mount, api):
    mount.sh("git commit -q --allow-empty -m 'A note of my own'")
    mine = mount.sh("git rev-parse HEAD").stdout.strip()
    mount.sh("echo 'After my commit.' > system/human.md")
    wait_for(lambda: mount.sh("git log -1 --format=%s").stdout.startswith("Local edit"), SEEN)
    assert mount.sh("git rev-parse HEAD~1").stdout.strip() == mine


def test_status_tells_the_truth(mount):
    mount.sh("echo 'Status check.' > system/human.md")
    wait_for(lambda: "Local edit: system/human.md" in mount.memfuse("status").stdout, SEEN)
    text = mount.memfuse("status", str(mount.path)).stdout
    assert f"agent {mount.agent_id} mounted at {mount.path}" in text
    assert ": reachable" in text and "last poll      " in text
    assert "0 unsent write(s)" in text and "last conflict  none" in text
    mount.memfuse("umount", mount.agent_id)
    gone = mount.memfuse("status", mount.agent_id, check=False)
    assert gone.returncode == 1 and "nothing is mounted" in gone.stdout


def test_memory_filesystem_block_is_kept_equal_to_the_tree(api, home):
    agent = make_agent(api, [
        {"label": "human", "value": "h\n", "description": "d"},
        {"label": "memory_filesystem", "value": "/memory/", "description": "Filesystem view",
         "read_only": True},
    ])
    m = start_mount(agent, home)
    try:
        expected = "\n".join(["/memory/", "└── system/", "    ├── human.md",
                              "    └── memory_filesystem.md"])
        wait_for(lambda: block_by_label(api, agent, "memory_filesystem")["value"] == expected,
                 SEEN)
        m.sh("mkdir -p system/projects && echo x > system/projects/memfuse.md && echo n > notes.md")
        expected = "\n".join(["/memory/", "├── system/", "│   ├── projects/",
                              "│   │   └── memfuse.md", "│   ├── human.md",
                              "│   └── memory_filesystem.md", "└── notes.md"])
        # The file shows the block once the server has confirmed memfuse's write of it; the
        # server may answer a reader a moment before that reply is back.
        wait_for(lambda: block_by_label(api, agent, "memory_filesystem")["value"] == expected
                 and m.sh("cat system/memory_filesystem.md").stdout.endswith(expected), SEEN)
        with pytest.raises(PermissionError):
            open(m.path / "system/memory_filesystem.md", "w")
    finally:
        stop_mount(m)
        api.delete(f"/v1/agents/{agent}")
