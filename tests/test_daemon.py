"""The daemon's lifecycle, in this process, over a real FUSE mount and the fake API: it serves,
and whatever ends it (a cancel, a crashed task, a failing teardown step), it unmounts, removes
its pid file and leaves the history committed and closed."""
import json
import os
import stat
from functools import partial
from pathlib import Path

import httpx
import pyfuse3
import pytest
import trio
from dulwich.repo import Repo

from memfuse import daemon, fileattrs, letta
from memfuse.config import Config
from memfuse.daemon import MountError, serve
from memfuse.fs import MemoryFs
from memfuse.history import BRANCH, HistoryRepo
from memfuse.poller import Poller
from memfuse.writerlock import WriterLock

from .fakeletta import FakeLetta

pytestmark = pytest.mark.real_clock  # pyfuse3's loop serves real syscalls from worker threads


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    fake = FakeLetta()
    agent = fake.add_agent()
    fake.add_block("human", "The human.\n", agent=agent)
    config = Config.build(agent, base_url="http://letta.test", quiet_period=0.05,
                          poll_interval=0.05, full_poll_interval=0.05,
                          retry_budget=0.2)
    return fake, config


def mounted(path: Path) -> bool:
    """Whether `path` is a mount point. Call it from a worker thread while serving: it stats
    the mount, which this process itself answers."""
    return os.path.ismount(path)


def history_subjects(config: Config) -> list[str]:
    repo = HistoryRepo(config.history_dir)
    repo.open()
    try:
        return [e.commit.message.decode().splitlines()[0] for e in repo.repo.get_walker()]
    finally:
        repo.close()


async def run_until_ready(nursery, config, fake) -> list:
    reports, ready = [], trio.Event()

    def on_ready(error):
        reports.append(error)
        ready.set()

    nursery.start_soon(partial(serve, config, on_ready, transport=fake.transport()))
    await ready.wait()
    return reports


def in_thread(fn, *args):
    return trio.to_thread.run_sync(partial(fn, *args))


async def test_serves_then_a_cancel_unmounts_and_cleans_up(setup):
    fake, config = setup
    human = config.mountpoint / "system/human.md"
    async with trio.open_nursery() as nursery:
        assert await run_until_ready(nursery, config, fake) == [None]
        assert await in_thread(mounted, config.mountpoint) and config.pid_file.exists()
        assert (await in_thread(human.read_text)).endswith("---\nThe human.\n")
        await in_thread(human.write_text, "Written through the mount.\n")
        nursery.cancel_scope.cancel()
    [block] = fake.by_label("human")
    assert block["value"] == "Written through the mount.\n"
    assert not mounted(config.mountpoint)
    assert not config.pid_file.exists() and not config.status_file.exists()
    assert history_subjects(config) == ["Local edit: system/human.md",
                                        "Snapshot at mount: system/human.md"]


async def test_a_crash_of_the_fuse_loop_still_unmounts_snapshots_and_removes_the_pid_file(
        setup, monkeypatch):
    fake, config = setup
    crash, real_main = trio.Event(), pyfuse3.main

    async def main_then_crash():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(real_main)
            await crash.wait()
            raise RuntimeError("a bug in the FUSE loop")

    monkeypatch.setattr(pyfuse3, "main", main_then_crash)
    with pytest.raises(BaseException) as caught:
        async with trio.open_nursery() as nursery:
            await run_until_ready(nursery, config, fake)
            await in_thread((config.mountpoint / "system/human.md").write_text, "Before.\n")
            crash.set()
    assert "a bug in the FUSE loop" in repr(caught.value)
    assert not mounted(config.mountpoint) and not config.pid_file.exists()
    assert history_subjects(config)[0] == "Local edit: system/human.md"


@pytest.mark.expect_error("the poller failed unexpectedly")
async def test_a_crashing_background_task_is_restarted_and_the_mount_serves_on(
        setup, monkeypatch, caplog):
    fake, config = setup
    real_poll, calls = Poller.poll_once, []

    async def poll_with_one_bug(self):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in the poller")
        return await real_poll(self)

    monkeypatch.setattr(Poller, "poll_once", poll_with_one_bug)
    monkeypatch.setattr(daemon, "RESTART_DELAY", 0.01)
    monkeypatch.setattr(daemon, "STATUS_INTERVAL", 0.01)

    def status() -> dict:
        try:
            return json.loads(config.status_file.read_text())
        except (OSError, ValueError):
            return {}

    async with trio.open_nursery() as nursery:
        await run_until_ready(nursery, config, fake)
        with trio.fail_after(10):
            while len(calls) < 4 or status().get("unexpected_errors") != 1:
                await trio.sleep(0.02)  # restarted: it polls again; the status counts it
        human = config.mountpoint / "system/human.md"
        assert (await in_thread(human.read_text)).endswith("The human.\n")
        nursery.cancel_scope.cancel()
    assert "a bug in the poller" in caplog.text  # with its traceback


@pytest.mark.expect_error("unmount: sending unsent writes failed")
async def test_a_failing_teardown_step_does_not_stop_the_others(setup, monkeypatch, caplog):
    fake, config = setup

    async def broken_shutdown(self):
        raise RuntimeError("shutdown flush broke")

    monkeypatch.setattr(MemoryFs, "shutdown", broken_shutdown)
    async with trio.open_nursery() as nursery:
        await run_until_ready(nursery, config, fake)
        nursery.cancel_scope.cancel()
    assert not mounted(config.mountpoint) and not config.pid_file.exists()
    assert "shutdown flush broke" in caplog.text
    assert "unmounted" in caplog.text


async def test_start_up_refusals_say_why_and_leave_nothing_behind(setup):
    fake, config = setup
    unknown = Config.build("agent-00000000-0000-4000-8000-000000000000",
                           base_url="http://letta.test", retry_budget=0.2)
    for bad, words in ((unknown, "not found"), (config, "is not empty")):
        if bad is config:
            config.mountpoint.mkdir(parents=True)
            (config.mountpoint / "stray").write_text("x")
        reports = []
        with pytest.raises(MountError):
            await serve(bad, reports.append, transport=fake.transport())
        assert len(reports) == 1 and words in reports[0]
        assert not mounted(bad.mountpoint) and not bad.pid_file.exists()


def test_check_mountpoint_refuses_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MountError) as caught:
        daemon.check_mountpoint(tmp_path / "file")
    assert "cannot be used as a mountpoint" in str(caught.value)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_state_is_private_and_what_an_older_memfuse_left_open_is_tightened(
        setup, monkeypatch):
    fake, config = setup
    monkeypatch.setattr(daemon, "STATUS_INTERVAL", 0.01)
    old = os.umask(0o022)
    try:
        config.history_dir.mkdir(parents=True, mode=0o755)
        os.chmod(config.state_dir, 0o755)
        config.log_file.write_text("an old log\n")
        os.chmod(config.log_file, 0o644)
        async with trio.open_nursery() as nursery:
            await run_until_ready(nursery, config, fake)
            with trio.fail_after(10):
                while not config.status_file.exists():
                    await trio.sleep(0.01)
            modes = {p.name: mode(p) for p in (config.state_dir, config.history_dir,
                                               config.log_file, config.pid_file,
                                               config.status_file)}
            nursery.cancel_scope.cancel()
    finally:
        os.umask(old)
    assert modes == {config.state_dir.name: 0o700, "memory.git": 0o700, "memfuse.log": 0o600,
                     "memfuse.pid": 0o600, "memfuse.status.json": 0o600}


async def test_a_stale_git_lock_from_a_dead_daemon_is_cleared_at_mount(setup, caplog):
    fake, config = setup
    async with trio.open_nursery() as nursery:  # a first mount makes the history
        await run_until_ready(nursery, config, fake)
        nursery.cancel_scope.cancel()
    lock = config.history_dir / "refs/heads/main.lock"
    lock.write_text("0" * 40 + "\n")  # a crash in the middle of a ref update
    async with trio.open_nursery() as nursery:
        assert await run_until_ready(nursery, config, fake) == [None]
        await in_thread((config.mountpoint / "system/human.md").write_text, "After.\n")
        nursery.cancel_scope.cancel()
    assert not lock.exists() and "a git lock left by a daemon that is gone" in caplog.text
    assert history_subjects(config)[0] == "Local edit: system/human.md"


@pytest.mark.parametrize("answer", [
    httpx.Response(404, text="<html>not found</html>"),
    httpx.Response(200, text="<html>a web page</html>"),
    httpx.Response(200, json={"hello": "world"}),
])
async def test_a_base_url_that_is_not_a_letta_server_says_so(setup, answer):
    _fake, config = setup
    reports = []
    with pytest.raises(MountError):
        await serve(config, reports.append, transport=httpx.MockTransport(lambda r: answer))
    assert "does not look like a Letta server" in reports[0]


async def test_a_large_memory_reports_how_its_load_goes(setup, monkeypatch):
    fake, config = setup
    for i in range(5):
        fake.add_block(f"n{i}", "v", attached=False,
                       tags=[f"owner:{config.agent_id}"])
    monkeypatch.setattr(daemon, "PROGRESS_FROM", 3)
    monkeypatch.setattr(letta, "PAGE_SIZE", 2)
    said, ready = [], trio.Event()

    def on_ready(error):
        ready.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve, config, on_ready, on_progress=said.append,
                                   transport=fake.transport()))
        await ready.wait()
        nursery.cancel_scope.cancel()
    agent = config.agent_id
    assert said == [f"loading agent {agent}: 2 of 5 blocks listed",
                    f"loading agent {agent}: 4 of 5 blocks listed",
                    f"loading agent {agent}: 5 of 5 blocks listed",
                    f"loading agent {agent}: 6 files shown; the snapshot at mount is being "
                    f"committed"]


async def test_the_history_is_pushed_to_a_git_remote_and_the_last_snapshot_at_unmount(
        setup, tmp_path):
    fake, config = setup
    remote = tmp_path / "remote.git"
    remote.mkdir()
    Repo.init_bare(str(remote)).close()
    config.git_remote = str(remote)
    config.quiet_period = 60.0  # the write below is committed only by the unmount

    def remote_head():
        with Repo(str(remote)) as repo:
            return repo.refs.as_dict().get(BRANCH)

    async with trio.open_nursery() as nursery:
        assert await run_until_ready(nursery, config, fake) == [None]
        with trio.fail_after(30):
            while remote_head() is None:  # the snapshot at mount goes out
                await trio.sleep(0.02)
        await in_thread((config.mountpoint / "system/human.md").write_text, "Last words.\n")
        status = json.loads(config.status_file.read_text())
        assert status["git_remote"] == str(remote) and status["last_push_error"] is None
        nursery.cancel_scope.cancel()
    assert history_subjects(config)[0] == "Local edit: system/human.md"
    repo = HistoryRepo(config.history_dir)
    repo.open()
    try:
        assert remote_head() == repo.head()
    finally:
        repo.close()


async def test_a_mount_that_fails_after_its_pusher_is_made_pushes_nothing(
        setup, tmp_path, monkeypatch, caplog):
    fake, config = setup
    remote = tmp_path / "remote.git"
    remote.mkdir()
    Repo.init_bare(str(remote)).close()
    config.git_remote = str(remote)

    def init_fails(*_args):
        raise RuntimeError("no FUSE here")

    monkeypatch.setattr(pyfuse3, "init", init_fails)
    with pytest.raises(MountError):
        await serve(config, lambda _error: None, transport=fake.transport())
    assert history_subjects(config) == ["Snapshot at mount: system/human.md"]  # committed
    with Repo(str(remote)) as repo:
        assert repo.refs.as_dict().get(BRANCH) is None  # ... and not pushed
    assert "last push" not in caplog.text


async def test_times_and_modes_are_kept_across_a_remount(setup):
    """chmod and utimens through a real FUSE mount: saved soon after (no unmount needed) and at
    unmount, and back at the next mount; a file the server changed meanwhile keeps its mode and
    takes the time the mount saw it."""
    fake, config = setup
    human, system = config.mountpoint / "system/human.md", config.mountpoint / "system"
    past = (1_500_000_000_123_456_789, 1_400_000_000_987_654_321)  # atime, mtime (ns)

    def change():
        os.chmod(human, 0o600)
        os.utime(human, ns=past)
        os.chmod(system, 0o700)
        os.utime(system, ns=past)

    def shown(path):
        st = os.stat(path)
        return stat.S_IMODE(st.st_mode), st.st_atime_ns, st.st_mtime_ns

    async with trio.open_nursery() as nursery:
        assert await run_until_ready(nursery, config, fake) == [None]
        await in_thread(change)
        with trio.fail_after(30):  # saved in a second or so, before any unmount
            while fileattrs.load(config.attrs_file).get("system/human.md", (0,))[0] != 0o600:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert stat.S_IMODE(config.attrs_file.stat().st_mode) == 0o600
    async with trio.open_nursery() as nursery:
        assert await run_until_ready(nursery, config, fake) == [None]
        assert await in_thread(shown, human) == (0o600, *past)
        assert await in_thread(shown, system) == (0o700, *past)
        nursery.cancel_scope.cancel()
    [block] = fake.by_label("human")
    block["value"] = "Changed while unmounted.\n"
    async with trio.open_nursery() as nursery:
        assert await run_until_ready(nursery, config, fake) == [None]
        mode, atime, mtime = await in_thread(shown, human)
        assert mode == 0o600 and mtime > past[1]
        nursery.cancel_scope.cancel()


async def test_a_record_of_times_and_modes_that_cannot_be_read_does_not_stop_the_mount(
        setup, caplog):
    fake, config = setup
    config.attrs_file.parent.mkdir(parents=True, exist_ok=True)
    config.attrs_file.write_bytes(b"not json")
    async with trio.open_nursery() as nursery:
        assert await run_until_ready(nursery, config, fake) == [None]
        nursery.cancel_scope.cancel()
    assert "the files' times and modes start afresh" in caplog.text
    assert "system/human.md" in fileattrs.load(config.attrs_file)  # written anew


async def test_the_daemon_holds_the_history_lock_and_a_mount_waits_for_its_holder(
        setup, monkeypatch):
    fake, config = setup
    lock = WriterLock(config.writer_lock_file)
    async with trio.open_nursery() as nursery:
        assert await run_until_ready(nursery, config, fake) == [None]
        assert not lock.try_acquire()  # the daemon holds it while it runs
        nursery.cancel_scope.cancel()
    assert lock.try_acquire()  # and lets it go at unmount
    monkeypatch.setattr(daemon, "WRITER_WAIT", 0.3)
    reports = []
    try:
        with pytest.raises(MountError, match="another memfuse process"):
            await serve(config, reports.append, transport=fake.transport())
    finally:
        lock.release()
    assert "memfuse serve" in reports[0] and not config.pid_file.exists()


async def test_the_status_report_is_this_daemons_own_once_it_says_ready(setup):
    # a daemon killed with SIGKILL leaves its last report behind: here one whose journal is
    # empty. When the next daemon says it is ready, the report must be its own, or a
    # `memfuse status` run at once takes the dead daemon's "journal empty" for this one's.
    fake, config = setup
    config.state_dir.mkdir(parents=True)
    (config.state_dir / "memfuse.status.json").write_text(json.dumps({
        "agent_id": config.agent_id, "mountpoint": str(config.mountpoint), "base_url": "x",
        "pid": 1, "reachable": True, "last_poll": None, "pending_writes": 0,
        "pending_unlinks": 0, "uncommitted": 0, "last_commit": None,
        "last_commit_message": None, "last_commit_at": None, "last_conflict": None,
        "last_error": None, "last_error_at": None, "updated_at": 1e12}))
    at_ready = []

    def on_ready(error):  # called before any background task has run
        at_ready.append(json.loads(config.status_file.read_text())["pid"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve, config, on_ready, transport=fake.transport()))
        with trio.fail_after(10):
            while not at_ready:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert at_ready == [os.getpid()]
