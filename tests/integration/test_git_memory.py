"""An agent tagged `git-memory-enabled` on the real Letta 0.16.8 server, mounted in the
git-memory layout (memfuse/layout.py, docs/git-memory.md): labels are paths, every block file
is an attached block, and real programs (sed -i, vim, mkdir, mv, rm, git) work on it.

The agent is made as a stock server lets one be made: created with plain labels and no tag
(a create *with* the tag makes 0.16.8 prefix every label with `system/` and drop the tag),
then tagged by a PATCH (which keeps the labels), then given path-labelled blocks through the
block API.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import MEMFUSE, make_agent, start_mount, stop_mount, wait_for

pytestmark = pytest.mark.integration

GRACE = 2.5  # memfuse retires an unlinked block after 2 s
TAG = "git-memory-enabled"
BLOCKS = [("system/human", "The human.\n"), ("notes/todo", "- one\n"),
          ("skills/pdf", "Read PDFs with pdftotext.\n")]


def attached(api, agent_id: str) -> dict[str, dict]:
    """label -> block, of the blocks attached to the agent."""
    return {b["label"]: b for b in api.get(f"/v1/agents/{agent_id}/core-memory/blocks").json()}


@pytest.fixture
def git_agent(api) -> str:
    agent_id = make_agent(api, [{"label": "system/persona", "value": "I am a test agent.\n",
                                 "limit": 2000, "description": "Who I am"}])
    api.patch(f"/v1/agents/{agent_id}", json={"tags": [TAG]}).raise_for_status()
    for label, value in BLOCKS:
        made = api.post("/v1/blocks/", json={"label": label, "value": value, "limit": 2000,
                                             "description": f"{label} block"})
        made.raise_for_status()
        api.patch(f"/v1/agents/{agent_id}/core-memory/blocks/attach/{made.json()['id']}"
                  ).raise_for_status()
    assert api.get(f"/v1/agents/{agent_id}").json()["tags"] == [TAG]
    assert set(attached(api, agent_id)) == {"system/persona", *(label for label, _ in BLOCKS)}
    yield agent_id
    api.delete(f"/v1/agents/{agent_id}")


@pytest.fixture
def git_mount(git_agent, home):
    m = start_mount(git_agent, home)
    yield m
    stop_mount(m)


def files(mount) -> list[str]:
    return sorted(mount.sh("find . -path ./.git -prune -o -type f -print").stdout.split())


def test_a_tagged_agent_is_mounted_at_its_paths(git_mount):
    assert files(git_mount) == ["./notes/todo.md", "./skills/pdf/SKILL.md", "./system/human.md",
                                "./system/persona.md"]
    assert (git_mount.path / "skills/pdf/SKILL.md").read_text().endswith(
        "---\nRead PDFs with pdftotext.\n")
    assert "layout         git-memory" in git_mount.memfuse("status", git_mount.agent_id).stdout
    assert "mounted in the git-memory layout" in git_mount.log()


def test_a_classic_agent_is_unchanged(mount):
    assert files(mount) == ["./system/human.md", "./system/persona.md"]
    assert "\n  layout " not in mount.memfuse("status", mount.agent_id).stdout
    assert "mounted in the classic layout" in mount.log()


def test_sed_and_vim_edit_blocks_in_place(git_mount, api, tmp_path):
    before = attached(api, git_mount.agent_id)
    git_mount.sh("sed -i 's/- one/- one\\n- two/' notes/todo.md")
    # No vimrc; `nocompatible` gives Vim's defaults: swapfile, writebackup, backupcopy=auto
    # (as tests/integration/test_editors.py drives it).
    subprocess.run(["vim", "-Es", "--cmd", "set nocompatible", "-c",
                    "%s/The human./The human is Ada./", "-c", "wq", "system/human.md"],
                   cwd=git_mount.path, env=dict(git_mount.env, HOME=str(tmp_path)), check=True,
                   timeout=60)
    time.sleep(GRACE)  # an unlinked block would be retired by now
    after = attached(api, git_mount.agent_id)
    assert after["notes/todo"]["value"] == "- one\n- two\n"
    assert after["system/human"]["value"] == "The human is Ada.\n"
    assert {k: b["id"] for k, b in after.items()} == {k: b["id"] for k, b in before.items()}
    wait_for(lambda: git_mount.sh("git status --porcelain").stdout == "")
    assert git_mount.sh("git show HEAD:system/human.md").stdout.endswith("The human is Ada.\n")
    log = git_mount.sh("git log --format=%s").stdout
    assert "Local edit" in log
    # cp: a copy at a block path is a new block under that label, with the file's fields
    git_mount.sh("cp system/human.md notes/human.md && cp -a notes/todo.md notes/todo-copy.md")
    copies = attached(api, git_mount.agent_id)
    assert copies["notes/human"]["value"] == "The human is Ada.\n"
    assert copies["notes/todo-copy"]["value"] == "- one\n- two\n"
    assert copies["notes/human"]["id"] != copies["system/human"]["id"]


def test_create_mv_dir_rename_and_rm(git_mount, api):
    agent_id = git_mount.agent_id
    git_mount.sh("mkdir reference && printf 'GET /v1/agents\\n' > reference/api.md")
    made = attached(api, agent_id)["reference/api"]
    assert made["value"] == "GET /v1/agents\n" and f"owner:{agent_id}" in made["tags"]

    todo = attached(api, agent_id)["notes/todo"]
    git_mount.sh("mv notes/todo.md notes/done.md")
    assert attached(api, agent_id)["notes/done"]["id"] == todo["id"]

    git_mount.sh("mv notes archive")
    assert attached(api, agent_id)["archive/done"]["id"] == todo["id"]

    git_mount.sh("rm reference/api.md")
    wait_for(lambda: "reference/api" not in attached(api, agent_id), timeout=GRACE + 5)
    kept = api.get(f"/v1/blocks/{made['id']}")
    assert kept.status_code == 200 and kept.json()["label"] == "reference/api"  # not deleted

    assert files(git_mount) == ["./archive/done.md", "./skills/pdf/SKILL.md",
                                "./system/human.md", "./system/persona.md"]
    wait_for(lambda: sorted(git_mount.sh("git ls-files").stdout.split()) == [
        "archive/done.md", "skills/pdf/SKILL.md", "system/human.md", "system/persona.md"])


def test_a_block_made_on_the_server_shows_at_its_path(git_mount, api):
    made = api.post("/v1/blocks/", json={"label": "projects/letta", "value": "From the API.\n",
                                         "limit": 2000, "description": "d"}).json()
    api.patch(f"/v1/agents/{git_mount.agent_id}/core-memory/blocks/attach/{made['id']}"
              ).raise_for_status()
    path = git_mount.path / "projects/letta.md"
    wait_for(lambda: path.exists() and path.read_text().endswith("From the API.\n"))


# -- kept files: a skill's companion file ------------------------------------------------------

EXTRACT = "import subprocess, sys\nprint(subprocess.run(['pdftotext', sys.argv[1], '-']))\n"


def kill_9(m) -> None:
    """kill -9 of the mount's daemon, its dead mount cleared as `memfuse umount` does."""
    os.kill(json.loads((m.state / "memfuse.pid").read_text())["pid"], 9)
    wait_for(lambda: subprocess.run(["fusermount3", "-u", "-z", str(m.path)],
                                    capture_output=True).returncode == 0
             or not os.path.ismount(m.path), 10)
    m.memfuse("umount", m.agent_id, check=False)  # clears the dead daemon's records


def test_a_skills_companion_file_is_kept_across_remount_kill_9_and_a_local_first_mount(
        git_agent, home, api):
    m = start_mount(git_agent, home)
    try:
        (m.path / "skills/pdf/extract.py").write_text(EXTRACT)
        m.sh("mkdir .letta && echo '{}' > .letta/config.json"
             " && sed -i 's/pdftotext/pdftotext -layout/' skills/pdf/extract.py")
        edited = EXTRACT.replace("pdftotext", "pdftotext -layout")
        stop_mount(m)
        m = start_mount(git_agent, home)  # unmount + remount
        assert (m.path / "skills/pdf/extract.py").read_text() == edited
        assert m.sh("git show HEAD:skills/pdf/extract.py").stdout == edited
        assert m.sh("git status --porcelain").stdout == ""
        user = m.sh("id -un").stdout.strip()
        assert m.sh("git log -1 --format=%an -- skills/pdf/extract.py").stdout.strip() == user
        m.sh("echo 'written just before the crash' > skills/pdf/notes.md")
        kill_9(m)  # before the 1 s quiet period lets the snapshot commit it
        m = start_mount(git_agent, home)
        assert (m.path / "skills/pdf/notes.md").read_text() == "written just before the crash\n"
        assert m.sh("git show HEAD:skills/pdf/notes.md").stdout == \
            "written just before the crash\n"
        assert (m.path / "skills/pdf/extract.py").read_text() == edited
        stop_mount(m)
        # a local-first mount: the server cannot be reached (nothing listens on port 9)
        m.memfuse("mount", git_agent, "--base-url", "http://127.0.0.1:9")
        assert (m.path / "skills/pdf/extract.py").read_text() == edited
        assert (m.path / ".letta/config.json").read_text() == "{}\n"
        assert (m.path / "skills/pdf/SKILL.md").read_text().endswith(
            "---\nRead PDFs with pdftotext.\n")
    finally:
        stop_mount(m)
    # never sent: the server's blocks are the agent's four, with their values
    blocks = attached(api, git_agent)
    assert set(blocks) == {"system/persona", *(label for label, _ in BLOCKS)}
    assert not any("pdftotext -layout" in b["value"] or "crash" in b["value"]
                   for b in blocks.values())
    assert api.get("/v1/blocks/", params={"label": "skills/pdf/extract"}).json() == []


def test_mount_all_gives_each_agent_its_layout_and_each_history_reaches_its_git_remote(
        git_agent, home, api, tmp_path):
    """Many agents and the remote push, in both layouts: `mount --all` of a tagged and a
    classic agent, edits and a kept file, `umount --all`, then each bare remote's main."""
    tag = f"memfuse-test-{os.urandom(4).hex()}"
    api.patch(f"/v1/agents/{git_agent}", json={"tags": [TAG, tag]}).raise_for_status()
    classic = make_agent(api, [{"label": "human", "value": "The human.\n", "limit": 2000}])
    api.patch(f"/v1/agents/{classic}", json={"tags": [tag]}).raise_for_status()
    for agent_id in (git_agent, classic):
        subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / f"{agent_id}.git")],
                       check=True)
    env = home
    memory = {a: Path(env["HOME"]) / ".letta/agents" / a / "memory" for a in (git_agent, classic)}
    try:
        result = subprocess.run([MEMFUSE, "mount", "--all", "--tag", tag, "--git-remote",
                                 str(tmp_path / "{agent}.git")], env=env, capture_output=True,
                                text=True, timeout=240)
        assert result.returncode == 0, result.stderr
        assert "2 mounted" in result.stdout
        assert (memory[git_agent] / "notes/todo.md").exists()
        assert not (memory[git_agent] / "system/notes").exists()  # not the classic layout
        assert (memory[classic] / "system/human.md").exists()
        (memory[git_agent] / "notes/todo.md").write_text("- one\n- two\n")
        (memory[git_agent] / "notes/todo.txt").write_text("kept, never sent\n")
        (memory[classic] / "system/human.md").write_text("Edited.\n")
    finally:
        result = subprocess.run([MEMFUSE, "umount", "--all"], env=env, capture_output=True,
                                text=True, timeout=240)
        api.delete(f"/v1/agents/{classic}")
    assert result.returncode == 0, result.stderr

    def remote(agent_id: str, *args: str) -> str:
        return subprocess.run(["git", "--git-dir", str(tmp_path / f"{agent_id}.git"), *args],
                              capture_output=True, text=True, check=True).stdout

    assert remote(git_agent, "show", "main:notes/todo.md").endswith("---\n- one\n- two\n")
    assert remote(git_agent, "show", "main:notes/todo.txt") == "kept, never sent\n"
    assert "system/persona.md" in remote(git_agent, "ls-tree", "-r", "--name-only", "main")
    assert remote(classic, "show", "main:system/human.md").endswith("---\nEdited.\n")
    assert attached(api, git_agent)["notes/todo"]["value"] == "- one\n- two\n"
