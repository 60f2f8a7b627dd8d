"""The poller's two listings and their cost: attached blocks often, everything now and then,
bursts of opens served by one listing, unchanged listings not decoded or rendered again."""
import pytest
import trio

from memfuse import blockfile, files as files_module
from memfuse.model import Origin
from memfuse.poller import Poller

from .fsworld import read_all
from .test_namespace import listdir
from .test_sync import RecordingInvalidator

ATTACHED = "/core-memory/blocks"


def gets(world, what: str) -> int:
    """GET requests whose path ends with (attached listing) or is (owned listing) `what`."""
    return sum(1 for m, p, _ in world.fake.requests
               if m == "GET" and (p.endswith(what) if what == ATTACHED else p == what))


@pytest.fixture
def poller(world):
    world.state.invalidator = RecordingInvalidator()
    world.fake.requests.clear()
    return Poller(world.state, world.remote)


async def test_the_attached_listing_alone_applies_attached_changes(world, poller):
    world.fake.blocks[world.ids["human"]]["value"] = "Edited by the agent.\n"
    world.fake.add_block("fresh", "f", agent=world.agent)
    assert await poller.poll_attached()
    assert (await read_all(world.fs, "system/human.md")).endswith(b"Edited by the agent.\n")
    assert "fresh.md" in await listdir(world.fs, "system")
    assert gets(world, ATTACHED) == 1 and gets(world, "/v1/blocks/") == 0
    assert ("system/human.md", Origin.SERVER) in [(p, o) for p, _c, o in world.records]


async def test_a_block_leaving_the_attached_listing_is_read_once_to_tell_where_it_went(
        world, poller):
    fake, agent = world.fake, world.agent
    fake.blocks[world.ids["human"]]["tags"] = [f"owner:{agent}"]
    fake.agents[agent].remove(world.ids["human"])  # detached, still owned: moves to the root
    fake.agents[agent].remove(world.ids["persona"])  # detached, not owned: leaves the mount
    assert await poller.poll_attached()
    assert "human.md" in await listdir(world.fs, "")
    assert "human.md" not in await listdir(world.fs, "system")
    assert "persona.md" not in await listdir(world.fs, "system")
    assert "persona.md" not in await listdir(world.fs, "")
    reads = [p for m, p, _ in fake.requests if m == "GET" and p.startswith("/v1/blocks/block")]
    assert sorted(reads) == sorted([f"/v1/blocks/{world.ids['human']}",
                                    f"/v1/blocks/{world.ids['persona']}"])


async def test_a_block_deleted_from_the_attached_listing_leaves_the_mount(world, poller):
    fake, agent = world.fake, world.agent
    fake.agents[agent].remove(world.ids["persona"])
    del fake.blocks[world.ids["persona"]]
    assert await poller.poll_attached()
    assert "persona.md" not in await listdir(world.fs, "system")


async def test_the_attached_listing_leaves_the_roots_files_to_the_full_listing(world, poller):
    fake, agent = world.fake, world.agent
    del fake.blocks[world.ids["notes"]]  # a detached block deleted: only the full listing knows
    assert await poller.poll_attached()
    assert "notes.md" in await listdir(world.fs, "")
    assert await poller.poll_once()
    assert "notes.md" not in await listdir(world.fs, "")


async def test_a_block_attached_on_the_server_moves_under_system_at_the_attached_listing(
        world, poller):
    world.fake.agents[world.agent].append(world.ids["notes"])
    assert await poller.poll_attached()
    assert "notes.md" in await listdir(world.fs, "system")
    assert "notes.md" not in await listdir(world.fs, "")


async def test_a_listing_that_raced_a_local_change_is_dropped(world, poller, monkeypatch):
    real = world.remote.attached

    async def racing(*args, **kwargs):
        result = await real(*args, **kwargs)
        world.remote.generation += 1  # a write completed while the listing was under way
        return result

    monkeypatch.setattr(world.remote, "attached", racing)
    world.fake.blocks[world.ids["human"]]["value"] = "later"
    assert not await poller.poll_attached()
    assert not (await read_all(world.fs, "system/human.md")).endswith(b"later")


async def test_full_listings_are_rarer_than_attached_ones(world, autojump_clock):
    poller = Poller(world.state, world.remote, interval=0.5, full_interval=4.0)
    world.fake.requests.clear()
    with trio.move_on_after(10):
        await poller.run()
    assert gets(world, "/v1/blocks/") == 3  # at 0, 4 and 8 s
    assert 17 <= gets(world, ATTACHED) <= 20  # every 0.5 s: with each full one, or alone
    assert poller.last_full is not None and poller.applied.is_set()


async def test_a_slow_full_listing_stretches_the_full_interval(world, autojump_clock,
                                                               monkeypatch):
    real = world.remote.listing

    async def slow(*args, **kwargs):
        await trio.sleep(2.0)  # a listing of many thousands of blocks
        return await real(*args, **kwargs)

    monkeypatch.setattr(world.remote, "listing", slow)
    poller = Poller(world.state, world.remote, interval=0.5, full_interval=4.0)
    world.fake.requests.clear()
    with trio.move_on_after(25):
        await poller.run()
    # listings start at 0 and 12 s (answered at 2 and 14): five times 2 s apart, not 4 s
    assert gets(world, "/v1/blocks/") == 2


async def bursting(world, nursery, notes: int, first_listing: float = 1) -> Poller:
    """A poller that lists only when asked (a burst), wired to the opens (revalidation window
    1 s), `notes` detached blocks n0.. added and listed, then every cached copy past the
    window. first_listing: seconds the first full listing may take."""
    poller = Poller(world.state, world.remote, interval=3600, full_interval=3600)
    nursery.start_soon(poller.run)
    await trio.sleep(first_listing)
    world.files.listed_since = poller.listed_since
    world.files.revalidate_after = 1.0
    for i in range(notes):
        world.fake.add_block(f"n{i}", f"v{i}", agent=world.agent, attached=False,
                             tags=[f"owner:{world.agent}"])
    await poller.poll_once()
    await trio.sleep(5)
    return poller


async def test_a_burst_of_opens_is_served_by_one_listing(world, nursery, autojump_clock):
    await bursting(world, nursery, 10)
    world.fake.requests.clear()
    for i in range(10):
        world.fake.blocks[world.fake.by_label(f"n{i}")[0]["id"]]["value"] = f"new {i}"
    for i in range(10):
        assert (await read_all(world.fs, f"n{i}.md")).endswith(f"new {i}".encode())
    single = [p for m, p, _ in world.fake.requests
              if m == "GET" and p.startswith("/v1/blocks/block")]
    assert len(single) == files_module.BURST_OPENS - 1  # then one listing served the rest
    assert gets(world, "/v1/blocks/") == 1


async def test_a_burst_with_the_server_away_serves_the_cache_at_once(world, nursery,
                                                                     autojump_clock):
    await bursting(world, nursery, 0)
    world.fake.down = True
    started = trio.current_time()
    for _ in range(5):
        assert (await read_all(world.fs, "notes.md")).endswith(b"n")
    assert trio.current_time() - started < 1


async def test_an_unchanged_listing_is_neither_decoded_nor_rendered_again(world, poller,
                                                                          monkeypatch):
    assert await poller.poll_once()
    rendered = []
    real_render = blockfile.render
    monkeypatch.setattr(blockfile, "render", lambda block: rendered.append(block) or
                        real_render(block))
    first = world.state.tree.block_node(world.ids["notes"]).block
    assert await poller.poll_once()
    assert rendered == []
    assert world.state.tree.block_node(world.ids["notes"]).block is first  # the same object
    world.fake.blocks[world.ids["notes"]]["value"] = "changed"
    assert await poller.poll_once()
    assert [b.id for b in rendered] == [world.ids["notes"]]


async def test_asking_for_a_listing_while_the_server_is_away_is_one_attempt(world, nursery):
    poller = Poller(world.state, world.remote, interval=3600, full_interval=3600)
    nursery.start_soon(poller.run)
    await trio.sleep(0.1)  # the first full listing
    world.fake.down = True
    world.fake.requests.clear()
    assert not await poller.listed_since(trio.current_time(), 0.5)
    assert gets(world, ATTACHED) == 1  # no answer: the opens read their blocks themselves


async def test_a_burst_is_served_by_its_listing_until_its_opens_stop(world, nursery,
                                                                     autojump_clock):
    await bursting(world, nursery, 4)
    for i in range(3):  # the third starts a burst: one listing
        await read_all(world.fs, f"n{i}.md")
    world.fake.requests.clear()
    for _ in range(6):  # a long pass: past the 1 s window, but the burst goes on
        await trio.sleep(0.5)
        await read_all(world.fs, "n3.md")
    assert world.fake.requests == []
    await trio.sleep(1.5)  # the burst is over: an open reads its block again
    await read_all(world.fs, "n3.md")
    assert [p for m, p, _ in world.fake.requests if m == "GET"] == [
        f"/v1/blocks/{world.fake.by_label('n3')[0]['id']}"]


async def test_a_slow_listing_serves_a_long_pass_for_the_span_after_it_arrived(
        world, nursery, autojump_clock, monkeypatch):
    real = world.remote.listing

    async def slow(*args, **kwargs):
        await trio.sleep(3.0)  # 10,000 blocks: a listing of seconds
        return await real(*args, **kwargs)

    monkeypatch.setattr(world.remote, "listing", slow)
    await bursting(world, nursery, 4, first_listing=5)
    for i in range(3):  # the third open waits for a listing of 3 s
        await read_all(world.fs, f"n{i}.md")
    world.fake.requests.clear()
    for _ in range(8):  # the pass goes on for 4 s after the listing arrived (7 s after it began)
        await trio.sleep(0.5)
        await read_all(world.fs, "n3.md")
    assert world.fake.requests == [], "a long pass paid for a second listing"


async def test_a_burst_waits_for_a_listing_slower_than_a_get_would_be(world, nursery,
                                                                      autojump_clock,
                                                                      monkeypatch):
    real = world.remote.listing

    async def slow(*args, **kwargs):
        await trio.sleep(3.0)  # thousands of blocks: longer than an open waits for one GET
        return await real(*args, **kwargs)

    monkeypatch.setattr(world.remote, "listing", slow)
    await bursting(world, nursery, 4, first_listing=5)  # the first listing is 3 s long
    world.fake.requests.clear()
    for i in range(4):
        await read_all(world.fs, f"n{i}.md")
    single = [p for m, p, _ in world.fake.requests
              if m == "GET" and p.startswith("/v1/blocks/block")]
    assert len(single) == files_module.BURST_OPENS - 1


async def test_opens_that_never_stop_still_ask_again_once_the_bursts_listing_is_old(
        world, nursery, autojump_clock):
    await bursting(world, nursery, 4)
    for i in range(3):  # a burst: one listing
        await read_all(world.fs, f"n{i}.md")
    world.fake.requests.clear()
    for _ in range(14):  # opens every 0.5 s for 7 s: the burst never ends by itself
        await trio.sleep(0.5)
        await read_all(world.fs, "n3.md")
    assert world.fake.requests, f"served a copy more than {files_module.BURST_SPAN} s old"


async def test_a_mount_written_without_a_pause_still_applies_a_listing(world, poller, nursery,
                                                                      monkeypatch):
    # each listing is raced by a local write that starts while it runs; after RACED_LIMIT
    # dropped in a row, the next holds the mount's changes back (Remote.changes_held) and is
    # applied, so a steadily written mount still sees the server's changes
    from memfuse.poller import RACED_LIMIT

    from .test_offline import write
    real, started = world.remote.listing, []

    async def listing_while_written(*args, **kwargs):
        nursery.start_soon(write, world, "system/persona.md", f"local {len(started)}\n".encode())
        started.append(1)
        for _ in range(100):  # until the write is under way, unless changes are held
            if world.remote.in_flight:
                break
            await trio.sleep(0)
        return await real(*args, **kwargs)

    monkeypatch.setattr(world.remote, "listing", listing_while_written)
    world.fake.blocks[world.ids["human"]]["value"] = "Edited by the agent.\n"
    assert [await poller.poll_once() for _ in range(RACED_LIMIT + 1)] == (
        [False] * RACED_LIMIT + [True])
    assert (await read_all(world.fs, "system/human.md")).endswith(b"Edited by the agent.\n")
    await trio.sleep(0.1)  # the write held back during the last listing went on after it
    assert world.fake.blocks[world.ids["persona"]]["value"] == f"local {RACED_LIMIT}\n"
