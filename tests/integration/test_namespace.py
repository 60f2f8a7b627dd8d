"""Namespace rows of SEMANTICS.md through a real mount on the real server."""
from __future__ import annotations

import ctypes
import errno
import os
import time

import pytest

from .conftest import block_by_label, make_agent, start_mount, stop_mount, wait_for

pytestmark = pytest.mark.integration

GRACE = 2.5  # memfuse retires an unlinked block after 2 s
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100


def attached(api, agent_id) -> dict[str, dict]:
    blocks = api.get(f"/v1/agents/{agent_id}/core-memory/blocks").json()
    return {b["label"]: b for b in blocks}


def owned(api, agent_id) -> dict[str, dict]:
    blocks = api.get("/v1/blocks/", params={"tags": f"owner:{agent_id}"}).json()
    return {b["label"]: b for b in blocks}


def renameat2(old, new, flags) -> int:
    """renameat2(2) through glibc; returns the errno (0 on success)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) == 0:
        return 0
    return ctypes.get_errno()


def test_create_in_system_creates_an_attached_tagged_block(mount, api):
    mount.sh("echo '- ship memfuse' > system/todo.md")
    block = attached(api, mount.agent_id)["todo"]
    assert block["value"] == "- ship memfuse\n"
    assert block["tags"] == [f"owner:{mount.agent_id}"]
    assert block["description"] == "Memory block: todo" and block["limit"] == 20000
    wait_for(lambda: "system/todo.md" in mount.sh("git ls-files").stdout)


def test_create_at_the_root_with_frontmatter_is_detached(mount, api):
    (mount.path / "ideas.md").write_text("---\ndescription: Ideas\nlimit: 500\n---\nfly\n")
    block = owned(api, mount.agent_id)["ideas"]
    assert (block["description"], block["limit"], block["value"]) == ("Ideas", 500, "fly\n")
    assert "ideas" not in attached(api, mount.agent_id)


def test_rm_detaches_and_untags_after_the_grace_period_and_deletes_nothing(mount, api):
    human = block_by_label(api, mount.agent_id, "human")
    mount.sh("rm system/human.md")
    assert "human.md" not in os.listdir(mount.path / "system")
    time.sleep(GRACE)
    assert "human" not in attached(api, mount.agent_id)
    assert api.get(f"/v1/blocks/{human['id']}").json()["value"] == "The human.\n"
    wait_for(lambda: "system/human.md" not in mount.sh("git ls-files").stdout)


def test_rm_of_a_detached_block_drops_the_owner_tag(mount, api):
    mount.sh("echo note > notes.md")
    note = owned(api, mount.agent_id)["notes"]
    mount.sh("rm notes.md")
    time.sleep(GRACE)
    assert api.get(f"/v1/blocks/{note['id']}").json()["tags"] == []


def test_rename_relabels_the_same_block(mount, api):
    persona = block_by_label(api, mount.agent_id, "persona")
    mount.sh("mv system/persona.md system/character.md")
    blocks = attached(api, mount.agent_id)
    assert blocks["character"]["id"] == persona["id"] and "persona" not in blocks
    wait_for(lambda: "system/character.md" in mount.sh("git ls-files").stdout)


def test_rename_over_an_existing_block_updates_the_target(mount, api):
    human = block_by_label(api, mount.agent_id, "human")
    persona = block_by_label(api, mount.agent_id, "persona")
    mount.sh("mv system/persona.md system/human.md")
    time.sleep(GRACE)
    blocks = attached(api, mount.agent_id)
    assert blocks["human"]["id"] == human["id"]
    assert blocks["human"]["value"] == "I am a test agent.\n"
    assert blocks["human"]["description"] == "Who I am"  # the source's frontmatter came along
    assert "persona" not in blocks  # the source's block is retired, not deleted
    assert api.get(f"/v1/blocks/{persona['id']}").status_code == 200


def test_directory_create_and_rename_relabel_everything_under_it(mount, api):
    mount.sh("mkdir -p system/projects && echo a > system/projects/a.md"
             " && echo b > system/projects/b.md")
    assert {"projects/a", "projects/b"} <= set(attached(api, mount.agent_id))
    ids = {label: b["id"] for label, b in attached(api, mount.agent_id).items()}
    mount.sh("mv system/projects system/work")
    blocks = attached(api, mount.agent_id)
    assert blocks["work/a"]["id"] == ids["projects/a"] and blocks["work/b"]["id"] == ids[
        "projects/b"]
    mount.sh("mv system/work archive")  # out of system/: detached, still owned
    # rename(2) returns once the server accepted the relabel and the detach: nothing to wait for
    assert "work/a" not in attached(api, mount.agent_id)
    assert owned(api, mount.agent_id)["archive/a"]["id"] == ids["projects/a"]
    assert mount.sh("cat archive/b.md").stdout.endswith("---\nb\n")


def test_renameat2_flags(mount, api):
    before = attached(api, mount.agent_id)
    human, persona = mount.path / "system/human.md", mount.path / "system/persona.md"
    assert renameat2(human, persona, RENAME_NOREPLACE) == errno.EEXIST
    assert renameat2(human, persona, RENAME_EXCHANGE) == errno.EINVAL
    assert renameat2(human, mount.path / "system/h2.md", RENAME_NOREPLACE) == 0
    assert attached(api, mount.agent_id)["h2"]["id"] == before["human"]["id"]


def test_mkdir_and_rmdir_live_in_the_daemon(mount, api):
    mount.sh("mkdir system/drafts && mkdir drafts")
    assert (mount.path / "system/drafts").is_dir() and (mount.path / "drafts").is_dir()
    mount.sh("rmdir system/drafts drafts")
    assert not (mount.path / "drafts").exists()
    mount.sh("mkdir system/drafts && echo x > system/drafts/x.md")
    assert mount.sh("rmdir system/drafts", check=False).returncode != 0  # ENOTEMPTY
    assert "x.md" in os.listdir(mount.path / "system/drafts")


def test_scratch_files_and_symlinks_stay_in_the_daemon(mount, api):
    before = set(owned(api, mount.agent_id)) | set(attached(api, mount.agent_id))
    mount.sh("echo swap > system/.human.md.swp && echo probe > system/4913"
             " && cp system/human.md system/human.md~ && ln -s me@host.1:1 system/.#human.md"
             " && echo tmp > 'system/#human.md#'")
    assert os.readlink(mount.path / "system/.#human.md") == "me@host.1:1"
    assert (mount.path / "system/human.md~").read_text().endswith("The human.\n")
    assert set(owned(api, mount.agent_id)) | set(attached(api, mount.agent_id)) == before
    mount.sh("echo changed > system/human.md")  # let a snapshot happen
    wait_for(lambda: "changed" in mount.sh("git show HEAD:system/human.md").stdout)
    assert mount.sh("git ls-files").stdout.split() == ["system/human.md", "system/persona.md"]
    mount.sh("rm system/.human.md.swp system/4913 system/human.md~ system/.#human.md"
             " 'system/#human.md#'")


def test_refusals_are_errnos_with_a_log_line(mount, api):
    with pytest.raises(OSError) as caught:
        open(mount.path / "system/bad\tname.md", "w").close()
    assert caught.value.errno == errno.EINVAL
    assert "system/bad\tname.md cannot be a block file" in mount.log()
    for call, code in [(lambda: os.unlink(mount.path / ".git"), errno.EPERM),
                       (lambda: os.rmdir(mount.path / "system"), errno.EPERM),
                       (lambda: os.link(mount.path / "system/human.md",
                                        mount.path / "system/h.md"), errno.EPERM)]:
        with pytest.raises(OSError) as caught:
            call()
        assert caught.value.errno == code
    assert "hard links are not supported (EPERM)" in mount.log()


def test_read_only_block_is_0444_and_refuses_writers(api, home):
    agent_id = make_agent(api, [{"label": "policy", "value": "Be kind.\n", "read_only": True,
                                 "description": "Rules"}])
    m = start_mount(agent_id, home)
    try:
        path = m.path / "system/policy.md"
        assert oct(path.stat().st_mode & 0o777) == "0o444"
        assert path.read_text() == "---\ndescription: Rules\nlimit: 100000\nread_only: true\n" \
                                   "---\nBe kind.\n"
        with pytest.raises(PermissionError):  # even for root: memfuse checks, not the kernel
            open(path, "w")
        assert "system/policy.md: the block is read-only (EACCES)" in m.log()
        assert block_by_label(api, agent_id, "policy")["value"] == "Be kind.\n"
        chmod = m.sh("chmod 644 system/policy.md", check=False)  # even for root
        assert chmod.returncode != 0 and "Operation not permitted" in chmod.stderr
        assert oct(path.stat().st_mode & 0o777) == "0o444"
        assert "system/policy.md: a read-only file stays 0444 (EPERM)" in m.log()
    finally:
        stop_mount(m)
        api.delete(f"/v1/agents/{agent_id}")
