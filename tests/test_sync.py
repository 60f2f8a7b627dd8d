"""Server -> mount (the poller), conflicts, the memory_filesystem block, and the status report,
at the filesystem level over the fake API."""
import dataclasses
import errno
import os
import time

import pyfuse3
import pytest
import trio

from memfuse import blockfile
from memfuse.model import Block, Origin
from memfuse.remote import Stale
from memfuse.status import Status
from memfuse.keeper import TreeBlockKeeper, render_memory_filesystem
from memfuse.poller import Poller
from memfuse.state import MountState
from memfuse.tree import ROOT_INODE, Tree

from .fsworld import inode_of, read_all
from .test_namespace import create, listdir, unlink


class RecordingInvalidator:
    def __init__(self):
        self.entries, self.inodes, self.attributes_of = [], [], []

    def entry(self, parent_inode, name):
        self.entries.append((parent_inode, name))

    def attributes(self, inode):
        self.attributes_of.append(inode)

    async def inode(self, inode):
        self.inodes.append(inode)


@pytest.fixture
def poller(world):
    world.state.invalidator = RecordingInvalidator()
    return Poller(world.state, world.remote)


def server_paths(world):
    return [(p, o) for p, _c, o in world.records]


async def test_value_change_is_applied_invalidated_and_recorded(world, poller):
    world.fake.blocks[world.ids["human"]]["value"] = "Changed remotely.\n"
    assert await poller.poll_once()
    inode = await inode_of(world.fs, "system/human.md")
    assert (await read_all(world.fs, "system/human.md")).endswith(b"---\nChanged remotely.\n")
    assert world.state.invalidator.inodes == [inode]
    assert server_paths(world) == [("system/human.md", Origin.SERVER)]


async def test_shorter_value_leaves_no_stale_bytes(world, poller):
    inode = await inode_of(world.fs, "system/human.md")
    world.fake.blocks[world.ids["human"]]["value"] = "x"
    await poller.poll_once()
    data = await read_all(world.fs, "system/human.md")
    assert data.endswith(b"---\nx") and (await world.fs.getattr(inode, None)).st_size == len(data)


async def test_created_attached_and_detached_blocks_appear(world, poller):
    fake = world.fake
    fake.add_block("new/idea", "i", agent=world.agent)
    fake.add_block("loose", "l", agent=world.agent, attached=False,
                   tags=[f"owner:{world.agent}"])
    await poller.poll_once()
    assert "idea.md" in await listdir(world.fs, "system/new")
    assert "loose.md" in await listdir(world.fs, "")
    assert (await world.fs.lookup(await inode_of(world.fs, "system"), b"new", None)).st_ino
    assert (await inode_of(world.fs, "system/new"), "idea.md") in world.state.invalidator.entries


async def test_detach_attach_relabel_and_delete_move_the_same_inode(world, poller):
    fake, agent = world.fake, world.agent
    inode = await inode_of(world.fs, "system/persona.md")
    fake.agents[agent].remove(world.ids["persona"])  # detached on the server, not owned
    await poller.poll_once()
    assert "persona.md" not in await listdir(world.fs, "system")
    fake.agents[agent].append(world.ids["persona"])
    await poller.poll_once()
    new_inode = await inode_of(world.fs, "system/persona.md")
    fake.blocks[world.ids["notes"]]["label"] = "journal"  # relabelled (detached, owned)
    notes_inode = await inode_of(world.fs, "notes.md")
    await poller.poll_once()
    assert await inode_of(world.fs, "journal.md") == notes_inode
    fake.agents[agent].append(world.ids["notes"])  # attached on the server
    await poller.poll_once()
    assert await inode_of(world.fs, "system/journal.md") == notes_inode
    del fake.blocks[world.ids["notes"]]
    fake.agents[agent].remove(world.ids["notes"])
    await poller.poll_once()
    assert "journal.md" not in await listdir(world.fs, "system")
    assert new_inode != inode  # a block gone and back is a new file, never a reused inode


async def test_a_label_swap_on_the_server_moves_both_files(world, poller):
    # human <-> persona relabelled at once: each path shows its new block, each inode follows
    # its block, and history says where each text is
    fake, ids = world.fake, world.ids
    human_inode = await inode_of(world.fs, "system/human.md")
    persona_inode = await inode_of(world.fs, "system/persona.md")
    fake.blocks[ids["human"]]["label"] = "persona"
    fake.blocks[ids["persona"]]["label"] = "human"
    await poller.poll_once()
    assert await inode_of(world.fs, "system/persona.md") == human_inode
    assert await inode_of(world.fs, "system/human.md") == persona_inode
    assert (await read_all(world.fs, "system/persona.md")).endswith(b"The human.\n")
    assert (await read_all(world.fs, "system/human.md")).endswith(b"I am.")
    assert world.state.tree.problems() == []


async def test_a_rotation_of_three_labels_and_a_swap_across_directories_are_applied(world,
                                                                                      poller):
    fake, ids = world.fake, world.ids
    fake.blocks[ids["human"]]["label"] = "persona"
    fake.blocks[ids["persona"]]["label"] = "notes"  # attached: system/notes.md
    fake.blocks[ids["notes"]]["label"] = "human"  # detached: human.md at the root
    await poller.poll_once()
    files = world.state.tree.files()
    assert files["system/persona.md"].endswith(b"The human.\n")
    assert files["system/notes.md"].endswith(b"I am.")
    assert files["human.md"].endswith(b"n")
    assert "system/human.md" not in files and "notes.md" not in files


async def test_a_file_set_aside_for_a_swap_whose_new_path_is_taken_leaves_the_mount(world,
                                                                                      poller):
    # persona moves to a path another block keeps (two blocks, one label) while human takes
    # persona's path: persona's file has nowhere to go and leaves; its block stays
    fake, ids = world.fake, world.ids
    extra = fake.add_block("extra", "Extra.\n", agent=world.agent)
    await poller.poll_once()
    fake.blocks[ids["human"]]["label"] = "persona"
    fake.blocks[ids["persona"]]["label"] = "extra"
    await poller.poll_once()
    files = world.state.tree.files()
    assert files["system/persona.md"].endswith(b"The human.\n")
    assert files["system/extra.md"].endswith(b"Extra.\n")
    assert world.state.tree.block_node(ids["persona"]) is None
    assert ids["persona"] in fake.blocks and extra in fake.agents[world.agent]
    assert world.state.tree.problems() == []


async def test_a_block_in_its_grace_period_is_not_brought_back(world, poller):
    await unlink(world.fs, "system/human.md")
    await poller.poll_once()  # still attached on the server: the retirer has not run yet
    assert "human.md" not in await listdir(world.fs, "system")


async def test_a_listing_that_raced_a_local_change_is_dropped(world, poller):
    real_list = world.remote.client.list_owned_blocks

    async def list_then_local_change(agent_id, **options):
        blocks = await real_list(agent_id, **options)
        await create(world.fs, "system/racer.md", b"r")  # lands while the poll is listing
        return blocks

    world.remote.client.list_owned_blocks = list_then_local_change
    assert not await poller.poll_once()
    assert "racer.md" in await listdir(world.fs, "system")


async def test_conflict_overwrite_keeps_both_versions_in_order(world):
    fs, fake = world.fs, world.fake
    info = await fs.open(await inode_of(fs, "system/human.md"), os.O_WRONLY | os.O_TRUNC, None)
    fake.blocks[world.ids["human"]]["value"] = "Server's words.\n"
    await fs.write(info.fh, 0, b"Mine.\n")
    await fs.flush(info.fh)
    await fs.release(info.fh)
    assert fake.blocks[world.ids["human"]]["value"] == "Mine.\n"
    assert [(c.split(b"---\n")[-1], o) for _p, c, o in world.records] == [
        (b"Server's words.\n", Origin.SERVER), (b"Mine.\n", Origin.LOCAL)]
    assert "changed on the server after it was opened" in world.files.last_conflict


async def test_conflict_reject_fails_estale_and_keeps_both_versions(world):
    fs, fake = world.fs, world.fake
    world.remote.on_conflict = "reject"
    info = await fs.open(await inode_of(fs, "system/human.md"), os.O_WRONLY | os.O_TRUNC, None)
    fake.blocks[world.ids["human"]]["value"] = "Server's words.\n"
    await fs.write(info.fh, 0, b"Mine.\n")
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.flush(info.fh)
    await fs.release(info.fh)
    assert caught.value.errno == errno.ESTALE
    assert fake.blocks[world.ids["human"]]["value"] == "Server's words.\n"
    assert [(c.split(b"---\n")[-1], o) for _p, c, o in world.records] == [
        (b"Server's words.\n", Origin.SERVER), (b"Mine.\n", Origin.REJECTED),
        (b"Server's words.\n", Origin.SERVER)]
    assert (await read_all(fs, "system/human.md")).endswith(b"---\nServer's words.\n")


async def test_no_conflict_when_the_server_did_not_change(world):
    world.remote.on_conflict = "reject"
    info = await world.fs.open(await inode_of(world.fs, "system/human.md"),
                               os.O_RDWR | os.O_TRUNC, None)
    await world.fs.write(info.fh, 0, b"first")
    await world.fs.flush(info.fh)
    await world.fs.write(info.fh, 0, b"second")  # its own first write is no conflict
    await world.fs.flush(info.fh)
    await world.fs.release(info.fh)
    assert world.fake.blocks[world.ids["human"]]["value"] == "second"
    assert world.files.last_conflict is None


def test_memory_filesystem_rendering_matches_letta_code():
    state = MountState(Tree(), lambda *change: None)
    blocks = [Block(f"b{i}", label, "v", 100) for i, label in enumerate(
        ["persona", "human", "projects/letta", "projects/memfuse", "memory_filesystem"])]
    state.load(blocks, [Block("d1", "notes", "n", 10), Block("d2", "archive/old", "o", 10)], 0,
               {})
    state.create(state.tree.system, ".human.md.swp")
    assert render_memory_filesystem(state.tree) == "\n".join([
        "/memory/",
        "├── archive/",
        "│   └── old.md",
        "├── system/",
        "│   ├── projects/",
        "│   │   ├── letta.md",
        "│   │   └── memfuse.md",
        "│   ├── human.md",
        "│   ├── memory_filesystem.md",
        "│   └── persona.md",
        "└── notes.md",
    ])


async def test_memory_filesystem_block_follows_the_tree_and_is_read_only(world):
    fake = world.fake
    block_id = fake.add_block("memory_filesystem", "/memory/", agent=world.agent)
    await Poller(world.state, world.remote).poll_once()
    keeper = TreeBlockKeeper(world.state, world.remote)
    await keeper.refresh()
    assert fake.blocks[block_id]["value"] == render_memory_filesystem(world.state.tree)
    await create(world.fs, "system/todo.md", b"t")
    await keeper.refresh()
    assert "│   └── todo.md" in fake.blocks[block_id]["value"]
    inode = await inode_of(world.fs, "system/memory_filesystem.md")
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await world.fs.open(inode, os.O_WRONLY, None)
    assert caught.value.errno == errno.EACCES
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await unlink(world.fs, "system/memory_filesystem.md")
    assert caught.value.errno == errno.EACCES


def test_status_report_reads_at_a_glance():
    now = time.time()
    status = Status(agent_id="agent-1", mountpoint="/m", base_url="http://s", pid=7,
                    reachable=False, last_poll=now - 3, pending_writes=1, pending_unlinks=2,
                    uncommitted=0, last_commit="0123456789abcdef", last_commit_message="Local "
                    "edit: system/human.md", last_commit_at=now - 1, last_conflict=None,
                    last_error="system/x.md: value too long (EFBIG)", last_error_at=now - 5,
                    updated_at=now, requests=30, received_bytes=2_000_000, started_at=now - 10)
    text = status.render(now)
    assert "30 request(s), 2.0 MB received in 10 s since mount (3.00 requests/s, 200.0 kB/s)" in text
    assert "agent agent-1 mounted at /m (pid 7)" in text
    assert "http://s: UNREACHABLE (serving the last known state)" in text
    assert "last poll      3.0 s ago" in text
    assert "1 unsent write(s), 2 unlink(s) in their grace period" in text
    assert "last commit    0123456 1.0 s ago: Local edit: system/human.md" in text
    assert "last conflict  none" in text
    assert "system/x.md: value too long (EFBIG) (5.0 s ago)" in text
    assert "WARNING" in status.render(now + 60)


async def test_a_block_removed_on_the_server_while_open_takes_no_write(world, poller):
    fs = world.fs
    info = await fs.open(await inode_of(fs, "system/persona.md"), os.O_WRONLY | os.O_TRUNC, None)
    world.fake.agents[world.agent].remove(world.ids["persona"])  # detached on the server
    await poller.poll_once()
    await fs.write(info.fh, 0, b"too late")
    with pytest.raises(pyfuse3.FUSEError) as caught:  # the write is not lost without a word
        await fs.flush(info.fh)
    assert caught.value.errno == errno.ESTALE
    await fs.release(info.fh)
    assert world.fake.patches() == []
    assert ("system/persona.md", b"too late", Origin.REJECTED) in world.records
    assert "persona.md" not in await listdir(fs, "system")
    assert "system/persona.md" not in world.state.tree.files()


async def test_a_read_that_started_before_a_newer_view_cannot_undo_it(world, poller):
    fs = world.fs
    world.files.revalidate_after = 0
    real_get = world.remote.client.get_block

    async def stale_get(block_id, **options):
        old = await real_get(block_id, **options)  # the server answers with the old value...
        world.fake.blocks[world.ids["human"]]["value"] = "newer\n"
        await trio.sleep(0.01)
        assert await poller.poll_once()  # ...and a later listing is applied meanwhile
        return old

    world.remote.client.get_block = stale_get
    info = await fs.open(await inode_of(fs, "system/human.md"), os.O_RDONLY, None)
    await fs.release(info.fh)
    world.remote.client.get_block = real_get
    world.files.revalidate_after = 3600
    assert (await read_all(fs, "system/human.md")).endswith(b"---\nnewer\n")


async def test_an_unreachable_server_keeps_the_last_known_state(world, poller):
    before = world.state.tree.files()
    world.fake.fail_next = [503] * 50
    assert not await poller.poll_once()
    assert not poller.reachable and "poll failed" in poller.last_error
    assert world.state.tree.files() == before
    assert (await read_all(world.fs, "system/human.md")).endswith(b"---\nThe human.\n")
    world.fake.fail_next = []
    assert await poller.poll_once() and poller.reachable and poller.last_error is None


async def test_a_directory_listing_opened_before_a_server_change_never_brings_back_a_gone_name(
        world, poller, monkeypatch):
    # readdirplus hands the kernel each entry it lists, kept for fs.ENTRY_TIMEOUT: a name the
    # listing removed (its invalidation already sent) must not come back through a directory
    # handle opened before it
    fh = await world.fs.opendir(ROOT_INODE, None)
    world.fake.blocks[world.ids["notes"]]["label"] = "journal"  # relabelled on the server
    await poller.poll_once()
    listed = []
    monkeypatch.setattr(pyfuse3, "readdir_reply",
                        lambda token, name, attr, next_id: listed.append(name) or True)
    await world.fs.readdir(fh, 0, None)
    await world.fs.releasedir(fh)
    assert b"notes.md" not in listed
    assert (ROOT_INODE, "notes.md") in world.state.invalidator.entries


async def test_duplicate_labels_are_shown_not_hidden(world, poller, caplog):
    """Several blocks of the agent with one label (left by an earlier memfuse, or made through
    the API): the mount shows one; state.duplicates (memfuse status) lists them all."""
    extra = world.fake.add_block("notes", "an older copy", agent=world.agent, attached=False,
                                 tags=[f"owner:{world.agent}"])
    assert await poller.poll_once()
    assert world.state.duplicates == {"notes.md": sorted([world.ids["notes"], extra])}
    assert world.state.shown_at("notes.md") == world.ids["notes"]  # the one shown before
    assert "notes.md: 2 blocks of the agent have this path" in caplog.text
    assert world.fake.blocks[extra]["value"] == "an older copy"  # nothing deleted
    report = Status(agent_id=world.agent, mountpoint="/m", base_url="http://x", pid=1,
                    reachable=True, last_poll=None, pending_writes=0, pending_unlinks=0,
                    uncommitted=0, last_commit=None, last_commit_message=None,
                    last_commit_at=None, last_conflict=None, last_error=None,
                    last_error_at=None, updated_at=0.0,
                    duplicates=[f"notes.md: shows {world.ids['notes']}; also {extra}"]
                    ).render(now=0.0)
    assert f"duplicates     notes.md: shows {world.ids['notes']}; also {extra}" in report


async def test_a_base_showing_the_default_description_is_no_conflict_with_a_blank_one(world):
    """A file shows a blank description as `<label> block`, so a writer who read that did not
    see a different block than the server's blank one (a local-first mount's bases)."""
    world.remote.on_conflict = "reject"
    block = world.fake.blocks[world.ids["human"]]
    block["description"] = ""
    base = Block(block["id"], "human", block["value"], block["limit"], "human block")
    written = await world.remote.update(base, blockfile.parse(b"New.\n"), base=base)
    assert written.theirs is None and block["value"] == "New.\n" and block["description"] == ""
    base = dataclasses.replace(base, description="another")  # a real change still is one
    with pytest.raises(Stale):
        await world.remote.update(base, blockfile.parse(b"Newer.\n"), base=base)
