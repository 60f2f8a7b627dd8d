"""The server away, at the filesystem level over the fake API: reads never wait on it, writes
go to the journal and are replayed when it answers again."""
import errno
import os

import pyfuse3
import pytest
import trio

from memfuse.replay import REPLAY_FAILURES
from memfuse import files as files_module
from memfuse.journal import Journal
from memfuse.model import Block, Origin
from memfuse.poller import Poller
from memfuse.tree import ROOT_INODE

from .fsworld import HUMAN, inode_of, read_all


async def test_a_dead_server_costs_one_attempt_then_opens_serve_the_cache(world):
    world.files.revalidate_after = 0  # every open would revalidate
    world.fake.requests.clear()
    world.fake.down = True
    assert await read_all(world.fs, "system/human.md") == HUMAN  # one attempt, no retries
    assert len(world.fake.requests) == 1 and not world.remote.reachable
    for _ in range(20):
        assert await read_all(world.fs, "system/human.md") == HUMAN
    assert len(world.fake.requests) == 1  # known to be away: no call at all


async def test_the_poller_notices_the_server_is_back_and_opens_revalidate_again(world):
    world.files.revalidate_after = 0
    poller = Poller(world.state, world.remote)
    world.fake.requests.clear()
    world.fake.down = True
    assert not await poller.poll_once()
    assert not world.remote.reachable and len(world.fake.requests) == 1  # no retry budget
    world.fake.down = False
    world.fake.blocks[world.ids["human"]]["value"] = "Changed while we were away.\n"
    assert await poller.poll_once() and world.remote.reachable
    world.fake.blocks[world.ids["human"]]["value"] = "And once more.\n"
    assert (await read_all(world.fs, "system/human.md")).endswith(b"And once more.\n")


async def test_a_5xx_is_no_answer_either(world):
    world.files.revalidate_after = 0
    world.fake.requests.clear()
    world.fake.fail_next = [503]
    assert await read_all(world.fs, "system/human.md") == HUMAN
    assert not world.remote.reachable and len(world.fake.requests) == 1


async def write(world, path: str, data: bytes) -> None:
    info = await world.fs.open(await inode_of(world.fs, path), os.O_WRONLY | os.O_TRUNC, None)
    try:
        await world.fs.write(info.fh, 0, data)
        await world.fs.flush(info.fh)
    finally:
        await world.fs.release(info.fh)


async def test_a_write_with_the_server_down_is_journaled_shown_and_replayed(world):
    world.fake.down = True
    await write(world, "system/human.md", b"Written offline.\n")  # close() returns 0
    [entry] = world.journal.pending()
    assert entry.block_id == world.ids["human"] and entry.path == "system/human.md"
    assert Journal(world.journal.path).pending()[0].content == b"Written offline.\n"  # on disk
    assert (await read_all(world.fs, "system/human.md")).endswith(b"---\nWritten offline.\n")
    assert world.records[-1][0] == "system/human.md" and world.records[-1][2] is Origin.LOCAL
    assert await Poller(world.state, world.remote).poll_once() is False  # still down
    world.fake.down = False
    assert await Poller(world.state, world.remote).poll_once()  # back: the view stays pinned
    assert (await read_all(world.fs, "system/human.md")).endswith(b"---\nWritten offline.\n")
    assert await world.replayer.replay()
    assert world.fake.blocks[world.ids["human"]]["value"] == "Written offline.\n"
    assert world.journal.pending() == [] and world.journal.path.read_bytes() == b""
    assert world.replayer.last_replay == "system/human.md: sent"


async def test_once_the_server_is_known_away_writes_go_straight_to_the_journal(world):
    world.fake.down = True
    await write(world, "system/human.md", b"one\n")
    world.fake.requests.clear()
    await write(world, "system/human.md", b"two\n")
    await write(world, "system/persona.md", b"three")
    assert world.fake.requests == []  # no attempt: known to be away
    assert [e.content for e in world.journal.pending()] == [b"one\n", b"two\n", b"three"]
    world.fake.down = False
    assert await world.replayer.replay()
    assert world.fake.blocks[world.ids["human"]]["value"] == "two\n"  # in order, no conflict
    assert world.fake.blocks[world.ids["persona"]]["value"] == "three"
    assert world.files.last_conflict is None


async def test_refused_content_is_still_refused_while_the_server_is_away(world):
    world.fake.down = True
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await write(world, "system/persona.md", b"x" * 21)  # limit 20
    assert caught.value.errno == errno.EFBIG
    assert world.journal.pending() == []


@pytest.mark.parametrize("policy", ["overwrite", "reject"])
async def test_a_server_change_during_the_outage_is_a_conflict_at_replay(world, policy):
    world.remote.on_conflict = policy
    world.fake.down = True
    await write(world, "system/human.md", b"Mine, offline.\n")
    world.fake.blocks[world.ids["human"]]["value"] = "The agent's, meanwhile.\n"
    world.fake.down = False
    start = len(world.records)
    assert await world.replayer.replay()
    value = world.fake.blocks[world.ids["human"]]["value"]
    origins = [(c.split(b"---\n")[-1], o) for _p, c, o in world.records[start:]]
    assert origins[0] == (b"The agent's, meanwhile.\n", Origin.SERVER)  # theirs first
    if policy == "overwrite":
        assert value == "Mine, offline.\n"
    else:
        assert value == "The agent's, meanwhile.\n"
        assert (b"Mine, offline.\n", Origin.REJECTED) in origins
        assert (await read_all(world.fs, "system/human.md")).endswith(b"meanwhile.\n")
    assert world.journal.pending() == [] and "journaled" in world.files.last_conflict


@pytest.mark.expect_error("the server refused journaled changes")
async def test_a_write_the_server_refuses_at_replay_stays_in_history(world):
    world.fake.down = True
    await write(world, "system/human.md", b"For a block about to vanish.\n")
    del world.fake.blocks[world.ids["human"]]  # deleted on the server during the outage
    world.fake.agents[world.agent].remove(world.ids["human"])
    world.fake.down = False
    start = len(world.records)
    assert await world.replayer.replay()
    assert world.journal.pending() == []
    assert world.records[start:start + 1] == [
        ("system/human.md", b"---\ndescription: desc\nlimit: 20000\n---\nFor a block about to "
                            b"vanish.\n", Origin.REJECTED)]
    assert "refused" in world.replayer.last_replay


async def test_replay_stops_when_the_server_goes_away_again(world):
    world.fake.down = True
    await write(world, "system/human.md", b"a\n")
    await write(world, "system/persona.md", b"b")
    assert await world.replayer.replay() is False  # still down: nothing lost
    assert len(world.journal.pending()) == 2


def test_the_journal_survives_a_crash_and_ignores_a_cut_line(tmp_path):
    journal = Journal(tmp_path / "memory.journal")
    block = Block("block-1", "human", "v2", 100)
    first = journal.add(block, "system/human.md", b"v2", Block("block-1", "human", "v1", 100))
    journal.add(block, "system/human.md", b"v3", block)
    journal.done(first, "sent")
    with open(journal.path, "a") as f:
        f.write('{"seq": 3, "kind": "write", "bl')  # kill -9 in the middle of an append
    reopened = Journal(journal.path)
    assert [(e.seq, e.content) for e in reopened.pending()] == [(2, b"v3")]
    assert reopened.pending()[0].base == {"value": "v2", "description": None, "limit": 100}
    reopened.add(block, "system/human.md", b"v4", block)  # after the cut line: kept
    assert [e.content for e in Journal(journal.path).pending()] == [b"v3", b"v4"]
    assert oct(journal.path.stat().st_mode & 0o777) == "0o600"


async def test_a_rename_over_a_block_waits_for_its_journaled_writes(world):
    world.fake.down = True
    await write(world, "system/human.md", b"offline\n")
    world.fake.down = False
    assert await Poller(world.state, world.remote).poll_once()  # back, not replayed yet
    system = await inode_of(world.fs, "system")
    info, _ = await world.fs.create(system, b"sedAb12Cd", 0o644, os.O_WRONLY, None)
    await world.fs.write(info.fh, 0, b"later, via rename\n")  # sed -i's temp file
    await world.fs.flush(info.fh)
    await world.fs.release(info.fh)
    await world.fs.rename(system, b"sedAb12Cd", system, b"human.md", 0, None)
    assert await world.replayer.replay()
    assert world.fake.blocks[world.ids["human"]]["value"] == "later, via rename\n"


async def test_a_write_that_waited_never_overtakes_one_that_was_journaled(world, nursery):
    fs = world.fs
    first = await fs.open(await inode_of(fs, "system/human.md"), os.O_WRONLY | os.O_TRUNC, None)
    second = await fs.open(await inode_of(fs, "system/human.md"), os.O_WRONLY | os.O_TRUNC, None)
    await fs.write(first.fh, 0, b"first close\n")
    await fs.write(second.fh, 0, b"second close\n")
    world.fake.down = True

    async def back_during_the_first_budget():
        await trio.sleep(1.55)
        world.fake.down = False

    nursery.start_soon(back_during_the_first_budget)
    async with trio.open_nursery() as closes:
        closes.start_soon(fs.flush, first.fh)
        await trio.sleep(0.01)
        closes.start_soon(fs.flush, second.fh)
    assert await world.replayer.replay()
    await fs.release(first.fh)
    await fs.release(second.fh)
    assert world.fake.blocks[world.ids["human"]]["value"] == "second close\n"


async def test_history_matches_the_mount_when_a_replay_stops_halfway(world):
    world.fake.down = True
    await write(world, "system/human.md", b"one\n")
    await write(world, "system/human.md", b"two\n")
    await write(world, "system/persona.md", b"p")
    world.fake.blocks[world.ids["human"]]["value"] = "theirs\n"  # a conflict for human
    world.fake.down = False
    real_update = world.remote.client.update_block

    async def update_then_away(block_id, **fields):
        block = await real_update(block_id, **fields)
        world.fake.down = True  # away again before persona's turn
        return block

    world.remote.client.update_block = update_then_away
    assert await world.replayer.replay() is False
    world.remote.client.update_block = real_update
    assert world.fake.blocks[world.ids["human"]]["value"] == "two\n"  # the last write only
    assert [e.content for e in world.journal.pending()] == [b"p"]
    assert "not sent yet" in world.replayer.last_replay
    world.fake.down = False
    assert await world.replayer.replay()
    assert world.fake.blocks[world.ids["persona"]]["value"] == "p"
    # and check_invariants (after the test) holds


@pytest.mark.expect_error("the server refused the API key")
@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_key_pauses_the_replay_and_keeps_the_entry(world, status):
    world.fake.down = True
    await write(world, "system/human.md", b"offline\n")
    world.fake.down = False
    world.fake.fail_next = [status]
    assert await world.replayer.replay() is False
    assert len(world.journal.pending()) == 1 and "not sent yet" in world.replayer.last_replay
    assert "refused the API key" in world.replayer.stuck()  # status says so
    assert await world.replayer.replay()
    assert world.fake.blocks[world.ids["human"]]["value"] == "offline\n"
    assert world.replayer.stuck() is None


async def test_a_429_is_waited_out_never_refused_and_its_retry_after_is_honoured(world):
    world.fake.down = True
    await write(world, "system/human.md", b"offline\n")
    world.fake.down = False
    world.fake.fail_paths[f"/v1/blocks/{world.ids['human']}"] = 429
    world.fake.retry_after = "30"
    for _ in range(2 * REPLAY_FAILURES):  # never given up
        assert await world.replayer.replay() is False
    assert len(world.journal.pending()) == 1
    assert world.remote.throttled_until > trio.current_time() + 20  # Retry-After: 30
    del world.fake.fail_paths[f"/v1/blocks/{world.ids['human']}"]
    assert await world.replayer.replay()
    assert world.fake.blocks[world.ids["human"]]["value"] == "offline\n"


async def test_a_close_answered_429_is_journaled_not_eio(world):
    world.fake.fail_paths[f"/v1/blocks/{world.ids['human']}"] = 429
    await write(world, "system/human.md", b"busy\n")  # returns 0
    assert [e.kind for e in world.journal.pending()] == ["write"]
    del world.fake.fail_paths[f"/v1/blocks/{world.ids['human']}"]
    assert await world.replayer.replay()
    assert world.fake.blocks[world.ids["human"]]["value"] == "busy\n"


async def test_a_write_to_another_block_is_not_held_back_by_one_that_keeps_failing(world):
    world.fake.down = True
    await write(world, "system/human.md", b"fails\n")
    await write(world, "notes.md", b"goes\n")
    world.fake.down = False
    world.fake.fail_paths[f"/v1/blocks/{world.ids['human']}"] = 500
    assert await world.replayer.replay() is False  # human waits; notes is sent meanwhile
    assert world.fake.blocks[world.ids["notes"]]["value"] == "goes\n"
    assert [e.path for e in world.journal.pending()] == ["system/human.md"]


@pytest.mark.expect_error("the server refused journaled changes")
async def test_a_write_the_server_keeps_failing_on_is_given_up_after_its_tries(world):
    world.fake.down = True
    await write(world, "system/human.md", b"the server chokes on this\n")
    world.fake.down = False
    world.fake.fail_paths[f"/v1/blocks/{world.ids['human']}"] = 500
    for _ in range(REPLAY_FAILURES - 1):
        assert await world.replayer.replay() is False
    assert await world.replayer.replay()  # given up: committed as refused, the journal moves on
    assert world.journal.pending() == []
    assert world.records[-1][2] is Origin.REJECTED


async def test_several_journaled_writes_to_one_block_chain_without_false_conflicts(world):
    world.remote.on_conflict = "reject"
    world.fake.down = True
    await write(world, "system/human.md", b"---\ndescription: new\n---\none\n")
    await write(world, "system/human.md", b"---\nlimit: 500\n---\ntwo\n")
    world.fake.down = False
    assert await world.replayer.replay()
    block = world.fake.blocks[world.ids["human"]]
    assert (block["description"], block["limit"], block["value"]) == ("new", 500, "two\n")
    assert world.files.last_conflict is None



@pytest.mark.parametrize("policy", ["overwrite", "reject"])
async def test_a_write_whose_answer_was_lost_is_no_conflict_with_itself_at_replay(world, policy):
    # the link dies after the server took the PATCH: the write is journaled on the block as it
    # was, and the server now holds that very write. Replay must not take it for somebody
    # else's change (under reject, the person's writes would be turned away).
    world.remote.on_conflict = policy
    world.fake.lose_answer = lambda method, path, body: method == "PATCH"
    await write(world, "system/human.md", b"one\n")  # taken; answer lost; journaled
    assert world.fake.blocks[world.ids["human"]]["value"] == "one\n"
    await write(world, "system/human.md", b"two\n")
    assert len(world.journal.pending()) == 2
    world.fake.down = False
    start = len(world.records)
    assert await world.replayer.replay()
    assert world.fake.blocks[world.ids["human"]]["value"] == "two\n"
    assert world.files.last_conflict is None
    assert not [o for _p, _c, o in world.records[start:] if o in (Origin.REJECTED,
                                                                  Origin.SERVER)]

# -- namespace changes while the server is away ---------------------------------------------------

from memfuse.model import is_provisional  # noqa: E402

from .fsworld import check_invariants, make_world  # noqa: E402
from .test_namespace import create, listdir, rename, unlink  # noqa: E402


async def server_back(world) -> None:
    """The server answers again: the poller sees it, then the journal replays."""
    world.fake.down = False
    assert await Poller(world.state, world.remote).poll_once()
    assert await world.replayer.replay(), world.replayer.last_replay
    assert world.journal.queued() == []


async def test_an_unlink_is_journaled_at_once_and_a_claim_settles_it(world):
    await unlink(world.fs, "notes.md")
    [entry] = world.journal.pending()
    assert (entry.kind, entry.block_id, entry.queued) == ("unlink", world.ids["notes"], False)
    assert Journal(world.journal.path).pending()[0].kind == "unlink"  # durable in the grace
    await create(world.fs, "notes.md", b"back within the grace period\n")
    assert world.journal.pending() == [] and world.journal.path.read_bytes() == b""
    await trio.sleep(1)
    assert world.fake.calls("detach") == []
    assert world.fake.blocks[world.ids["notes"]]["value"] == "back within the grace period\n"


async def test_a_retirement_the_server_cannot_take_is_journaled_and_never_given_up(world):
    world.fake.down = True
    await unlink(world.fs, "system/human.md")
    await trio.sleep(3600)  # the grace period ends with the server away: queued, not dropped
    [entry] = world.journal.queued()
    assert entry.kind == "unlink"
    world.fake.down = False
    assert await Poller(world.state, world.remote).poll_once()
    assert "human.md" not in await listdir(world.fs, "system")  # hidden until it is replayed
    assert await world.replayer.replay()
    assert world.ids["human"] not in world.fake.agents[world.agent]
    assert world.journal.pending() == []
    assert world.replayer.last_replay == "system/human.md: retired"


async def test_an_unlink_in_its_grace_period_survives_a_crash(world, nursery):
    await unlink(world.fs, "notes.md")  # the daemon dies before the grace period ends
    again = await make_world(nursery, after=world)
    assert "notes.md" not in await listdir(again.fs, "")
    assert await again.replayer.replay()
    assert world.fake.blocks[world.ids["notes"]]["tags"] == []  # retired, never deleted
    assert again.journal.pending() == []
    check_invariants(again)


async def test_a_create_while_the_server_is_away_is_journaled_and_replayed_once(world):
    world.fake.down = True
    await create(world.fs, "system/todo.md", b"first\n")  # close() returns 0
    node = world.state.tree.node(await inode_of(world.fs, "system/todo.md"))
    assert is_provisional(node.block.id)
    await write(world, "system/todo.md", b"second\n")
    assert [e.kind for e in world.journal.pending()] == ["create", "write"]
    assert (await read_all(world.fs, "system/todo.md")).endswith(b"---\nsecond\n")
    await server_back(world)
    [made] = world.fake.by_label("todo")
    assert made["value"] == "second\n" and made["id"] in world.fake.agents[world.agent]
    assert node.block.id == made["id"] and world.state.tree.block_node(made["id"]) is node
    await write(world, "system/todo.md", b"third\n")  # online again: a plain PATCH
    assert made["value"] == "third\n" and world.journal.pending() == []


async def test_a_replayed_create_after_a_crash_makes_no_second_block(world, nursery):
    world.fake.down = True
    await create(world.fs, "system/idea.md", b"an idea\n")
    world.fake.down = False
    world.fake.requests.clear()
    # the replay's POST reached the server, then the daemon died before attaching it
    [entry] = world.journal.pending()
    world.fake.add_block("idea", "an idea\n", agent=world.agent, attached=False,
                         tags=[f"owner:{world.agent}", f"memfuse-create:{entry.block_id}"])
    again = await make_world(nursery, after=world)
    # the marked block is system/idea.md's, half made: not shown as a root file of its own
    assert "idea.md" not in await listdir(again.fs, "")
    assert await again.replayer.replay()
    assert await Poller(again.state, again.remote).poll_once()
    [made] = world.fake.by_label("idea")
    assert world.fake.calls("create") == [] and made["id"] in world.fake.agents[world.agent]
    assert made["tags"] == [f"owner:{world.agent}"]  # the marker is dropped
    assert (await read_all(again.fs, "system/idea.md")).endswith(b"---\nan idea\n")
    assert "idea.md" not in await listdir(again.fs, "")
    assert again.journal.pending() == []
    check_invariants(again)


async def test_a_create_then_unlink_while_away_sends_nothing(world):
    world.fake.down = True
    await create(world.fs, "draft.md", b"never mind\n")
    await unlink(world.fs, "draft.md")
    await trio.sleep(3600)
    world.fake.requests.clear()
    await server_back(world)
    assert world.fake.by_label("draft") == [] and world.fake.calls("create") == []
    assert "created and removed while the server was away" in world.replayer.last_replay


async def test_renames_while_away_are_journaled_shown_and_replayed(world):
    world.fake.down = True
    await rename(world.fs, "notes.md", "system/notes.md")  # attach
    await rename(world.fs, "system/persona.md", "persona.md")  # detach
    await rename(world.fs, "system/human.md", "system/person.md")  # relabel
    assert [e.kind for e in world.journal.pending()] == ["relocate"] * 3
    world.fake.down = False
    assert await Poller(world.state, world.remote).poll_once()  # the listing does not undo them
    assert await listdir(world.fs, "system") == ["notes.md", "person.md", "projects"]
    assert "persona.md" in await listdir(world.fs, "")
    assert await world.replayer.replay()
    fake, agent = world.fake, world.agent
    assert fake.blocks[world.ids["human"]]["label"] == "person"
    assert world.ids["notes"] in fake.agents[agent]
    assert world.ids["persona"] not in fake.agents[agent]
    assert f"owner:{agent}" in fake.blocks[world.ids["persona"]]["tags"]
    assert await Poller(world.state, world.remote).poll_once()
    assert await listdir(world.fs, "system") == ["notes.md", "person.md", "projects"]


async def test_a_directory_rename_while_away_moves_every_block_below_it(world):
    await world.fs.mkdir(ROOT_INODE, b"ideas", 0o755, None)
    await create(world.fs, "ideas/a.md", b"a\n")
    await create(world.fs, "ideas/b.md", b"b\n")
    world.fake.down = True
    await rename(world.fs, "ideas", "system/thoughts")  # relabel and attach, two blocks
    assert [e.kind for e in world.journal.pending()] == ["relocate", "relocate"]
    assert await listdir(world.fs, "system/thoughts") == ["a.md", "b.md"]
    await server_back(world)
    attached = {world.fake.blocks[i]["label"] for i in world.fake.agents[world.agent]}
    assert {"thoughts/a", "thoughts/b"} <= attached


async def test_sed_i_while_away_is_a_journaled_write_of_the_target(world):
    world.fake.down = True
    system = await inode_of(world.fs, "system")
    info, _ = await world.fs.create(system, b"sedXy12", 0o644, os.O_WRONLY, None)
    await world.fs.write(info.fh, 0, b"edited by sed\n")
    await world.fs.flush(info.fh)
    await world.fs.release(info.fh)
    await world.fs.rename(system, b"sedXy12", system, b"human.md", 0, None)
    assert (await read_all(world.fs, "system/human.md")).endswith(b"---\nedited by sed\n")
    await server_back(world)
    assert world.fake.blocks[world.ids["human"]]["value"] == "edited by sed\n"
    assert world.fake.calls("create") == []


async def test_a_scratch_file_renamed_to_a_block_name_while_away_is_a_journaled_create(world):
    world.fake.down = True
    await create(world.fs, "notes.tmp", b"from scratch\n")
    await rename(world.fs, "notes.tmp", "fresh.md")
    [entry] = world.journal.pending()
    assert entry.kind == "create" and entry.content == b"from scratch\n"
    await server_back(world)
    assert [b["value"] for b in world.fake.by_label("fresh")] == ["from scratch\n"]


async def test_journaled_renames_and_creates_are_shown_after_a_restart(world, nursery):
    world.fake.down = True
    await rename(world.fs, "notes.md", "system/notes.md")
    await create(world.fs, "later.md", b"made offline\n")
    world.fake.down = False
    again = await make_world(nursery, after=world)  # the daemon died; not replayed yet
    assert "notes.md" in await listdir(again.fs, "system")
    assert (await read_all(again.fs, "later.md")).endswith(b"---\nmade offline\n")
    await server_back(again)
    assert world.ids["notes"] in world.fake.agents[world.agent]
    assert [b["value"] for b in world.fake.by_label("later")] == ["made offline\n"]
    check_invariants(again)


# -- the bytes of a failed close are kept --------------------------------------------------------


async def test_the_bytes_of_a_write_refused_at_write_are_kept_in_history(world):
    info = await world.fs.open(await inode_of(world.fs, "system/persona.md"),
                               os.O_WRONLY | os.O_TRUNC, None)
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await world.fs.write(info.fh, 0, b"far more than twenty characters")
    assert caught.value.errno == errno.EFBIG
    for _ in range(2):  # a dup's close too: kept once
        with pytest.raises(pyfuse3.FUSEError):
            await world.fs.flush(info.fh)
    await world.fs.release(info.fh)
    rejected = [r for r in world.records if r[2] is Origin.REJECTED]
    assert rejected == [("system/persona.md", b"far more than twenty characters",
                         Origin.REJECTED)]
    assert world.fake.blocks[world.ids["persona"]]["value"] == "I am."


async def test_the_bytes_of_a_write_the_server_refuses_are_kept_in_history(world):
    world.fake.fail_next = [400]
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await write(world, "system/human.md", b"the server says no\n")
    assert caught.value.errno == errno.EINVAL
    assert ("system/human.md", b"the server says no\n", Origin.REJECTED) in world.records
    assert world.records[-1] == ("system/human.md", HUMAN, Origin.SERVER)  # shown again


async def test_a_create_the_server_refuses_leaves_no_file_behind(world):
    world.fake.fail_paths["/v1/blocks/"] = 422
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await create(world.fs, "refused.md", b"keep me\n")
    assert caught.value.errno == errno.EINVAL
    assert "refused.md" not in await listdir(world.fs, "")
    assert ("refused.md", b"keep me\n", Origin.REJECTED) in world.records
    assert world.records[-1] == ("refused.md", None, Origin.SERVER)


# -- found in review: the provisional id, half-made creates, order across blocks ---------------


async def poll(world) -> bool:
    return await Poller(world.state, world.remote).poll_once()


async def test_a_create_whose_file_is_unlinked_in_its_grace_period_is_never_sent(world):
    world.fake.down = True
    await create(world.fs, "idea.md", b"an idea\n")
    await unlink(world.fs, "idea.md")
    world.fake.down = False
    assert await poll(world)
    assert not await world.replayer.replay()  # the create waits: the file may be claimed back
    await trio.sleep(5)  # the grace period ends online: the unlink joins the create
    assert await world.replayer.replay()
    assert await poll(world)
    assert world.fake.by_label("idea") == [] and "idea.md" not in await listdir(world.fs, "")
    assert world.journal.pending() == []


async def test_a_vim_save_of_a_journaled_create_is_one_block(world):
    world.fake.down = True
    await create(world.fs, "idea.md", b"an idea\n")
    world.fake.down = False
    assert await poll(world)
    await rename(world.fs, "idea.md", "idea.md~")  # vim's backup: the unlink in its grace period
    assert not await world.replayer.replay()  # the create waits for the grace period
    await create(world.fs, "idea.md", b"edited in vim\n")  # claims the journaled block back
    assert await world.replayer.replay()
    assert await poll(world)
    [made] = world.fake.by_label("idea")
    assert made["value"] == "edited in vim\n" and made["tags"] == [f"owner:{world.agent}"]
    node = world.state.tree.node(await inode_of(world.fs, "idea.md"))
    assert node.block.id == made["id"] and world.journal.pending() == []


async def test_a_create_whose_attach_got_no_answer_is_completed_not_made_twice(world, monkeypatch):
    world.fake.down = True
    await create(world.fs, "system/todo.md", b"todo\n")
    world.fake.down = False
    attach = world.client.attach_block

    async def attach_then_away(*args, **kwargs):
        world.fake.down = True  # the POST went through; the attach gets no answer
        return await attach(*args, **kwargs)

    monkeypatch.setattr(world.client, "attach_block", attach_then_away)
    assert not await world.replayer.replay()
    monkeypatch.setattr(world.client, "attach_block", attach)
    world.fake.down = False
    assert await poll(world)  # lists the half-made block, detached
    assert await world.replayer.replay()
    assert await poll(world)
    [made] = world.fake.by_label("todo")
    assert made["id"] in world.fake.agents[world.agent] and made["tags"] == [
        f"owner:{world.agent}"]
    assert "todo.md" not in await listdir(world.fs, "")
    assert "todo.md" in await listdir(world.fs, "system")


async def test_renames_across_blocks_are_replayed_in_their_order(world):
    world.fake.down = True
    await write(world, "notes.md", b"edited\n")
    await rename(world.fs, "system/human.md", "human-old.md")  # frees the attached label
    await rename(world.fs, "notes.md", "system/human.md")  # then takes it
    world.fake.down = False
    assert await poll(world)
    assert await world.replayer.replay(), world.replayer.last_replay
    attached = {world.fake.blocks[i]["label"]: i for i in world.fake.agents[world.agent]}
    assert attached["human"] == world.ids["notes"]
    assert world.fake.blocks[world.ids["notes"]]["value"] == "edited\n"
    assert world.fake.blocks[world.ids["human"]]["label"] == "human-old"


async def test_a_rename_that_waited_for_a_create_replay_uses_the_real_block(world, nursery,
                                                                           monkeypatch):
    world.fake.down = True
    await create(world.fs, "idea.md", b"an idea\n")
    world.fake.down = False
    assert await poll(world)
    post = world.client.create_block

    async def slow_post(**kwargs):
        await trio.sleep(1)
        return await post(**kwargs)

    monkeypatch.setattr(world.client, "create_block", slow_post)
    nursery.start_soon(world.replayer.replay)
    await trio.sleep(0.5)
    await rename(world.fs, "idea.md", "idea2.md")  # waits for the create's replay
    [made] = world.fake.by_label("idea2")
    node = world.state.tree.node(await inode_of(world.fs, "idea2.md"))
    assert node.block.id == made["id"] and world.journal.pending() == []


@pytest.mark.expect_error("the server refused journaled changes")
async def test_a_journaled_create_the_server_refuses_leaves_history_and_mount_equal(world):
    world.fake.down = True
    await create(world.fs, "idea.md", b"an idea\n")
    world.fake.down = False
    world.fake.fail_paths["/v1/blocks/"] = 422
    assert await world.replayer.replay()
    assert "idea.md" not in await listdir(world.fs, "")
    assert ("idea.md", b"an idea\n", Origin.REJECTED) in world.records


@pytest.mark.expect_error("the server refused journaled changes")
async def test_a_block_made_read_only_during_the_outage_settles_its_journaled_write(world):
    world.fake.down = True
    await write(world, "system/human.md", b"offline\n")
    world.fake.blocks[world.ids["human"]]["read_only"] = True
    world.fake.down = False
    assert await world.replayer.replay()  # refused for good, kept in history: never stuck
    assert world.journal.pending() == [] and "refused" in world.replayer.last_replay
    assert world.fake.blocks[world.ids["human"]]["value"] == "The human.\n"


async def test_a_new_file_unlinked_while_its_first_close_waits_is_not_created(world):
    world.fake.down = True  # not known to be away yet: the close tries for 2 s
    info, _ = await world.fs.create(ROOT_INODE, b"gone.md", 0o644, os.O_WRONLY, None)
    await world.fs.write(info.fh, 0, b"x\n")
    async with trio.open_nursery() as closes:
        closes.start_soon(world.fs.flush, info.fh)
        await trio.sleep(0.5)
        await unlink(world.fs, "gone.md")  # waits for the create: journaled, then unlinked
        assert [e.kind for e in world.journal.pending()] == ["create", "unlink"]
    await world.fs.release(info.fh)
    await trio.sleep(1)  # the unlink's grace period
    await server_back(world)
    assert world.fake.by_label("gone") == [] and "gone.md" not in await listdir(world.fs, "")
