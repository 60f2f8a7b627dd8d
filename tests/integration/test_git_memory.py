"""An agent tagged `git-memory-enabled` on the real Letta 0.16.8 server, mounted in the
git-memory layout (memfuse/layout.py, docs/git-memory.md): labels are paths, every block file
is an attached block, and real programs (sed -i, vim, mkdir, mv, rm, git) work on it.

The agent is made as a stock server lets one be made: created with plain labels and no tag
(a create *with* the tag makes 0.16.8 prefix every label with `system/` and drop the tag),
then tagged by a PATCH (which keeps the labels), then given path-labelled blocks through the
block API.
"""
from __future__ import annotations

import subprocess
import time

import pytest

from .conftest import make_agent, start_mount, stop_mount, wait_for

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
