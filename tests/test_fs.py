"""Filesystem-level tests: pyfuse3 Operations called directly, over the in-memory fake API.

Fast checks of the write path (one PATCH per close, O_TRUNC, refusals) and of the namespace.
The same claims are checked through a real mount against the real server in tests/integration.
"""
import errno
import logging
import os
import stat
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from memfuse.fs import WRITER_WINDOW
from memfuse.model import Origin
from memfuse.tree import ROOT_INODE

from .fsworld import HUMAN, inode_of, read_all, write_file

async def test_layout_attached_in_system_detached_at_root(world, monkeypatch):
    listed = []
    monkeypatch.setattr(pyfuse3, "readdir_reply",
                        lambda token, name, attr, next_id: listed.append(name) or True)
    for path in ("", "system", "system/projects"):
        inode = await inode_of(world.fs, path) if path else ROOT_INODE
        fh = await world.fs.opendir(inode, None)
        await world.fs.readdir(fh, 0, None)
        await world.fs.releasedir(fh)
    assert listed == [b".git", b"notes.md", b"system",
                      b"human.md", b"persona.md", b"projects",
                      b"policy.md"]


async def test_cat_shows_frontmatter_and_value_with_exact_size(world):
    assert await read_all(world.fs, "system/human.md") == HUMAN
    attr = await world.fs.getattr(await inode_of(world.fs, "system/human.md"), None)
    assert attr.st_size == len(HUMAN) and stat.S_ISREG(attr.st_mode)


async def test_gitfile_points_at_history_and_is_read_only(world):
    assert await read_all(world.fs, ".git") == b"gitdir: /somewhere/memory.git\n"
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await world.fs.open(await inode_of(world.fs, ".git"), os.O_WRONLY, None)
    assert caught.value.errno == errno.EACCES


async def test_shell_redirect_sends_exactly_one_patch_with_the_value(world):
    fs = world.fs
    info = await fs.open(await inode_of(fs, "system/human.md"), os.O_WRONLY | os.O_TRUNC, None)
    await fs.flush(info.fh)  # the shell closes a dup before writing: nothing may be sent yet
    assert world.fake.patches() == []
    await fs.write(info.fh, 0, b"The human is Ada.\n")
    await fs.flush(info.fh)
    await fs.release(info.fh)
    assert world.fake.patches() == [{"value": "The human is Ada.\n"}]
    assert world.records == [("system/human.md",
                              b"---\ndescription: desc\nlimit: 20000\n---\nThe human is Ada.\n",
                              Origin.LOCAL)]


async def test_truncate_only_open_sends_an_empty_value_at_release(world):
    fs = world.fs
    info = await fs.open(await inode_of(fs, "system/human.md"), os.O_WRONLY | os.O_TRUNC, None)
    await fs.flush(info.fh)
    await fs.release(info.fh)
    assert world.fake.patches() == [{"value": ""}]


async def test_writing_back_what_cat_printed_sends_nothing(world):
    await write_file(world.fs, "system/human.md", await read_all(world.fs, "system/human.md"))
    assert world.fake.patches() == []
    assert [content for _path, content, _origin in world.records] in ([], [HUMAN])  # no change


async def test_changed_frontmatter_fields_are_sent(world):
    await write_file(world.fs, "system/human.md",
                     b"---\ndescription: About Ada\nlimit: 500\n---\nThe human.\n")
    assert world.fake.patches() == [{"description": "About Ada", "limit": 500}]


async def test_size_while_writing_is_the_buffer(world):
    fs = world.fs
    inode = await inode_of(fs, "system/human.md")
    writer, reader = SimpleNamespace(pid=10), SimpleNamespace(pid=11)
    info = await fs.open(inode, os.O_RDWR, writer)
    await fs.write(info.fh, len(HUMAN), b"more text\n")
    assert (await fs.getattr(inode, writer)).st_size == len(HUMAN) + 10
    # every other process sees the last version closed, and may not cache it meanwhile
    assert (await fs.getattr(inode, reader)).st_size == len(HUMAN)
    assert (await fs.getattr(inode, reader)).attr_timeout == 0
    assert await fs.read(info.fh, len(HUMAN), 100) == b"more text\n"
    await fs.flush(info.fh)
    await fs.release(info.fh)
    assert world.fake.patches() == [{"value": "The human.\nmore text\n"}]


async def test_a_reader_while_a_handle_writes_reads_the_last_version_whole(world):
    fs = world.fs
    inode = await inode_of(fs, "system/human.md")
    writer = await fs.open(inode, os.O_WRONLY | os.O_TRUNC, SimpleNamespace(pid=10))
    await fs.write(writer.fh, 0, b"new\n")
    reader = await fs.open(inode, os.O_RDONLY, SimpleNamespace(pid=11))
    assert reader.direct_io and not reader.keep_cache  # past the kernel's moved size
    assert await fs.read(reader.fh, 0, 4096) == HUMAN
    await fs.flush(writer.fh)
    await fs.release(writer.fh)
    assert await fs.read(reader.fh, 0, 4096) == HUMAN  # the version it opened
    await fs.release(reader.fh)
    soon = await fs.open(inode, os.O_RDONLY, SimpleNamespace(pid=11))
    assert soon.direct_io  # the writer may save in place again at once
    await fs.release(soon.fh)
    await trio.sleep(WRITER_WINDOW)
    later = await fs.open(inode, os.O_RDONLY, SimpleNamespace(pid=11))
    assert not later.direct_io and await fs.read(later.fh, 0, 4096) == (
        b"---\ndescription: desc\nlimit: 20000\n---\nnew\n")
    await fs.release(later.fh)


@pytest.mark.parametrize("data, code, words", [
    (b"x" * 21, errno.EFBIG, "value is 21 characters, over the limit of 20"),
    (b"---\ncolour: red\n---\nx", errno.EINVAL, "unknown frontmatter key(s): colour"),
    (b"bad \xff byte", errno.EINVAL, "not valid UTF-8"),
])
async def test_refused_content_errors_at_close_and_leaves_server_alone(world, caplog, data, code,
                                                                      words):
    before = dict(world.fake.blocks[world.ids["persona"]])
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await write_file(world.fs, "system/persona.md", data)
    assert caught.value.errno == code
    assert world.fake.patches() == [] and world.fake.blocks[world.ids["persona"]] == before
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(m.startswith("system/persona.md: ") and words in m for m in logged), logged


async def test_read_only_block_is_0444_and_refuses_writers(world):
    inode = await inode_of(world.fs, "system/projects/policy.md")
    assert stat.S_IMODE((await world.fs.getattr(inode, None)).st_mode) == 0o444
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await world.fs.open(inode, flags, None)
        assert caught.value.errno == errno.EACCES
    assert world.fake.patches() == []


async def test_truncate_by_path_is_one_write(world):
    inode = await inode_of(world.fs, "system/human.md")
    fields = SimpleNamespace(update_size=True, update_mode=False, update_mtime=False)
    attr = SimpleNamespace(st_size=0)
    # The value is emptied; the file keeps its frontmatter, as every block file does.
    empty = b"---\ndescription: desc\nlimit: 20000\n---\n"
    assert (await world.fs.setattr(inode, attr, fields, None, None)).st_size == len(empty)
    assert world.fake.patches() == [{"value": ""}]
    assert await read_all(world.fs, "system/human.md") == empty


async def test_ftruncate_on_open_file_waits_for_close(world):
    fs = world.fs
    inode = await inode_of(fs, "system/human.md")
    info = await fs.open(inode, os.O_RDWR, None)
    fields = SimpleNamespace(update_size=True, update_mode=False, update_mtime=False)
    await fs.setattr(inode, SimpleNamespace(st_size=0), fields, info.fh, None)
    await fs.write(info.fh, 0, b"new")
    assert world.fake.patches() == []
    await fs.flush(info.fh)
    await fs.release(info.fh)
    assert world.fake.patches() == [{"value": "new"}]


async def test_open_revalidates_after_the_window(world):
    fs, fake = world.fs, world.fake
    fake.blocks[world.ids["human"]]["value"] = "Changed on the server, longer than before.\n"
    assert await read_all(fs, "system/human.md") == HUMAN  # inside the window: cached copy
    world.files.revalidate_after = 0
    data = await read_all(fs, "system/human.md")
    assert data.endswith(b"---\nChanged on the server, longer than before.\n")
    assert (await fs.getattr(await inode_of(fs, "system/human.md"), None)).st_size == len(data)
    assert world.records == [("system/human.md", data, Origin.SERVER)]


async def test_unreachable_server_on_open_serves_the_cache(world):
    world.files.revalidate_after = 0
    world.fake.fail_next = [503] * 50
    assert await read_all(world.fs, "system/human.md") == HUMAN


@pytest.mark.parametrize("status, code", [(400, errno.EINVAL), (404, errno.ESTALE),
                                          (409, errno.EEXIST)])  # 5xx: journaled (offline)
async def test_server_refusal_at_close_is_an_errno(world, status, code):
    world.fake.fail_next = [status] * 50
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await write_file(world.fs, "system/human.md", b"new value")
    assert caught.value.errno == code


async def test_detached_block_is_writable_at_root(world):
    await write_file(world.fs, "notes.md", b"fresh notes\n")
    assert world.fake.blocks[world.ids["notes"]]["value"] == "fresh notes\n"


async def test_inodes_are_unique_and_stable(world):
    paths = ["system", "system/human.md", "system/persona.md", "system/projects",
             "system/projects/policy.md", "notes.md", ".git"]
    first = [await inode_of(world.fs, p) for p in paths]
    await write_file(world.fs, "system/human.md", b"changed")
    assert [await inode_of(world.fs, p) for p in paths] == first
    assert len(set(first)) == len(first)


async def test_mtime_moves_only_when_content_changes(world):
    inode = await inode_of(world.fs, "system/human.md")
    before = (await world.fs.getattr(inode, None)).st_mtime_ns
    await write_file(world.fs, "system/human.md", HUMAN)
    assert (await world.fs.getattr(inode, None)).st_mtime_ns == before
    await write_file(world.fs, "system/human.md", b"other")
    assert (await world.fs.getattr(inode, None)).st_mtime_ns > before
