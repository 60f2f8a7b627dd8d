"""The editor matrix: real programs edit block files in a real mount of a real agent.

After each edit: the server's value is exactly the expected text, the block kept its id and is
still attached after the unlink grace period, no block was created anywhere on the server (no
`.swp`, `4913`, `~`), and the history has the change.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from .conftest import block_by_label, wait_for

pytestmark = pytest.mark.integration

FRONT = "---\ndescription: About the human\nlimit: 2000\n---\n"
GRACE = 2.5  # memfuse retires an unlinked block after 2 s


def agent_block_ids(api, agent_id: str) -> set[str]:
    """The blocks the agent has: attached, or tagged owner:<agent> (every block memfuse makes
    is). Other agents' blocks are left out: other test runs on the same server make and delete
    theirs meanwhile."""
    attached = api.get(f"/v1/agents/{agent_id}/core-memory/blocks").json()
    owned = api.get("/v1/blocks/", params={"tags": f"owner:{agent_id}", "limit": 1000}).json()
    return {b["id"] for b in attached + owned}


@pytest.fixture
def editing(mount, api):
    """Run an edit of system/human.md and check the four promises afterwards."""
    human = block_by_label(api, mount.agent_id, "human")
    before_ids = agent_block_ids(api, mount.agent_id)

    def check(expected_value: str, path: str = "system/human.md", label: str = "human"):
        time.sleep(GRACE)
        block = block_by_label(api, mount.agent_id, label)
        assert block["value"] == expected_value
        if label == "human":
            assert block["id"] == human["id"]
        assert agent_block_ids(api, mount.agent_id) == before_ids, "a stray block was created"
        content = (mount.path / path).read_text()
        assert content.endswith(expected_value)
        wait_for(lambda: mount.sh(f"git show HEAD:{path}").stdout == content)
        assert mount.sh("git log -1 --format=%s").stdout.startswith("Local edit")
        assert mount.sh("git status --porcelain").stdout == ""
        names = mount.sh("ls -A system").stdout.split()
        assert not [n for n in names if n.endswith((".swp", "~")) or n == "4913"] or \
            label == "emacs-backup-check"
        return block

    return check


def test_vim_with_default_settings(mount, editing, tmp_path):
    # No vimrc; `nocompatible` gives Vim's defaults (-Es alone starts Vi-compatible, where
    # backupcopy is "yes"): swapfile, writebackup, backupcopy=auto.
    env = dict(mount.env, HOME=str(tmp_path))
    subprocess.run(["vim", "-Es", "--cmd", "set nocompatible", "-c",
                    "%s/The human./The human is Ada./", "-c", "wq", "system/human.md"],
                   cwd=mount.path, env=env, check=True, timeout=60)
    editing("The human is Ada.\n")
    assert "re-created within the grace period" in mount.log()  # vim's rename-and-write ran


def test_nano_through_tmux(mount, editing, tmp_path):
    session = f"nano-{os.getpid()}"
    env = dict(mount.env, HOME=str(tmp_path), TERM="xterm")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "30",
                    "nano system/human.md"], cwd=mount.path, env=env, check=True)
    try:
        def screen() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                  capture_output=True, text=True).stdout
        wait_for(lambda: "The human." in screen(), timeout=20)
        subprocess.run(["tmux", "send-keys", "-t", session, "M-/", "Ada writes with nano."],
                       check=True)  # M-/: to the end of the file (the empty last line)
        subprocess.run(["tmux", "send-keys", "-t", session, "C-o"], check=True)
        wait_for(lambda: "File Name to Write" in screen(), timeout=20)
        subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        wait_for(lambda: "Wrote" in screen(), timeout=20)
        subprocess.run(["tmux", "send-keys", "-t", session, "C-x"], check=True)
        wait_for(lambda: subprocess.run(["tmux", "has-session", "-t", session],
                                        capture_output=True).returncode != 0, timeout=20)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    editing("The human.\nAda writes with nano.\n")


def test_emacs_batch_with_backups(mount, editing, tmp_path):
    # Backups on: emacs skips them for version-controlled files (the mount has .git) unless
    # vc-make-backup-files is set; backup-by-copying nil (the default) renames to human.md~.
    script = ('(progn (setq make-backup-files t vc-make-backup-files t)'
              ' (find-file "system/human.md") (goto-char (point-max))'
              ' (insert "Ada uses emacs.\\n") (save-buffer))')
    subprocess.run(["emacs", "-Q", "--batch", "--eval", script], cwd=mount.path,
                   env=dict(mount.env, HOME=str(tmp_path)), check=True, timeout=60,
                   capture_output=True)
    assert "re-created within the grace period" in mount.log()  # emacs renamed to its backup
    backup = mount.path / "system/human.md~"
    assert backup.read_text() == FRONT + "The human.\n"  # emacs's backup: a scratch file
    backup.unlink()
    editing("The human.\nAda uses emacs.\n")


def test_sed_in_place(mount, editing):
    mount.sh("sed -i 's/The human./Ada, edited by sed./' system/human.md")
    editing("Ada, edited by sed.\n")


def test_perl_in_place(mount, editing):
    mount.sh("perl -pi -e 's/The human\\./Ada, edited by perl./' system/human.md")
    editing("Ada, edited by perl.\n")


def test_python_atomic_save(mount, editing):
    import tempfile
    with tempfile.NamedTemporaryFile("w", dir=mount.path / "system", delete=False) as tmp:
        tmp.write(FRONT + "Ada saved atomically.\n")
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, mount.path / "system/human.md")
    editing("Ada saved atomically.\n")


def test_vscode_pattern_truncate_write_fdatasync(mount, editing):
    fd = os.open(mount.path / "system/human.md", os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, (FRONT + "Ada uses VS Code.\n").encode())
        os.fdatasync(fd)
    finally:
        os.close(fd)
    editing("Ada uses VS Code.\n")


def test_cat_append(mount, editing, tmp_path):
    (tmp_path / "more.txt").write_text("Appended by cat.\n")
    mount.sh(f"cat {tmp_path / 'more.txt'} >> system/human.md")
    editing("The human.\nAppended by cat.\n")


def test_cp_over_an_existing_block(mount, editing, tmp_path):
    (tmp_path / "new.md").write_text(FRONT + "Copied in by cp.\n")
    mount.sh(f"cp {tmp_path / 'new.md'} system/human.md")
    editing("Copied in by cp.\n")


def test_truncate_to_zero(mount, editing):
    mount.sh("truncate -s 0 system/human.md")
    editing("")


def test_git_checkout_restores_the_committed_version(mount, editing, api):
    mount.sh("echo 'A mistake.' > system/human.md")
    assert block_by_label(api, mount.agent_id, "human")["value"] == "A mistake.\n"
    wait_for(lambda: "A mistake." in mount.sh("git show HEAD:system/human.md").stdout)
    mount.sh("git checkout HEAD~1 -- system/human.md")  # unlink + create with O_EXCL
    mount.sh("git reset -q")  # checkout from a revision also stages; the snapshot commits it
    editing("The human.\n")


def test_mv_between_system_and_the_root(mount, api):
    persona = block_by_label(api, mount.agent_id, "persona")
    mount.sh("mv system/persona.md persona.md")
    attached = api.get(f"/v1/agents/{mount.agent_id}/core-memory/blocks").json()
    assert persona["id"] not in [b["id"] for b in attached]
    owned = api.get("/v1/blocks/", params={"tags": f"owner:{mount.agent_id}"}).json()
    assert [b["id"] for b in owned] == [persona["id"]]
    assert (mount.path / "persona.md").read_text().endswith("I am a test agent.\n")
    wait_for(lambda: mount.sh("git ls-files").stdout.split() == ["persona.md",
                                                                  "system/human.md"])
    mount.sh("mv persona.md system/persona.md")
    time.sleep(GRACE)
    assert block_by_label(api, mount.agent_id, "persona")["id"] == persona["id"]
    wait_for(lambda: "system/persona.md" in mount.sh("git ls-files").stdout)
    assert mount.sh("git log -2 --format=%s").stdout.splitlines() == [
        "Local edit: persona.md, system/persona.md"] * 2
    assert mount.sh("git status --porcelain").stdout == ""


def test_tools_are_installed():
    # The matrix needs the real programs: scripts/setup installs them.
    for tool in ("vim", "nano", "emacs", "tmux", "perl", "sed", "git", "truncate"):
        assert shutil.which(tool), f"{tool} is missing"
