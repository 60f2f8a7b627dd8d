"""A hostile but fair user against a real mount and the real Letta server: each input gets a
clear errno and a log line, the mount keeps serving, the server keeps its state, and the
history stays private and valid (issue 8's findings, one test each)."""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import MEMFUSE, block_by_label, make_agent, start_mount, stop_mount, wait_for

pytestmark = pytest.mark.integration

HOSTILE_FRONTMATTER = [
    "---\\ndescription: 2024-13-45\\n---\\nhi\\n",
    "---\\ndescription: 2024-01-01 25:61:61\\n---\\nhi\\n",
    "---\\n2024-99-01: 1\\n---\\nhi\\n",
    "---\\nlimit: !!int 1e400\\n---\\nhi\\n",
]


def alive(mount) -> bool:
    status = mount.memfuse("status", mount.agent_id, check=False).stdout
    return (": reachable" in status and "unexpected     none" in status
            and mount.sh("cat system/human.md", check=False).returncode == 0)


def test_hostile_frontmatter_is_einval_and_the_mount_keeps_serving(mount, api):
    human = block_by_label(api, mount.agent_id, "human")
    mount.sh("rm system/persona.md")  # a delete just before must still take effect
    for text in HOSTILE_FRONTMATTER:  # the write itself fails (dash's printf says "I/O error")
        result = mount.sh(f"printf -- '{text}' > system/human.md", check=False)
        assert result.returncode != 0, text
    assert mount.log().count("system/human.md: frontmatter cannot be read") >= 4
    deep = "---\\nlimit: " + "[" * 3000 + "]" * 3000 + "\\n---\\n"
    assert mount.sh(f"printf -- '{deep}' > system/human.md", check=False).returncode != 0
    assert alive(mount)
    assert block_by_label(api, mount.agent_id, "human")["value"] == human["value"]
    wait_for(lambda: "persona" not in [b["label"] for b in api.get(
        f"/v1/agents/{mount.agent_id}/core-memory/blocks").json()], 15)
    assert "frontmatter cannot be read (ValueError" in mount.log()


def test_a_name_that_is_not_utf8_is_einval(mount):
    for name in (b"\xff.md", b"system/\xfe"):
        with pytest.raises(OSError) as caught:
            open(os.fsencode(mount.path) + b"/" + name, "w").close()
        assert caught.value.errno == errno.EINVAL
    assert "the name is not valid UTF-8 (EINVAL)" in mount.log()
    assert alive(mount)


def test_a_huge_truncate_is_efbig_at_once_and_costs_no_memory(mount, api):
    before = block_by_label(api, mount.agent_id, "human")
    started = time.monotonic()
    result = mount.sh("truncate -s 64G system/human.md", check=False)
    assert result.returncode != 0 and "File too large" in result.stderr
    assert time.monotonic() - started < 5
    rss_kb = int(Path(f"/proc/{mount_pid(mount)}/status").read_text()
                 .split("VmRSS:")[1].split()[0])
    assert rss_kb < 500_000
    assert block_by_label(api, mount.agent_id, "human") == before and alive(mount)


def mount_pid(mount) -> int:
    return json.loads((mount.state / "memfuse.pid").read_text())["pid"]


def test_a_block_path_past_gits_limit_is_refused_and_git_keeps_working(mount):
    # 21 nested 200-byte directories, made step by step relative to the last one (as `cd`
    # does), so no single path a syscall sees is that long
    fd = os.open(mount.path, os.O_DIRECTORY)
    try:
        for level in range(21):
            name = "d" * 199 + str(level % 10)
            os.mkdir(name, dir_fd=fd)
            fd, old = os.open(name, os.O_DIRECTORY, dir_fd=fd), fd
            os.close(old)
        with pytest.raises(OSError) as caught:
            os.open("deep.md", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        assert caught.value.errno == errno.ENAMETOOLONG
    finally:
        os.close(fd)
    assert mount.sh("git status --porcelain").returncode == 0
    assert "more than git's index can hold (ENAMETOOLONG)" in mount.log()


def test_labels_through_a_git_directory_are_hidden_and_history_stays_valid(api, home):
    agent = make_agent(api, [{"label": "human", "value": "h\n", "description": "d"},
                             {"label": ".git/config", "value": "evil\n", "description": "d"},
                             {"label": "a/.git/hooks/pre-commit", "value": "evil\n",
                              "description": "d"},
                             {"label": "b/.GIT/x", "value": "evil\n", "description": "d"}])
    m = start_mount(agent, home)
    try:
        assert sorted(m.sh("ls -A system").stdout.split()) == ["human.md"]
        fsck = subprocess.run(["git", "--git-dir", str(m.state / "memory.git"), "fsck",
                               "--strict"], capture_output=True, text=True)
        assert fsck.returncode == 0 and "hasDotgit" not in fsck.stdout + fsck.stderr
        clone = subprocess.run(["git", "clone", "-q", str(m.state / "memory.git"),
                                str(Path(home["HOME"]) / "clone")], capture_output=True,
                               text=True)
        assert clone.returncode == 0, clone.stderr
        assert "cannot be shown as a file" in m.log()
    finally:
        stop_mount(m)
        api.delete(f"/v1/agents/{agent}")


def test_state_and_history_are_private(mount):
    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(mount.state) == 0o700 and mode(mount.state / "memory.git") == 0o700
    for name in ("memfuse.log", "memfuse.pid"):
        assert mode(mount.state / name) == 0o600, name
    wait_for(lambda: (mount.state / "memfuse.status.json").exists())
    assert mode(mount.state / "memfuse.status.json") == 0o600


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_a_shell_sees_a_write_past_the_limit(mount, api, shell):
    before = block_by_label(api, mount.agent_id, "persona")  # limit 40
    result = subprocess.run([shell, "-c", "echo \"$(head -c 6000 /dev/zero | tr '\\0' a)\" > "
                             "system/persona.md; echo \"status $?\""], cwd=mount.path,
                            capture_output=True, text=True, env=mount.env)
    assert "status 0" not in result.stdout and "status 1" in result.stdout
    assert block_by_label(api, mount.agent_id, "persona") == before


@pytest.mark.parametrize("frontmatter", ["limit: 2147483648", 'description: "a\\0b"'])
def test_what_the_server_cannot_store_is_einval_at_once(mount, api, frontmatter):
    before = block_by_label(api, mount.agent_id, "human")
    started = time.monotonic()
    with pytest.raises(OSError) as caught:
        with open(mount.path / "system/human.md", "w") as f:
            f.write(f"---\n{frontmatter}\n---\nx\n")
    assert caught.value.errno == errno.EINVAL
    assert time.monotonic() - started < 2  # no retries against a 500
    assert block_by_label(api, mount.agent_id, "human") == before


def test_a_stale_git_lock_does_not_stop_the_next_mount(agent, home):
    m = start_mount(agent, home)
    stop_mount(m)
    lock = m.state / "memory.git/refs/heads/main.lock"
    lock.write_text("0" * 40 + "\n")
    m = start_mount(agent, home)
    try:
        m.sh("echo 'After the crash.' > system/human.md")
        wait_for(lambda: "After the crash." in m.sh("git show HEAD:system/human.md").stdout, 10)
        assert not lock.exists()
    finally:
        stop_mount(m)


def test_an_agent_id_that_is_a_path_is_refused_before_any_directory_is_made(home):
    result = subprocess.run([MEMFUSE, "mount", "../../etc"], env=home, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "is not an agent id" in result.stderr
    assert not (Path(home["HOME"]) / "etc").exists()
    assert not (Path(home["HOME"]) / ".letta").exists()


def test_windows_files_are_understood_and_duplicate_keys_refused(mount, api):
    path = mount.path / "system/human.md"
    path.write_bytes(b"\xef\xbb\xbf---\r\ndescription: From Windows\r\nlimit: 2000\r\n---\r\n"
                     b"Line one.\r\nLine two.\r\n")
    block = block_by_label(api, mount.agent_id, "human")
    assert (block["description"], block["value"]) == ("From Windows",
                                                      "Line one.\r\nLine two.\r\n")
    with pytest.raises(OSError) as caught:
        path.write_bytes(b"---\nlimit: 100\nlimit: 5\n---\nx")
    assert caught.value.errno == errno.EINVAL
    assert block_by_label(api, mount.agent_id, "human")["limit"] == 2000


def test_a_name_over_255_bytes_is_enametoolong(mount):
    with pytest.raises(OSError) as caught:
        open(mount.path / ("a" * 253 + ".md"), "w").close()
    assert caught.value.errno == errno.ENAMETOOLONG


def test_a_base_url_that_is_not_a_letta_server_says_so(agent, home, tmp_path):
    server = subprocess.Popen(["python3", "-m", "http.server", "0", "--bind", "127.0.0.1",
                               "--directory", str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N ..."
        port = line.split(" port ")[1].split()[0]
        result = subprocess.run([MEMFUSE, "mount", agent, "--base-url",
                                 f"http://127.0.0.1:{port}"], env=home, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 1
        assert "does not look like a Letta server" in result.stderr
    finally:
        server.kill()


def test_after_kill_9_the_persons_acknowledged_edit_is_committed_under_their_name(agent, home):
    m = start_mount(agent, home)
    try:
        m.sh("echo 'Written just before the crash.' > system/human.md")
        os.kill(mount_pid(m), 9)  # before the 1 s quiet period lets the snapshot commit it
        wait_for(lambda: subprocess.run(["fusermount3", "-u", "-z", str(m.path)]).returncode
                 == 0 or not os.path.ismount(m.path), 10)
        m.memfuse("umount", agent, check=False)  # clears the dead daemon's records
        m = start_mount(agent, home)
        user = m.sh("id -un").stdout.strip()
        log = m.sh("git log --format='%an|%s'").stdout.splitlines()
        assert f"{user}|Local edit (recovered at mount): system/human.md" in log
        assert "Written just before the crash." in m.sh("git show HEAD:system/human.md").stdout
    finally:
        stop_mount(m)
