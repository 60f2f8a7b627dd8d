"""Namespace operations at the filesystem level (Operations called directly, fake API).

Each editor's save is replayed as the sequence of FUSE calls it makes; the real programs run
against a real mount in tests/integration/test_editors.py.
"""
import errno
import os

import pyfuse3
import pytest
import trio

from memfuse.tree import ROOT_INODE

from .fsworld import inode_of, read_all, write_file

GRACE_PASSED = 0.5  # the world's unlink grace is 0.2 s

W_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


async def create(fs, path: str, data: bytes | None = None, flags=W_CREATE, fsync=False):
    parent, _, name = path.rpartition("/")
    parent_inode = await inode_of(fs, parent) if parent else ROOT_INODE
    info, attr = await fs.create(parent_inode, name.encode(), 0o644, flags, None)
    if data is not None:
        await fs.write(info.fh, 0, data)
    if fsync:
        await fs.fsync(info.fh, False)
    await fs.flush(info.fh)
    await fs.release(info.fh)
    return attr.st_ino


async def unlink(fs, path: str):
    parent, _, name = path.rpartition("/")
    await fs.unlink(await inode_of(fs, parent) if parent else ROOT_INODE, name.encode(), None)


async def rename(fs, old: str, new: str, flags=0):
    op, _, on = old.rpartition("/")
    np, _, nn = new.rpartition("/")
    await fs.rename(await inode_of(fs, op) if op else ROOT_INODE, on.encode(),
                    await inode_of(fs, np) if np else ROOT_INODE, nn.encode(), flags, None)


async def listdir(fs, path: str) -> list[str]:
    inode = await inode_of(fs, path) if path else ROOT_INODE
    return sorted(fs.tree.node(inode).children)


def assert_untouched_except(world, block_key: str, value: str):
    """The block kept its id and got `value`; nothing was created, attached or detached."""
    block = world.fake.blocks[world.ids[block_key]]
    assert block["value"] == value
    assert world.fake.calls("create") == []
    assert world.fake.calls("attach") == [] and world.fake.calls("detach") == []


async def test_create_in_system_creates_a_tagged_attached_block(world):
    await create(world.fs, "system/todo.md", b"- write tests\n")
    [block] = world.fake.by_label("todo")
    assert block["value"] == "- write tests\n"
    assert block["tags"] == [f"owner:{world.agent}"]
    assert block["description"] == "Memory block: todo" and block["limit"] == 20000
    assert block["id"] in world.fake.agents[world.agent]
    # the create's marker tag (a retry after no answer finds the block) is dropped at the end
    [post] = [body for method, path, body in world.fake.requests if method == "POST"]
    assert post["tags"][1].startswith("memfuse-create:local-")
    assert world.fake.patches() == [{"tags": [f"owner:{world.agent}"]}]


async def test_create_at_root_with_frontmatter_is_detached(world):
    await create(world.fs, "ideas.md", b"---\ndescription: Ideas\nlimit: 300\n---\nfly\n")
    [block] = world.fake.by_label("ideas")
    assert (block["description"], block["limit"], block["value"]) == ("Ideas", 300, "fly\n")
    assert block["id"] not in world.fake.agents[world.agent]


async def test_touch_creates_an_empty_block_once(world):
    await create(world.fs, "system/empty.md")
    [block] = world.fake.by_label("empty")
    assert block["value"] == "" and len(world.fake.calls("create")) == 1


async def test_new_file_over_its_limit_is_efbig_and_creates_nothing(world):
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await create(world.fs, "system/big.md", b"---\nlimit: 3\n---\ntoo long", fsync=True)
    assert caught.value.errno == errno.EFBIG
    assert world.fake.calls("create") == []


async def test_create_with_a_control_character_is_einval(world):
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await create(world.fs, "system/a\nb.md", b"x")
    assert caught.value.errno == errno.EINVAL


async def test_unlink_retires_after_the_grace_period_and_never_deletes(world):
    await unlink(world.fs, "system/human.md")
    assert "human.md" not in await listdir(world.fs, "system")
    assert world.fake.calls("detach") == []  # not yet: an editor may re-create it
    await trio.sleep(GRACE_PASSED)
    block = world.fake.blocks[world.ids["human"]]
    assert world.ids["human"] not in world.fake.agents[world.agent]
    assert block["value"] == "The human.\n"  # still on the server
    assert ("system/human.md", None) in [(p, c) for p, c, _ in world.records]


async def test_unlink_detached_drops_the_owner_tag(world):
    await unlink(world.fs, "notes.md")
    await trio.sleep(GRACE_PASSED)
    assert world.fake.blocks[world.ids["notes"]]["tags"] == []


async def test_vim_save_is_one_patch_of_the_same_block(world):
    fs = world.fs
    await create(fs, "system/4913")          # vim probes that it may create files
    await unlink(fs, "system/4913")
    await create(fs, "system/.human.md.swp", b"swap")
    await rename(fs, "system/human.md", "system/human.md~")  # backupcopy=auto: rename
    await create(fs, "system/human.md", b"---\ndescription: desc\nlimit: 20000\n---\nvim\n",
                 fsync=True)
    await unlink(fs, "system/human.md~")
    await unlink(fs, "system/.human.md.swp")
    await trio.sleep(GRACE_PASSED)
    assert_untouched_except(world, "human", "vim\n")
    assert world.fake.patches() == [{"value": "vim\n"}]
    assert await listdir(fs, "system") == ["human.md", "persona.md", "projects"]


async def test_sed_i_rename_over_is_one_patch(world):
    fs = world.fs
    await create(fs, "system/sedAb12Cd", b"---\ndescription: desc\nlimit: 20000\n---\nsed\n")
    inode = await inode_of(fs, "system/sedAb12Cd")
    await rename(fs, "system/sedAb12Cd", "system/human.md")
    await trio.sleep(GRACE_PASSED)
    assert_untouched_except(world, "human", "sed\n")
    assert world.fake.patches() == [{"value": "sed\n"}]
    assert await inode_of(fs, "system/human.md") == inode  # the kernel moved the inode
    assert (await read_all(fs, "system/human.md")).endswith(b"---\nsed\n")


async def test_git_checkout_unlink_then_create_is_one_patch(world):
    fs = world.fs
    await unlink(fs, "system/human.md")
    await create(fs, "system/human.md", b"restored\n", flags=W_CREATE | os.O_EXCL)
    await trio.sleep(GRACE_PASSED)
    assert_untouched_except(world, "human", "restored\n")


async def test_emacs_backup_rename_keeps_the_backup_as_scratch(world):
    fs = world.fs
    await fs.symlink(await inode_of(fs, "system"), b".#human.md", b"me@host.1:1", None)
    await rename(fs, "system/human.md", "system/human.md~")
    await create(fs, "system/human.md", b"emacs\n", fsync=True)
    await unlink(fs, "system/.#human.md")
    await trio.sleep(GRACE_PASSED)
    assert_untouched_except(world, "human", "emacs\n")
    assert await read_all(fs, "system/human.md~") == b"---\ndescription: desc\nlimit: 20000\n" \
                                                     b"---\nThe human.\n"
    assert "system/human.md~" not in [p for p, _, _ in world.records]


async def test_scratch_files_never_reach_the_server(world):
    fs = world.fs
    for name in ["4913", ".human.md.swp", "human.md~", "#human.md#", "sedAb12Cd", "x.tmp"]:
        await create(fs, f"system/{name}", b"scratch data")
        assert await read_all(fs, f"system/{name}") == b"scratch data"
    await fs.symlink(await inode_of(fs, "system"), b".#human.md", b"me@host.1:1", None)
    assert await fs.readlink(await inode_of(fs, "system/.#human.md"), None) == b"me@host.1:1"
    assert world.fake.requests == [r for r in world.fake.requests if r[0] == "GET"]
    assert world.records == []


async def test_rename_relabels_the_same_block(world):
    await rename(world.fs, "system/persona.md", "system/character.md")
    block = world.fake.blocks[world.ids["persona"]]
    assert block["label"] == "character" and world.ids["persona"] in world.fake.agents[world.agent]
    assert world.fake.patches() == [{"label": "character"}]


async def test_mv_between_system_and_root_detaches_and_attaches(world):
    fs, fake, block_id = world.fs, world.fake, world.ids["persona"]
    await rename(fs, "system/persona.md", "persona.md")
    assert block_id not in fake.agents[world.agent]
    assert f"owner:{world.agent}" in fake.blocks[block_id]["tags"]  # so it stays visible
    assert "persona.md" in await listdir(fs, "")
    await rename(fs, "persona.md", "system/persona.md")
    assert block_id in fake.agents[world.agent]
    assert fake.blocks[block_id]["value"] == "I am." and fake.calls("create") == []


async def test_rename_over_an_existing_block_updates_the_target(world):
    fs, fake = world.fs, world.fake
    await rename(fs, "notes.md", "system/human.md")
    assert fake.blocks[world.ids["human"]]["value"] == "n"
    assert fake.blocks[world.ids["human"]]["label"] == "human"
    await trio.sleep(GRACE_PASSED)
    assert fake.blocks[world.ids["notes"]]["tags"] == []  # the source's block is retired
    assert "notes.md" not in await listdir(fs, "")


async def test_directory_rename_relabels_everything_under_it(world):
    fs, fake = world.fs, world.fake
    await fs.mkdir(await inode_of(fs, "system"), b"drafts", 0o755, None)
    await create(fs, "system/drafts/memfuse.md", b"fuse\n")
    await create(fs, "system/drafts/letta.md", b"letta\n")
    await rename(fs, "system/drafts", "system/work")
    assert fake.by_label("work/letta")[0]["value"] == "letta\n"
    assert fake.by_label("work/memfuse")[0]["value"] == "fuse\n"
    assert await listdir(fs, "system/work") == ["letta.md", "memfuse.md"]
    await rename(fs, "system/work", "work")  # out of system/: detached
    assert fake.by_label("work/letta")[0]["id"] not in fake.agents[world.agent]


async def test_rename_flags(world):
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await rename(world.fs, "system/human.md", "system/persona.md", pyfuse3.RENAME_NOREPLACE)
    assert caught.value.errno == errno.EEXIST
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await rename(world.fs, "system/human.md", "system/persona.md", pyfuse3.RENAME_EXCHANGE)
    assert caught.value.errno == errno.EINVAL
    assert world.fake.patches() == []


async def test_mkdir_rmdir_live_in_the_daemon(world):
    fs = world.fs
    entry = await fs.mkdir(await inode_of(fs, "system"), b"drafts", 0o755, None)
    assert "drafts" in await listdir(fs, "system")
    await create(fs, "system/drafts/a.md", b"a")
    assert world.fake.by_label("drafts/a")[0]["value"] == "a"
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.rmdir(await inode_of(fs, "system"), b"drafts", None)
    assert caught.value.errno == errno.ENOTEMPTY
    await unlink(fs, "system/drafts/a.md")
    await fs.rmdir(await inode_of(fs, "system"), b"drafts", None)
    assert "drafts" not in await listdir(fs, "system") and entry.st_ino > 0


async def test_system_and_gitfile_are_protected(world):
    fs = world.fs
    for call in (fs.rmdir(ROOT_INODE, b"system", None), fs.unlink(ROOT_INODE, b".git", None),
                 rename(fs, "system", "elsewhere"), rename(fs, ".git", "x")):
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await call
        assert caught.value.errno == errno.EPERM


async def test_unlinked_open_file_keeps_its_inode_until_forgotten(world):
    fs = world.fs
    inode = await inode_of(fs, "system/human.md")  # one lookup held
    info = await fs.open(inode, os.O_RDONLY, None)
    await unlink(fs, "system/human.md")
    assert (await fs.getattr(inode, None)).st_ino == inode
    assert (await fs.read(info.fh, 0, 100)).endswith(b"The human.\n")
    await fs.release(info.fh)
    await fs.forget([(inode, 2)])  # inode_of looked it up twice (now and before)
    with pytest.raises(pyfuse3.FUSEError):
        await fs.getattr(inode, None)


async def test_write_to_an_unlinked_file_stays_local(world):
    fs = world.fs
    info = await fs.open(await inode_of(fs, "system/human.md"), os.O_RDWR, None)
    await unlink(fs, "system/human.md")
    await fs.write(info.fh, 0, b"ghost")
    await fs.flush(info.fh)
    await fs.release(info.fh)
    assert world.fake.patches() == []


async def test_write_file_of_existing_block_still_one_patch(world):
    await write_file(world.fs, "system/human.md", b"plain\n")
    assert world.fake.patches() == [{"value": "plain\n"}]


async def test_a_directory_rename_the_server_refuses_halfway_is_undone(world):
    fs, fake = world.fs, world.fake
    await fs.mkdir(await inode_of(fs, "system"), b"drafts", 0o755, None)
    await create(fs, "system/drafts/a.md", b"a")
    await create(fs, "system/drafts/z.md", b"z")
    z_id = fake.by_label("drafts/z")[0]["id"]
    fake.fail_paths[f"/v1/blocks/{z_id}"] = 400  # the second relabel is refused
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await rename(fs, "system/drafts", "system/work")
    assert caught.value.errno == errno.EINVAL
    assert fake.by_label("drafts/a") and not fake.by_label("work/a")  # moved back
    assert await listdir(fs, "system/drafts") == ["a.md", "z.md"]


async def test_a_directory_holding_a_read_only_block_cannot_be_renamed(world):
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await rename(world.fs, "system/projects", "system/work")
    assert caught.value.errno == errno.EACCES
    assert world.fake.patches() == []


async def test_a_read_only_block_cannot_be_unlinked_or_renamed(world):
    for call in (unlink(world.fs, "system/projects/policy.md"),
                 rename(world.fs, "system/projects/policy.md", "system/projects/p.md"),
                 rename(world.fs, "system/human.md", "system/projects/policy.md")):
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await call
        assert caught.value.errno == errno.EACCES
    assert world.fake.patches() == [] and world.state.graveyard.pending_block_ids() == set()


async def test_a_file_unlinked_while_its_write_is_in_flight_leaves_history_alone(world):
    fs = world.fs
    info = await fs.open(await inode_of(fs, "system/human.md"), os.O_WRONLY | os.O_TRUNC, None)
    await fs.write(info.fh, 0, b"in flight")
    real_update = world.remote.client.update_block

    async def update_then_unlinked(block_id, **fields):
        block = await real_update(block_id, **fields)
        await unlink(fs, "system/human.md")  # rm lands while the PATCH is on the wire
        return block

    world.remote.client.update_block = update_then_unlinked
    await fs.flush(info.fh)
    await fs.release(info.fh)
    assert world.fake.blocks[world.ids["human"]]["value"] == "in flight"
    assert [p for p, _c, _o in world.records] == ["system/human.md"]  # only the unlink
    assert [c for _p, c, _o in world.records] == [None]


async def test_scratch_files_are_limited_and_refused_with_enospc(world, monkeypatch):
    world.state.scratch.limit = 10
    fs = world.fs
    await create(fs, "system/.a.swp", b"12345678")
    info = await fs.open(await inode_of(fs, "system/.a.swp"), os.O_WRONLY, None)
    assert await fs.write(info.fh, 0, b"abcdefgh") == 8  # an overwrite does not grow
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.write(info.fh, 8, b"xyz")  # 11 bytes > 10
    assert caught.value.errno == errno.ENOSPC
    await fs.release(info.fh)
    assert await read_all(fs, "system/.a.swp") == b"abcdefgh"


async def test_a_write_opened_before_its_file_was_renamed_over_another_lands_in_that_block(
        world):
    # the kernel keeps the fd on the moved inode: its close writes the file now named a.md,
    # whose block is the replaced file's (the rename wrote the source's bytes there). The
    # conflict check read the block the writer had opened (its base's id) and PATCHed that,
    # the retired source block: the acknowledged bytes were lost (the ordering model found it)
    fs, fake = world.fs, world.fake
    await create(fs, "a.md", b"old a\n")
    [a] = fake.by_label("a")
    info = await fs.open(await inode_of(fs, "system/human.md"), os.O_RDWR, None)
    own = await fs.read(info.fh, 0, 1 << 20)
    await rename(fs, "system/human.md", "a.md")
    await fs.write(info.fh, len(own), b"more\n")
    await fs.flush(info.fh)
    await fs.release(info.fh)
    assert fake.blocks[a["id"]]["value"] == "The human.\nmore\n"
    assert (await read_all(fs, "a.md")).endswith(b"---\nThe human.\nmore\n")
    assert fake.blocks[world.ids["human"]]["value"] == "The human.\n"  # retired as it was
