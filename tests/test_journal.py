"""The journal's file on a disk that fills up or tears: an append adds whole records or nothing,
ENOSPC reaches the program as ENOSPC, a record that cannot be read is logged and kept aside
(never dropped without a word), and a journal an older memfuse wrote still replays.

The fault-injected tests run anywhere; the real-disk ones mount a small tmpfs (root only: they
fail, never skip, without it)."""
import base64
import errno
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pyfuse3
import pytest
import trio

from memfuse.config import Config
from memfuse.daemon import MountError, serve
from memfuse.errors import FsError
from memfuse.journal import Journal
from memfuse.model import Block
from memfuse.state import MountState
from memfuse.tree import Tree

from .fakeletta import FakeLetta
from .fsworld import make_world, read_all
from .test_offline import write

BLOCK = Block("block-1", "human", "v1", 100, "desc")


class FullDisk:
    """os.write and os.pwrite on the journal file (and no other) as a disk with `room` bytes
    left: a write gets what fits (a short write), then OSError(`code`) once nothing does."""

    def __init__(self, monkeypatch, journal_path: Path, room: int, code: int = errno.ENOSPC):
        self.path, self.room, self.code = os.path.realpath(journal_path), room, code
        self._write, self._pwrite = os.write, os.pwrite
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(os, "pwrite", self.pwrite)

    def _ours(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}") == self.path
        except OSError:
            return False

    def _take(self, data) -> bytes:
        if self.room <= 0:
            raise OSError(self.code, os.strerror(self.code))
        part = bytes(data[:self.room])
        self.room -= len(part)
        return part

    def write(self, fd, data):
        return self._write(fd, self._take(data) if self._ours(fd) else data)

    def pwrite(self, fd, data, offset):
        return self._pwrite(fd, self._take(data) if self._ours(fd) else data, offset)


def aside(journal_path: Path) -> list[Path]:
    return sorted(journal_path.parent.glob(journal_path.name + ".corrupt-*"))


def test_an_append_that_fails_midway_leaves_the_journal_as_it_was(tmp_path, monkeypatch,
                                                                  caplog):
    journal = Journal(tmp_path / "memory.journal")
    journal.add(BLOCK, "system/human.md", b"first", BLOCK)
    before = journal.path.read_bytes()
    disk = FullDisk(monkeypatch, journal.path, room=40)  # part of the next record fits
    with pytest.raises(OSError) as refused:
        journal.add(BLOCK, "system/human.md", b"x" * 500, BLOCK)
    assert refused.value.errno == errno.ENOSPC
    assert disk.room == 0  # a partial record was written before the disk was full...
    assert journal.path.read_bytes() == before  # ...and cut back: the file is as it was
    assert [e.content for e in journal.pending()] == [b"first"]
    disk.room = 1 << 20  # space is freed
    journal.add(BLOCK, "system/human.md", b"acknowledged", BLOCK)
    reopened = Journal(journal.path)
    assert [(e.seq, e.content) for e in reopened.pending()] == [(1, b"first"),
                                                                (2, b"acknowledged")]
    assert aside(journal.path) == []
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


def test_a_failed_fsync_cuts_the_append_back_too(tmp_path, monkeypatch):
    journal = Journal(tmp_path / "memory.journal")
    journal.add(BLOCK, "system/human.md", b"first", BLOCK)
    before = journal.path.read_bytes()
    real_fsync = os.fsync
    fails = [OSError(errno.EIO, "Input/output error")]

    def fsync(fd):
        if fails:
            raise fails.pop()
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        journal.add(BLOCK, "system/human.md", b"second", BLOCK)
    assert journal.path.read_bytes() == before
    journal.add(BLOCK, "system/human.md", b"third", BLOCK)
    assert [(e.seq, e.content) for e in Journal(journal.path).pending()] == [(1, b"first"),
                                                                           (2, b"third")]


async def test_a_journal_the_disk_refuses_is_that_errno_for_the_program(world, monkeypatch):
    world.fake.down = True
    human = await read_all(world.fs, "system/human.md")
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
        with monkeypatch.context() as patch:
            FullDisk(patch, world.journal.path, room=10, code=code)
            with pytest.raises(pyfuse3.FUSEError) as refused:
                await write(world, "system/human.md", b"Not kept: the disk is full.\n")
        assert refused.value.errno == code  # ENOSPC and EDQUOT as they are, anything else EIO
        assert await read_all(world.fs, "system/human.md") == human  # nothing changed
        assert world.journal.pending() == [] and Journal(world.journal.path).pending() == []
        assert world.journal.path.read_bytes() == b""


def test_journal_errors_name_the_disk_and_the_path(tmp_path):
    state = MountState(Tree(gitfile=b"gitdir: /x\n"), lambda *change: None,
                       journal=Journal(tmp_path / "memory.journal"))

    def refuse(code):
        def append():
            raise OSError(code, os.strerror(code))
        with pytest.raises(FsError) as refused:
            state._journal(append)
        return refused.value

    full = refuse(errno.ENOSPC)
    assert full.errno == errno.ENOSPC and "is full" in full.reason
    assert str(tmp_path / "memory.journal") in full.reason
    assert refuse(errno.EDQUOT).errno == errno.EDQUOT
    assert refuse(errno.EROFS).errno == errno.EIO


@pytest.mark.expect_error("1 record(s) cannot be read")
def test_a_damaged_record_is_an_error_and_kept_aside_never_dropped(tmp_path, caplog):
    journal = Journal(tmp_path / "memory.journal")
    journal.add(BLOCK, "system/human.md", b"first", BLOCK)
    journal.add(BLOCK, "system/human.md", b"second", BLOCK)
    journal.add(BLOCK, "system/human.md", b"third", BLOCK)
    lines = journal.path.read_bytes().splitlines(keepends=True)
    damaged = lines[1].replace(base64.b64encode(b"second"), base64.b64encode(b"sEcond"))
    assert damaged != lines[1]  # still JSON, but not the bytes that were acknowledged
    journal.path.write_bytes(lines[0] + damaged + lines[2])
    reopened = Journal(journal.path)
    assert [e.content for e in reopened.pending()] == [b"first", b"third"]
    [kept] = aside(journal.path)
    assert kept.read_bytes() == damaged  # kept aside, byte for byte
    assert oct(kept.stat().st_mode & 0o777) == "0o600"
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "1 record(s) cannot be read" in error.getMessage() and str(kept) in error.getMessage()
    assert [e.content for e in Journal(journal.path).pending()] == [b"first", b"third"]
    assert len(aside(journal.path)) == 1  # the journal was rewritten without it: once only
    reopened.add(BLOCK, "system/human.md", b"fourth", BLOCK)
    assert [e.content for e in Journal(journal.path).pending()] == [b"first", b"third",
                                                                   b"fourth"]


@pytest.mark.expect_error("2 record(s) cannot be read")
def test_a_line_that_is_not_a_record_is_an_error_and_kept_aside(tmp_path, caplog):
    journal = Journal(tmp_path / "memory.journal")
    journal.add(BLOCK, "system/human.md", b"first", BLOCK)
    with open(journal.path, "ab") as f:
        f.write(b'{"seq": 2, "kind": "write", "bl\n')  # cut, with a newline: not a crash's
        f.write(b"\x00\x00\x00\x00\n")  # a block of zeros (a lost page after a power cut)
    reopened = Journal(journal.path)
    assert [e.content for e in reopened.pending()] == [b"first"]
    reopened.add(BLOCK, "system/human.md", b"third", BLOCK)
    assert [e.content for e in Journal(journal.path).pending()] == [b"first", b"third"]
    [kept] = aside(journal.path)
    assert kept.read_bytes() == b'{"seq": 2, "kind": "write", "bl\n\x00\x00\x00\x00\n'
    assert any("2 record(s) cannot be read" in r.getMessage() for r in caplog.records
               if r.levelname == "ERROR")


def test_a_line_a_crash_cut_short_is_a_warning_and_kept_aside(tmp_path, caplog):
    journal = Journal(tmp_path / "memory.journal")
    journal.add(BLOCK, "system/human.md", b"first", BLOCK)
    with open(journal.path, "ab") as f:
        f.write(b'0badc0de {"seq": 2, "kind": "wri')  # kill -9 in the middle of an append
    reopened = Journal(journal.path)
    assert [e.content for e in reopened.pending()] == [b"first"]
    [kept] = aside(journal.path)
    assert kept.read_bytes() == b'0badc0de {"seq": 2, "kind": "wri'
    assert any("cut short" in r.getMessage() and str(kept) in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    reopened.add(BLOCK, "system/human.md", b"second", BLOCK)  # on a line of its own
    assert [e.content for e in Journal(journal.path).pending()] == [b"first", b"second"]


def legacy_line(item: dict) -> str:
    """A record exactly as memfuse wrote it before records carried a checksum."""
    return json.dumps(item) + "\n"


def server_base(world, name: str) -> dict:
    block = world.fake.blocks[world.ids[name]]
    return {"value": block["value"], "description": block["description"],
            "limit": block["limit"]}


async def test_a_journal_in_the_format_before_checksums_replays_after_the_upgrade(nursery,
                                                                                  caplog):
    old = await make_world(nursery)
    human, notes = "system/human.md", "notes.md"
    at = 1.7e9
    lines = [
        legacy_line({"seq": 1, "kind": "write", "block": old.ids["persona"],
                     "path": "system/persona.md", "at": at,
                     "content": base64.b64encode(b"Sent before.").decode(),
                     "base": server_base(old, "persona")}),
        legacy_line({"done": 1, "outcome": "sent"}),
        legacy_line({"seq": 2, "kind": "write", "block": old.ids["human"], "path": human,
                     "at": at, "content": base64.b64encode(b"Journaled by the old one.\n")
                     .decode(), "base": server_base(old, "human")}),
        legacy_line({"seq": 3, "kind": "create", "block": "local-0123", "path": "new.md",
                     "at": at, "content": base64.b64encode(b"A new block.\n").decode(),
                     "to": {"label": "new", "attached": False}}),
        legacy_line({"seq": 4, "kind": "relocate", "block": old.ids["notes"], "path": notes,
                     "at": at, "from": {"label": "notes", "attached": False},
                     "to": {"label": "kept/notes", "attached": False}}),
    ]
    # today's memfuse on a full disk: the fragment of a failed append, then the next
    # acknowledged record glued to it (the old loader dropped that line without a word)
    glued = legacy_line({"seq": 5, "kind": "write", "block": old.ids["policy"],
                         "path": "system/projects/policy.md", "at": at,
                         "content": base64.b64encode(b"x").decode(),
                         "base": server_base(old, "policy")})[:37] + legacy_line(
        {"seq": 5, "kind": "write", "block": old.ids["human"], "path": human, "at": at,
         "content": base64.b64encode(b"Acknowledged after the disk was freed.\n").decode(),
         "base": server_base(old, "human")})
    old.journal.path.write_text("".join(lines) + glued)
    upgraded = await make_world(nursery, after=old)
    assert [(e.seq, e.kind) for e in upgraded.journal.pending()] == [
        (2, "write"), (3, "create"), (4, "relocate"), (5, "write")]
    assert await read_all(upgraded.fs, human) == (
        b"---\ndescription: desc\nlimit: 20000\n---\nAcknowledged after the disk was freed.\n")
    assert any("found behind the fragment" in r.getMessage() for r in caplog.records)
    assert await upgraded.replayer.replay()
    assert old.fake.blocks[old.ids["human"]]["value"] == (
        "Acknowledged after the disk was freed.\n")
    assert old.fake.blocks[old.ids["notes"]]["label"] == "kept/notes"
    assert [b["value"] for b in old.fake.by_label("new")] == ["A new block.\n"]
    assert old.fake.blocks[old.ids["policy"]]["value"] == "Rules."  # the fragment: not sent
    assert upgraded.journal.pending() == []


def test_records_are_written_with_a_checksum_and_both_formats_are_read():
    from memfuse.journal import encode, read_records  # the format is journal.py's
    item = {"seq": 1, "kind": "unlink", "block": "block-1", "path": "a.md", "at": 1.0,
            "from": {"label": "a", "attached": False}}
    line = encode(item)
    assert line.endswith(b"\n") and line[8:9] == b" " and json.loads(line[9:]) == item
    items, bad, fragments, torn = read_records(line + legacy_line(item).encode())
    assert items == [item, item] and bad == fragments == [] and torn == b""


# -- a real disk that fills up: a small tmpfs (needs root) ---------------------------------------

def tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(path)], capture_output=True, text=True)
    assert done.returncode == 0, f"cannot mount a tmpfs at {path} (root needed): {done.stderr}"


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the file system of the directory `path` with a file, then free `leave` bytes of
    it; returns the filler."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


@pytest.fixture
def small_disk():
    """A 1 MiB tmpfs on a temporary directory, unmounted after the test."""
    path = Path(tempfile.mkdtemp(prefix="memfuse-small-disk-"))
    tmpfs(path, "1m")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)
    path.rmdir()


def test_on_a_full_tmpfs_an_append_is_enospc_and_the_journal_stays_whole(small_disk):
    journal = Journal(small_disk / "memory.journal")
    journal.add(BLOCK, "system/human.md", b"first", BLOCK)
    before = journal.path.read_bytes()
    filler = fill(small_disk, leave=4096)  # one page left: a big record starts, then ENOSPC
    state = MountState(Tree(gitfile=b"gitdir: /x\n"), lambda *change: None, journal=journal)
    with pytest.raises(FsError) as refused:
        state.journal_write(BLOCK, "system/human.md", b"y" * 65536, BLOCK)
    assert refused.value.errno == errno.ENOSPC and str(journal.path) in refused.value.reason
    assert journal.path.read_bytes() == before
    with pytest.raises(OSError) as full:  # the disk is still full: again nothing is torn
        journal.add(BLOCK, "system/human.md", b"z" * 65536, BLOCK)
    assert full.value.errno == errno.ENOSPC and journal.path.read_bytes() == before
    filler.unlink()  # space is freed
    state.journal_write(BLOCK, "system/human.md", b"acknowledged", BLOCK)
    assert [(e.seq, e.content) for e in Journal(journal.path).pending()] == [
        (1, b"first"), (2, b"acknowledged")]
    assert aside(journal.path) == []


@pytest.mark.expect_error("could not be kept aside")
def test_a_torn_line_a_full_disk_cannot_keep_aside_at_mount_is_kept_at_the_next_append(
        small_disk, caplog):
    journal = Journal(small_disk / "memory.journal")
    journal.add(BLOCK, "system/human.md", b"first", BLOCK)
    whole = journal.path.read_bytes()
    with open(journal.path, "ab") as f:
        f.write(b'0badc0de {"seq": 2, "kind": "wri')  # kill -9 in the middle of an append
    torn = journal.path.read_bytes()
    filler = fill(small_disk)
    reopened = Journal(journal.path)  # a mount on the full disk
    assert [e.content for e in reopened.pending()] == [b"first"]
    assert journal.path.read_bytes() == torn and aside(journal.path) == []  # left as it was
    assert any("could not be kept aside" in r.getMessage() for r in caplog.records
               if r.levelname == "ERROR")
    with pytest.raises(OSError) as full:  # still full: the torn line stays, nothing is added
        reopened.add(BLOCK, "system/human.md", b"y" * 8192, BLOCK)
    assert full.value.errno == errno.ENOSPC and journal.path.read_bytes() == torn
    filler.unlink()
    reopened.add(BLOCK, "system/human.md", b"second", BLOCK)
    [kept] = aside(journal.path)  # kept aside now that there is room, then cut off
    assert kept.read_bytes() == b'0badc0de {"seq": 2, "kind": "wri'
    assert journal.path.read_bytes().startswith(whole)
    assert [e.content for e in Journal(journal.path).pending()] == [b"first", b"second"]
    assert len(aside(journal.path)) == 1


def test_bytes_that_cannot_be_kept_aside_stay_and_the_next_record_starts_a_line(
        small_disk, caplog):
    from memfuse.journal import read_records
    journal = Journal(small_disk / "memory.journal")
    journal.add(BLOCK, "system/human.md", b"first", BLOCK)
    journal.path.write_bytes(journal.path.read_bytes() + b"left by a failed cut")
    fill(small_disk)  # no page for a new file; the journal's own last page still has room
    journal.add(BLOCK, "system/human.md", b"second", BLOCK)
    assert any("cannot be kept aside" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING")
    journal.add(BLOCK, "system/human.md", b"third", BLOCK)
    items, bad, fragments, torn = read_records(journal.path.read_bytes())
    assert [base64.b64decode(i["content"]) for i in items] == [b"first", b"second", b"third"]
    assert bad == [b"left by a failed cut\n"] and fragments == [] and torn == b""


@pytest.mark.expect_error("could not be cut back")
def test_a_failed_append_whose_cut_fails_too_is_cut_at_the_next_append(tmp_path, monkeypatch,
                                                                        caplog):
    journal = Journal(tmp_path / "memory.journal")
    journal.add(BLOCK, "system/human.md", b"first", BLOCK)
    before = journal.path.read_bytes()
    with monkeypatch.context() as patch:
        FullDisk(patch, journal.path, room=30)

        def ftruncate(fd, length):
            raise OSError(errno.EIO, "Input/output error")

        patch.setattr(os, "ftruncate", ftruncate)
        with pytest.raises(OSError):
            journal.add(BLOCK, "system/human.md", b"x" * 100, BLOCK)
    assert len(journal.path.read_bytes()) == len(before) + 30  # the fragment stayed...
    journal.add(BLOCK, "system/human.md", b"second", BLOCK)  # ...and is cut before this one
    assert journal.path.read_bytes().startswith(before)
    assert [e.content for e in Journal(journal.path).pending()] == [b"first", b"second"]
    [kept] = aside(journal.path)
    assert len(kept.read_bytes()) == 30
    assert any("kept in" in r.getMessage() and "cut off" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")


@pytest.fixture
def full_home(monkeypatch):
    """HOME on a 2 MiB tmpfs, unmounted after the test (after any FUSE mount below it)."""
    home = Path(tempfile.mkdtemp(prefix="memfuse-full-home-"))
    tmpfs(home, "2m")
    monkeypatch.setenv("HOME", str(home))
    yield home
    subprocess.run(["umount", "-R", "-l", str(home)], check=True)
    home.rmdir()


async def serve_once(config: Config, fake: FakeLetta) -> list:
    """Start the daemon in this process; stop it once it is mounted. Its reports to on_ready."""
    reports, ready = [], trio.Event()

    def on_ready(error):
        reports.append(error)
        ready.set()

    async def run():
        try:
            await serve(config, on_ready, transport=fake.transport())
        except MountError:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await ready.wait()
        nursery.cancel_scope.cancel()
    return reports


@pytest.mark.real_clock  # pyfuse3's loop serves real syscalls from worker threads
@pytest.mark.parametrize("mounted_before", [False, True])
async def test_a_mount_on_a_full_disk_says_the_disk_is_full(full_home, mounted_before):
    fake = FakeLetta()
    agent = fake.add_agent()
    fake.add_block("human", "The human.\n", agent=agent)
    config = Config.build(agent, base_url="http://letta.test", quiet_period=0.05,
                          poll_interval=0.05, full_poll_interval=0.05, retry_budget=0.2)
    if mounted_before:
        assert await serve_once(config, fake) == [None]
    fill(full_home)
    [error] = await serve_once(config, fake)
    assert error is not None and "is full (No space left on device)" in error, error
    assert str(full_home) in error, error  # the path of the full disk
