"""The open-file state machine (handles.py) without FUSE: handles opened, written, truncated,
flushed and released by hand over the in-memory fake API (fsworld), one rule per test.

tests/test_fs.py and tests/test_ordering.py check the same rules through MemoryFs; these name
the rule each bit of handles.py keeps, so removing it fails here first.
"""
import errno
import os

import pytest

from memfuse.errors import FsError
from memfuse.handles import BlockHandle, Release, ScratchHandle, truncate_path
from memfuse.model import Origin

from .fsworld import HUMAN

PERSONA = b"---\ndescription: desc\nlimit: 20\n---\nI am."  # its value is limited to 20 chars


def node_at(world, path: str):
    """The node at `path` in the mount's tree."""
    tree = world.state.tree
    node = tree.root
    for name in path.split("/"):
        node = tree.child(node, name)
    return node


def block_value(world, name: str) -> str:
    return world.fake.blocks[world.ids[name]]["value"]


async def test_an_append_handle_writes_at_its_end_whatever_the_offset(world):
    handle = BlockHandle.open(node_at(world, "system/human.md"), os.O_WRONLY | os.O_APPEND,
                              world.state)
    handle.write(0, b"one\n", world.state)  # the kernel's offset: a size another writer moved
    handle.write(3, b"two\n", world.state)
    assert handle.data == HUMAN + b"one\ntwo\n"
    assert handle.added == b"one\ntwo\n" and handle.dirty and handle.written


async def test_a_write_past_the_end_fills_the_gap_with_nul_bytes(world):
    handle = BlockHandle.open(node_at(world, "system/human.md"), os.O_RDWR, world.state)
    handle.write(len(HUMAN) + 3, b"x", world.state)
    assert handle.data == HUMAN + b"\0\0\0x"


async def test_an_open_alone_is_not_dirty_and_o_trunc_waits_for_release(world):
    human = node_at(world, "system/human.md")
    plain = BlockHandle.open(human, os.O_RDWR, world.state)
    assert not plain.dirty and not plain.needs_flush() and plain.at_release() is Release.NOTHING
    emptied = BlockHandle.open(human, os.O_WRONLY | os.O_TRUNC, world.state)
    assert emptied.data == b"" and emptied.dirty and not emptied.written
    assert not emptied.needs_flush()  # a shell's `> file` closes a dup before its first write
    assert emptied.at_release() is Release.SEND  # `: > file`: the empty file, at last close
    await emptied.send(world.state, world.files)
    assert world.fake.patches() == [{"value": ""}] and not emptied.dirty


async def test_a_truncate_makes_the_handle_dirty_and_written_and_sends_the_whole_file(world):
    handle = BlockHandle.open(node_at(world, "system/human.md"), os.O_WRONLY | os.O_APPEND,
                              world.state)
    assert not handle.dirty
    await handle.truncate(len(HUMAN) - 3, world.state, world.files)
    assert handle.data == HUMAN[:-3] and handle.dirty and handle.written
    assert handle.added is None  # no longer only added bytes
    assert handle.needs_flush()
    await handle.truncate(len(HUMAN) - 1, world.state, world.files)
    assert handle.data == HUMAN[:-3] + b"\0\0"


async def test_a_truncate_of_the_git_file_is_eacces(world):
    handle = BlockHandle.open(node_at(world, ".git"), os.O_RDONLY, world.state)
    with pytest.raises(FsError) as caught:
        await handle.truncate(0, world.state, world.files)
    assert caught.value.errno == errno.EACCES and not handle.dirty


async def test_a_refused_write_keeps_what_it_would_have_made_for_history(world):
    handle = BlockHandle.open(node_at(world, "system/persona.md"), os.O_WRONLY | os.O_TRUNC,
                              world.state)
    too_long = b"---\ndescription: desc\nlimit: 20\n---\n" + b"x" * 30
    with pytest.raises(FsError) as caught:
        handle.write(0, too_long, world.state)
    assert caught.value.errno == errno.EFBIG
    assert handle.data == b"" and handle.refused == errno.EFBIG
    assert handle.attempted == too_long
    assert handle.needs_flush()  # its close fails too
    for _close in range(2):
        with pytest.raises(FsError) as caught:
            await handle.send(world.state, world.files)
        assert caught.value.errno == errno.EFBIG and "nothing was sent" in caught.value.reason
    assert [(p, c, o) for p, c, o in world.records if o is Origin.REJECTED] == [
        ("system/persona.md", too_long, Origin.REJECTED)]  # once, whatever the closes
    assert world.fake.patches() == [] and handle.at_release() is Release.REFUSED


async def test_a_refused_write_past_a_gap_keeps_the_bytes_before_it(world):
    handle = BlockHandle.open(node_at(world, "system/persona.md"), os.O_RDWR, world.state)
    with pytest.raises(FsError) as caught:
        handle.write(len(PERSONA) + 40, b"y", world.state)  # the gap alone is past the limit
    assert caught.value.errno == errno.EFBIG
    assert handle.attempted == PERSONA and handle.data == PERSONA


async def test_a_written_handle_the_server_refused_is_unsent_at_release(world):
    handle = BlockHandle.open(node_at(world, "system/human.md"), os.O_WRONLY | os.O_TRUNC,
                              world.state)
    handle.write(0, b"new value\n", world.state)
    world.fake.fail_next = [400] * 50
    with pytest.raises(FsError) as caught:
        await handle.send(world.state, world.files)
    assert caught.value.errno == errno.EINVAL
    assert handle.dirty and handle.at_release() is Release.UNSENT
    assert [c for _p, c, o in world.records if o is Origin.REJECTED] == [b"new value\n"]


async def test_a_new_files_first_flush_makes_its_block(world):
    node = world.namespace.create(node_at(world, "system"), "t.md")
    touch = BlockHandle.open(node, os.O_WRONLY | os.O_CREAT, world.state, new=True)
    assert touch.fresh and touch.dirty and not touch.written
    assert touch.needs_flush()  # close() returns once the block exists
    await touch.send(world.state, world.files)
    assert [b["value"] for b in world.fake.by_label("t")] == [""]
    assert touch.at_release() is Release.NOTHING


async def test_a_fresh_handle_never_written_sends_nothing_once_another_made_the_block(world):
    node = world.namespace.create(node_at(world, "system"), "t.md")
    touch = BlockHandle.open(node, os.O_WRONLY | os.O_CREAT, world.state, new=True)
    writer = BlockHandle.open(node, os.O_WRONLY | os.O_APPEND, world.state)
    writer.write(0, b"hi\n", world.state)
    assert writer.needs_flush()
    await writer.send(world.state, world.files)
    assert not touch.needs_flush() and not touch.dirty
    assert touch.at_release() is Release.NOTHING  # not `: > file`: the text stays
    assert [b["value"] for b in world.fake.by_label("t")] == ["hi\n"]


async def test_an_append_handle_adds_its_bytes_after_the_servers_text_at_send(world):
    handle = BlockHandle.open(node_at(world, "system/human.md"), os.O_WRONLY | os.O_APPEND,
                              world.state)
    handle.write(0, b"appended\n", world.state)
    world.fake.blocks[world.ids["human"]]["value"] = "Edited by the agent.\n"  # meanwhile
    await handle.send(world.state, world.files)
    assert block_value(world, "human") == "Edited by the agent.\nappended\n"
    assert handle.added == b"" and not handle.dirty  # sent: the next send adds only new bytes


async def test_an_unmount_sends_only_block_handles_not_refused(world):
    human = node_at(world, "system/human.md")
    written = BlockHandle.open(human, os.O_RDWR, world.state)
    written.write(0, b"x", world.state)
    refused = BlockHandle.open(node_at(world, "system/persona.md"), os.O_RDWR | os.O_TRUNC,
                               world.state)
    with pytest.raises(FsError):
        refused.write(0, PERSONA + b"y" * 40, world.state)
    assert written.sends_at_unmount() and written.unsent
    assert refused.dirty and not refused.sends_at_unmount()  # its O_TRUNC alone is not sent


async def test_a_scratch_handle_writes_to_the_store_and_never_has_anything_unsent(world):
    node = world.namespace.create(world.state.tree.root, ".t.md.swp")
    handle = ScratchHandle.open(node, os.O_RDWR | os.O_CREAT, world.state)
    handle.write(2, b"ab", world.state)
    assert handle.read(0, 10, world.state) == b"\0\0ab"
    await handle.truncate(3, world.state, world.files)
    assert world.state.read(node, 0, 10) == b"\0\0a"
    assert not handle.dirty and not handle.unsent and not handle.needs_flush()
    assert handle.at_release() is Release.NOTHING and not handle.sends_at_unmount()
    ScratchHandle.open(node, os.O_WRONLY | os.O_TRUNC, world.state)
    assert world.state.read(node, 0, 10) == b""
    assert world.fake.patches() == [] and world.fake.calls("create") == []


async def test_a_truncate_by_path_of_a_block_file_is_one_write_now(world):
    await truncate_path(node_at(world, "system/human.md"), len(HUMAN) - 3, world.state,
                        world.files)
    assert world.fake.patches() == [{"value": "The huma"}]
