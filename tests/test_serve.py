"""`memfuse serve` in this process: waitress and gitserve.GitEndpoint on a loopback port over the
fake API, driven by dulwich's git client (clone, pull) and plain HTTP requests."""
import os
import threading
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from dulwich import porcelain
from dulwich.client import HTTPUnauthorized
from dulwich.errors import GitProtocolError, NotGitRepository
from dulwich.repo import Repo

from memfuse import blockfile, daemon, gitserve
from memfuse.config import Config, RunningMount
from memfuse.model import Block
from memfuse.writerlock import WriterLock

from .fakeletta import FakeLetta


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    return FakeLetta()


@pytest.fixture
def served(fake):
    """The base URL of a GitEndpoint over `fake`, served by waitress on a free port."""
    app = gitserve.GitEndpoint("http://letta.test", transport=fake.transport(), lock_wait=0.5)
    server = gitserve.Server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield server.url
    server.stop()
    thread.join(10)
    assert not thread.is_alive()


def git_url(served: str, agent: str) -> str:
    return f"{served}/v1/git/{agent}/state.git"


def clone(served: str, agent: str, target: Path, key: str | None = None) -> Repo:
    return porcelain.clone(git_url(served, agent), str(target), username="letta",
                           password=key, errstream=porcelain.NoneStream())


def files(target: Path) -> dict[str, bytes]:
    return {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*")
            if p.is_file() and ".git" not in p.relative_to(target).parts}


def advertise(app: gitserve.GitEndpoint, agent: str) -> tuple[list[bytes], object]:
    """Call `app` as a WSGI server would for `agent`'s ref advertisement: (what it wrote,
    its body, not read yet)."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/v1/git/{agent}/state.git/info/refs",
               "QUERY_STRING": "service=git-upload-pack", "wsgi.input": None}
    written: list[bytes] = []
    body = app(environ, lambda status, headers: written.append)
    return written, body


def block_of(fake: FakeLetta, block_id: str) -> Block:
    return Block.from_json(fake.blocks[block_id])


def test_a_clone_has_the_agents_blocks_as_the_mount_shows_them(fake, served, tmp_path):
    agent = fake.add_agent()
    human = fake.add_block("human", "The human.\n", agent=agent)
    notes = fake.add_block("notes/todo", "- a\n", agent=agent, attached=False,
                           tags=[f"owner:{agent}"])
    repo = clone(served, agent, tmp_path / "clone")
    assert files(tmp_path / "clone") == {
        "system/human.md": blockfile.render(block_of(fake, human)),
        "notes/todo.md": blockfile.render(block_of(fake, notes))}
    head = repo[repo.head()]
    assert head.author == b"Letta server <server@letta>"
    assert head.message.startswith(b"Server change: ")
    assert repo.refs.read_ref(b"HEAD") == b"ref: refs/heads/main"


def test_a_git_memory_agent_is_served_with_its_labels_as_paths(fake, served, tmp_path):
    agent = fake.add_agent()
    fake.agent_tags[agent] = ["git-memory-enabled"]
    fake.add_block("system/human", "The human.\n", agent=agent)
    fake.add_block("skills/pdf", "Read PDFs.\n", agent=agent)
    clone(served, agent, tmp_path / "clone")
    assert sorted(files(tmp_path / "clone")) == ["skills/pdf/SKILL.md", "system/human.md"]


def test_a_pull_after_an_api_edit_sees_it_at_once(fake, served, tmp_path):
    agent = fake.add_agent()
    human = fake.add_block("human", "The human.\n", agent=agent)
    clone(served, agent, tmp_path / "clone")
    fake.blocks[human]["value"] = "Edited through the API.\n"
    fake.add_block("persona", "New.\n", agent=agent)
    porcelain.pull(str(tmp_path / "clone"), git_url(served, agent), username="letta",
                   errstream=porcelain.NoneStream())
    got = files(tmp_path / "clone")
    assert got["system/human.md"].endswith(b"---\nEdited through the API.\n")
    assert got["system/persona.md"].endswith(b"---\nNew.\n")


def test_an_unknown_agent_is_not_found(fake, served, tmp_path):
    with pytest.raises(NotGitRepository):
        clone(served, "agent-00000000-0000-4000-8000-000000000000", tmp_path / "clone")
    answer = httpx.get(f"{served}/v1/git/..%2Fx/state.git/info/refs",
                       params={"service": "git-upload-pack"})
    assert answer.status_code == 404
    assert httpx.get(f"{served}/v1/other").status_code == 404


def test_without_a_key_a_server_that_wants_one_gets_a_basic_challenge(fake, served, tmp_path):
    agent = fake.add_agent()
    fake.add_block("human", "The human.\n", agent=agent)
    fake.required_key = "the-key"
    with pytest.raises(HTTPUnauthorized) as caught:
        clone(served, agent, tmp_path / "none")
    assert caught.value.www_authenticate.startswith("Basic ")
    with pytest.raises(HTTPUnauthorized):
        clone(served, agent, tmp_path / "wrong", key="not-the-key")
    clone(served, agent, tmp_path / "right", key="the-key")
    assert "system/human.md" in files(tmp_path / "right")


def test_the_serve_processs_own_key_is_never_lent_to_a_request(fake, served, tmp_path,
                                                              monkeypatch, caplog):
    agent = fake.add_agent()
    fake.add_block("human", "The human.\n", agent=agent)
    monkeypatch.setenv("LETTA_API_KEY", "the-serves-own-key")
    fake.required_key = "the-serves-own-key"
    with pytest.raises(HTTPUnauthorized):
        clone(served, agent, tmp_path / "clone")
    assert "Bearer the-serves-own-key" not in fake.keys_seen
    fake.keys_seen.clear()
    clone(served, agent, tmp_path / "clone", key="the-serves-own-key")  # given: used
    assert set(fake.keys_seen) == {"Bearer the-serves-own-key"}
    history = tmp_path / ".letta/agents" / agent
    assert all(b"the-serves-own-key" not in p.read_bytes()
               for p in history.rglob("*") if p.is_file())
    assert "the-serves-own-key" not in caplog.text


def test_a_push_is_refused_for_now_with_the_reason(fake, served):
    agent = fake.add_agent()
    for request in (partial(httpx.get, params={"service": "git-receive-pack"}),):
        answer = request(f"{git_url(served, agent)}/info/refs")
        assert answer.status_code == 403 and "pushes" in answer.text
    answer = httpx.post(f"{git_url(served, agent)}/git-receive-pack", content=b"0000",
                        headers={"Content-Type": "application/x-git-receive-pack-request"})
    assert answer.status_code == 403 and "pushes" in answer.text
    dumb = httpx.get(f"{git_url(served, agent)}/info/refs")  # git's dumb protocol
    assert dumb.status_code == 403 and "smart HTTP" in dumb.text
    assert fake.requests == []  # refused before Letta is asked anything


def test_a_mounted_agent_is_answered_503_for_now(fake, served, tmp_path, monkeypatch):
    agent = fake.add_agent()
    fake.add_block("human", "The human.\n", agent=agent)
    config = Config.build(agent)
    config.state_dir.mkdir(parents=True)
    RunningMount(agent, str(config.mountpoint), 1, "http://letta.test",
                 str(config.log_file)).save(config.pid_file)
    monkeypatch.setattr(RunningMount, "alive", lambda self: True)
    with pytest.raises(GitProtocolError, match="503"):
        clone(served, agent, tmp_path / "clone")
    answer = httpx.get(f"{git_url(served, agent)}/info/refs",
                       params={"service": "git-upload-pack"})
    assert answer.status_code == 503 and "is mounted" in answer.text
    assert not config.history_dir.exists()  # nothing written behind the daemon's back


def test_a_request_waits_for_the_history_lock_and_gives_up_with_503(fake, served):
    agent = fake.add_agent()
    fake.add_block("human", "The human.\n", agent=agent)
    lock = WriterLock(Config.build(agent).writer_lock_file)
    assert lock.try_acquire()  # another writer (a mount starting, another serve)
    try:
        answer = httpx.get(f"{git_url(served, agent)}/info/refs",
                           params={"service": "git-upload-pack"})
        assert answer.status_code == 503 and "busy" in answer.text
    finally:
        lock.release()
    answer = httpx.get(f"{git_url(served, agent)}/info/refs",
                       params={"service": "git-upload-pack"})
    assert answer.status_code == 200 and b"refs/heads/main" in answer.content


def test_a_request_holds_the_history_lock_until_its_answer_is_sent(fake, tmp_path):
    agent = fake.add_agent()
    fake.add_block("human", "The human.\n", agent=agent)
    app = gitserve.GitEndpoint("http://letta.test", transport=fake.transport())
    written, body = advertise(app, agent)
    other = WriterLock(Config.build(agent).writer_lock_file)
    assert not other.try_acquire()
    list(body)
    assert b"refs/heads/main" in b"".join(written)
    body.close()
    assert other.try_acquire()
    other.release()


def test_basic_authorization_gives_the_password_as_the_key():
    import base64

    def environ(value):
        return {"HTTP_AUTHORIZATION": value}

    basic = "Basic " + base64.b64encode(b"letta:sk-1:2").decode()
    assert gitserve.request_key(environ(basic)) == "sk-1:2"
    assert gitserve.request_key(environ("Basic " + base64.b64encode(b"letta:").decode())) is None
    assert gitserve.request_key(environ("Basic !!!")) is None
    assert gitserve.request_key(environ("Bearer sk-1")) is None
    assert gitserve.request_key({}) is None


def test_listen_addresses():
    assert gitserve.parse_listen("127.0.0.1:8285") == ("127.0.0.1", 8285)
    assert gitserve.parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8285", "host:", ":80", "h:99999"):
        with pytest.raises(ValueError):
            gitserve.parse_listen(bad)
    assert gitserve.loopback("localhost") and gitserve.loopback("127.0.0.2")
    assert gitserve.loopback("::1") and not gitserve.loopback("0.0.0.0")


@pytest.mark.real_clock
async def test_a_mount_after_serve_continues_the_same_history(fake, tmp_path):
    agent = fake.add_agent()
    fake.add_block("human", "The human.\n", agent=agent)
    app = gitserve.GitEndpoint("http://letta.test", transport=fake.transport())
    _written, body = await trio.to_thread.run_sync(advertise, app, agent)
    list(body)
    body.close()
    config = Config.build(agent, base_url="http://letta.test", quiet_period=0.05,
                          retry_budget=0.2)
    served_head = Repo(str(config.history_dir)).head()
    ready = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(daemon.serve, config, lambda error: ready.set(),
                                   transport=fake.transport()))
        await ready.wait()
        nursery.cancel_scope.cancel()
    assert Repo(str(config.history_dir)).head() == served_head  # nothing new to commit



def test_a_serve_record_is_shown_while_its_process_is_a_memfuse_serve(fake, monkeypatch):
    from memfuse import procs

    assert procs.is_serve_argv(["/venv/bin/python", "/venv/bin/memfuse", "serve", "--listen",
                                "127.0.0.1:0"])
    assert procs.is_serve_argv(["python", "-m", "memfuse.cli", "serve"])
    assert not procs.is_serve_argv(["memfuse", "mount", "agent-1", "--foreground"])
    path = gitserve.record_file("127.0.0.1", 8285)
    status = gitserve.ServeStatus(path, gitserve.RunningServe(
        "http://127.0.0.1:8285", os.getpid(), "http://letta.test", 0.0))
    status.answered("GET /v1/git/agent-1/state.git/info/refs", "404 Not Found", "not found")
    assert gitserve.serve_records() == []  # this process is no memfuse serve
    monkeypatch.setattr(procs, "is_memfuse_serve", lambda pid: True)
    [(found, record)] = gitserve.serve_records()
    assert found == path and record.requests == 1
    shown = record.render(now=record.last_request_at)
    assert "memfuse serve at http://127.0.0.1:8285" in shown and "404 Not Found" in shown
    status.remove()
    assert gitserve.serve_records() == []
