"""The ordering model (issue 22 point 8): random programs of two or three processes, run at once
against the fake API, must leave what POSIX would leave.

Each process runs its operations one after the other at full speed (no pauses; the only waits
are the server's, `FakeLetta.random_latency`, on trio's MockClock, so a sequence costs no real
time): create (`O_CREAT` with or without `O_TRUNC`, with a write or empty as `touch`), a whole
write (`O_TRUNC`), an extending write (`O_RDWR`: the handle's bytes plus more), an append
(`O_APPEND`, with or without `O_CREAT`), truncate to 0 by path, rename (within and across
`system/` and the root, over another file or not), unlink, and reads, on a few names in the two
directories (one attached block and one detached block that exist at mount among them). As in
the kernel, close() is the flush and waits for it; the release comes after close() returned and
runs as a task of its own.

The model is a dict of path -> file, each file a value and the versions it held. Every call is
applied to it when it returns (memfuse changes its tree synchronously at the end of each call, so
that is the order the mount applied them in): a close of a whole-file writer sets the file's value
to the handle's bytes (the last close wins); a close of an `O_APPEND` handle adds its bytes at the
end of the value as it is at that close (memfuse/files.py `append`); a rename moves the file (over
another: that one is gone); a new file is empty from its create on. After each sequence (and past
every unlink's grace period):

- the mount's block files equal the model (values), the other files are as loaded;
- every label has exactly one live block on the server, with the model's value: attached for
  `system/`, owned (tagged `owner:<agent>`) and detached at the root; no other live block;
- history (the world's records) holds every acknowledged text: each value a close returned 0
  for, unless an unlink or a rename over that file was under way (then POSIX has the bytes in an
  orphan inode, and memfuse may keep them in the daemon only);
- every read returned one whole version: a value its file held at some moment between the open
  and the read (the reader's own handle reads its own bytes exactly).

Documented limits (SEMANTICS.md "Ordering") the generator avoids rather than models: an `O_TRUNC`
open of an existing file closed with no write (`: > x.md` empties the block at release, after
close() returned, so it can land after a later writer's close); such an open of a name that
exists when the process reaches it is made an open without `O_TRUNC` (nothing sent). Readers
read through FUSE `read` from their own snapshot, so the page-cache limit (a reader opened before
a save in place) does not arise here. The label `a` is in both directories (`system/a.md`
attached, `a.md` detached: two blocks, one label). No server-side
edits, outages or polls: test_fuzz covers those. The kernel's locks are modelled too: create,
unlink and rename in a directory, and rename, unlink and truncate of a file, never overlap
(`Run.locked`).

`MEMFUSE_MODEL_EXAMPLES` (default 500) sets the sequences, `MEMFUSE_MODEL_SEED` fixes
Hypothesis's seed; `scripts/chaos --model N` runs N of them.
"""
import errno
import os
import random
from contextlib import AsyncExitStack, asynccontextmanager

import pyfuse3
import trio
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from memfuse import blockfile
from memfuse.tree import ROOT_INODE

from .fsworld import check_invariants, make_world, setattr_fields

EXAMPLES = int(os.environ.get("MEMFUSE_MODEL_EXAMPLES", 500))
SEED = os.environ.get("MEMFUSE_MODEL_SEED")

# `a` in both directories: an attached and a detached block share a label, and a create of
# `system/a.md` while `a.md` is created at the root must not take the other's block
PATHS = ["system/a.md", "system/b.md", "system/human.md", "a.md", "c.md", "notes.md"]
FLAGS = {"write": os.O_WRONLY | os.O_TRUNC, "create": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
         "touch": os.O_WRONLY | os.O_CREAT, "extend": os.O_RDWR,
         "append": os.O_WRONLY | os.O_APPEND, "append_create": os.O_WRONLY | os.O_APPEND
         | os.O_CREAT}
CHECKPOINTS = st.integers(0, 2)  # trio checkpoints between a process's calls (no time passes)
PATH = st.sampled_from(PATHS)
OP = st.one_of(
    st.tuples(st.sampled_from(sorted(FLAGS)), PATH, st.booleans(), CHECKPOINTS),
    st.tuples(st.just("truncate"), PATH),
    st.tuples(st.just("rename"), PATH, PATH),
    st.tuples(st.just("unlink"), PATH),
    st.tuples(st.just("read"), PATH),
)
PROGRAMS = st.lists(st.lists(OP, min_size=1, max_size=6), min_size=2, max_size=3)
LATENCY = st.sampled_from([0.0, 0.01, 0.05, 0.3])  # most seconds an answer takes (grace: 0.2)


class File:
    """A file of the model: its value now and every value it held, with when (call counts)."""

    def __init__(self, value: str, at: int):
        self.value = value
        self.versions = [[value, at, None]]  # [value, from, until]

    def set(self, value: str, at: int) -> None:
        self.versions[-1][2] = at
        self.value = value
        self.versions.append([value, at, None])

    def held(self, value: str, since: int) -> bool:
        """Whether the file held `value` at some moment from call count `since` on."""
        return any(v == value and (until is None or until > since)
                   for v, _at, until in self.versions)


class Model:
    """What POSIX leaves: path -> File; `clock` counts the calls that returned."""

    def __init__(self, loaded: dict[str, bytes]):
        self.clock = 0
        self.files = {p: File(_value(c), 0) for p, c in loaded.items() if p in PATHS}
        self.acked: list[tuple[str, File, str]] = []  # (path, file, value) of each close
        self.orphaning: dict[int, int] = {}  # id(File) -> unlinks/renames over it under way
        self.differences: list[str] = []

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def differ(self, what: str) -> None:
        self.differences.append(what)

    def path_of(self, file: File) -> str | None:
        return next((p for p, f in self.files.items() if f is file), None)


def _value(content: bytes) -> str:
    return blockfile.parse(content).value


async def _lookup(fs, path: str) -> int | None:
    inode = ROOT_INODE
    for name in path.split("/"):
        try:
            inode = (await fs.lookup(inode, name.encode(), None)).st_ino
        except pyfuse3.FUSEError:
            return None
    return inode


def _parent(path: str) -> tuple[int, bytes]:
    head, _, name = path.rpartition("/")
    return head, name.encode()


class Run:
    """One sequence: the world, the model, the processes and their releases."""

    def __init__(self, world, model: Model, releases):
        self.world, self.fs, self.model, self.releases = world, world.fs, model, releases
        self.texts = 0
        self._locks: dict[object, trio.Lock] = {}

    @asynccontextmanager
    async def locked(self, *keys):
        """Hold the kernel's locks `keys` (a directory's path, a file's inode, or "rename",
        the superblock's rename mutex), in one order: the kernel serializes create, unlink and
        rename in a directory (its i_rwsem), and rename, unlink and truncate of a file (the
        file's), so the mount never sees two of them at once there."""
        async with AsyncExitStack() as stack:
            for key in sorted(set(k for k in keys if k is not None), key=repr):
                await stack.enter_async_context(self._locks.setdefault(key, trio.Lock()))
            yield

    def text(self, pid: int) -> str:
        self.texts += 1
        return f"p{pid}.{self.texts}\n"

    async def _release(self, fh: int) -> None:
        try:
            await self.fs.release(fh)
        except pyfuse3.FUSEError as exc:
            self.model.differ(f"release failed: {errno.errorcode[exc.errno]}")

    def _found(self, path: str, inode: int | None) -> File | None:
        """The model's file at `path`; a difference when the mount disagrees."""
        file = self.model.files.get(path)
        if (file is None) != (inode is None):
            self.model.differ(f"{path}: the mount {'has' if inode else 'lacks'} it, the model "
                              f"{'has' if file else 'lacks'} it")
        return file

    async def write(self, pid: int, kind: str, path: str, with_text: bool, checkpoints: int
                    ) -> None:
        fs, model = self.fs, self.model
        flags = FLAGS[kind]
        head, name = _parent(path)
        # open(O_CREAT) looks the name up and creates it under the directory's lock
        async with self.locked(head if flags & os.O_CREAT else None):
            inode = await _lookup(fs, path)
            file = self._found(path, inode)
            new = file is None
            if new and not flags & os.O_CREAT:
                return  # ENOENT: nothing to model
            if not new and not with_text and flags & os.O_TRUNC:
                flags &= ~os.O_TRUNC  # `: > x.md` of a file that exists: a documented limit
            if new:
                try:
                    info, _attr = await fs.create(await _lookup(fs, head) if head else ROOT_INODE,
                                                  name, 0o644, flags, None)
                except pyfuse3.FUSEError as exc:
                    model.differ(f"{kind} {path}: create failed with "
                                 f"{errno.errorcode[exc.errno]}")
                    return
                file = model.files[path] = File("", model.tick())
        if not new:
            try:
                info = await fs.open(inode, flags & ~os.O_CREAT, None)
            except pyfuse3.FUSEError as exc:
                model.differ(f"{kind} {path}: open failed with {errno.errorcode[exc.errno]}")
                return
            model.tick()
        opened = model.clock
        fh = info.fh
        text = self.text(pid) if with_text else ""
        append = bool(flags & os.O_APPEND)
        own = await fs.read(fh, 0, 1 << 20)  # the handle's own bytes
        if new and _value(own) != "":
            model.differ(f"{kind} {path}: a new file reads {own!r}, not empty")
        elif not (flags & os.O_TRUNC) and not new and not file.held(_value(own), opened - 1):
            model.differ(f"{kind} {path}: opened on {own!r}, which it never held then")
        if flags & os.O_TRUNC:
            own = b""
        for _ in range(checkpoints):
            await trio.sleep(0)
        if text:
            try:
                await fs.write(fh, len(own), text.encode())
            except pyfuse3.FUSEError as exc:
                model.differ(f"{kind} {path}: write failed with {errno.errorcode[exc.errno]}")
            mine = _value(own + text.encode())
            if _value(await fs.read(fh, 0, 1 << 20)) != mine:
                model.differ(f"{kind} {path}: the writer does not read its own bytes")
        for _ in range(checkpoints):
            await trio.sleep(0)
        orphaning = model.orphaning.get(id(file), 0)
        try:
            await fs.flush(fh)
        except pyfuse3.FUSEError as exc:
            model.differ(f"{kind} {path}: close failed with {errno.errorcode[exc.errno]}")
        else:
            model.tick()
            where = model.path_of(file)
            if text and where is not None:
                value = file.value + text if append else _value(own + text.encode())
                file.set(value, model.clock)
                if not orphaning and not model.orphaning.get(id(file), 0):
                    model.acked.append((where, file, value))
        self.releases.start_soon(self._release, fh)

    async def truncate(self, path: str) -> None:
        fs, model = self.fs, self.model
        inode = await _lookup(fs, path)
        file = self._found(path, inode)
        if file is None:
            return
        attr = pyfuse3.EntryAttributes()
        attr.st_size = 0
        async with self.locked(inode):
            try:
                await fs.setattr(inode, attr, setattr_fields(update_size=True), None, None)
            except pyfuse3.FUSEError as exc:
                model.differ(f"truncate {path}: {errno.errorcode[exc.errno]}")
                return
            model.tick()
            if model.path_of(file) is not None:
                file.set("", model.clock)

    async def rename(self, path: str, to: str) -> None:
        fs, model = self.fs, self.model
        if path == to:
            return
        head, name = _parent(path)
        new_head, new_name = _parent(to)
        async with self.locked("rename" if head != new_head else None, head, new_head):
            src, dst = await _lookup(fs, path), await _lookup(fs, to)
            file, replaced = self._found(path, src), self._found(to, dst)
            if file is None:
                return
            async with self.locked(src, dst):
                if replaced is not None:
                    model.orphaning[id(replaced)] = model.orphaning.get(id(replaced), 0) + 1
                try:
                    await fs.rename(await _lookup(fs, head) if head else ROOT_INODE, name,
                                    await _lookup(fs, new_head) if new_head else ROOT_INODE,
                                    new_name, 0, None)
                except pyfuse3.FUSEError as exc:
                    model.differ(f"rename {path} {to}: {errno.errorcode[exc.errno]}")
                else:
                    model.tick()
                    model.files[to] = model.files.pop(path)
                finally:
                    if replaced is not None:
                        model.orphaning[id(replaced)] -= 1

    async def unlink(self, path: str) -> None:
        fs, model = self.fs, self.model
        head, name = _parent(path)
        async with self.locked(head):
            inode = await _lookup(fs, path)
            file = self._found(path, inode)
            if file is None:
                return
            async with self.locked(inode):
                model.orphaning[id(file)] = model.orphaning.get(id(file), 0) + 1
                try:
                    await fs.unlink(await _lookup(fs, head) if head else ROOT_INODE, name, None)
                except pyfuse3.FUSEError as exc:
                    model.differ(f"unlink {path}: {errno.errorcode[exc.errno]}")
                else:
                    model.tick()
                    del model.files[path]
                finally:
                    model.orphaning[id(file)] -= 1

    async def read(self, path: str) -> None:
        fs, model = self.fs, self.model
        inode = await _lookup(fs, path)
        file = self._found(path, inode)
        if file is None:
            return
        since = model.clock
        try:
            info = await fs.open(inode, os.O_RDONLY, None)
        except pyfuse3.FUSEError as exc:
            model.differ(f"read {path}: open failed with {errno.errorcode[exc.errno]}")
            return
        data = await fs.read(info.fh, 0, 1 << 20)
        if not file.held(_value(data), since):
            model.differ(f"read {path}: {data!r} is no version it held since the open "
                         f"({[v for v, _a, _u in file.versions]})")
        await fs.flush(info.fh)
        self.releases.start_soon(self._release, info.fh)

    async def process(self, pid: int, program) -> None:
        for op in program:
            kind = op[0]
            if kind in FLAGS:
                await self.write(pid, *op)
            else:
                await getattr(self, kind)(*op[1:])


def _live(world) -> dict[tuple[str, bool], list[dict]]:
    """The agent's live blocks by (label, attached): attached, or detached and owned."""
    attached = set(world.fake.agents[world.agent])
    owner = f"owner:{world.agent}"
    live: dict[tuple[str, bool], list[dict]] = {}
    for block in world.fake.blocks.values():
        if block["id"] in attached or owner in block["tags"]:
            live.setdefault((block["label"], block["id"] in attached), []).append(block)
    return live


def _where(path: str) -> tuple[str, bool]:
    attached = path.startswith("system/")
    return path.removeprefix("system/")[:-3], attached


def check(world, model: Model) -> None:
    """The checks after a sequence (see the module docstring); differences go to the model."""
    files = world.state.tree.files()
    for path in PATHS:
        mine, theirs = model.files.get(path), files.get(path)
        if (mine is None) != (theirs is None):
            model.differ(f"end: {path} is {'in' if theirs is not None else 'not in'} the mount "
                         f"but {'in' if mine is not None else 'not in'} the model")
        elif mine is not None and _value(theirs) != mine.value:
            model.differ(f"end: {path} shows {_value(theirs)!r}, the model {mine.value!r}")
    for path, content in world.loaded.items():
        if path not in PATHS and files.get(path) != content:
            model.differ(f"end: {path}, never touched, changed")
    live = _live(world)
    wanted = {_where(p): p for p in files}
    for where, blocks in live.items():
        if where not in wanted:
            model.differ(f"end: live block(s) {[b['id'] for b in blocks]} labelled {where} "
                         f"have no file")
        elif len(blocks) != 1:
            model.differ(f"end: {len(blocks)} live blocks for {wanted[where]}")
    for where, path in wanted.items():
        blocks = live.get(where, [])
        if not blocks:
            model.differ(f"end: {path} has no live block")
        elif path in model.files and blocks[0]["value"] != model.files[path].value:
            model.differ(f"end: the server holds {blocks[0]['value']!r} for {path}, the model "
                         f"{model.files[path].value!r}")
    history = {_value(c) for _p, c, _o in world.records if c is not None}
    for path, _file, value in model.acked:
        if value not in history:
            model.differ(f"history lacks {value!r}, acknowledged at {path}")
    if world.fs.faults.count:
        model.differ(f"the safe boundary caught {world.fs.faults.count} bug(s)")


async def scenario(programs, latency: float, rng_seed: int) -> list[str]:
    async with trio.open_nursery() as nursery:
        world = await make_world(nursery)
        world.fake.random_latency = (random.Random(rng_seed), latency)
        model = Model(world.loaded)
        try:
            async with trio.open_nursery() as releases:
                run = Run(world, model, releases)
                async with trio.open_nursery() as processes:
                    for pid, program in enumerate(programs):
                        processes.start_soon(run.process, pid, program)
            await trio.sleep(5)  # every grace period ends: unlinked blocks are retired
            check(world, model)
            if not model.differences:
                check_invariants(world)
        finally:
            await world.client.aclose()
            nursery.cancel_scope.cancel()
    return model.differences


_settings = settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
                     phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                     suppress_health_check=list(HealthCheck))


def _seeded(test):
    return seed(int(SEED))(test) if SEED else test


@_seeded
@_settings
@given(PROGRAMS, LATENCY, st.integers(0, 1 << 30))
def test_concurrent_programs_leave_what_posix_leaves(programs, latency, rng_seed):
    differences = trio.run(scenario, programs, latency, rng_seed,
                           clock=MockClock(autojump_threshold=0))
    assert not differences, "\n".join(differences)
