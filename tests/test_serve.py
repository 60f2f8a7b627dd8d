"""`memfuse serve` in this process: waitress and gitserve.GitEndpoint on a loopback port over the
fake API, driven by dulwich's git client (clone, pull) and plain HTTP requests."""
import os
import threading
from functools import partial
import io
from pathlib import Path

import httpx
import pytest
import trio
from dulwich import porcelain
from dulwich.client import HTTPUnauthorized
from dulwich.errors import GitProtocolError, NotGitRepository
from dulwich.repo import Repo

from memfuse import blockfile, blockmap, daemon, gitpush, gitserve, gitsync, handoff
from memfuse.config import Config, RunningMount
from memfuse.history import HistoryRepo
from memfuse.layout import CLASSIC
from memfuse.letta import LettaClient
from memfuse.model import Block
from memfuse.remote import Remote
from memfuse.writerlock import WriterLock

from .fakeletta import FakeLetta


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    return FakeLetta()


def serving(app: gitserve.GitEndpoint):
    """Serve `app` with waitress on a free loopback port in a thread; yields its base URL,
    then stops it."""
    server = gitserve.Server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield server.url
    server.stop()
    thread.join(10)
    assert not thread.is_alive()


@pytest.fixture
def served(fake):
    """The base URL of a GitEndpoint over `fake`, served by waitress on a free port."""
    yield from serving(gitserve.GitEndpoint("http://letta.test", transport=fake.transport(),
                                            lock_wait=0.5))


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


def test_gits_dumb_protocol_is_refused_before_letta_is_asked(fake, served):
    agent = fake.add_agent()
    dumb = httpx.get(f"{git_url(served, agent)}/info/refs")  # git's dumb protocol
    assert dumb.status_code == 403 and "smart HTTP" in dumb.text
    assert fake.requests == []  # refused before Letta is asked anything


def test_a_mounted_agent_whose_daemon_does_not_answer_is_a_503_and_nothing_is_written(
        fake, served, tmp_path, monkeypatch):
    agent = fake.add_agent()
    fake.add_block("human", "The human.\n", agent=agent)
    config = Config.build(agent)
    config.state_dir.mkdir(parents=True)
    RunningMount(agent, str(config.mountpoint), 1, "http://letta.test",
                 str(config.log_file)).save(config.pid_file)
    monkeypatch.setattr(RunningMount, "alive", lambda self: True)
    monkeypatch.setattr(handoff, "CONNECT_WAIT", 0.2)
    with pytest.raises(GitProtocolError, match="503"):  # no daemon listens on its socket
        clone(served, agent, tmp_path / "clone")
    answer = httpx.get(f"{git_url(served, agent)}/info/refs",
                       params={"service": "git-upload-pack"})
    assert answer.status_code == 503 and "is mounted, and its daemon did not answer" in answer.text
    assert not config.history_dir.exists()  # serve writes nothing for a mounted agent
    made = HistoryRepo(config.history_dir)  # as a mount makes it
    made.open()
    made.close()
    answer = httpx.get(f"{git_url(served, agent)}/info/refs",
                       params={"service": "git-upload-pack"})
    assert answer.status_code == 503 and str(config.handoff_socket) in answer.text
    assert not (config.history_dir / "refs/heads/main").exists()


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


# --- pushes (issue 20 point 4) -----------------------------------------------------------------

def history(agent: str) -> Repo:
    return Repo(str(Config.build(agent).history_dir))


def commit_all(target: Path, message: str = "edit") -> bytes:
    """Stage every new, changed and removed file of the clone `target` and commit."""
    porcelain.add(str(target))
    return porcelain.commit(str(target), message=message.encode(), author=b"A <a@a>",
                            committer=b"A <a@a>", all=True)


def rename_and_commit(target: Path, old: str, new: str) -> bytes:
    """`git mv old new` in the clone `target`, committed (`commit_all`)."""
    (target / old).rename(target / new)
    porcelain.add(str(target), [str(target / new)])
    porcelain.rm(str(target), [str(target / old)], cached=True)
    return commit_all(target)


def push(target: Path, served: str, agent: str, force: bool = False) -> tuple[bytes | str, str]:
    """`git push origin main` from `target`: (the ref's status: its sha when ok, else the
    `ng` reason; what the remote said)."""
    err = io.BytesIO()
    result = porcelain.push(str(target), git_url(served, agent), "main", username="letta",
                            errstream=err, force=force)
    status = result.ref_status.get(b"refs/heads/main") if result.ref_status else None
    return status or result.refs[b"refs/heads/main"], err.getvalue().decode()


def changing_calls(fake: FakeLetta) -> list[tuple[str, str]]:
    return [(m, p) for m, p, _ in fake.requests if m in ("POST", "PATCH", "DELETE")]


@pytest.fixture
def classic(fake):
    """A classic agent: attached human (limit 100) and persona, a detached owned note."""
    agent = fake.add_agent()
    ids = {"human": fake.add_block("human", "The human.\n", agent=agent, limit=100),
           "persona": fake.add_block("persona", "I am.\n", agent=agent),
           "notes": fake.add_block("notes", "n\n", agent=agent, attached=False,
                                   tags=[f"owner:{agent}"])}
    return agent, ids


def assert_block_map_is_the_servers(fake: FakeLetta, agent: str, layout=CLASSIC) -> None:
    """The block map serve saved is what a listing of the server now gives."""
    async def listing() -> gitsync.Live:
        async with LettaClient("http://letta.test", transport=fake.transport()) as client:
            return await gitsync.live(Remote(client, agent), layout)
    saved = blockmap.read(gitserve.agent_config(agent, "http://letta.test").block_map_file)
    assert saved == (layout.name, blockmap.records(trio.run(listing).shown))


def test_a_push_of_an_edit_a_create_and_a_removal_is_on_the_server_when_it_returns(
        fake, served, tmp_path, classic):
    agent, ids = classic
    target = tmp_path / "clone"
    clone(served, agent, target)
    (target / "system/human.md").write_text("---\ndescription: About them\n---\nPushed.\n")
    (target / "system/goals.md").write_text("---\ndescription: Goals\n---\nShip it.\n")
    (target / "todo.md").write_text("- push\n")
    porcelain.rm(str(target), [str(target / "notes.md")])
    pushed = commit_all(target)
    fake.requests.clear()
    status, said = push(target, served, agent)
    assert status == pushed  # ok: the served main is the pushed commit itself
    assert history(agent).refs[b"refs/heads/main"] == pushed
    human = fake.blocks[ids["human"]]
    assert (human["value"], human["description"], human["limit"]) == ("Pushed.\n", "About them",
                                                                     100)
    [goals] = fake.by_label("goals")
    assert goals["id"] in fake.agents[agent] and f"owner:{agent}" in goals["tags"]
    [todo] = fake.by_label("todo")
    assert todo["id"] not in fake.agents[agent] and todo["tags"] == [f"owner:{agent}"]
    assert ids["notes"] in fake.blocks  # removed: never deleted, its owner tag dropped
    assert fake.blocks[ids["notes"]]["tags"] == []
    assert not any(m == "DELETE" for m, _ in changing_calls(fake))
    assert "memfuse: on the server:" in said
    assert_block_map_is_the_servers(fake, agent)  # made from the push, not a listing
    # the next pull has nothing new: no commit on top normalises the pushed bytes
    porcelain.pull(str(target), git_url(served, agent), username="letta",
                   errstream=porcelain.NoneStream())
    assert history(agent).refs[b"refs/heads/main"] == pushed


def test_a_renamed_block_file_is_relabelled_not_made_again(fake, served, tmp_path, classic):
    agent, ids = classic
    target = tmp_path / "clone"
    clone(served, agent, target)
    pushed = rename_and_commit(target, "system/human.md", "system/person.md")
    fake.requests.clear()
    assert push(target, served, agent)[0] == pushed
    assert fake.blocks[ids["human"]]["label"] == "person"
    assert ids["human"] in fake.agents[agent]
    assert fake.calls("create") == []
    assert_block_map_is_the_servers(fake, agent)


BAD = "---\ndescription: d\nfoo: 1\n---\nx\n"


@pytest.mark.parametrize("path,content,rule", [
    ("system/human.md", BAD, "unknown frontmatter key(s): foo"),
    ("system/human.md", "---\ndescription: d\n---\n" + "x" * 101,
     "value is 101 characters, over the limit of 100 (EFBIG)"),
    ("system/new.md", "---\nlimit: 5\n---\n123456", "over the limit of 5 (EFBIG)"),
    ("system/persona.md", "---\nread_only: true\n---\nI am.\n",
     "read_only cannot be changed from a file"),
    ("system/locked.md", "---\ndescription: d\n---\nchanged\n", "the block is read_only"),
    ("system/a\tb.md", "x\n", "Letta would read it as a block whose label memfuse cannot show"),
    ("README.txt", "hello\n", "not a block file"),
], ids=["frontmatter", "server-limit", "pushed-limit", "read-only-set", "read-only-block",
        "label", "classic-non-block"])
def test_a_refused_push_names_the_file_and_its_rule_and_applies_nothing(
        fake, served, tmp_path, classic, path, content, rule):
    agent, _ids = classic
    fake.add_block("locked", "fixed\n", agent=agent, read_only=True)
    target = tmp_path / "clone"
    clone(served, agent, target)
    before = history(agent).refs[b"refs/heads/main"]
    (target / path).write_text(content)
    if path != "system/persona.md":
        (target / "system/persona.md").write_text("I am, edited.\n")  # a good edit beside it
    commit_all(target)
    fake.requests.clear()
    status, said = push(target, served, agent)
    assert isinstance(status, str) and rule in status
    assert f"{path}: " in said and rule in said and "nothing was applied" in said
    assert changing_calls(fake) == []  # the good edit of persona.md was not applied either
    assert history(agent).refs[b"refs/heads/main"] == before


def test_a_read_only_blocks_file_cannot_be_removed_and_a_push_must_leave_a_block(
        fake, served, tmp_path):
    agent = fake.add_agent()
    fake.add_block("locked", "fixed\n", agent=agent, read_only=True)
    target = tmp_path / "clone"
    clone(served, agent, target)
    porcelain.rm(str(target), [str(target / "system/locked.md")])
    commit_all(target)
    status, said = push(target, served, agent)
    assert "system/locked.md: the block is read_only: its file cannot be removed" in status
    assert "the push leaves no block file" in said
    assert changing_calls(fake) == []


def test_a_git_memory_agent_keeps_non_block_files_in_history(fake, served, tmp_path):
    agent = fake.add_agent(tags=["git-memory-enabled"])
    fake.add_block("system/human", "The human.\n", agent=agent)
    target = tmp_path / "clone"
    clone(served, agent, target)
    (target / "skills/pdf").mkdir(parents=True)
    (target / "skills/pdf/SKILL.md").write_text("---\ndescription: PDFs\n---\nRead PDFs.\n")
    (target / "skills/pdf/extract.py").write_text("print('x')\n")
    (target / "profile.png").write_bytes(b"\x89PNG\0")
    pushed = commit_all(target)
    assert push(target, served, agent)[0] == pushed
    [skill] = fake.by_label("skills/pdf")
    assert skill["value"] == "Read PDFs.\n" and skill["id"] in fake.agents[agent]
    assert len(fake.blocks) == 2  # extract.py and profile.png are no blocks
    porcelain.pull(str(target), git_url(served, agent), username="letta",
                   errstream=porcelain.NoneStream())
    assert history(agent).refs[b"refs/heads/main"] == pushed  # and stay in history


def test_a_push_on_a_base_the_server_moved_past_is_non_fast_forward(fake, served, tmp_path,
                                                                   classic):
    agent, ids = classic
    target = tmp_path / "clone"
    clone(served, agent, target)
    fake.blocks[ids["persona"]]["value"] = "Edited through the API.\n"
    (target / "system/human.md").write_text("Pushed.\n")
    commit_all(target)
    fake.requests.clear()
    status, said = push(target, served, agent, force=True)  # git itself would say fetch first
    assert status == "non-fast-forward" and "git pull --rebase" in said
    assert changing_calls(fake) == []
    assert fake.blocks[ids["persona"]]["value"] == "Edited through the API.\n"
    assert fake.blocks[ids["human"]]["value"] == "The human.\n"


def test_a_merge_commit_is_accepted(fake, served, tmp_path, classic):
    from dulwich.objects import Commit

    agent, ids = classic
    target = tmp_path / "clone"
    repo = clone(served, agent, target)
    base = repo.head()
    (target / "system/human.md").write_text("From the branch.\n")
    branch = commit_all(target, "branch")
    porcelain.reset(str(target), "hard", base)
    (target / "system/persona.md").write_text("From main.\n")
    (target / "system/human.md").write_text("From the branch.\n")
    main = commit_all(target, "main")
    merge = Commit()
    merge.tree, merge.parents = repo[main].tree, [main, branch]
    merge.author = merge.committer = b"Letta Code <noreply@letta.com>"
    merge.author_time = merge.commit_time = 0
    merge.author_timezone = merge.commit_timezone = 0
    merge.message = b"Merge branch\n"
    repo.object_store.add_object(merge)
    repo.refs[b"refs/heads/main"] = merge.id
    assert push(target, served, agent)[0] == merge.id
    assert fake.blocks[ids["human"]]["value"] == "From the branch.\n"
    assert fake.blocks[ids["persona"]]["value"] == "From main.\n"


def test_a_push_the_server_takes_in_part_moves_main_to_what_was_applied(fake, served, tmp_path,
                                                                        classic):
    agent, ids = classic
    target = tmp_path / "clone"
    clone(served, agent, target)
    before = history(agent).refs[b"refs/heads/main"]
    (target / "system/human.md").write_text("Pushed human.\n")
    (target / "system/persona.md").write_text("Pushed persona.\n")
    commit_all(target)
    fake.fail_paths[f"/v1/blocks/{ids['persona']}"] = 422  # the second PATCH fails
    status, said = push(target, served, agent)
    assert "applied in part" in status
    assert "applied: system/human.md" in status and "not applied: system/persona.md" in status
    assert "not applied: system/persona.md" in said
    assert fake.blocks[ids["human"]]["value"] == "Pushed human.\n"
    served_repo = history(agent)
    head = served_repo[served_repo.refs[b"refs/heads/main"]]
    assert head.parents == [before] and head.message.startswith(b"Part of a push")
    tree = {p.decode(): served_repo[sha].data for p, _m, sha in
            served_repo.object_store.iter_tree_contents(head.tree)}
    assert tree["system/human.md"] == b"Pushed human.\n"
    assert tree["system/persona.md"].endswith(b"---\nI am.\n")
    assert_block_map_is_the_servers(fake, agent)
    # fixed: pull --rebase (here: pull onto the part, then commit again) and push completes it
    del fake.fail_paths[f"/v1/blocks/{ids['persona']}"]
    porcelain.reset(str(target), "hard", before)
    porcelain.pull(str(target), git_url(served, agent), username="letta",
                   errstream=porcelain.NoneStream())
    (target / "system/persona.md").write_text("Pushed persona.\n")
    again = commit_all(target)
    assert push(target, served, agent)[0] == again
    assert fake.blocks[ids["persona"]]["value"] == "Pushed persona.\n"


def test_an_api_edit_made_while_a_push_is_applied_is_never_overwritten(
        fake, served, tmp_path, classic, monkeypatch):
    agent, ids = classic
    target = tmp_path / "clone"
    clone(served, agent, target)
    (target / "system/human.md").write_text("Pushed human.\n")
    (target / "system/persona.md").write_text("Pushed persona.\n")
    commit_all(target)
    receive = gitpush.Receiver.receive

    def edited_after_the_take(self, *args):  # an agent's tool call between take and apply
        fake.blocks[ids["human"]]["value"] = "Edited through the API.\n"
        return receive(self, *args)

    monkeypatch.setattr(gitpush.Receiver, "receive", edited_after_the_take)
    status, said = push(target, served, agent)
    assert "its block changed on the server while the push was applied (ESTALE)" in status
    assert "not applied: system/human.md, system/persona.md" in said
    assert fake.blocks[ids["human"]]["value"] == "Edited through the API.\n"
    assert fake.blocks[ids["persona"]]["value"] == "I am.\n"  # nothing after the stale step
    again = tmp_path / "again"
    clone(served, agent, again)  # the next fetch has the API edit
    assert (again / "system/human.md").read_text().endswith("---\nEdited through the API.\n")


def test_a_renamed_file_that_shows_the_default_description_sends_no_description(
        fake, served, tmp_path):
    agent = fake.add_agent()
    block_id = fake.add_block("human", "The human.\n", agent=agent, description="")
    fake.add_block("persona", "I am.\n", agent=agent)
    target = tmp_path / "clone"
    clone(served, agent, target)
    assert "description: human block" in (target / "system/human.md").read_text()
    pushed = rename_and_commit(target, "system/human.md", "system/person.md")
    fake.requests.clear()
    assert push(target, served, agent)[0] == pushed
    assert fake.blocks[block_id]["label"] == "person"
    assert fake.blocks[block_id]["description"] == ""  # not "human block", the old default
    assert not any("description" in body for body in fake.patches())


# --- the Letta server away (issue 20 point 7) ---------------------------------------------------

@pytest.fixture
def clock():
    return [1000.0]  # seconds; the tests move it


@pytest.fixture
def served_with_clock(fake, clock, monkeypatch):
    """`served`, its accepted keys on `clock`, and a short retry budget for a server away."""
    monkeypatch.setattr(gitserve, "RETRY_BUDGET", 0.2)
    yield from serving(gitserve.GitEndpoint(
        "http://letta.test", transport=fake.transport(), lock_wait=0.5,
        keys=gitserve.AcceptedKeys(clock=lambda: clock[0])))


def refs_answer(served: str, agent: str, key: str | None, service: str = "git-upload-pack"
                ) -> httpx.Response:
    auth = ("letta", key) if key else None
    return httpx.get(f"{git_url(served, agent)}/info/refs", params={"service": service},
                     auth=auth)


def test_while_letta_is_away_a_fetch_is_served_the_last_history_to_a_key_it_accepted_lately(
        fake, served_with_clock, tmp_path, classic, clock):
    agent, _ids = classic
    served = served_with_clock
    clone(served, agent, tmp_path / "clone", key="k1")
    fake.down = True  # the Letta server stops answering
    clock[0] += 590  # 9 min 50 s later
    again = clone(served, agent, tmp_path / "again", key="k1")
    assert files(tmp_path / "again") == files(tmp_path / "clone")
    assert again.head() == history(agent).refs[b"refs/heads/main"]
    other = refs_answer(served, agent, "k2")  # a key Letta never accepted for the agent
    assert other.status_code == 503
    assert "has not accepted this request's key" in other.text and "ConnectError" in other.text
    assert refs_answer(served, agent, None).status_code == 503  # nor no key at all
    clock[0] += 20  # over 10 minutes since Letta accepted k1
    late = refs_answer(served, agent, "k1")
    assert late.status_code == 503 and "in the last 10 minutes" in late.text
    fake.down = False  # back: k1 is accepted again and the fetch is live
    assert refs_answer(served, agent, "k1").status_code == 200


def test_while_letta_is_away_a_push_is_refused_and_nothing_is_applied(
        fake, served_with_clock, tmp_path, classic):
    agent, ids = classic
    served = served_with_clock
    target = tmp_path / "clone"
    clone(served, agent, target, key="k1")
    before = history(agent).refs[b"refs/heads/main"]
    (target / "system/human.md").write_text("Pushed.\n")
    commit_all(target)
    fake.down = True
    answer = refs_answer(served, agent, "k1", "git-receive-pack")
    assert answer.status_code == 503
    assert "a push cannot be checked against it or applied; nothing was applied" in answer.text
    with pytest.raises(GitProtocolError, match="503"):
        porcelain.push(str(target), git_url(served, agent), "main", username="letta",
                       password="k1", errstream=io.BytesIO())
    fake.down = False
    assert fake.blocks[ids["human"]]["value"] == "The human.\n"
    assert history(agent).refs[b"refs/heads/main"] == before
    assert push_with_key(target, served, agent, "k1") == commit_head(target)  # then it lands
    assert fake.blocks[ids["human"]]["value"] == "Pushed.\n"


def push_with_key(target: Path, served: str, agent: str, key: str) -> bytes | str:
    result = porcelain.push(str(target), git_url(served, agent), "main", username="letta",
                            password=key, errstream=io.BytesIO())
    status = result.ref_status.get(b"refs/heads/main") if result.ref_status else None
    return status or result.refs[b"refs/heads/main"]


def commit_head(target: Path) -> bytes:
    return Repo(str(target)).head()


def test_accepted_keys_keep_digests_only():
    keys = gitserve.AcceptedKeys(clock=lambda: 5.0)
    keys.accepted("agent-1", "sk-secret", gitserve.CLASSIC)
    assert keys.recent("agent-1", "sk-secret", 10) is gitserve.CLASSIC
    assert keys.recent("agent-2", "sk-secret", 10) is None
    assert "sk-secret" not in repr(keys._seen)


def test_pushed_files_that_are_no_block_have_the_mounts_caps(fake, served, tmp_path,
                                                              monkeypatch):
    agent = fake.add_agent(tags=["git-memory-enabled"])
    fake.add_block("system/human", "The human.\n", agent=agent)
    monkeypatch.setattr(gitpush, "KEPT_FILE_LIMIT", 10)
    monkeypatch.setattr(gitpush, "KEPT_LIMIT", 15)
    target = tmp_path / "clone"
    clone(served, agent, target)
    before = history(agent).refs[b"refs/heads/main"]
    (target / "big.bin").write_bytes(b"x" * 11)
    commit_all(target)
    status, said = push(target, served, agent)
    assert "big.bin: a file that is no block is kept up to 0 MiB (10 bytes); it has 11 " \
           "(EFBIG)" in status and "nothing was applied" in said
    porcelain.reset(str(target), "hard", before)
    (target / "a.bin").write_bytes(b"x" * 8)
    (target / "b.bin").write_bytes(b"x" * 8)
    commit_all(target)
    status, _said = push(target, served, agent)
    assert "come to 16 bytes, over the 0 MiB (15 bytes) a mount keeps of them (ENOSPC)" in status
    assert history(agent).refs[b"refs/heads/main"] == before
    porcelain.rm(str(target), [str(target / "b.bin")])
    under = commit_all(target)
    assert push(target, served, agent)[0] == under  # under the caps: taken


@pytest.mark.parametrize("gone", ["key revoked", "agent deleted"])
def test_a_key_or_agent_letta_refused_since_is_not_served_while_it_is_away(
        fake, served_with_clock, tmp_path, classic, gone):
    agent, _ids = classic
    served = served_with_clock
    fake.required_key = "k1"
    clone(served, agent, tmp_path / "clone", key="k1")
    if gone == "key revoked":
        fake.required_key = "k2"
        assert refs_answer(served, agent, "k1").status_code == 401
    else:
        del fake.agents[agent]
        assert refs_answer(served, agent, "k1").status_code == 404
    fake.down = True
    answer = refs_answer(served, agent, "k1")
    assert answer.status_code == 503 and "has not accepted this request's key" in answer.text


def test_when_only_the_block_listing_fails_a_fetch_is_served_the_last_history(
        fake, served_with_clock, tmp_path, classic):
    agent, _ids = classic
    served = served_with_clock
    target = tmp_path / "clone"
    clone(served, agent, target, key="k1")
    fake.fail_paths[f"/v1/agents/{agent}/core-memory/blocks"] = 503  # the take fails, not the lookup
    again = clone(served, agent, tmp_path / "again", key="k1")
    assert again.head() == history(agent).refs[b"refs/heads/main"]
    answer = refs_answer(served, agent, "k1", "git-receive-pack")
    assert answer.status_code == 503 and "nothing was applied" in answer.text
    del fake.fail_paths[f"/v1/agents/{agent}/core-memory/blocks"]
    assert refs_answer(served, agent, "k1").status_code == 200  # the history was let go


def test_a_removal_never_detaches_a_block_edited_after_the_push_was_judged(
        fake, served, tmp_path, classic, monkeypatch):
    agent, ids = classic
    target = tmp_path / "clone"
    clone(served, agent, target)
    porcelain.rm(str(target), [str(target / "system/persona.md")])
    commit_all(target)
    receive = gitpush.Receiver.receive

    def edited_after_the_take(self, *args):
        fake.blocks[ids["persona"]]["value"] = "Edited through the API.\n"
        return receive(self, *args)

    monkeypatch.setattr(gitpush.Receiver, "receive", edited_after_the_take)
    status, _said = push(target, served, agent)
    assert "its block changed on the server while the push was applied (ESTALE)" in status
    assert ids["persona"] in fake.agents[agent]  # still attached, with the agent's edit
    assert fake.blocks[ids["persona"]]["value"] == "Edited through the API.\n"
