"""Each name has one order (SEMANTICS.md, "Ordering"): an operation on a name whose block is
being created waits for that create, so a label has one block whatever the timing.

FUSE operations called directly over the fake API, whose answers take time (`latency`); as in
the kernel, a release runs as its own task after close() (flush) has returned.
"""
import errno
import os

import pyfuse3
import pytest
import trio

from memfuse.model import Origin
from memfuse.tree import ROOT_INODE

from .fsworld import inode_of, read_all

LATENCY = 0.3  # seconds each answer of the fake server takes


@pytest.fixture
async def slow(world):
    world.fake.latency = LATENCY
    return world


async def _create(fs, path: str, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC):
    parent, _, name = path.rpartition("/")
    parent_inode = await inode_of(fs, parent) if parent else ROOT_INODE
    info, _attr = await fs.create(parent_inode, name.encode(), 0o644, flags, None)
    return info.fh


async def _open(fs, path: str, flags: int) -> int:
    return (await fs.open(await inode_of(fs, path), flags, None)).fh


async def _close(fs, fh: int, nursery) -> None:
    """close(2): flush, which the program waits for; the release comes after, on its own."""
    await fs.flush(fh)
    nursery.start_soon(fs.release, fh)


def _blocks(world, label: str) -> list[dict]:
    return world.fake.by_label(label)


def _attached(world, block: dict) -> bool:
    return block["id"] in world.fake.agents[world.agent]


@pytest.mark.parametrize("directory", ["system/", ""])
async def test_touch_then_append_lands_in_the_one_block(slow, nursery, directory):
    fs = slow.fs
    for n in range(3):
        path = f"{directory}s{n}.md"
        await _close(fs, await _create(fs, path), nursery)  # touch
        fh = await _open(fs, path, os.O_WRONLY | os.O_APPEND)  # echo "shell N" >> path
        await fs.write(fh, 0, f"shell {n}\n".encode())
        await _close(fs, fh, nursery)
    await trio.sleep(5)
    for n in range(3):
        [block] = _blocks(slow, f"s{n}")
        assert block["value"] == f"shell {n}\n"
        assert _attached(slow, block) == (directory == "system/")
        assert (await read_all(fs, f"{directory}s{n}.md")).endswith(f"shell {n}\n".encode())


async def test_touch_then_mv_moves_the_one_block(slow, nursery):
    fs = slow.fs
    await _close(fs, await _create(fs, "system/m.md"), nursery)
    await fs.rename(await inode_of(fs, "system"), b"m.md", await inode_of(fs, "system"),
                    b"m2.md", 0, None)
    await trio.sleep(5)
    assert _blocks(slow, "m") == []
    [block] = _blocks(slow, "m2")
    assert _attached(slow, block)
    assert set(slow.state.tree.files()) == set(slow.loaded) | {"system/m2.md"}


async def test_touch_then_rm_leaves_no_live_block(slow, nursery):
    fs = slow.fs
    await _close(fs, await _create(fs, "system/k.md"), nursery)
    await fs.unlink(await inode_of(fs, "system"), b"k.md", None)
    await trio.sleep(5)  # past the grace period: the block is retired
    assert [(_attached(slow, b), f"owner:{slow.agent}" in b["tags"])
            for b in _blocks(slow, "k")] == [(False, False)]
    assert "system/k.md" not in slow.state.tree.files()


async def test_touch_rm_then_write_again_is_one_block_with_the_text(slow, nursery):
    fs = slow.fs
    await _close(fs, await _create(fs, "n.md"), nursery)
    await fs.unlink(ROOT_INODE, b"n.md", None)
    fh = await _create(fs, "n.md")
    await fs.write(fh, 0, b"test\n")
    await _close(fs, fh, nursery)
    assert (await fs.getattr(await inode_of(fs, "n.md"), None)).st_size > 0
    await trio.sleep(5)
    live = [b for b in _blocks(slow, "n") if f"owner:{slow.agent}" in b["tags"]]
    assert [b["value"] for b in live] == ["test\n"]


@pytest.mark.parametrize("directory", ["system/", ""])
async def test_two_processes_creating_one_name_make_one_block(slow, directory):
    fs = slow.fs
    path = f"{directory}s.md"
    results = {}

    async def writer(text: bytes):
        # open(O_CREAT) without O_EXCL: the kernel sends create to the first, open to the other
        try:
            fh = await _create(fs, path)
        except pyfuse3.FUSEError as exc:
            assert exc.errno == errno.EEXIST, exc
            fh = await _open(fs, path, os.O_WRONLY | os.O_TRUNC)
        await fs.write(fh, 0, text)
        try:
            await fs.flush(fh)
            results[text] = 0
        except pyfuse3.FUSEError as exc:
            results[text] = exc.errno
        await fs.release(fh)

    async with trio.open_nursery() as both:
        both.start_soon(writer, b"one\n")
        both.start_soon(writer, b"two\n")
    assert results == {b"one\n": 0, b"two\n": 0}
    [block] = _blocks(slow, "s")
    assert block["value"] in ("one\n", "two\n")
    assert _attached(slow, block) == (directory == "system/")
    texts = [content for p, content, origin in slow.records if p == path and content]
    assert any(c.endswith(b"one\n") for c in texts) and any(c.endswith(b"two\n") for c in texts)


async def test_a_create_of_a_name_that_exists_opens_it_without_o_excl(slow, nursery):
    fs = slow.fs
    await _close(fs, await _create(fs, "p.md"), nursery)
    fh = await _create(fs, "p.md", os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # no EEXIST
    await fs.write(fh, 0, b"more\n")
    await _close(fs, fh, nursery)
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await _create(fs, "p.md", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert caught.value.errno == errno.EEXIST
    await trio.sleep(5)
    assert [b["value"] for b in _blocks(slow, "p")] == ["more\n"]


async def test_a_directory_renamed_while_files_are_created_inside_relabels_them_all(slow):
    fs = slow.fs
    system = await inode_of(fs, "system")
    await fs.mkdir(system, b"dir", 0o755, None)
    names = []

    async def creator(n: int):
        for i in range(4):
            where = "dir" if "dir" in slow.state.tree.system.children else "dir2"
            name = f"f{n}-{i}.md"
            try:
                fh = await _create(fs, f"system/{where}/{name}")
            except pyfuse3.FUSEError:
                continue  # the directory moved between the look and the create
            await fs.write(fh, 0, f"{n}-{i}\n".encode())
            await fs.flush(fh)
            await fs.release(fh)
            names.append(name)

    async def renamer():
        for i in range(6):
            old, new = (b"dir", b"dir2") if i % 2 == 0 else (b"dir2", b"dir")
            await fs.rename(system, old, system, new, 0, None)
            await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(renamer)
        for n in range(3):
            nursery.start_soon(creator, n)
    files = slow.state.tree.files()
    assert names
    for name in names:
        stem = name[:-3]
        [block] = [b for b in slow.fake.blocks.values() if b["label"].endswith("/" + stem)]
        assert f"system/{block['label']}.md" in files, block["label"]
        assert _attached(slow, block)
    history = {p: c for p, c, _o in slow.records}
    assert all(p.startswith("system/dir/") for p in files if p.startswith("system/dir"))
    assert {p for p, c in history.items() if c is not None and "/f" in p} == {
        p for p in files if "/f" in p}
    assert all(o is not Origin.REJECTED for _p, _c, o in slow.records)


async def _append_lines(fs, path: str, lines: list[bytes], nursery) -> None:
    """One shell's `echo line >> path`, line after line: open(O_APPEND), write at the offset
    the kernel has cached (the size this handle saw at open), close."""
    for line in lines:
        fh = await _open(fs, path, os.O_WRONLY | os.O_APPEND)
        seen = (await fs.getattr(await inode_of(fs, path), None)).st_size
        await fs.write(fh, seen, line)
        await _close(fs, fh, nursery)


async def test_three_appenders_keep_every_line_in_each_ones_order(slow, nursery):
    fs = slow.fs
    async with trio.open_nursery() as shells:
        for n in range(3):
            shells.start_soon(_append_lines, fs, "system/human.md",
                              [f"shell {n} line {i}\n".encode() for i in range(10)], nursery)
    value = slow.fake.blocks[slow.ids["human"]]["value"]
    lines = value.splitlines()
    assert lines[0] == "The human." and len(lines) == 31
    for n in range(3):
        mine = [line for line in lines if line.startswith(f"shell {n} ")]
        assert mine == [f"shell {n} line {i}" for i in range(10)]


async def test_an_api_edit_while_an_append_is_open_is_kept_before_the_appended_line(slow,
                                                                                   nursery):
    fs = slow.fs
    fh = await _open(fs, "system/human.md", os.O_WRONLY | os.O_APPEND)
    await fs.write(fh, 0, b"appended\n")
    slow.fake.blocks[slow.ids["human"]]["value"] = "Edited through the API.\n"
    await _close(fs, fh, nursery)
    assert slow.fake.blocks[slow.ids["human"]]["value"] == "Edited through the API.\nappended\n"
    assert (await read_all(fs, "system/human.md")).endswith(
        b"Edited through the API.\nappended\n")
