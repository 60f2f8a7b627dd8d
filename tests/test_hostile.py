"""Inputs a hostile but fair user can give the mount, at the filesystem level: each gets a clear
errno and a log line, the mount keeps serving, and the server keeps its state."""
import errno
import os
from types import SimpleNamespace

import pyfuse3
import pytest

from memfuse.poller import Poller
from memfuse.tree import ROOT_INODE

from .fsworld import inode_of, read_all, setattr_fields
from .test_namespace import create, listdir

TRUNCATE = setattr_fields(update_size=True)


async def test_a_write_past_the_limit_fails_at_write_and_sends_nothing(world, caplog):
    fs = world.fs  # persona's limit is 20 characters
    info = await fs.open(await inode_of(fs, "system/persona.md"), os.O_WRONLY | os.O_TRUNC, None)
    assert await fs.write(info.fh, 0, b"a" * 20) == 20
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.write(info.fh, 20, b"b")  # the 21st character
    assert caught.value.errno == errno.EFBIG
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.flush(info.fh)  # close() fails too, and sends nothing
    assert caught.value.errno == errno.EFBIG
    await fs.release(info.fh)
    assert world.fake.patches() == []
    assert world.fake.blocks[world.ids["persona"]]["value"] == "I am."
    assert "system/persona.md: value is 21 characters, over the limit of 20" in caplog.text


async def test_a_refused_first_write_does_not_blank_the_block(world):
    fs = world.fs  # `echo <too long> > file`: O_TRUNC, one refused write, close
    info = await fs.open(await inode_of(fs, "system/persona.md"), os.O_WRONLY | os.O_TRUNC, None)
    with pytest.raises(pyfuse3.FUSEError):
        await fs.write(info.fh, 0, b"x" * 6000)
    with pytest.raises(pyfuse3.FUSEError):
        await fs.flush(info.fh)
    await fs.release(info.fh)
    assert world.fake.blocks[world.ids["persona"]]["value"] == "I am."


async def test_multibyte_characters_count_as_characters(world):
    fs = world.fs
    info = await fs.open(await inode_of(fs, "system/persona.md"), os.O_WRONLY | os.O_TRUNC, None)
    assert await fs.write(info.fh, 0, "é".encode() * 20) == 40  # 40 bytes, 20 characters
    await fs.flush(info.fh)
    await fs.release(info.fh)
    assert world.fake.blocks[world.ids["persona"]]["value"] == "é" * 20


@pytest.mark.parametrize("size", [1 << 30, 64 << 30])
async def test_a_huge_truncate_is_refused_before_any_allocation(world, size):
    inode = await inode_of(world.fs, "system/human.md")
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await world.fs.setattr(inode, SimpleNamespace(st_size=size), TRUNCATE, None, None)
    assert caught.value.errno == errno.EFBIG
    info = await world.fs.open(inode, os.O_RDWR, None)
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await world.fs.setattr(inode, SimpleNamespace(st_size=size), TRUNCATE, info.fh, None)
    assert caught.value.errno == errno.EFBIG
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await world.fs.write(info.fh, size, b"x")  # a write far past the end
    assert caught.value.errno == errno.EFBIG
    await world.fs.release(info.fh)
    assert world.fake.patches() == []


async def test_a_name_that_is_not_utf8_is_einval(world, caplog):
    for name in (b"\xff.md", b"\xff", b"caf\xe9.md"):
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await world.fs.create(ROOT_INODE, name, 0o644, os.O_WRONLY | os.O_CREAT, None)
        assert caught.value.errno == errno.EINVAL
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await world.fs.mkdir(ROOT_INODE, b"\xfe", 0o755, None)
    assert caught.value.errno == errno.EINVAL
    assert "the name is not valid UTF-8" in caplog.text
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await world.fs.lookup(ROOT_INODE, b"\xff.md", None)
    assert caught.value.errno == errno.ENOENT


async def test_a_name_over_255_bytes_is_enametoolong(world):
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await world.fs.create(ROOT_INODE, b"a" * 253 + b".md", 0o644, os.O_WRONLY, None)
    assert caught.value.errno == errno.ENAMETOOLONG


async def test_a_block_path_past_gits_limit_is_enametoolong(world):
    fs, parent = world.fs, ROOT_INODE
    for level in range(21):  # 21 nested 200-byte directories, as `cd` steps allow
        parent = (await fs.mkdir(parent, b"d" * 199 + str(level % 10).encode(), 0o755,
                                 None)).st_ino
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.create(parent, b"deep.md", 0o644, os.O_WRONLY | os.O_CREAT, None)
    assert caught.value.errno == errno.ENAMETOOLONG
    assert world.fake.calls("create") == []


async def test_git_directories_are_refused_and_server_labels_through_them_hidden(world, caplog):
    for name in (b".git", b".GIT", b".Git"):
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await world.fs.mkdir(await inode_of(world.fs, "system"), name, 0o755, None)
        assert caught.value.errno == errno.EINVAL
    agent, fake = world.agent, world.fake
    for label in (".git/config", "a/.git/hooks/pre-commit", "b/.GIT/x"):
        fake.add_block(label, "evil", agent=agent)
    fake.add_block("fine/.gitignore", "ok", agent=agent)
    await Poller(world.state, world.remote).poll_once()
    assert set(await listdir(world.fs, "system")) == {"human.md", "persona.md", "projects",
                                                     "fine"}
    assert await listdir(world.fs, "system/fine") == [".gitignore.md"]
    assert not [p for p in world.state.tree.files() if ".git/" in p.casefold()]
    assert "cannot be shown as a file" in caplog.text


async def test_hostile_frontmatter_is_einval_and_the_mount_keeps_serving(world):
    for n, data in enumerate((b"---\ndescription: 2024-13-45\n---\nhi\n",
                              b"---\nlimit: " + b"[" * 3000 + b"]" * 3000 + b"\n---\n")):
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await create(world.fs, f"system/hostile{n}.md", data, fsync=True)
        assert caught.value.errno == errno.EINVAL
    assert (await read_all(world.fs, "system/human.md")).endswith(b"The human.\n")
    assert world.fake.calls("create") == []


@pytest.mark.expect_error("FUSE flush failed unexpectedly; answered EIO")
async def test_a_bug_inside_an_operation_is_eio_for_that_call_only(world, monkeypatch, caplog):
    async def broken_send(node, data, base=None, **_kwargs):
        raise RuntimeError("a bug on the write path")

    monkeypatch.setattr(world.files, "send", broken_send)
    info = await world.fs.open(await inode_of(world.fs, "system/human.md"), os.O_WRONLY, None)
    await world.fs.write(info.fh, 0, b"x")
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await world.fs.flush(info.fh)
    assert caught.value.errno == errno.EIO
    assert world.fs.faults.count == 1 and "a bug on the write path" in caplog.text
    monkeypatch.undo()
    assert (await read_all(world.fs, "system/human.md")).endswith(b"The human.\n")


async def test_a_complete_bad_frontmatter_fails_at_write_and_sends_nothing(world):
    fs = world.fs  # `printf '---\ndescription: 2024-13-45\n---\nhi\n' > file`: shells ignore close
    info = await fs.open(await inode_of(fs, "system/human.md"), os.O_WRONLY | os.O_TRUNC, None)
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.write(info.fh, 0, b"---\ndescription: 2024-13-45\n---\nhi\n")
    assert caught.value.errno == errno.EINVAL
    with pytest.raises(pyfuse3.FUSEError):
        await fs.flush(info.fh)
    await fs.release(info.fh)
    assert world.fake.patches() == []
    assert world.fake.blocks[world.ids["human"]]["value"] == "The human.\n"


async def test_a_frontmatter_written_in_pieces_is_judged_once_complete(world):
    fs = world.fs
    info = await fs.open(await inode_of(fs, "system/human.md"), os.O_WRONLY | os.O_TRUNC, None)
    for offset, piece in ((0, b"---\ndescr"), (9, b"iption: Ada\n"), (21, b"limit: 50\n---\n"),
                          (35, b"v")):
        await fs.write(info.fh, offset, piece)
    await fs.flush(info.fh)
    await fs.release(info.fh)
    block = world.fake.blocks[world.ids["human"]]
    assert (block["description"], block["limit"], block["value"]) == ("Ada", 50, "v")
