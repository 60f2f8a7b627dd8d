"""A real mount of a real agent on the real Letta server, driven by real programs."""
from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import MEMFUSE, block_by_label, make_agent, wait_for

pytestmark = pytest.mark.integration

HUMAN = "---\ndescription: About the human\nlimit: 2000\n---\nThe human.\n"


def git_log(mount) -> list[str]:
    return mount.sh("git log --format='%an|%s'").stdout.splitlines()


def test_ls_and_cat_show_the_attached_blocks(mount):
    assert mount.sh("ls -A").stdout.split() == [".git", "system"]
    assert mount.sh("ls system").stdout.split() == ["human.md", "persona.md"]
    assert mount.sh("cat system/human.md").stdout == HUMAN
    assert (mount.path / "system/human.md").stat().st_size == len(HUMAN.encode())
    assert mount.sh("grep -rl 'test agent' system").stdout.split() == ["system/persona.md"]


def test_echo_redirect_reaches_the_server(mount, api):
    mount.sh('echo "The human is Ada." > system/human.md')
    block = block_by_label(api, mount.agent_id, "human")
    assert block["value"] == "The human is Ada.\n"
    assert block["description"] == "About the human"  # no frontmatter: the value only
    assert mount.sh("cat system/human.md").stdout.endswith("---\nThe human is Ada.\n")


def test_python_write_with_frontmatter_changes_description_and_value(mount, api):
    path = mount.path / "system/human.md"
    with open(path, "w") as f:
        f.write("---\ndescription: Facts about Ada\nlimit: 2000\n---\nAda likes tea.\n")
    block = block_by_label(api, mount.agent_id, "human")
    assert (block["description"], block["value"]) == ("Facts about Ada", "Ada likes tea.\n")


def test_writing_back_what_cat_printed_changes_nothing(mount, api):
    before = block_by_label(api, mount.agent_id, "human")
    path = mount.path / "system/human.md"
    path.write_bytes(path.read_bytes())
    assert block_by_label(api, mount.agent_id, "human") == before


@pytest.mark.parametrize("new_value", ["A much longer value than the one before it.\n" * 3,
                                       "short\n"])
def test_api_side_change_is_seen_by_cat_after_the_window(mount, api, new_value):
    assert mount.sh("cat system/human.md").stdout == HUMAN  # warm the caches
    block = block_by_label(api, mount.agent_id, "human")
    api.patch(f"/v1/blocks/{block['id']}", json={"value": new_value}).raise_for_status()
    time.sleep(0.7)  # the mount was started with --revalidate 0.5
    expected = HUMAN.replace("The human.\n", new_value)
    assert mount.sh("cat system/human.md").stdout == expected  # no stale bytes, no garbage
    assert (mount.path / "system/human.md").stat().st_size == len(expected.encode())


def test_over_limit_write_fails_at_close_and_leaves_the_server_alone(mount, api):
    before = block_by_label(api, mount.agent_id, "persona")
    with pytest.raises(OSError) as caught:
        with open(mount.path / "system/persona.md", "w") as f:
            f.write("x" * 41)  # the persona block's limit is 40 characters
    assert caught.value.errno == errno.EFBIG
    assert block_by_label(api, mount.agent_id, "persona") == before
    assert "system/persona.md: value is 41 characters, over the limit of 40 (EFBIG)" in mount.log()


def test_bad_frontmatter_fails_with_einval(mount, api):
    before = block_by_label(api, mount.agent_id, "human")
    with pytest.raises(OSError) as caught:
        with open(mount.path / "system/human.md", "w") as f:
            f.write("---\ncolour: red\n---\nx")
    assert caught.value.errno == errno.EINVAL
    assert block_by_label(api, mount.agent_id, "human") == before
    assert "system/human.md: unknown frontmatter key(s): colour" in mount.log()


def test_git_log_in_the_mount_shows_initial_and_later_commits(mount, api):
    assert git_log(mount) == ["Letta server|Snapshot at mount: system/human.md, system/persona.md"]
    mount.sh('echo "Edited locally." > system/human.md')
    user = mount.sh("id -un").stdout.strip()
    wait_for(lambda: len(git_log(mount)) == 2)
    assert git_log(mount)[0] == f"{user}|Local edit: system/human.md"
    assert mount.sh("git show HEAD:system/human.md").stdout == mount.sh(
        "cat system/human.md").stdout
    assert "-The human.\n+Edited locally." in mount.sh("git log -p -1 system/human.md").stdout


def test_umount_leaves_nothing_mounted_and_no_daemon(mount):
    record = json.loads((mount.state / "memfuse.pid").read_text())
    mount.memfuse("umount", str(mount.path))
    assert not os.path.ismount(mount.path)
    with pytest.raises(ProcessLookupError):
        os.kill(record["pid"], 0)
    assert not (mount.state / "memfuse.pid").exists()
    assert "unmounted" in mount.log()


def test_umount_takes_the_last_snapshot(mount):
    mount.sh('echo "Last words." > system/human.md')
    mount.memfuse("umount", mount.agent_id)  # at once: inside the quiet period
    log = subprocess.run(["git", f"--git-dir={mount.state / 'memory.git'}", "log",
                          "--format=%s", "-1"], capture_output=True, text=True).stdout
    assert log.strip() == "Local edit: system/human.md"


def test_second_mount_reuses_history_and_records_server_changes(mount, api):
    mount.memfuse("umount", mount.agent_id)
    block = block_by_label(api, mount.agent_id, "human")
    api.patch(f"/v1/blocks/{block['id']}", json={"value": "Changed while unmounted.\n"})
    mount.memfuse("mount", mount.agent_id)
    assert git_log(mount) == ["Letta server|Snapshot at mount: system/human.md",
                              "Letta server|Snapshot at mount: system/human.md, system/persona.md"]


def test_foreground_mount_unmounts_on_sigint(agent, home, tmp_path):
    mountpoint = tmp_path / "mnt"
    proc = subprocess.Popen([MEMFUSE, "mount", agent, str(mountpoint), "--foreground"],
                            env=home, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.ismount(mountpoint), timeout=60)
        assert (mountpoint / "system/human.md").read_text() == HUMAN
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not os.path.ismount(mountpoint)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def run_memfuse(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([MEMFUSE, *args], env=env, capture_output=True, text=True, timeout=120)


def test_unknown_agent_is_a_clear_error(home, tmp_path):
    result = run_memfuse(home, "mount", "agent-123e4567-e89b-42d3-8456-426614174000",
                         str(tmp_path / "m"))
    assert result.returncode == 1
    assert "agent agent-123e4567-e89b-42d3-8456-426614174000 not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.ismount(tmp_path / "m")


def test_unreachable_server_is_a_clear_error(agent, home, tmp_path):
    env = dict(home, LETTA_BASE_URL="http://127.0.0.1:9")  # nothing listens on port 9
    result = run_memfuse(env, "mount", agent, str(tmp_path / "m"))
    assert result.returncode == 1
    assert "cannot reach the Letta server at http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr


def test_busy_mountpoint_is_a_clear_error(mount, agent, home, tmp_path, api):
    other = make_agent(api, [{"label": "human", "value": "x"}])
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    try:
        again = run_memfuse(home, "mount", other, str(mount.path))
        assert again.returncode == 1 and "already a mount point" in again.stderr
        result = run_memfuse(home, "mount", other, str(full))
        assert result.returncode == 1 and "is not empty" in result.stderr
        assert (full / "keep.txt").read_text() == "mine"
    finally:
        api.delete(f"/v1/agents/{other}")
    twice = run_memfuse(home, "mount", agent, str(tmp_path / "second"))
    assert twice.returncode == 1
    assert f"agent {agent} is already mounted at {mount.path}" in twice.stderr


def test_umount_by_a_relative_mountpoint(agent, home, tmp_path):
    assert run_memfuse(home, "mount", agent, str(tmp_path / "mnt")).returncode == 0
    result = subprocess.run([MEMFUSE, "umount", "mnt"], cwd=tmp_path, env=home,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_umount_of_nothing_is_a_clear_error(home, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_memfuse(home, "umount", str(tmp_path / "empty"))
    assert result.returncode == 1 and "nothing is mounted" in result.stderr


def test_api_key_is_sent_and_never_written(agent, home, tmp_path):
    env = dict(home, LETTA_API_KEY="sk-memfuse-test-secret")
    mountpoint = tmp_path / "m"
    result = run_memfuse(env, "mount", agent, str(mountpoint), "--debug")
    assert result.returncode == 0, result.stderr
    try:
        (mountpoint / "system/human.md").write_text("x\n")
    finally:
        run_memfuse(env, "umount", str(mountpoint))
    state = Path(home["HOME"]) / ".letta"
    for path in state.rglob("*"):
        if path.is_file():
            assert b"sk-memfuse-test-secret" not in path.read_bytes(), path


def test_chmod_chown_touch_are_accepted_and_send_nothing(mount, api):
    before = block_by_label(api, mount.agent_id, "human")
    mount.sh("chmod 600 system/human.md && chown $(id -u):$(id -g) system/human.md"
             " && touch -d '2020-01-02 03:04:05' system/human.md")
    assert block_by_label(api, mount.agent_id, "human") == before
    shown = (mount.path / "system/human.md").stat()
    assert time.gmtime(shown.st_mtime)[:3] == (2020, 1, 2)
    assert stat.S_IMODE(shown.st_mode) == 0o600  # the mode chmod gave, not 0644


PAST_A, PAST_M = 1_500_000_000_123_456_789, 1_400_000_000_987_654_321  # ns: atime, mtime


def run(*argv: str) -> subprocess.CompletedProcess:
    """Run a real program; fail loudly with its stderr when it does not exit 0."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}: {result.stderr}"
    return result


def test_rsync_back_and_forth_then_a_second_rsync_transfers_nothing(mount, api, tmp_path):
    """The issue's acceptance test: a backup with rsync -a, an edit there dated yesterday,
    rsync -a back (a temporary file, its times set, renamed onto the block), and a second
    rsync -ai finds nothing to do: every size, time and mode in the mount is what it set."""
    backup = tmp_path / "backup"
    run("rsync", "-a", f"{mount.path}/", f"{backup}/")
    with open(backup / "system/human.md", "a") as f:
        f.write("Edited in the backup.\n")
    run("touch", "-d", "yesterday", str(backup / "system/human.md"))
    run("rsync", "-a", f"{backup}/", f"{mount.path}/")
    assert block_by_label(api, mount.agent_id, "human")["value"] == \
        "The human.\nEdited in the backup.\n"
    copied, mine = (backup / "system/human.md").stat(), (mount.path / "system/human.md").stat()
    assert (mine.st_mtime_ns, mine.st_size) == (copied.st_mtime_ns, copied.st_size)
    assert run("rsync", "-ai", f"{backup}/", f"{mount.path}/").stdout == ""


def test_tar_x_and_cp_a_keep_the_sources_times_and_modes(mount, api, tmp_path):
    source = tmp_path / "source"
    (source / "system/notes").mkdir(parents=True)
    files = {"system/notes/tarred.md": 0o640, "copied.md": 0o600}
    for name, mode in files.items():
        (source / name).write_text(f"From {name}.\n")
        os.chmod(source / name, mode)
        os.utime(source / name, ns=(PAST_A, PAST_M))
    os.chmod(source / "system/notes", 0o750)
    os.utime(source / "system/notes", ns=(PAST_A, PAST_M))
    run("tar", "-cf", str(tmp_path / "notes.tar"), "-C", str(source), "system/notes")
    run("tar", "-xf", str(tmp_path / "notes.tar"), "-C", str(mount.path))
    run("cp", "-a", str(source / "copied.md"), str(mount.path / "copied.md"))
    for name in (*files, "system/notes"):
        want, got = (source / name).stat(), (mount.path / name).stat()
        # tar keeps whole seconds (its default format); cp -a every nanosecond
        exact = name == "copied.md"
        assert got.st_mtime_ns == (want.st_mtime_ns if exact else want.st_mtime_ns
                                   // 10**9 * 10**9), name
        assert stat.S_IMODE(got.st_mode) == stat.S_IMODE(want.st_mode), name
    assert block_by_label(api, mount.agent_id, "notes/tarred")["value"] == \
        "From system/notes/tarred.md.\n"


def test_install_m_600_and_chmod_leave_the_mode_they_asked_for(mount, api, tmp_path):
    (tmp_path / "key.md").write_text("Installed.\n")
    before = block_by_label(api, mount.agent_id, "human")
    run("install", "-m", "600", str(tmp_path / "key.md"), str(mount.path / "system/key.md"))
    run("chmod", "640", str(mount.path / "system/human.md"))
    run("chmod", "700", str(mount.path / "system"))
    for name, mode in (("system/key.md", 0o600), ("system/human.md", 0o640), ("system", 0o700)):
        assert stat.S_IMODE((mount.path / name).stat().st_mode) == mode, name
    assert block_by_label(api, mount.agent_id, "key")["value"] == "Installed.\n"
    assert block_by_label(api, mount.agent_id, "human") == before  # a mode is never sent


def test_utime_by_path_or_by_fd_before_close_is_what_stat_shows(mount, api):
    path = mount.path / "system/human.md"
    run("touch", "-d", "2020-01-02 03:04:05 UTC", str(path))
    assert time.gmtime(path.stat().st_mtime)[:6] == (2020, 1, 2, 3, 4, 5)
    with open(path, "w") as f:  # write, then futimens, then close: what tar -x and cp -a do
        f.write("Written, then dated.\n")
        f.flush()
        os.utime(f.fileno(), ns=(PAST_A, PAST_M))
    shown = path.stat()
    assert (shown.st_atime_ns, shown.st_mtime_ns) == (PAST_A, PAST_M)  # atime kept apart
    assert block_by_label(api, mount.agent_id, "human")["value"] == "Written, then dated.\n"
    os.chmod(path, 0o600)
    assert path.stat().st_ctime_ns > shown.st_ctime_ns  # metadata moves the ctime
    assert path.stat().st_mtime_ns == PAST_M


def test_times_and_modes_survive_a_remount(mount):
    path, system = mount.path / "system/human.md", mount.path / "system"
    os.chmod(path, 0o600)
    os.utime(path, ns=(PAST_A, PAST_M))
    os.chmod(system, 0o700)
    mount.memfuse("umount", mount.agent_id)
    mount.memfuse("mount", mount.agent_id, "--revalidate", "0.5")
    shown = path.stat()
    assert (stat.S_IMODE(shown.st_mode), shown.st_atime_ns, shown.st_mtime_ns) == \
        (0o600, PAST_A, PAST_M)
    assert stat.S_IMODE(system.stat().st_mode) == 0o700
    assert (mount.state / "memory.attrs").exists()


def test_an_unlinked_open_file_has_no_link_and_a_long_name_is_enametoolong(mount):
    path = mount.path / "system/persona.md"
    with open(path) as f:
        os.unlink(path)
        assert os.fstat(f.fileno()).st_nlink == 0
        assert f.read().endswith("I am a test agent.\n")
    with pytest.raises(OSError) as caught:
        os.stat(mount.path / "system" / ("x" * 253 + ".md"))
    assert caught.value.errno == errno.ENAMETOOLONG


def test_statfs_answers(mount):
    fields = mount.sh("df -P .").stdout.splitlines()[1].split()
    assert fields[0] == "memfuse" and int(fields[3]) > 0  # filesystem name, available 1K blocks
