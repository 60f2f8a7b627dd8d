"""A mount started while the server is away (local-first), in this process over a real FUSE
mount and the fake API: it mounts from the history's head, the block map and the journal,
says so, journals writes, and when the server answers first shows (and commits as the
server's) what changed there, then sends the journal."""
import base64
import json
import os
import stat
import time
from functools import partial

import httpx
import pytest
import trio

from memfuse import daemon
from memfuse.config import Config
from memfuse.daemon import MountError, serve
from memfuse.history import HistoryRepo
from memfuse.journal import Journal
from memfuse.status import Status

from .fakeletta import FakeLetta
from .test_daemon import in_thread, mounted

pytestmark = pytest.mark.real_clock  # pyfuse3's loop serves real syscalls from worker threads


class SlowOwnedListing(httpx.AsyncBaseTransport):
    """The fake API, with the second call of a listing (`GET /v1/blocks/?tags=owner:…`) taking
    `delay` seconds while `slow` is set: the first call has answered by then, so the server is
    known to be back while the listing is not applied yet (the window a replay must not use)."""

    def __init__(self, fake: FakeLetta, delay: float):
        self.fake, self.delay, self.slow = fake, delay, False
        self.inner = fake.transport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if (self.slow and not self.fake.down and request.method == "GET"
                and request.url.path == "/v1/blocks/"):
            await trio.sleep(self.delay)
        return await self.inner.handle_async_request(request)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(daemon, "STATUS_INTERVAL", 0.02)
    fake = FakeLetta()
    agent = fake.add_agent()
    ids = {"human": fake.add_block("human", "The human.\n", agent=agent),
           "persona": fake.add_block("persona", "I am a test agent.\n", agent=agent),
           "notes": fake.add_block("projects/notes", "Owned, detached.\n", agent=agent,
                                   attached=False, tags=[f"owner:{agent}"])}
    config = Config.build(agent, base_url="http://letta.test", quiet_period=0.05,
                          poll_interval=0.05, full_poll_interval=0.05,
                          retry_budget=0.2)
    return fake, config, ids


async def start(nursery, config, transport) -> tuple[list, list]:
    """Serve in the background until ready; (on_ready reports, notices)."""
    reports, notices, ready = [], [], trio.Event()

    def on_ready(error):
        reports.append(error)
        ready.set()

    nursery.start_soon(partial(serve, config, on_ready, on_notice=notices.append,
                               transport=transport))
    await ready.wait()
    return reports, notices


FILES = ("system/human.md", "system/persona.md", "projects/notes.md")


async def mount_once_online(config, fake) -> dict[str, bytes]:
    """A first mount with the server there (it makes the history and the block map); the
    files' bytes as it showed them."""
    async with trio.open_nursery() as nursery:
        assert (await start(nursery, config, fake.transport()))[0] == [None]
        shown = {p: await in_thread((config.mountpoint / p).read_bytes) for p in FILES}
        nursery.cancel_scope.cancel()
    return shown


def read_status(config) -> str:
    report = Status.load(config.status_file)
    return report.render() if report else ""


async def wait_until(predicate, timeout=10.0):
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.02)


def history(config) -> list[tuple[str, str]]:
    """(author name, subject) of each commit, newest first."""
    repo = HistoryRepo(config.history_dir)
    repo.open()
    try:
        return [(e.commit.author.decode().split(" <")[0],
                 e.commit.message.decode().splitlines()[0]) for e in repo.repo.get_walker()]
    finally:
        repo.close()


async def test_with_the_server_away_the_mount_starts_from_history_then_reconciles_then_replays(
        setup):
    fake, config, ids = setup
    online = await mount_once_online(config, fake)
    assert stat.S_IMODE(os.stat(config.block_map_file).st_mode) == 0o600
    fake.down = True
    transport = SlowOwnedListing(fake, delay=1.5)  # longer than the replayer's 0.5 s tick
    human = config.mountpoint / "system/human.md"
    async with trio.open_nursery() as nursery:
        reports, notices = await start(nursery, config, transport)
        assert reports == [None]
        assert notices == [f"the server at http://letta.test cannot be reached (ConnectError: "
                           f"connection refused (the fake server is down)); mounted agent "
                           f"{config.agent_id} from its local history (3 blocks, 0 journaled "
                           f"changes); changes are sent when it answers"]
        for path, content in online.items():
            assert await in_thread((config.mountpoint / path).read_bytes) == content
        await wait_until(lambda: trio.to_thread.run_sync(
            lambda: "local-first (mounted from history at" in read_status(config)))
        await in_thread(human.write_text, "Written while the server was away.\n")  # close: 0
        assert [e.path for e in Journal(config.journal_file).pending()] == ["system/human.md"]
        assert fake.blocks[ids["human"]]["value"] == "The human.\n"
        fake.blocks[ids["persona"]]["value"] = "Changed on the server meanwhile.\n"
        back = len(fake.requests)
        transport.slow, fake.down = True, False
        persona = config.mountpoint / "system/persona.md"
        await wait_until(lambda: trio.to_thread.run_sync(
            lambda: persona.read_bytes().endswith(b"Changed on the server meanwhile.\n")))
        await wait_until(lambda: trio.to_thread.run_sync(
            lambda: fake.blocks[ids["human"]]["value"] == "Written while the server was "
                                                           "away.\n"))
        await wait_until(lambda: trio.to_thread.run_sync(
            lambda: "local-first" not in read_status(config) and ": reachable" in
            read_status(config)))
        await wait_until(lambda: trio.to_thread.run_sync(
            lambda: ("Letta server", "Server change: system/persona.md") in history(config)))
        nursery.cancel_scope.cancel()
    # The order: the listing (both of its calls) answered before the journal's PATCH was sent.
    calls = [(m, p) for m, p, _ in fake.requests[back:]]
    owned_listing = calls.index(("GET", "/v1/blocks/"))
    first_patch = next(i for i, (m, p) in enumerate(calls) if m == "PATCH")
    assert owned_listing < first_patch, calls
    assert Journal(config.journal_file).pending() == []
    subjects = [subject for _author, subject in history(config)]
    assert "Local edit: system/human.md" in subjects


async def test_with_the_server_away_and_no_history_the_mount_says_so(setup):
    fake, config, _ids = setup
    fake.down = True
    reports = []
    with pytest.raises(MountError):
        await serve(config, reports.append, transport=fake.transport())
    assert reports == [f"cannot reach the Letta server at http://letta.test (ConnectError: "
                       f"connection refused (the fake server is down)), and there is no local "
                       f"history of agent {config.agent_id} to mount from "
                       f"({config.history_dir})"]
    assert not config.history_dir.exists()  # the refusal made no empty history either
    assert not mounted(config.mountpoint) and not config.pid_file.exists()


async def test_a_history_without_a_block_map_is_not_mounted_without_the_server(setup):
    fake, config, _ids = setup
    await mount_once_online(config, fake)
    config.block_map_file.unlink()  # as a memfuse before local-first mounts left it
    fake.down = True
    reports = []
    with pytest.raises(MountError):
        await serve(config, reports.append, transport=fake.transport())
    assert "has no block map (memory.blocks" in reports[0]
    assert "mount once with the server reachable" in reports[0]


async def test_a_refused_api_key_stays_an_error_whatever_the_history(setup):
    fake, config, _ids = setup
    await mount_once_online(config, fake)
    fake.fail_paths["/v1/health/"] = 401
    reports = []
    with pytest.raises(MountError):
        await serve(config, reports.append, transport=fake.transport())
    assert "refused the API key" in reports[0]


async def test_the_block_map_follows_the_mount_at_each_snapshot(setup):
    fake, config, ids = setup
    async with trio.open_nursery() as nursery:
        await start(nursery, config, fake.transport())
        fake.agents[config.agent_id].remove(ids["persona"])  # detached on the server
        fake.blocks[ids["persona"]]["tags"] = [f"owner:{config.agent_id}"]

        async def moved():
            found = json.loads(config.block_map_file.read_text())["blocks"]
            return {r["path"]: r["id"] for r in found}.get("persona.md") == ids["persona"]

        await wait_until(moved)
        nursery.cancel_scope.cancel()
    found = json.loads(config.block_map_file.read_text())["blocks"]
    assert [(r["path"], r["attached"]) for r in found] == [
        ("persona.md", False), ("projects/notes.md", False), ("system/human.md", True)]


async def test_a_file_the_block_map_does_not_name_is_not_committed_as_deleted(setup):
    fake, config, ids = setup
    await mount_once_online(config, fake)
    saved = json.loads(config.block_map_file.read_text())  # as if saved before notes existed
    saved["blocks"] = [r for r in saved["blocks"] if r["path"] != "projects/notes.md"]
    config.block_map_file.write_text(json.dumps(saved))
    before = history(config)
    fake.down = True
    notes = config.mountpoint / "projects/notes.md"
    async with trio.open_nursery() as nursery:
        _reports, notices = await start(nursery, config, fake.transport())
        assert "(2 blocks, 0 journaled changes)" in notices[0]
        assert not await in_thread(notes.exists)
        assert history(config) == before  # no "Snapshot at mount: D projects/notes.md"
        fake.down = False
        await wait_until(lambda: in_thread(notes.exists))
        nursery.cancel_scope.cancel()
    assert history(config) == before  # the server's file is the history's: nothing to commit


def test_status_says_local_first_until_the_server_is_listed():
    now = time.time()
    fields = dict(agent_id="agent-1", mountpoint="/m", base_url="http://s", pid=7,
                  reachable=False, last_poll=None, pending_writes=0, pending_unlinks=0,
                  uncommitted=0, last_commit=None, last_commit_message=None,
                  last_commit_at=None, last_conflict=None, last_error=None, last_error_at=None,
                  updated_at=now, unreachable_since=now - 3)
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now - 3))
    text = Status(**fields, local_first_at=now - 3).render(now)
    assert text.splitlines()[2] == (f"  started        local-first (mounted from history at "
                                    f"{at}); the server's changes show once it answers")
    assert "local-first" not in Status(**fields).render(now)


async def test_an_edit_a_killed_daemon_never_committed_is_shown_and_committed_as_the_persons(
        setup):
    fake, config, ids = setup
    await mount_once_online(config, fake)
    # A daemon wrote this, the server took it, then the daemon was killed before committing.
    edited = b"---\ndescription: desc\nlimit: 20000\n---\nAccepted, never committed.\n"
    fake.blocks[ids["human"]]["value"] = "Accepted, never committed.\n"
    (config.history_dir / "memfuse-uncommitted.jsonl").write_text(json.dumps({
        "path": "system/human.md", "origin": "local",
        "content": base64.b64encode(edited).decode()}) + "\n")
    fake.down = True
    async with trio.open_nursery() as nursery:
        await start(nursery, config, fake.transport())
        human = config.mountpoint / "system/human.md"
        assert await in_thread(human.read_bytes) == edited  # not the history's older version
        nursery.cancel_scope.cancel()
    author, subject = history(config)[0]
    assert subject == "Local edit (recovered at mount): system/human.md"
    assert author != "Letta server"


async def test_a_blank_description_shown_as_its_default_is_no_conflict_at_replay(setup):
    """A block without a description shows `<label> block`; a local-first mount reads its
    blocks back from those files. Under `reject`, the replay of an edit made offline must
    not take that shown default for a change on the server (it would refuse the edit)."""
    import dataclasses

    fake, config, ids = setup
    config = dataclasses.replace(config, on_conflict="reject")
    fake.blocks[ids["human"]]["description"] = ""
    await mount_once_online(config, fake)
    fake.down = True
    human = config.mountpoint / "system/human.md"
    async with trio.open_nursery() as nursery:
        reports, _notices = await start(nursery, config, fake.transport())
        assert reports == [None]
        assert (await in_thread(human.read_text)).startswith("---\ndescription: human block\n")
        await in_thread(human.write_text, "Written while the server was away.\n")
        fake.down = False
        await wait_until(lambda: trio.to_thread.run_sync(
            lambda: Journal(config.journal_file).pending() == []))
        nursery.cancel_scope.cancel()
    assert fake.blocks[ids["human"]]["value"] == "Written while the server was away.\n"
    assert fake.blocks[ids["human"]]["description"] == ""
    subjects = [subject for _author, subject in history(config)]
    assert not any(s.startswith("Rejected") for s in subjects), subjects
