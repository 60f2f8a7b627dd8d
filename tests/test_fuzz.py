"""A fuzzer of the FUSE operations (Hypothesis) over the fake API.

Random sequences of creates, writes (at random offsets), truncates, unlinks, renames, mkdirs,
reads, server-side edits, polls, passing time, and the server going away and coming back (so
writes are journaled and replayed), with random names (block names, scratch names,
names that are not UTF-8, too long, `.git`) and contents (plain text, frontmatter both valid and
hostile, CRLF, BOM, NUL). After each sequence: no operation failed other than with a FUSE errno,
the safe boundary caught nothing (no bug), the state's invariants hold (history replays to the
tree), and nothing refused reached the server (every block there is one a file could make).

`scripts/test` runs the short profile; `scripts/fuzz [EXAMPLES]` the long one.
"""
import os
import string

import pyfuse3
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from memfuse import blockfile
from memfuse.poller import Poller
from memfuse.tree import ROOT_INODE, Kind

from .fsworld import check_invariants, make_world, setattr_fields

settings.register_profile("ci", max_examples=250, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=int(os.environ.get("MEMFUSE_FUZZ_EXAMPLES", 3000)),
                          deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("MEMFUSE_FUZZ_PROFILE", "ci")

BLOCK_NAMES = st.one_of(
    st.sampled_from([b"a.md", b"b.md", b"notes.md", b"human.md", b"caf\xc3\xa9.md"]),
    st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=8)
    .map(lambda s: s.encode() + b".md"),
)
NAMES = st.one_of(
    BLOCK_NAMES, BLOCK_NAMES,
    st.sampled_from([b"a.md", b"b.md", b"notes.md", b"human.md", b"x.md~", b".x.md.swp", b"4913",
                     b"#a.md#", b".#a.md", b"sub", b"dir", b".git", b".GIT", b"\xff.md", b"\xff",
                     b"a" * 253 + b".md", b"caf\xc3\xa9.md", b"system", b".md"]),
    st.text(string.ascii_letters + string.digits + "._-~#", min_size=1, max_size=12)
    .map(lambda s: s.encode()),
)
FRONTMATTER = st.sampled_from([
    b"", b"---\ndescription: d\nlimit: 50\n---\n", b"---\nlimit: 3\n---\n",
    b"---\r\ndescription: w\r\n---\r\n", b"\xef\xbb\xbf---\nlimit: 9\n---\n",
    b"---\ndescription: 2024-13-45\n---\n", b"---\nlimit: 2147483648\n---\n",
    b"---\ndescription: 2024-01-01 25:61:61\n---\n", b"---\n2024-99-01: 1\n---\n",
    b"---\nlimit: !!int 1e400\n---\n",
    b"---\nlimit: 1\nlimit: 2\n---\n", b"---\nread_only: true\n---\n", b"---\ncolour: red\n---\n",
    b"---\nlimit: " + b"[" * 200 + b"]" * 200 + b"\n---\n", b"---\nno end\n",
    b'---\ndescription: "a\\0b"\n---\n',
])
BODY = st.one_of(st.binary(max_size=64), st.text(max_size=40).map(lambda s: s.encode()))
CONTENT = st.tuples(FRONTMATTER, BODY).map(lambda pair: pair[0] + pair[1])
PICK = st.integers(min_value=0, max_value=1 << 16)

CREATE = st.tuples(st.just("create"), PICK, NAMES, CONTENT)
WRITE = st.tuples(st.just("write"), PICK, st.integers(0, 300), CONTENT, st.booleans())
OPS = st.one_of(
    CREATE, CREATE, CREATE, WRITE, WRITE, WRITE,
    st.tuples(st.just("truncate"), PICK, st.sampled_from([0, 1, 10, 100, 5000, 1 << 34])),
    st.tuples(st.just("setattr"), PICK, st.integers(0, 0o7777), st.integers(0, 1 << 62)),
    st.tuples(st.just("unlink"), PICK),
    st.tuples(st.just("rename"), PICK, PICK, NAMES),
    st.tuples(st.just("mkdir"), PICK, NAMES),
    st.tuples(st.just("rmdir"), PICK),
    st.tuples(st.just("read"), PICK),
    st.tuples(st.just("server_edit"), PICK,  # the real server strips NUL from values
              st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                      max_size=30)),
    st.tuples(st.just("poll")),
    st.tuples(st.just("sleep"), st.sampled_from([0.1, 1.0, 5.0])),
    st.tuples(st.just("server_down")),
    st.tuples(st.just("server_up")),
    st.tuples(st.just("replay")),
)


def entries(world, kinds) -> list:
    tree = world.state.tree
    return sorted((n for n in tree.walk(tree.root) if n.kind in kinds and n.parent),
                  key=lambda n: tree.path(n))


def pick(items, index):
    return items[index % len(items)] if items else None


async def run_op(world, op) -> None:
    fs, kind = world.fs, op[0]
    event(kind)
    files = entries(world, {Kind.BLOCK, Kind.SCRATCH})
    dirs = [world.state.tree.root] + entries(world, {Kind.DIR})
    if kind == "create":
        info, _ = await fs.create(pick(dirs, op[1]).inode, op[2], 0o644,
                                  os.O_WRONLY | os.O_CREAT | os.O_TRUNC, None)
        try:
            await fs.write(info.fh, 0, op[3])
            await fs.flush(info.fh)
        finally:
            await fs.release(info.fh)
    elif kind == "write" and files:
        flags = os.O_RDWR | (os.O_TRUNC if op[4] else 0)
        info = await fs.open(pick(files, op[1]).inode, flags, None)
        try:
            await fs.write(info.fh, op[2], op[3])
            await fs.flush(info.fh)
        finally:
            await fs.release(info.fh)
    elif kind == "truncate" and files:
        attr = type("A", (), {"st_size": op[2]})()
        await fs.setattr(pick(files, op[1]).inode, attr, setattr_fields(update_size=True), None,
                         None)
    elif kind == "setattr":  # chmod and utimens of anything, read-only files too
        attr = pyfuse3.EntryAttributes()
        attr.st_mode, attr.st_atime_ns, attr.st_mtime_ns = op[2], op[3], op[3]
        fields = setattr_fields(update_mode=True, update_atime=True, update_mtime=True)
        await fs.setattr(pick(files + dirs, op[1]).inode, attr, fields, None, None)
    elif kind == "unlink" and files:
        node = pick(files, op[1])
        await fs.unlink(node.parent, node.name.encode(), None)
    elif kind == "rename" and (files or dirs[1:]):
        node = pick(files + dirs[1:], op[1])
        await fs.rename(node.parent, node.name.encode(), pick(dirs, op[2]).inode, op[3], 0,
                        None)
    elif kind == "mkdir":
        await fs.mkdir(pick(dirs, op[1]).inode, op[2], 0o755, None)
    elif kind == "rmdir" and dirs[1:]:
        node = pick(dirs[1:], op[1])
        await fs.rmdir(node.parent, node.name.encode(), None)
    elif kind == "read" and files:
        info = await fs.open(pick(files, op[1]).inode, os.O_RDONLY, None)
        await fs.read(info.fh, 0, 1 << 20)
        await fs.release(info.fh)
    elif kind == "server_edit" and world.fake.blocks:
        block = pick(sorted(world.fake.blocks.values(), key=lambda b: b["id"]), op[1])
        block["value"] = op[2][: block["limit"]]
    elif kind == "poll":
        await Poller(world.state, world.remote).poll_once()
    elif kind == "sleep":
        await trio.sleep(op[1])
    elif kind == "server_down":
        world.fake.down = True
    elif kind == "server_up":
        world.fake.down = False
    elif kind == "replay":
        await world.replayer.replay()


def assert_server_holds_only_valid_blocks(world) -> None:
    for block in world.fake.blocks.values():
        assert len(block["value"]) <= block["limit"] <= blockfile.MAX_LIMIT, block
        assert "\0" not in block["value"] and "\0" not in (block["description"] or ""), block
        assert block["description"] is None or block["description"].strip(), block


async def scenario(ops) -> None:
    async with trio.open_nursery() as nursery:
        world = await make_world(nursery)
        try:
            for op in ops:
                try:
                    await run_op(world, op)
                except pyfuse3.FUSEError:
                    pass  # a refusal is an answer; anything else escapes and fails the test
            check_invariants(world)  # also while writes are still journaled
            world.fake.down = False
            await trio.sleep(10)  # every grace period ends: its unlink is retired or queued
            await Poller(world.state, world.remote).poll_once()
            assert await world.replayer.replay(), "the journal did not drain with the server up"
            assert world.journal.pending() == []
            assert world.fs.faults.count == 0, "the safe boundary caught a bug"
            check_invariants(world)
            assert_server_holds_only_valid_blocks(world)
            assert (await world.fs.getattr(ROOT_INODE, None)).st_ino == ROOT_INODE
        finally:
            await world.client.aclose()
            nursery.cancel_scope.cancel()


@settings(settings.get_profile(PROFILE))
@given(st.lists(OPS, max_size=25))
def test_random_operation_sequences_keep_the_mount_sound(ops):
    trio.run(scenario, ops, clock=MockClock(autojump_threshold=0))
