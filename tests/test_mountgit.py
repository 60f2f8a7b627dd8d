"""`memfuse serve` for a mounted agent (issue 20 point 5), in this process: a real FUSE mount of
the fake API (daemon.serve) and a GitEndpoint served by waitress over the same fake, driven by
dulwich's git client. serve hands the request to the daemon over its socket: a fetch sees the
mount and the server as they are now, and a push is on the server and in the mount, with the
pushed bytes and no commit on top, when it returns."""
import io
import os
import threading
from functools import partial
from pathlib import Path

import pytest
import trio
from dulwich import porcelain
from dulwich.repo import Repo

from memfuse import gitserve, handoff
from memfuse.config import Config, RunningMount
from memfuse.history import BRANCH

from .fakeletta import FakeLetta
from .test_daemon import run_until_ready

pytestmark = pytest.mark.real_clock  # pyfuse3's loop serves real syscalls from worker threads


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    # the daemon runs in this process, which /proc does not call a memfuse daemon
    monkeypatch.setattr(RunningMount, "alive", lambda self: True)
    fake = FakeLetta()
    agent = fake.add_agent()
    fake.add_block("human", "The human.\n", agent=agent, limit=100)
    fake.add_block("notes", "n\n", agent=agent, attached=False, tags=[f"owner:{agent}"])
    config = Config.build(agent, base_url="http://letta.test", quiet_period=0.05,
                          poll_interval=0.05, full_poll_interval=0.05, retry_budget=0.2)
    return fake, config


class Served:
    """A GitEndpoint over `fake` on a loopback port, in a thread."""

    def __init__(self, fake: FakeLetta):
        self.server = gitserve.Server(gitserve.GitEndpoint(
            "http://letta.test", transport=fake.transport(), lock_wait=0.5), "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def url(self, agent: str) -> str:
        return f"{self.server.url}/v1/git/{agent}/state.git"

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)


async def mounted(nursery, config, fake) -> None:
    assert await run_until_ready(nursery, config, fake) == [None]


def in_thread(fn, *args, **kwargs):
    return trio.to_thread.run_sync(partial(fn, *args, **kwargs))


def push(clone: Path, url: str, force: bool = False) -> tuple[bytes, str]:
    """(the ref's status: its sha when ok, else the `ng` reason; the remote's lines). force:
    send it even when the client sees it does not descend from the remote's head."""
    err = io.BytesIO()
    result = porcelain.push(str(clone), url, "main", errstream=err, force=force)
    status = result.ref_status.get(BRANCH) if result.ref_status else None
    return status or result.refs[BRANCH], err.getvalue().decode()


def commit_all(clone: Path, message: str = "edit") -> bytes:
    porcelain.add(str(clone))
    return porcelain.commit(str(clone), message=message.encode(), author=b"A <a@a>",
                            committer=b"A <a@a>", all=True)


def head_of(config: Config) -> bytes:
    repo = Repo(str(config.history_dir))
    try:
        return repo.refs[BRANCH]
    finally:
        repo.close()


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(root).parts}


async def test_a_fetch_sees_the_mount_and_a_push_is_in_the_mount_when_it_returns(setup, tmp_path):
    fake, config = setup
    served = Served(fake)
    clone, human = tmp_path / "clone", config.mountpoint / "system/human.md"
    try:
        async with trio.open_nursery() as nursery:
            await mounted(nursery, config, fake)
            assert config.handoff_socket.exists()
            assert os.stat(config.handoff_socket).st_mode & 0o777 == 0o600
            await in_thread(porcelain.clone, served.url(config.agent_id), str(clone),
                            errstream=porcelain.NoneStream())
            assert await in_thread(tree_files, clone) == await in_thread(
                tree_files, config.mountpoint)

            # an edit in the mount is in the very next fetch: the daemon commits it first
            await in_thread(human.write_text, "Written in the mount.\n")
            await in_thread(porcelain.pull, str(clone), served.url(config.agent_id),
                            errstream=porcelain.NoneStream())
            assert (clone / "system/human.md").read_text().endswith("---\nWritten in the mount.\n")

            # a push: an edit without the limit key (not the mount's rendering), a create
            (clone / "system/human.md").write_text("---\ndescription: About them\n---\nPushed.\n")
            (clone / "todo.md").write_text("---\ndescription: Things\n---\nbuy milk\n")
            pushed = await in_thread(commit_all, clone)
            status, said = await in_thread(push, clone, served.url(config.agent_id))
            assert status == pushed, said
            # live when it returns: the server, the mount (kernel caches dropped) and the branch
            [block] = fake.by_label("human")
            assert block["value"] == "Pushed.\n" and block["description"] == "About them"
            assert await in_thread(human.read_bytes) == (
                b"---\ndescription: About them\n---\nPushed.\n")
            assert await in_thread((config.mountpoint / "todo.md").read_text) == (
                "---\ndescription: Things\n---\nbuy milk\n")
            assert head_of(config) == pushed
            # the next fetch finds nothing new: no commit normalised what was pushed
            answer = await in_thread(handoff.call, config.handoff_socket, {"op": "sync"}, 30)
            assert answer == {"head": pushed.decode()}
            assert await in_thread(tree_files, clone) == await in_thread(
                tree_files, config.mountpoint)
            nursery.cancel_scope.cancel()
    finally:
        served.stop()
    assert not config.handoff_socket.exists()
    assert head_of(config) == pushed  # the last snapshot at unmount added nothing


async def test_a_push_on_a_base_the_mount_moved_past_is_refused(setup, tmp_path):
    fake, config = setup
    served = Served(fake)
    clone = tmp_path / "clone"
    try:
        async with trio.open_nursery() as nursery:
            await mounted(nursery, config, fake)
            await in_thread(porcelain.clone, served.url(config.agent_id), str(clone),
                            errstream=porcelain.NoneStream())
            await in_thread((config.mountpoint / "notes.md").write_text, "Mount's.\n")
            (clone / "notes.md").write_text("---\ndescription: n\n---\nClone's.\n")
            await in_thread(commit_all, clone)
            status, _said = await in_thread(push, clone, served.url(config.agent_id), True)
            assert status == "non-fast-forward"
            [notes] = fake.by_label("notes")
            assert notes["value"] == "Mount's.\n"
            assert (await in_thread((config.mountpoint / "notes.md").read_text)).endswith(
                "Mount's.\n")
            nursery.cancel_scope.cancel()
    finally:
        served.stop()
