"""`memfuse git-memory enable|disable` over the fake API (gitmemory.py): labels moved under
system/ so that the prompt keeps them, owned detached blocks attached, the tag set, shared
blocks left and listed, a record that disable undoes; the real server is in
tests/integration/test_git_memory_enable.py."""
import json
import time
from functools import partial

import pytest
from memfuse import cli, gitmemory
from memfuse.config import RunningMount
from memfuse.layout import GIT_MEMORY_TAG
from memfuse.remote import Remote, make_client
from memfuse.status import Status

from .fakeletta import FakeLetta
from .test_cli import home, live_pid  # noqa: F401 (fixtures)
from .test_git_memory import _serve_until, git_setup  # noqa: F401 (a fixture)

BASE = "http://fake"


@pytest.fixture
def classic(home):  # noqa: F811
    """A classic agent: human and persona attached, notes owned and detached, `shared`
    attached to it and to another agent."""
    fake = FakeLetta()
    agent = fake.add_agent(tags=["team"])
    other = fake.add_agent()
    fake.add_block("human", "The human.", agent=agent)
    fake.add_block("persona", "I am me.", agent=agent)
    fake.add_block("system/style", "Be brief.", agent=agent)
    fake.add_block("notes", "a note", agent=agent, attached=False, tags=[f"owner:{agent}"])
    shared = fake.add_block("shared", "both of us", agent=agent)
    fake.agents[other].append(shared)
    return fake, agent, other


def labels(fake, agent) -> list[str]:
    return sorted(fake.blocks[i]["label"] for i in fake.agents[agent])


async def run(fake, agent, action, *args, **kwargs) -> list[str]:
    said = []
    async with make_client(BASE, transport=fake.transport()) as client:
        remote = Remote(client, agent)
        if action == "enable":
            await gitmemory.enable(remote, BASE, said.append, *args, **kwargs)
        else:
            await gitmemory.disable(remote, gitmemory.Record.load(agent), said.append)
    return said


async def test_enable_moves_the_labels_into_the_prompt_attaches_owned_blocks_and_tags(classic):
    fake, agent, other = classic
    before = fake.prompt(agent)
    said = await run(fake, agent, "enable")
    assert labels(fake, agent) == ["notes", "shared", "system/human", "system/persona",
                                   "system/style"]
    assert fake.agent_tags[agent] == ["team", GIT_MEMORY_TAG]
    for value in ("The human.", "I am me.", "Be brief."):  # the prompt holds them still
        assert value in before and value in fake.prompt(agent)
    assert "a note" not in fake.prompt(agent)  # attached outside system/: a file, no prompt
    assert "moved human -> system/human (in the prompt, as before)" in said
    assert any(line.startswith("attached notes") for line in said)
    [shared] = [line for line in said if line.startswith("NOT moved: shared")]
    assert other in shared and "--include-shared shared" in shared
    assert [b["label"] for b in fake.blocks.values() if b["value"] == "both of us"] == ["shared"]
    record = json.loads(gitmemory.record_file(agent).read_text())
    assert {r["from"] for r in record["renamed"]} == {"human", "persona"}
    assert [a["label"] for a in record["attached"]] == ["notes"]
    assert fake.calls("attach") and any(p.endswith("/recompile") for _, p, _ in fake.requests)


async def test_the_tag_is_set_after_the_renames_and_before_the_attach(classic):
    fake, agent, _ = classic
    await run(fake, agent, "enable")
    order = [("tag" if p == f"/v1/agents/{agent}" else "rename" if "label" in (b or {})
              else "attach") for m, p, b in fake.requests
             if m == "PATCH" and (p == f"/v1/agents/{agent}" or "label" in (b or {})
                                  or "/attach/" in p)]
    assert order == ["rename", "rename", "tag", "attach"]


async def test_enable_twice_is_enable_once_and_disable_undoes_it(classic):
    fake, agent, _ = classic
    before = labels(fake, agent)
    await run(fake, agent, "enable")
    after = (labels(fake, agent), list(fake.agent_tags[agent]))
    record = gitmemory.record_file(agent).read_text()
    said = await run(fake, agent, "enable")
    assert (labels(fake, agent), fake.agent_tags[agent]) == after
    assert gitmemory.record_file(agent).read_text() == record
    assert said == [line for line in said if line.startswith("NOT moved")] + [
        f"agent {agent} uses git memory already; nothing to do"]
    said = await run(fake, agent, "disable")
    assert labels(fake, agent) == before
    assert fake.agent_tags[agent] == ["team"]
    assert "detached notes (a root file of the classic layout again)" in said
    assert not gitmemory.record_file(agent).exists()


async def test_include_shared_renames_a_shared_block_for_everyone(classic):
    fake, agent, other = classic
    await run(fake, agent, "enable", frozenset({"shared"}))
    assert "system/shared" in labels(fake, agent) and labels(fake, other) == ["system/shared"]


async def test_a_dry_run_changes_nothing(classic):
    fake, agent, _ = classic
    before = labels(fake, agent)
    said = await run(fake, agent, "enable", dry_run=True)
    assert "would be moved human -> system/human (in the prompt, as before)" in said
    assert labels(fake, agent) == before and GIT_MEMORY_TAG not in fake.agent_tags[agent]
    assert not gitmemory.record_file(agent).exists()


async def test_disable_leaves_what_changed_since_enable(classic):
    fake, agent, _ = classic
    await run(fake, agent, "enable")
    [human] = fake.by_label("system/human")
    human["label"] = "system/people/human"  # moved by someone since
    said = await run(fake, agent, "disable")
    assert "system/people/human" in labels(fake, agent) and "persona" in labels(fake, agent)
    assert any(line.startswith("left as it is: system/human") for line in said)


async def test_disable_keeps_a_tag_the_agent_had_before_enable(classic):
    fake, agent, _ = classic
    fake.agent_tags[agent].append(GIT_MEMORY_TAG)  # a git-memory agent with classic labels
    await run(fake, agent, "enable")
    assert "system/human" in labels(fake, agent)
    said = await run(fake, agent, "disable")
    assert "human" in labels(fake, agent)  # the renames are undone ...
    assert GIT_MEMORY_TAG in fake.agent_tags[agent]  # ... the tag was not enable's
    assert f"kept the tag {GIT_MEMORY_TAG}: the agent had it before memfuse git-memory " \
        f"enable" in said


def test_plan_leaves_collisions_markers_and_prompt_labels():
    from memfuse.model import Block
    attached = [Block("a", "human", "", 1), Block("b", "system/human", "", 1),
                Block("m", "memory_filesystem", "", 1)]
    owned = [Block("c", "human", "", 1), Block("d", "system/x", "", 1),
             Block("e", "todo", "", 1, tags=("memfuse-create:local-1",)), Block("f", "ok", "", 1)]
    plan = gitmemory.plan_enable(attached, owned, {})
    assert plan.renames == [] and [b.id for b in plan.attaches] == ["f"]
    assert {b.id for b, _ in plan.left} == {"a", "c", "d", "e", "m"}


def test_out_of_prompt_names_classic_core_labels():
    assert gitmemory.out_of_prompt(["human", "system/persona", "notes/todo", "persona",
                                    "memory_filesystem"]) == ["human", "persona"]


def test_enable_is_refused_while_the_agent_is_mounted(home, capsys, live_pid):  # noqa: F811
    state = home / ".letta/agents/agent-1"
    state.mkdir(parents=True)
    RunningMount("agent-1", str(state / "memory"), live_pid, "http://x",
                 str(state / "memfuse.log")).save(state / "memfuse.pid")
    assert cli.main(["git-memory", "enable", "agent-1"]) == 1
    assert "unmount it first (memfuse umount agent-1)" in capsys.readouterr().err


def test_the_command_runs_against_the_server_and_reports(classic, capsys, monkeypatch):
    fake, agent, _ = classic
    monkeypatch.setattr(cli, "make_client", partial(make_client, transport=fake.transport()))
    assert cli.main(["git-memory", "enable", agent, "--base-url", BASE]) == 0
    assert "memfuse: moved persona -> system/persona" in capsys.readouterr().out
    assert cli.main(["git-memory", "disable", agent, "--base-url", "http://elsewhere"]) == 1
    assert "records an enable on http://fake" in capsys.readouterr().err
    assert cli.main(["git-memory", "disable", agent, "--base-url", BASE]) == 0
    assert "memfuse: moved system/human -> human" in capsys.readouterr().out


def test_status_names_classic_core_blocks_out_of_the_prompt():
    report = Status(agent_id="agent-1", mountpoint="/m", base_url="http://x", pid=1,
                    reachable=True, last_poll=None, pending_writes=0, pending_unlinks=0,
                    uncommitted=0, last_commit=None, last_commit_message=None,
                    last_commit_at=None, last_conflict=None, last_error=None,
                    last_error_at=None, updated_at=1e12, layout="git-memory",
                    out_of_prompt=["human", "persona"])
    text = report.render(now=1e12)
    assert "OUT OF PROMPT  human, persona" in text
    assert "memfuse git-memory enable agent-1" in text


@pytest.mark.real_clock
async def test_a_git_memory_mount_reports_classic_labels_out_of_the_prompt(git_setup):
    fake, config, ids = git_setup
    fake.add_block("human", "left by a stock server's tag update", agent=config.agent_id)
    ideas = fake.add_block("ideas", "a classic root file", agent=config.agent_id)
    gitmemory.Record(config.agent_id, config.base_url,  # attached as a file by enable
                     attached=[{"block": ideas, "label": "ideas"}]).save()
    report = await _serve_until(config, fake, lambda: _status_when_written(config))
    assert "OUT OF PROMPT  human: classic core blocks" in report
    assert f"memfuse git-memory enable {config.agent_id}" in report


def _status_when_written(config) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        report = Status.load(config.status_file)
        if report is not None and report.out_of_prompt:
            return report.render()
        time.sleep(0.02)
    return Status.load(config.status_file).render()
