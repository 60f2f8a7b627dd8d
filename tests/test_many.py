"""Many agents without a server: `mount --all` (selection, skipping live mounts, starting side by
side, the report), `memfuse list` from pid and status files, `umount --all`, and listing agents
by tag in the client."""
import os
import threading

import httpx
import pytest

from memfuse import cli, letta, many
from memfuse.config import RunningMount
from memfuse.letta import LettaClient
from memfuse.remote import from_letta
from memfuse.status import Status

from .test_cli import (daemon_like, dead_pid, home,  # noqa: F401 (fixtures): the same HOME
                       live_pid)


def pid_file(home, agent_id: str, pid: int, name: str = "", base_url: str = "http://x"):
    state = home / ".letta/agents" / agent_id
    state.mkdir(parents=True, exist_ok=True)
    RunningMount(agent_id, str(state / "memory"), pid, base_url, str(state / "memfuse.log"),
                 agent_name=name).save(state / "memfuse.pid")
    return state


def status_file(state, agent_id: str, updated_at: float, **fields):
    values = dict(agent_id=agent_id, mountpoint=str(state / "memory"), base_url="http://x",
                  pid=RunningMount.load(state / "memfuse.pid").pid, reachable=True, last_poll=None, pending_writes=0,
                  pending_unlinks=0, uncommitted=0, last_commit=None, last_commit_message=None,
                  last_commit_at=None, last_conflict=None, last_error=None, last_error_at=None,
                  updated_at=updated_at)
    values.update(fields)
    Status(**values).save(state / "memfuse.status.json")


@pytest.mark.parametrize("argv", [
    ["mount"], ["mount", "agent-1", "--all"], ["mount", "agent-1", "--tag", "t"],
    ["mount", "--all", "/some/where"], ["mount", "--all", "--foreground"],
    ["mount", "--all", "--history-dir", "/h"], ["umount"], ["umount", "agent-1", "--all"],
    ["service", "install"], ["service", "install", "agent-1", "--all"],
    ["service", "install", "agent-1", "--tag", "t"],
])
def test_an_agent_or_all_but_not_both_and_tags_only_with_all(home, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


AGENTS = [many.Agent("agent-a", "Ada", ("team",)), many.Agent("agent-b", "Bob", ("team",)),
          many.Agent("agent-c", "Cy", ("team",))]


def test_mount_all_mounts_each_agent_side_by_side_and_skips_the_live_ones(home, monkeypatch,
                                                                          capsys, live_pid):
    asked = {}

    async def server_agents(base_url, api_key, tags):
        asked.update(base_url=base_url, tags=tags)
        return AGENTS

    monkeypatch.setattr(many, "server_agents", server_agents)
    pid_file(home, "agent-b", live_pid, "Bob")  # live: skipped
    pid_file(home, "agent-c", dead_pid(), "Cy")    # a daemon that died: mounted again
    both_started = threading.Barrier(2, timeout=10)  # broken if the launches run one by one
    launched = []

    def launch(config, debug):
        launched.append((config.agent_id, config.mountpoint, config.poll_interval))
        both_started.wait()
        return [], None

    monkeypatch.setattr(cli, "_launch", launch)
    code = cli.main(["mount", "--all", "--tag", "team", "--tag", "x", "--base-url", "http://s",
                     "--poll-interval", "2"])
    assert code == 0
    assert asked == {"base_url": "http://s", "tags": ["team", "x"]}
    assert sorted(launched) == [
        ("agent-a", home / ".letta/agents/agent-a/memory", 2.0),
        ("agent-c", home / ".letta/agents/agent-c/memory", 2.0)]
    out = capsys.readouterr().out
    assert f"mounted agent-a ('Ada') at {home}/.letta/agents/agent-a/memory" in out
    assert f"skipped agent-b ('Bob'): already mounted at {home}/.letta/agents/agent-b/memory" in out
    assert ("2 mounted, 1 skipped (already mounted), 0 failed, of 3 agents on http://s with "
            "the tag(s) team, x") in out


def test_mount_all_gives_each_agent_its_own_git_remote(home, monkeypatch, capsys, tmp_path):
    async def server_agents(base_url, api_key, tags):
        return AGENTS

    monkeypatch.setattr(many, "server_agents", server_agents)
    remotes = {}

    def launch(config, debug):
        remotes[config.agent_id] = config.git_remote
        return [], None

    monkeypatch.setattr(cli, "_launch", launch)
    # one URL for every agent would make all but the first diverge: refused before listing
    assert cli.main(["mount", "--all", "--git-remote", str(tmp_path / "memory.git")]) == 2
    assert "{agent}" in capsys.readouterr().err and remotes == {}
    monkeypatch.setenv("MEMFUSE_GIT_REMOTE", "git://git.example.test/{agent}.git")
    assert cli.main(["mount", "--all"]) == 0
    assert remotes == {a.id: f"git://git.example.test/{a.id}.git" for a in AGENTS}
    assert "MEMFUSE_GIT_REMOTE" not in os.environ


def test_mount_all_reports_each_failure_and_exits_1(home, monkeypatch, capsys):
    async def server_agents(base_url, api_key, tags):
        return AGENTS

    monkeypatch.setattr(many, "server_agents", server_agents)

    def launch(config, debug):
        if config.agent_id == "agent-b":
            return [], "/x is not empty; memfuse mounts only on an empty directory (log: l)"
        return ["mounted from its local history"] if config.agent_id == "agent-c" else [], None

    monkeypatch.setattr(cli, "_launch", launch)
    assert cli.main(["mount", "--all"]) == 1
    captured = capsys.readouterr()
    assert "FAILED agent-b ('Bob'): /x is not empty" in captured.err
    assert "agent-c ('Cy'): mounted from its local history" in captured.out
    assert "2 mounted, 0 skipped (already mounted), 1 failed, of 3 agents" in captured.out


def test_mount_all_with_no_agent_matching_says_so(home, monkeypatch, capsys):
    async def server_agents(base_url, api_key, tags):
        return []

    monkeypatch.setattr(many, "server_agents", server_agents)
    assert cli.main(["mount", "--all", "--tag", "nobody"]) == 0
    assert ("no agents on http://localhost:8283 with the tag(s) nobody"
            in capsys.readouterr().out)


def test_mount_all_with_the_server_away_says_so(home, monkeypatch, capsys):
    async def server_agents(base_url, api_key, tags):
        raise from_letta(letta.Unreachable("GET", "/v1/agents/", None, "ConnectError"))

    monkeypatch.setattr(many, "server_agents", server_agents)
    assert cli.main(["mount", "--all"]) == 1
    assert "could not list the agents: GET /v1/agents/: ConnectError" in capsys.readouterr().err


async def test_agents_are_listed_with_all_the_tags_page_by_page(monkeypatch):
    monkeypatch.setattr(letta, "AGENTS_PAGE", 2)
    agents = [{"id": f"agent-{i}", "name": f"n{i}", "tags": ["t", "u"]} for i in range(3)]
    seen = []

    def handler(request):
        params = request.url.params
        seen.append((params.get_list("tags"), params.get("match_all_tags"),
                     params.get("after"), params.get("include")))
        start = 0 if params.get("after") is None else int(params["after"][-1]) + 1
        return httpx.Response(200, json=agents[start:start + 2])

    async with LettaClient("http://letta.test", transport=httpx.MockTransport(handler)) as c:
        listed = await c.list_agents(["t", "u"])
    assert [a["id"] for a in listed] == ["agent-0", "agent-1", "agent-2"]
    assert seen == [(["t", "u"], "true", None, "agent.tags"),
                    (["t", "u"], "true", "agent-1", "agent.tags")]


async def test_an_agent_id_that_cannot_name_a_directory_is_left_out(monkeypatch):
    async def list_agents(self, tags=None, budget=None):
        return [{"id": "agent-1", "name": "ok"}, {"id": "../../etc", "name": "evil"}]

    monkeypatch.setattr(LettaClient, "list_agents", list_agents)
    assert await many.server_agents("http://x", None) == [many.Agent("agent-1", "ok")]


def test_list_shows_one_line_per_mount_with_its_state_and_pending_work(home, monkeypatch,
                                                                       capsys, live_pid):
    now = 1_000_000.0
    monkeypatch.setattr(many.time, "time", lambda: now)
    me = live_pid
    status_file(pid_file(home, "agent-a", me, "Ada", "http://one"), "agent-a", now,
                pending_writes=1, journal_pending=2, uncommitted=3)
    status_file(pid_file(home, "agent-b", me, "Bob\nthe builder"), "agent-b", now,
                reachable=False, journal_pending=4)
    status_file(pid_file(home, "agent-c", me), "agent-c", now, local_first_at=now - 5,
                reachable=False)
    status_file(pid_file(home, "agent-d", me, "Dee"), "agent-d", now - 60)
    pid_file(home, "agent-e", dead_pid(), "Eve")
    pid_file(home, "agent-f", me, "Fay")  # no status yet
    # a daemon killed with SIGKILL left its report: not the live daemon's
    status_file(pid_file(home, "agent-g", me, "Gil"), "agent-g", now, pid=dead_pid())
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["AGENT", "NAME", "MOUNTPOINT", "SERVER", "STATE", "PENDING"]
    rows = {line.split()[0]: " ".join(line.split()) for line in lines[1:]}
    assert sorted(rows) == ["agent-a", "agent-b", "agent-c", "agent-d", "agent-e", "agent-f",
                            "agent-g"]
    state = home / ".letta/agents"
    assert f"{state}/agent-a/memory" in rows["agent-a"] and "http://one" in rows["agent-a"]
    assert rows["agent-a"].endswith("serving 1 unsent, 2 journaled, 3 uncommitted")
    assert "Bob?the builder" in rows["agent-b"]  # a name never breaks the line
    assert rows["agent-b"].endswith("server unreachable 4 journaled")
    assert rows["agent-c"].endswith("local-first none")
    assert " - " in rows["agent-c"]  # no name known (a local-first start)
    assert rows["agent-d"].endswith("not responding for 60 s none")
    assert rows["agent-e"].endswith("dead daemon ?")
    assert rows["agent-f"].endswith("starting ?")
    assert rows["agent-g"].endswith("starting ?")
    assert len({line.index("http://") for line in lines[1:]}) == 1  # columns aligned


def test_list_with_nothing_mounted(home, capsys):
    assert cli.main(["list"]) == 0
    assert "no mounts are running" in capsys.readouterr().out


def test_umount_all_stops_every_daemon_and_clears_dead_records(home, capsys):
    daemons = [daemon_like(f"agent-{i}") for i in range(2)]
    try:
        for i, daemon in enumerate(daemons):
            pid_file(home, f"agent-{i}", daemon.pid)
        pid_file(home, "agent-dead", dead_pid())
        reaper = threading.Thread(target=lambda: [d.wait() for d in daemons], daemon=True)
        reaper.start()  # a child gone is reaped, so its pid stops being alive
        assert cli.main(["umount", "--all", "--timeout", "60"]) == 0
        reaper.join(timeout=60)
        assert [d.poll() for d in daemons] == [-15, -15]  # each got SIGTERM
    finally:
        for daemon in daemons:
            daemon.kill()
            daemon.stdin.close()
            daemon.stdout.close()
    out = capsys.readouterr().out
    state = home / ".letta/agents"
    for i in range(2):
        assert f"memfuse: unmounted {state}/agent-{i}/memory" in out
        assert not (state / f"agent-{i}/memfuse.pid").exists()
    assert "its daemon" in out and "is gone" in out
    assert not (state / "agent-dead/memfuse.pid").exists()
    assert cli.main(["umount", "--all"]) == 0
    assert "no mounts are running" in capsys.readouterr().out
