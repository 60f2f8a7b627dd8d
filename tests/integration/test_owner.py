"""`memfuse umount PATH` and `memfuse status PATH` of a real mount made by someone else: another
user (root's mount seen by an unprivileged user, a user's mount seen by root) or the same user
under another HOME. The mount is found by its path in the kernel's table, never lazily
unmounted behind a live daemon, and its daemon reported truthfully.

These tests run as root: they mount as, or run memfuse as, the unprivileged user `memfuse-test`
(created when missing). A FUSE mount by that user needs /dev/fuse, which this machine may keep
to root (mode 0600, where Debian's udev gives 0666): it is then opened to that one user with an
ACL entry, which is left in place (the next run needs it too).
"""
from __future__ import annotations

import os
import pwd
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from memfuse.config import RunningMount

from .conftest import MEMFUSE, Mount

pytestmark = pytest.mark.integration

USER = "memfuse-test"


@pytest.fixture(scope="session")
def user() -> pwd.struct_passwd:
    """The unprivileged test user, created when missing (a system user without a home)."""
    if os.geteuid() != 0:
        pytest.fail("the two-user tests run as root: they act as the unprivileged user "
                    f"{USER} (run scripts/test as root)")
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", USER], check=True, capture_output=True)
        return pwd.getpwnam(USER)


def run_as(user: pwd.struct_passwd, env: dict, *argv: str) -> subprocess.CompletedProcess:
    """`argv` run as `user` (no supplementary groups) with `env`."""
    return subprocess.run(list(argv), env=env, capture_output=True, text=True,
                          timeout=240, user=user.pw_uid, group=user.pw_gid, extra_groups=[])


@pytest.fixture
def user_env(user, home):
    """The test's environment (its server) with HOME a fresh directory `user` owns."""
    path = Path(tempfile.mkdtemp(prefix="memfuse-test-home-", dir="/tmp"))
    os.chown(path, user.pw_uid, user.pw_gid)
    yield dict(home, HOME=str(path), USER=USER, LOGNAME=USER)
    shutil.rmtree(path, ignore_errors=True)


def _can_open_dev_fuse(user) -> bool:
    return run_as(user, {"PATH": os.environ["PATH"]}, "sh", "-c",
                  "exec 3<>/dev/fuse").returncode == 0


@pytest.fixture(scope="session")
def fuse_for_user(user):
    """/dev/fuse usable by `user`: an ACL entry giving it read-write when the mode does not
    (the posix_acl_access xattr: version 2, then (tag, perm, id) entries; a mode of 0600 keeps
    its owner, group and other bits)."""
    if not _can_open_dev_fuse(user):
        mode = os.stat("/dev/fuse").st_mode

        def entry(tag: int, perm: int, uid: int = 0xFFFFFFFF) -> bytes:
            return struct.pack("<HHI", tag, perm, uid)

        acl = struct.pack("<I", 2) + b"".join([
            entry(0x01, (mode >> 6) & 7),          # owner
            entry(0x02, 6, user.pw_uid),           # the test user: rw
            entry(0x04, (mode >> 3) & 7),          # owning group
            entry(0x10, 6),                        # mask
            entry(0x20, mode & 7)])                # other
        os.setxattr("/dev/fuse", "system.posix_acl_access", acl)
    if not _can_open_dev_fuse(user):
        pytest.fail(f"{USER} cannot open /dev/fuse, even with an ACL entry: a FUSE mount by a "
                    f"user other than root is impossible on this machine")


@pytest.fixture
def user_mount(agent, user, user_env, fuse_for_user):
    """`agent` mounted by the test user at its default mountpoint under its own HOME."""
    state = Path(user_env["HOME"]) / ".letta" / "agents" / agent
    m = Mount(agent, state / "memory", user_env, state)
    result = run_as(user, user_env, MEMFUSE, "mount", agent)
    assert result.returncode == 0, result.stderr
    yield m
    # os.path.ismount cannot see it as root (FUSE refuses every other user): the kernel's table
    if is_mounted(m.path):
        result = run_as(user, user_env, MEMFUSE, "umount", agent)
        if is_mounted(m.path):
            subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False)
            pytest.fail(f"the test user's mount outlived the test: {result.stderr}")


def is_mounted(path: Path) -> bool:
    """Whether the kernel's table has a mount at `path` (a path with no character mountinfo
    escapes). As root, os.path.ismount cannot see a user's FUSE mount: FUSE refuses root."""
    table = Path("/proc/self/mountinfo").read_text().splitlines()
    return any(line.split(" ")[4] == str(path) for line in table)


def running(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie, its command line empty, is not)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() != b""
    except FileNotFoundError:
        return False


def daemon_of(m: Mount) -> RunningMount:
    record = RunningMount.load(m.state / "memfuse.pid")
    assert record is not None, f"no pid file in {m.state}"
    return record


def last_commit(user: pwd.struct_passwd | None, m: Mount) -> str:
    """The subject of the history's last commit, read as the history's owner (git refuses a
    repository another user owns)."""
    argv = ["git", f"--git-dir={m.state / 'memory.git'}", "log", "--format=%s", "-1"]
    result = (run_as(user, m.env, *argv) if user is not None
              else subprocess.run(argv, capture_output=True, text=True, env=m.env))
    return result.stdout.strip()


def test_a_user_can_neither_unmount_nor_read_roots_mount(mount, user, user_env):
    daemon = daemon_of(mount)
    result = run_as(user, user_env, MEMFUSE, "umount", str(mount.path))
    assert result.returncode == 1, result.stdout
    assert f"{mount.path} is mounted by root (uid 0); only root can unmount it" in result.stderr
    assert "unmounted" not in result.stdout
    result = run_as(user, user_env, MEMFUSE, "status", str(mount.path))
    assert result.returncode == 1
    assert f"{mount.path} is a memfuse mount of root (uid 0)" in result.stdout
    assert "cannot be read here" in result.stdout and "gone" not in result.stdout
    # untouched: the same daemon serves the same mount
    assert os.path.ismount(mount.path) and daemon_of(mount).pid == daemon.pid
    assert running(daemon.pid)
    assert mount.sh("cat system/human.md").stdout.endswith("The human.\n")


def test_root_reads_the_status_of_a_users_mount_and_unmounts_it_through_its_daemon(
        user_mount, user, home):
    daemon = daemon_of(user_mount)  # root's HOME (`home`) has no record of it
    result = subprocess.run([MEMFUSE, "status", str(user_mount.path)], env=home,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
    assert (f"agent {user_mount.agent_id} mounted at {user_mount.path} (pid {daemon.pid})"
            in result.stdout)
    assert f"mounted by     {USER} (uid {user.pw_uid})" in result.stdout
    written = run_as(user, user_mount.env, "sh", "-c",  # cd as the user: FUSE refuses root
                     'cd "$1" && echo "Last words." > system/human.md', "sh", str(user_mount.path))
    assert written.returncode == 0, written.stderr
    result = subprocess.run([MEMFUSE, "umount", str(user_mount.path)], env=home,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert f"unmounted {user_mount.path} (mounted by {USER})" in result.stdout
    # through its daemon: it sent the write, took its last snapshot and is gone
    assert not running(daemon.pid) and not is_mounted(user_mount.path)
    assert not (user_mount.state / "memfuse.pid").exists()
    assert last_commit(user, user_mount) == "Local edit: system/human.md"


def test_another_home_unmounts_a_live_mount_through_its_daemon_never_lazily(mount, tmp_path):
    daemon = daemon_of(mount)
    other = dict(mount.env, HOME=str(tmp_path / "other"))
    (tmp_path / "other").mkdir()
    # a shell sitting in the mount: a lazy unmount would detach the path and leave the daemon
    # serving it, so the daemon still running after `umount` returns would show it
    holder = subprocess.Popen(["sh", "-c", "read line"], cwd=mount.path, stdin=subprocess.PIPE)
    try:
        result = subprocess.run([MEMFUSE, "status", str(mount.path)], env=other,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout
        assert (f"agent {mount.agent_id} mounted at {mount.path} (pid {daemon.pid})"
                in result.stdout)
        mount.sh('echo "Last words." > system/human.md')
        result = subprocess.run([MEMFUSE, "umount", str(mount.path)], env=other,
                                capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr
        assert f"unmounted {mount.path}" in result.stdout
        assert not running(daemon.pid), "umount returned while the daemon still serves"
        assert not os.path.ismount(mount.path)
        assert not (mount.state / "memfuse.pid").exists()
        assert last_commit(None, mount) == "Local edit: system/human.md"
    finally:
        holder.stdin.close()
        holder.wait()
