"""Paths that a refactoring could switch off without any other fast test noticing: each test
here fails when its path is disabled (checked by hand when it was written)."""
import errno
import os
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from memfuse.grace import RETIRE_TRIES
from memfuse.keeper import TreeBlockKeeper, render_memory_filesystem
from memfuse.model import Origin
from memfuse.poller import Poller

from .fsworld import inode_of, make_world, read_all, setattr_fields
from .test_namespace import create, unlink

TRUNCATE = setattr_fields(update_size=True)


async def test_retire_all_retires_pending_unlinks_before_their_grace_ends(world):
    await unlink(world.fs, "system/human.md")
    await unlink(world.fs, "notes.md")
    assert world.fake.calls("detach") == []
    await world.namespace.retire_all()  # what the daemon does at unmount
    assert world.ids["human"] not in world.fake.agents[world.agent]
    assert world.fake.blocks[world.ids["notes"]]["tags"] == []
    assert world.state.graveyard.pending_block_ids() == set()


@pytest.mark.expect_error("gave up retiring block")
async def test_without_a_journal_a_retirement_that_keeps_failing_is_given_up(nursery, caplog):
    world = await make_world(nursery, journal=False)  # with one, it is journaled (test_offline)
    human = world.ids["human"]
    world.fake.fail_paths[f"/v1/blocks/{human}"] = 503  # the retirer's GET always fails
    await unlink(world.fs, "system/human.md")
    await trio.sleep(3600)  # MockClock: every retry's back-off passes at once
    gets = [p for m, p, _ in world.fake.requests if m == "GET" and p == f"/v1/blocks/{human}"]
    attempts = len([r for r in caplog.records if "retiring block" in r.getMessage()])
    assert attempts == RETIRE_TRIES  # RETIRE_TRIES - 1 warnings, then the error
    assert len(gets) >= RETIRE_TRIES
    assert world.state.graveyard.pending_block_ids() == set()
    assert "gave up retiring block" in caplog.text


async def test_scratch_quota_holds_for_truncate_by_path_and_by_handle(world):
    world.state.scratch.limit = 10
    await create(world.fs, "system/.a.swp", b"1234")
    inode = await inode_of(world.fs, "system/.a.swp")
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await world.fs.setattr(inode, SimpleNamespace(st_size=11), TRUNCATE, None, None)
    assert caught.value.errno == errno.ENOSPC
    info = await world.fs.open(inode, os.O_RDWR, None)
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await world.fs.setattr(inode, SimpleNamespace(st_size=1 << 40), TRUNCATE, info.fh, None)
    assert caught.value.errno == errno.ENOSPC
    await world.fs.setattr(inode, SimpleNamespace(st_size=10), TRUNCATE, info.fh, None)
    await world.fs.release(info.fh)
    assert await read_all(world.fs, "system/.a.swp") == b"1234" + b"\0" * 6
    assert world.state.scratch.used == 10


async def test_concurrent_opens_of_a_stale_block_revalidate_once(world):
    world.files.revalidate_after = 1.0
    await trio.sleep(2)  # the cached copy is now older than the window
    human = world.ids["human"]
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(read_all, world.fs, "system/human.md")
    gets = [p for m, p, _ in world.fake.requests if m == "GET" and p == f"/v1/blocks/{human}"]
    assert len(gets) == 1  # the others waited for the lock and found the copy fresh


async def test_memory_filesystem_updates_are_recorded_to_history(world):
    world.fake.add_block("memory_filesystem", "/memory/", agent=world.agent)
    await Poller(world.state, world.remote).poll_once()
    start = len(world.records)
    await TreeBlockKeeper(world.state, world.remote).refresh()
    [(path, content, origin)] = world.records[start:]
    assert path == "system/memory_filesystem.md" and origin is Origin.LOCAL
    assert content.decode().split("---\n", 2)[2] == render_memory_filesystem(world.state.tree)
