"""`memfuse git-memory enable|disable` against the real Letta 0.16.8 server: the agent's
compiled system prompt (`POST /v1/agents/{id}/recompile?dry_run=true`, and the stored system
message) holds the same block values after enable as before, its labels after disable are
what they were, enable twice is enable once, and a mounted agent is refused."""
import os
import subprocess
import uuid
from pathlib import Path

from .conftest import MEMFUSE, make_agent, start_mount, stop_mount

HUMAN = f"human-value-{uuid.uuid4().hex[:8]}"
PERSONA = f"persona-value-{uuid.uuid4().hex[:8]}"
NOTES = f"notes-value-{uuid.uuid4().hex[:8]}"
TAG = "git-memory-enabled"


def memfuse(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([MEMFUSE, *args], env=env, capture_output=True, text=True,
                          timeout=120)


def compiled(api, agent_id: str) -> str:
    """The system message the server compiles from the agent's blocks now (not saved)."""
    response = api.post(f"/v1/agents/{agent_id}/recompile", params={"dry_run": "true"})
    response.raise_for_status()
    return response.json()


def saved_system_message(api, agent_id: str) -> str:
    messages = api.get(f"/v1/agents/{agent_id}/messages",
                       params={"limit": 1, "order": "asc"}).json()
    assert messages[0]["message_type"] == "system_message"
    return messages[0]["content"]


def attached(api, agent_id: str) -> list[str]:
    return sorted(b["label"] for b in api.get(f"/v1/agents/{agent_id}/core-memory/blocks").json())


def tags(api, agent_id: str) -> list[str]:
    return api.get(f"/v1/agents/{agent_id}", params={"include": "agent.tags"}).json()["tags"]


def classic_agent(api) -> str:
    """human and persona attached; `notes` a detached block it owns (a classic root file)."""
    agent_id = make_agent(api, [
        {"label": "human", "value": HUMAN, "limit": 2000, "description": "About the human"},
        {"label": "persona", "value": PERSONA, "limit": 2000, "description": "Who I am"}])
    response = api.post("/v1/blocks/", json={"label": "notes", "value": NOTES, "limit": 2000,
                                             "tags": [f"owner:{agent_id}"]})
    response.raise_for_status()
    return agent_id


def test_enable_keeps_the_prompt_disable_restores_the_labels_and_twice_is_once(api, home,
                                                                               letta_url):
    agent_id = classic_agent(api)
    control = make_agent(api, [{"label": "human", "value": HUMAN, "limit": 2000}])
    try:
        before = compiled(api, agent_id)
        assert HUMAN in before and PERSONA in before and NOTES not in before
        # a stock server's tag alone: the classic labels drop out of the prompt (so the
        # checks below cannot pass on nothing)
        api.patch(f"/v1/agents/{control}", json={"tags": [TAG]}).raise_for_status()
        assert HUMAN not in compiled(api, control)

        done = memfuse(home, "git-memory", "enable", agent_id, "--base-url", letta_url)
        assert done.returncode == 0, done.stderr
        assert "memfuse: moved human -> system/human (in the prompt, as before)" in done.stdout
        assert "memfuse: moved persona -> system/persona (in the prompt, as before)" in done.stdout
        assert "memfuse: attached notes" in done.stdout
        assert attached(api, agent_id) == ["notes", "system/human", "system/persona"]
        assert TAG in tags(api, agent_id)
        after = compiled(api, agent_id)
        assert "<self>" in after  # 0.16.8's git-memory rendering
        assert HUMAN in after and PERSONA in after and NOTES not in after
        saved = saved_system_message(api, agent_id)  # enable recompiled it: saved at once
        assert HUMAN in saved and PERSONA in saved and "<self>" in saved
        record = Path(home["HOME"]) / ".letta/agents" / agent_id / "git-memory.json"
        assert record.exists()

        again = memfuse(home, "git-memory", "enable", agent_id, "--base-url", letta_url)
        assert again.returncode == 0, again.stderr
        assert "uses git memory already; nothing to do" in again.stdout
        assert attached(api, agent_id) == ["notes", "system/human", "system/persona"]
        assert tags(api, agent_id).count(TAG) == 1

        undone = memfuse(home, "git-memory", "disable", agent_id, "--base-url", letta_url)
        assert undone.returncode == 0, undone.stderr
        assert attached(api, agent_id) == ["human", "persona"]
        assert TAG not in tags(api, agent_id)
        owned = api.get("/v1/blocks/", params={"tags": f"owner:{agent_id}"}).json()
        assert [b["label"] for b in owned] == ["notes"]  # detached again, never deleted
        restored = compiled(api, agent_id)
        assert HUMAN in restored and PERSONA in restored and NOTES not in restored
        assert not record.exists()
    finally:
        for agent in (agent_id, control):
            api.delete(f"/v1/agents/{agent}")


def test_a_shared_block_is_listed_not_renamed(api, home, letta_url):
    agent_id = make_agent(api, [{"label": "human", "value": HUMAN, "limit": 2000}])
    other = make_agent(api, [])
    shared = api.post("/v1/blocks/", json={"label": "team", "value": "shared", "limit": 100})
    shared.raise_for_status()
    block_id = shared.json()["id"]
    for agent in (agent_id, other):
        api.patch(f"/v1/agents/{agent}/core-memory/blocks/attach/{block_id}").raise_for_status()
    try:
        done = memfuse(home, "git-memory", "enable", agent_id, "--base-url", letta_url)
        assert done.returncode == 0, done.stderr
        assert f"NOT moved: team ({block_id}) is attached to 1 other agent(s) too ({other})" \
            in done.stdout
        assert "--include-shared team" in done.stdout
        assert attached(api, agent_id) == ["system/human", "team"]
        assert attached(api, other) == ["team"]
    finally:
        for agent in (agent_id, other):
            api.delete(f"/v1/agents/{agent}")
        api.delete(f"/v1/blocks/{block_id}")


def test_a_mounted_agent_is_refused_and_mounts_in_the_git_memory_layout_after(api, home,
                                                                              letta_url):
    agent_id = classic_agent(api)
    m = start_mount(agent_id, home)
    try:
        assert sorted(os.listdir(m.path / "system")) == ["human.md", "persona.md"]
        refused = memfuse(home, "git-memory", "enable", agent_id, "--base-url", letta_url)
        assert refused.returncode == 1 and "unmount it first" in refused.stderr
        assert attached(api, agent_id) == ["human", "persona"]
        stop_mount(m)
        done = memfuse(home, "git-memory", "enable", agent_id, "--base-url", letta_url)
        assert done.returncode == 0, done.stderr
        m = start_mount(agent_id, home)
        assert (m.path / "system/human.md").read_text().endswith(HUMAN)
        assert (m.path / "notes.md").read_text().endswith(NOTES)
        status = m.memfuse("status", agent_id).stdout
        assert "layout         git-memory" in status and "OUT OF PROMPT" not in status
    finally:
        stop_mount(m)
        api.delete(f"/v1/agents/{agent_id}")
