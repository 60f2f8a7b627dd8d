"""Filesystem-level tests: pyfuse3 Operations called directly, over the in-memory fake API.

Fast checks of the write path (one PATCH per close, O_TRUNC, refusals) and of the namespace.
The same claims are checked through a real mount against the real server in tests/integration.
"""
import errno
import logging
import os
import stat
import time
from functools import partial
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from memfuse import fileattrs
from memfuse.fs import WRITER_WINDOW
from memfuse.model import Origin
from memfuse.tree import ROOT_INODE

from .fsworld import HUMAN, inode_of, make_world, read_all, setattr_fields, write_file

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


async def test_in_the_git_memory_layout_git_is_a_link_to_the_history(nursery):
    world = await make_world(nursery, git_memory=True)
    inode = await inode_of(world.fs, ".git")
    assert stat.S_ISLNK((await world.fs.getattr(inode, None)).st_mode)
    assert await world.fs.readlink(inode, None) == b"/somewhere/memory.git"
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await world.fs.unlink(pyfuse3.ROOT_INODE, b".git", None)
    assert caught.value.errno == errno.EPERM


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
    fields = setattr_fields(update_size=True)
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
    fields = setattr_fields(update_size=True)
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


# -- times and modes (issue 22, findings 4-6) -------------------------------------------------

PAST_A, PAST_M = 1_500_000_000_123_456_789, 1_400_000_000_987_654_321  # ns: atime, mtime


async def utimens(fs, inode: int, atime_ns: int | None = None, mtime_ns: int | None = None):
    """utimensat, by path or by fd alike: the kernel sends a setattr with no handle."""
    attr = pyfuse3.EntryAttributes()
    if atime_ns is not None:
        attr.st_atime_ns = atime_ns
    if mtime_ns is not None:
        attr.st_mtime_ns = mtime_ns
    return await fs.setattr(inode, attr, setattr_fields(update_atime=atime_ns is not None,
                                                        update_mtime=mtime_ns is not None),
                            None, None)


async def chmod(fs, inode: int, mode: int):
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = mode
    return await fs.setattr(inode, attr, setattr_fields(update_mode=True), None, None)


async def times_of(fs, path: str) -> tuple[int, int]:
    attr = await fs.getattr(await inode_of(fs, path), None)
    return attr.st_atime_ns, attr.st_mtime_ns


async def test_utimens_sets_atime_and_mtime_apart_on_files_and_directories(world):
    for path in ("system/human.md", "notes.md", "system", "system/projects", ".git"):
        inode = await inode_of(world.fs, path)
        shown = await utimens(world.fs, inode, PAST_A, PAST_M)
        assert (shown.st_atime_ns, shown.st_mtime_ns) == (PAST_A, PAST_M)
        assert await times_of(world.fs, path) == (PAST_A, PAST_M), path
        await utimens(world.fs, inode, mtime_ns=PAST_M + 1)  # UTIME_OMIT for the atime
        assert await times_of(world.fs, path) == (PAST_A, PAST_M + 1), path
    assert world.fake.patches() == [] and world.records == []  # times are never sent


async def test_a_close_after_futimens_keeps_the_mtime_the_program_set(world):
    """`cp -a` and `tar -x` write, set the times with futimens, then close: the close sends
    the writes and keeps the times. A write after the futimens (or a truncate) moves the
    mtime again."""
    fs = world.fs
    inode = await inode_of(fs, "system/human.md")
    info = await fs.open(inode, os.O_WRONLY | os.O_TRUNC, None)  # cp -a onto a block file
    await fs.write(info.fh, 0, b"Copied with cp -a.\n")
    await utimens(fs, inode, PAST_A, PAST_M)
    await fs.flush(info.fh)
    await fs.release(info.fh)
    assert world.fake.patches() == [{"value": "Copied with cp -a.\n"}]
    assert await times_of(fs, "system/human.md") == (PAST_A, PAST_M)

    system = await inode_of(fs, "system")  # tar -x of a new file
    info, entry = await fs.create(system, b"new.md", stat.S_IFREG | 0o600,
                                  os.O_WRONLY | os.O_CREAT | os.O_EXCL, None)
    await fs.write(info.fh, 0, b"Extracted by tar.\n")
    await utimens(fs, entry.st_ino, PAST_A, PAST_M)
    await fs.flush(info.fh)
    await fs.release(info.fh)
    [block] = world.fake.by_label("new")
    assert block["value"] == "Extracted by tar.\n"
    assert await times_of(fs, "system/new.md") == (PAST_A, PAST_M)

    before = time.time_ns()
    info = await fs.open(inode, os.O_RDWR, None)  # a write after the futimens
    await fs.write(info.fh, 0, b"First.\n")
    await utimens(fs, inode, mtime_ns=PAST_M)
    await fs.write(info.fh, 0, b"Second.\n")
    await fs.flush(info.fh)
    await fs.release(info.fh)
    assert (await times_of(fs, "system/human.md"))[1] >= before
    await utimens(fs, inode, mtime_ns=PAST_M)  # truncate(2) by path is a write too
    before = time.time_ns()
    await fs.setattr(inode, SimpleNamespace(st_size=0), setattr_fields(update_size=True),
                     None, None)
    assert (await times_of(fs, "system/human.md"))[1] >= before


async def test_a_rename_onto_a_block_carries_the_sources_times_and_mode(world):
    """rsync -a: its temporary file gets the data, then the times and mode by path, then is
    renamed onto the block file."""
    fs = world.fs
    system = await inode_of(fs, "system")
    edited = HUMAN.replace(b"The human.", b"The human, edited elsewhere.")
    info, entry = await fs.create(system, b".human.md.Xy12Ab", stat.S_IFREG | 0o600,
                                  os.O_WRONLY | os.O_CREAT | os.O_EXCL, None)
    await fs.write(info.fh, 0, edited)
    await fs.flush(info.fh)
    await fs.release(info.fh)
    await utimens(fs, entry.st_ino, PAST_A, PAST_M)
    await chmod(fs, entry.st_ino, 0o640)
    await fs.rename(system, b".human.md.Xy12Ab", system, b"human.md", 0, None)
    attr = await fs.getattr(await inode_of(fs, "system/human.md"), None)
    assert (attr.st_atime_ns, attr.st_mtime_ns) == (PAST_A, PAST_M)
    assert stat.S_IMODE(attr.st_mode) == 0o640 and attr.st_size == len(edited)
    assert world.fake.patches() == [{"value": "The human, edited elsewhere.\n"}]


async def test_a_server_edit_moves_the_mtime_to_when_the_mount_saw_it(world):
    await utimens(world.fs, await inode_of(world.fs, "system/human.md"), PAST_A, PAST_M)
    world.fake.blocks[world.ids["human"]]["value"] = "Changed on the server.\n"
    world.files.revalidate_after = 0
    seen_from = time.time_ns()
    assert (await read_all(world.fs, "system/human.md")).endswith(b"Changed on the server.\n")
    attr = await world.fs.getattr(await inode_of(world.fs, "system/human.md"), None)
    assert attr.st_mtime_ns >= seen_from and attr.st_ctime_ns == attr.st_mtime_ns
    assert attr.st_atime_ns == PAST_A  # reads do not move the atime (noatime)


async def test_ctime_moves_on_every_change_of_data_or_metadata(world):
    fs = world.fs
    inode = await inode_of(fs, "system/human.md")
    system = await inode_of(fs, "system")

    async def write():
        await write_file(fs, "system/human.md", b"A new value.\n")

    async def chown():
        attr = pyfuse3.EntryAttributes()
        attr.st_uid, attr.st_gid = os.getuid(), os.getgid()
        await fs.setattr(inode, attr, setattr_fields(update_uid=True, update_gid=True), None,
                         None)

    async def rename():
        await fs.rename(system, b"human.md", system, b"ada.md", 0, None)

    async def unlink():
        await fs.unlink(system, b"ada.md", None)

    for change in (partial(chmod, fs, inode, 0o600), chown,
                   partial(utimens, fs, inode, PAST_A, PAST_M), write, rename, unlink):
        before = (await fs.getattr(inode, None)).st_ctime_ns
        await change()
        assert (await fs.getattr(inode, None)).st_ctime_ns > before, change


async def test_chmod_of_a_block_file_or_a_directory_is_kept_and_sends_nothing(world):
    fs = world.fs
    for path, mode in (("system/human.md", 0o600), ("notes.md", 0o640), ("system", 0o700),
                       ("system/projects", 0o750)):
        inode = await inode_of(fs, path)
        assert stat.S_IMODE((await chmod(fs, inode, mode)).st_mode) == mode
        assert stat.S_IMODE((await fs.getattr(inode, None)).st_mode) == mode, path
    assert stat.S_IMODE((await chmod(fs, ROOT_INODE, 0o711)).st_mode) == 0o711
    assert world.fake.patches() == [] and world.records == []  # the server has no modes
    made = await fs.mkdir(await inode_of(fs, "system"), b"private", stat.S_IFDIR | 0o700, None)
    assert stat.S_IMODE(made.st_mode) == 0o700
    info, entry = await fs.create(ROOT_INODE, b"secret.md", stat.S_IFREG | 0o600,
                                  os.O_WRONLY | os.O_CREAT, None)  # install -m 600, umask 077
    await fs.write(info.fh, 0, b"Only mine.\n")
    await fs.flush(info.fh)
    await fs.release(info.fh)
    assert stat.S_IMODE((await fs.getattr(entry.st_ino, None)).st_mode) == 0o600


async def test_a_read_only_block_stays_0444_and_chmod_of_it_is_eperm(world, caplog):
    for path in ("system/projects/policy.md", ".git"):
        inode = await inode_of(world.fs, path)
        for mode in (0o644, 0o444):
            with pytest.raises(pyfuse3.FUSEError) as caught:
                await chmod(world.fs, inode, mode)
            assert caught.value.errno == errno.EPERM
        assert stat.S_IMODE((await world.fs.getattr(inode, None)).st_mode) == 0o444
    assert "system/projects/policy.md: a read-only file stays 0444 (EPERM)" in caplog.text


async def test_an_unlinked_file_still_open_has_no_link(world):
    fs = world.fs
    inode = await inode_of(fs, "notes.md")
    info = await fs.open(inode, os.O_RDONLY, None)
    assert (await fs.getattr(inode, None)).st_nlink == 1
    await fs.unlink(ROOT_INODE, b"notes.md", None)
    assert (await fs.getattr(inode, None)).st_nlink == 0
    assert await fs.read(info.fh, 0, 100) == b"---\ndescription: desc\nlimit: 20000\n---\nn"
    await fs.release(info.fh)


async def test_a_lookup_of_a_name_over_255_bytes_is_enametoolong(world):
    for name in (b"x" * 253 + b".md", "é".encode() * 128):  # 256 bytes
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await world.fs.lookup(await inode_of(world.fs, "system"), name, None)
        assert caught.value.errno == errno.ENAMETOOLONG
    with pytest.raises(pyfuse3.FUSEError) as caught:  # 255 bytes: a name, just not there
        await world.fs.lookup(ROOT_INODE, b"x" * 252 + b".md", None)
    assert caught.value.errno == errno.ENOENT


async def test_times_and_modes_come_back_at_the_next_mount_unless_the_file_changed(
        world, nursery, tmp_path):
    """What the daemon does across an unmount (MountState.attrs saved by fileattrs, then
    MountState.restore_attrs at the next mount): modes always come back, times when the file
    is what history's head has; a file the server changed meanwhile has the time of now."""
    fs = world.fs
    for path, mode in (("system/human.md", 0o600), ("notes.md", 0o640), ("system", 0o700)):
        inode = await inode_of(fs, path)
        await chmod(fs, inode, mode)
        await utimens(fs, inode, PAST_A, PAST_M)
    fileattrs.save(tmp_path / "memory.attrs", world.state.attrs())
    head = world.state.tree.files()  # the last snapshot
    world.fake.blocks[world.ids["notes"]]["value"] = "Changed while unmounted.\n"
    remounted_at = time.time_ns()
    again = await make_world(nursery, after=world)
    assert again.state.restore_attrs(fileattrs.load(tmp_path / "memory.attrs"), head) > 0
    for path, mode in (("system/human.md", 0o600), ("notes.md", 0o640), ("system", 0o700)):
        attr = await again.fs.getattr(await inode_of(again.fs, path), None)
        assert stat.S_IMODE(attr.st_mode) == mode, path
        if path == "notes.md":
            assert attr.st_mtime_ns >= remounted_at
        else:
            assert (attr.st_atime_ns, attr.st_mtime_ns) == (PAST_A, PAST_M), path
    await again.client.aclose()
