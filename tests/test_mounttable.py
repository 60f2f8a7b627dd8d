"""Finding a mount by its path without a server: the kernel's mount table (escapes, stacked
mounts, owners), which pids are memfuse daemons, and what `umount`/`status` do with a mount the
table shows but this HOME has no record of (the real two-user mounts: integration test_owner)."""
import os
import threading
from pathlib import Path

import pytest

from memfuse import cli, daemon, mounttable, procs
from memfuse.config import RunningMount

from .test_cli import daemon_like, home, live_pid  # noqa: F401 (fixtures)

TABLE = (
    b"22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    b"27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n"
    b"46 27 0:41 / /home/ada/my\\040memory\\011tab\\134back rw,nosuid,nodev,relatime shared:7 "
    b"master:2 - fuse.memfuse memfuse rw,user_id=1000,group_id=1000\n"
    b"47 27 0:42 / /srv/caf\\303\\251 rw - fuse.memfuse memfuse rw,user_id=0,group_id=0\n"
    b"not a mountinfo line\n"
    b"48 27 0:43 / /srv/stacked rw - tmpfs tmpfs rw,size=4k\n"
    b"49 48 0:44 / /srv/stacked rw - fuse.memfuse memfuse rw,user_id=7,group_id=7\n"
)


def test_mountinfo_paths_are_unescaped_and_owners_read():
    table = mounttable.parse(TABLE)
    assert [m.mountpoint for m in table] == [
        "/proc", "/", "/home/ada/my memory\ttab\\back", "/srv/café", "/srv/stacked",
        "/srv/stacked"]  # the line that does not parse is skipped
    ada = table[2]
    assert (ada.fstype, ada.source, ada.is_memfuse, ada.owner_uid) == (
        "fuse.memfuse", "memfuse", True, 1000)
    assert ada.options == {"rw": "", "user_id": "1000", "group_id": "1000"}
    assert table[1].owner_uid is None and not table[1].is_memfuse  # not FUSE: no owner
    assert mounttable.unescape(b"a\\012b\\377") == "a\nb" + os.fsdecode(b"\xff")


def test_the_mount_on_top_at_a_path_is_found_through_a_symlinked_parent(tmp_path):
    table = mounttable.parse(TABLE)
    assert mounttable.mount_at(mounttable.Path("/srv/stacked"), table).owner_uid == 7
    assert mounttable.mount_at(mounttable.Path("/home/ada/my memory\ttab\\back"),
                               table).owner_uid == 1000
    assert mounttable.mount_at(mounttable.Path("/home/ada"), table) is None
    real = tmp_path / "real"
    (real / "mnt").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    line = f"50 27 0:45 / {real}/mnt rw - fuse.memfuse memfuse rw,user_id=5\n".encode()
    via_link = mounttable.mount_at(tmp_path / "link" / "mnt", mounttable.parse(line))
    assert via_link is not None and via_link.owner_uid == 5


@pytest.mark.parametrize("argv, daemon_", [
    (["/usr/bin/python3", "/home/ada/.local/bin/memfuse", "mount", "agent-1", "--foreground"],
     True),  # the console script through its interpreter: systemd's ExecStart
    (["/usr/bin/python3", "-m", "memfuse.cli", "mount", "agent-1", "/m", "--foreground",
      "--ready-fd", "5"], True),  # what `memfuse mount` starts
    (["/usr/bin/python3", "/usr/bin/memfuse", "mount", "agent-1"], False),  # the launcher
    (["memfuse", "umount", "/m"], False),
    (["/usr/bin/python3", "-m", "pytest", "mount", "--foreground"], False),
    (["vim", "memfuse.cli"], False), ([], False),
])
def test_a_memfuse_daemon_is_told_by_its_command_line(argv, daemon_):
    assert procs.is_daemon_argv(argv) is daemon_


def test_a_pid_taken_by_another_program_is_not_a_live_daemon(tmp_path, live_pid):
    # a daemon killed -9 leaves its pid file; the pid may then be any program's (here pytest's)
    record = RunningMount("agent-1", str(tmp_path / "memory"), os.getpid(), "http://x",
                          str(tmp_path / "memfuse.log"))
    assert not record.alive()
    record.pid = live_pid
    assert record.alive()
    assert procs.daemons(os.getuid()).count(live_pid) == 1


@pytest.fixture
def table(tmp_path, monkeypatch):
    """Points the mount table at a file the test writes (`write(line, ...)`), and records
    every command run, so a lazy unmount would be seen."""
    path = tmp_path / "mountinfo"
    path.write_bytes(b"")
    monkeypatch.setattr(mounttable, "MOUNTINFO", path)
    ran = []
    monkeypatch.setattr(daemon.subprocess, "run", lambda argv, **kw: ran.append(argv))

    def write(mountpoint, fstype="fuse.memfuse", uid=os.getuid()):
        escaped = str(mountpoint).replace("\\", "\\134").replace(" ", "\\040")
        path.write_text(f"60 27 0:50 / {escaped} rw - {fstype} memfuse rw,user_id={uid}\n")
    write.ran = ran
    return write


def test_a_mount_of_another_user_is_refused_naming_its_owner(home, table, monkeypatch,
                                                               capsys):
    mountpoint = home / "theirs" / "my memory"
    mountpoint.mkdir(parents=True)
    table(mountpoint, uid=0)
    monkeypatch.setattr(os, "getuid", lambda: 4242)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    assert cli.main(["umount", str(mountpoint)]) == 1
    assert (f"{mountpoint} is mounted by root (uid 0); only root can unmount it"
            in capsys.readouterr().err)
    assert cli.main(["status", str(mountpoint)]) == 1
    out = capsys.readouterr().out
    assert f"{mountpoint} is a memfuse mount of root (uid 0)" in out
    assert "cannot be read here" in out and "gone" not in out
    assert table.ran == []  # no fusermount3, lazy or not


def test_a_mount_that_answers_without_a_record_here_is_left_alone(home, table, capsys):
    mountpoint = home / "elsewhere" / "memory"  # its lstat answers: a daemon serves it
    mountpoint.mkdir(parents=True)
    table(mountpoint)
    assert cli.main(["umount", str(mountpoint)]) == 1
    err = capsys.readouterr().err
    assert f"{mountpoint} is served by a live memfuse daemon that no pid file names" in err
    assert cli.main(["status", str(mountpoint)]) == 1
    out = capsys.readouterr().out
    assert "served by a live memfuse daemon" in out and "gone" not in out
    assert table.ran == []


def test_a_mount_that_is_not_memfuse_is_left_alone(home, table, capsys):
    table(home, fstype="tmpfs")
    assert cli.main(["umount", str(home)]) == 1
    assert f"{home} is a tmpfs mount, not a memfuse one; left alone" in capsys.readouterr().err
    assert table.ran == []


def _running(pid: int) -> bool:
    """Whether `pid` still runs: it exists and is not a zombie (an ended process stays in /proc
    until its parent, here the reaper thread, reaps it, which may come just after umount)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_a_record_beside_the_mountpoint_under_another_home_is_found(home, table, capsys,
                                                                    tmp_path):
    other = tmp_path / "other-home" / ".letta/agents/agent-1"
    (other / "memory").mkdir(parents=True)
    daemon_ = daemon_like()
    reaper = threading.Thread(target=daemon_.wait)  # reaped once it ends, as init would
    reaper.start()
    try:
        RunningMount("agent-1", str(other / "memory"), daemon_.pid, "http://x",
                     str(other / "memfuse.log")).save(other / "memfuse.pid")
        table(other / "memory")
        assert cli.main(["status", str(other / "memory")]) == 0  # HOME is `home`, not other's
        assert f"agent agent-1 at {other / 'memory'} (pid {daemon_.pid}): starting" in (
            capsys.readouterr().out)
        assert cli.main(["umount", str(other / "memory"), "--timeout", "60"]) == 0
        assert not _running(daemon_.pid)  # umount waited until it ended (a zombie, or reaped)
        reaper.join(30)  # the reaper sets returncode once its waitpid reaped it
        assert daemon_.returncode == -15  # SIGTERM
    finally:
        daemon_.kill()
        reaper.join()
        daemon_.stdin.close()
        daemon_.stdout.close()
    assert f"memfuse: unmounted {other / 'memory'}" in capsys.readouterr().out
    assert not (other / "memfuse.pid").exists()
    assert table.ran == []  # its mount answers (the fake one is a directory): not cleared
