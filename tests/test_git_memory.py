"""An agent tagged `git-memory-enabled`, mounted in the git-memory layout (layout.py), at the
filesystem level over the fake API: labels are paths, every block file is an attached block,
`rm` detaches, `mv` relabels, the journal replays. The real server and real programs are in
tests/integration/test_git_memory.py."""
import errno
import json
import os
from functools import partial

import pytest
import trio

from memfuse import daemon
from memfuse.config import Config
from memfuse.history import HistoryRepo
from memfuse.layout import CLASSIC, GIT_MEMORY, GIT_MEMORY_TAG
from memfuse.model import Origin
from memfuse.poller import Poller
from memfuse.status import Status
from memfuse.tree import ROOT_INODE, Kind

from .fakeletta import FakeLetta
from .fsworld import git_memory_agent, inode_of, make_world, read_all, write_file
from .test_daemon import in_thread
from .test_namespace import GRACE_PASSED, create, listdir, rename, unlink

def attached_labels(world) -> set[str]:
    return {world.fake.blocks[i]["label"] for i in world.fake.agents[world.agent]}


def block(world, label: str) -> dict:
    [found] = world.fake.by_label(label)
    return found


# -- what is shown where ---------------------------------------------------------------------

async def test_a_tagged_agent_shows_its_labels_as_paths(git_world):
    assert git_world.state.layout is GIT_MEMORY
    assert sorted(git_world.state.tree.files()) == [
        "notes/todo.md", "projects/policy.md", "skills/pdf/SKILL.md", "system/human.md",
        "system/persona.md"]  # the detached `scratchpad` is no file of a git-memory agent
    assert (await read_all(git_world.fs, "notes/todo.md")).endswith(b"\n---\n- one\n")
    assert (await read_all(git_world.fs, "skills/pdf/SKILL.md")).endswith(b"Read PDFs.\n")


async def test_a_classic_agent_keeps_the_classic_layout(world):
    assert world.state.layout is CLASSIC
    assert "system/human.md" in world.state.tree.files() and "notes.md" in world.state.tree.files()


# -- operations --------------------------------------------------------------------------------

async def test_creating_a_block_path_makes_an_attached_block_with_that_label(git_world):
    fs = git_world.fs
    await fs.mkdir(ROOT_INODE, b"reference", 0o755, None)
    await create(fs, "reference/api.md", b"GET /v1/agents\n")
    await create(fs, "system/style.md", b"Be brief.\n")
    await fs.mkdir(await inode_of(fs, "skills"), b"docx", 0o755, None)
    await create(fs, "skills/docx/SKILL.md", b"Write DOCX.\n")
    for label, value in [("reference/api", "GET /v1/agents\n"), ("system/style", "Be brief.\n"),
                         ("skills/docx", "Write DOCX.\n")]:
        made = block(git_world, label)
        assert made["value"] == value and made["tags"] == [f"owner:{git_world.agent}"]
        assert made["id"] in git_world.fake.agents[git_world.agent]
    assert git_world.records[-1][:3] == ("skills/docx/SKILL.md",
                                         git_world.state.tree.files()["skills/docx/SKILL.md"],
                                         Origin.LOCAL)


async def test_a_file_that_is_no_block_is_scratch_for_now(git_world):
    await create(git_world.fs, "skills/pdf/notes.md", b"kept, one day\n")
    await create(git_world.fs, "notes/todo.txt", b"not a block\n")
    assert git_world.fake.calls("create") == []
    node = git_world.state.tree.child(await_node(git_world, "skills/pdf"), "notes.md")
    assert node.kind is Kind.SCRATCH


def await_node(world, path: str):
    node = world.state.tree.root
    for name in path.split("/"):
        node = world.state.tree.child(node, name)
    return node


@pytest.mark.parametrize("path", [".md", "notes/.md", "notes/a\tb.md"])
async def test_a_path_whose_label_cannot_be_shown_is_refused_as_in_the_classic_layout(
        git_world, path):
    parent, _, name = path.rpartition("/")
    with pytest.raises(Exception) as raised:
        await git_world.fs.create(await inode_of(git_world.fs, parent) if parent else ROOT_INODE,
                                  name.encode(), 0o644, os.O_WRONLY, None)
    assert getattr(raised.value, "errno", None) == errno.EINVAL
    assert git_world.fake.calls("create") == []


async def test_rm_detaches_the_block_and_never_deletes_it(git_world):
    await unlink(git_world.fs, "notes/todo.md")
    await trio.sleep(GRACE_PASSED)
    todo = git_world.fake.blocks[git_world.ids["todo"]]  # still there
    assert todo["id"] not in git_world.fake.agents[git_world.agent]
    assert f"owner:{git_world.agent}" not in todo["tags"]
    assert "notes/todo.md" not in git_world.state.tree.files()


async def test_mv_relabels_and_the_block_stays_attached(git_world):
    await rename(git_world.fs, "notes/todo.md", "notes/done.md")
    await rename(git_world.fs, "system/human.md", "people.md")  # out of the prompt
    todo, human = (git_world.fake.blocks[git_world.ids[k]] for k in ("todo", "human"))
    assert (todo["label"], human["label"]) == ("notes/done", "people")
    assert {"notes/done", "people"} <= attached_labels(git_world)
    assert git_world.fake.calls("detach") == [] and git_world.fake.calls("create") == []
    assert await listdir(git_world.fs, "notes") == ["done.md"]


async def test_mv_onto_a_name_that_is_no_block_is_as_rm(git_world):
    await rename(git_world.fs, "notes/todo.md", "notes/todo.txt")
    await trio.sleep(GRACE_PASSED)
    assert git_world.ids["todo"] in git_world.fake.blocks  # never deleted
    assert "notes/todo" not in attached_labels(git_world)
    assert await read_all(git_world.fs, "notes/todo.txt") != b""  # the bytes live on, scratch


async def test_a_directory_rename_relabels_every_block_under_it(git_world):
    fs = git_world.fs
    await fs.mkdir(await inode_of(fs, "notes"), b"deep", 0o755, None)
    await create(fs, "notes/deep/idea.md", b"an idea\n")
    await rename(fs, "notes", "archive")
    assert {"archive/todo", "archive/deep/idea"} <= attached_labels(git_world)
    await rename(fs, "skills/pdf", "skills/reader")
    assert git_world.fake.blocks[git_world.ids["pdf"]]["label"] == "skills/reader"
    assert "skills/reader/SKILL.md" in git_world.state.tree.files()


async def test_a_directory_rename_that_would_unmake_a_skill_is_refused(git_world):
    with pytest.raises(Exception) as raised:  # skills/pdf/SKILL.md -> skills/x/pdf/SKILL.md
        await git_world.fs.mkdir(await inode_of(git_world.fs, "skills"), b"x", 0o755, None)
        await rename(git_world.fs, "skills/pdf", "skills/x/pdf")
    assert getattr(raised.value, "errno", None) == errno.EINVAL
    assert git_world.fake.blocks[git_world.ids["pdf"]]["label"] == "skills/pdf"


async def test_mkdir_at_any_depth_and_system_stays(git_world):
    fs = git_world.fs
    parent = ROOT_INODE
    for name in (b"a", b"b", b"c"):
        parent = (await fs.mkdir(parent, name, 0o755, None)).st_ino
    await create(fs, "a/b/c/d.md", b"deep\n")
    assert block(git_world, "a/b/c/d")["id"] in git_world.fake.agents[git_world.agent]
    with pytest.raises(Exception) as raised:
        await fs.rmdir(ROOT_INODE, b"system", None)
    assert getattr(raised.value, "errno", None) == errno.EPERM
    with pytest.raises(Exception) as raised:
        await rename(fs, "system", "prompt")
    assert getattr(raised.value, "errno", None) == errno.EPERM


async def test_a_sed_save_updates_the_same_block(git_world):
    # GNU sed -i: a temporary file beside the target, renamed over it
    await create(git_world.fs, "notes/sedAb12Cd", b"- one\n- two\n")
    await rename(git_world.fs, "notes/sedAb12Cd", "notes/todo.md")
    assert git_world.fake.blocks[git_world.ids["todo"]]["value"] == "- one\n- two\n"
    assert git_world.fake.calls("create") == [] and git_world.fake.calls("detach") == []


async def test_a_write_reaches_the_block(git_world):
    await write_file(git_world.fs, "system/human.md", b"Ada.\n")
    assert git_world.fake.blocks[git_world.ids["human"]]["value"] == "Ada.\n"


# -- the server's changes -----------------------------------------------------------------------

async def test_server_relabels_detaches_and_new_blocks_show_at_their_paths(git_world):
    fake, state = git_world.fake, git_world.state
    fake.blocks[git_world.ids["todo"]]["label"] = "notes/later"
    fake.agents[git_world.agent].remove(git_world.ids["persona"])  # detached: no file now
    fake.add_block("reference/new", "new\n", agent=git_world.agent)
    poller = Poller(state, git_world.remote)
    assert await poller.poll_attached()
    files = state.tree.files()
    assert "notes/later.md" in files and "reference/new.md" in files
    assert "system/persona.md" not in files and "notes/todo.md" not in files


# -- the journal ----------------------------------------------------------------------------------

async def test_changes_made_while_the_server_is_away_are_replayed_in_the_layout(git_world):
    fs, fake = git_world.fs, git_world.fake
    fake.down = True
    await fs.mkdir(ROOT_INODE, b"reference", 0o755, None)
    await create(fs, "reference/api.md", b"made offline\n")
    await write_file(fs, "system/human.md", b"Written offline.\n")
    await rename(fs, "notes/todo.md", "notes/done.md")
    await unlink(fs, "skills/pdf/SKILL.md")
    await trio.sleep(GRACE_PASSED)
    assert len(git_world.journal.pending()) >= 4
    fake.down = False
    assert await git_world.replayer.replay()
    assert git_world.journal.pending() == []
    assert block(git_world, "reference/api")["value"] == "made offline\n"
    assert fake.blocks[git_world.ids["human"]]["value"] == "Written offline.\n"
    assert fake.blocks[git_world.ids["todo"]]["label"] == "notes/done"
    assert {"reference/api", "notes/done", "system/human"} <= attached_labels(git_world)
    assert "skills/pdf" not in attached_labels(git_world)
    assert fake.blocks[git_world.ids["pdf"]]["label"] == "skills/pdf"  # detached, not deleted


async def test_a_restart_shows_the_journal_in_the_layout(nursery):
    first = await make_world(nursery, git_memory=True)
    first.fake.down = True
    await first.fs.mkdir(ROOT_INODE, b"reference", 0o755, None)
    await create(first.fs, "reference/api.md", b"made offline\n")
    await rename(first.fs, "notes/todo.md", "notes/done.md")
    first.fake.down = False  # the daemon died; the next one lists the server, then replays
    second = await make_world(nursery, after=first, git_memory=True)
    assert second.state.layout is GIT_MEMORY
    files = second.state.tree.files()
    assert "reference/api.md" in files and "notes/done.md" in files and "notes/todo.md" not in files
    assert await second.replayer.replay()
    assert {"reference/api", "notes/done"} <= attached_labels(second)
    await first.client.aclose()
    await second.client.aclose()


# -- a tag change while mounted ---------------------------------------------------------------

async def test_a_tag_change_while_mounted_is_said_and_the_mount_keeps_its_layout(world, caplog):
    poller = Poller(world.state, world.remote, model_interval=30)
    assert await poller.poll_once() and poller.model_changed is None
    world.fake.agent_tags[world.agent] = [GIT_MEMORY_TAG]
    assert await poller.poll_once()
    assert poller.model_changed is None  # read at most every model_interval
    await trio.sleep(31)
    assert await poller.poll_once()
    assert poller.model_changed == "git-memory" and world.state.layout is CLASSIC
    assert "system/human.md" in world.state.tree.files()  # the files stay where they are
    assert any("remount to show it in its new layout" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    line = status(layout="classic", layout_changed="git-memory").render()
    assert "the agent's memory model changed on the server" in line
    assert "remount to show it in its new layout" in line
    world.fake.agent_tags[world.agent] = []
    await trio.sleep(31)
    assert await poller.poll_once() and poller.model_changed is None


def status(**fields) -> Status:
    return Status(agent_id="agent-x", mountpoint="/m", base_url="http://l", pid=1,
                  reachable=True, last_poll=None, pending_writes=0, pending_unlinks=0,
                  uncommitted=0, last_commit=None, last_commit_message=None,
                  last_commit_at=None, last_conflict=None, last_error=None,
                  last_error_at=None, updated_at=0.0, **fields)


# -- the daemon: choosing, recording, and a local-first mount -----------------------------------

@pytest.fixture
def git_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(daemon, "STATUS_INTERVAL", 0.02)
    fake = FakeLetta()
    agent, ids = git_memory_agent(fake)
    config = Config.build(agent, base_url="http://letta.test", quiet_period=0.05,
                          poll_interval=0.05, full_poll_interval=0.05, retry_budget=0.2)
    return fake, config, ids


async def _serve_until(config, fake, check) -> list:
    """Mount (the daemon in this process), run `check()` in a worker thread, unmount."""
    reports, ready = [], trio.Event()

    def on_ready(error):
        reports.append(error)
        ready.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(daemon.serve, config, on_ready, on_notice=lambda _n: None,
                                   transport=fake.transport()))
        await ready.wait()
        assert reports == [None]
        result = await in_thread(check)
        nursery.cancel_scope.cancel()
    return result


GIT_FILES = ["notes/todo.md", "projects/policy.md", "skills/pdf/SKILL.md", "system/human.md",
             "system/persona.md"]


def tree(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.md"))


@pytest.mark.real_clock
async def test_the_daemon_mounts_by_the_tags_records_the_layout_and_a_local_first_mount_uses_it(
        git_setup):
    fake, config, ids = git_setup
    online = await _serve_until(config, fake, lambda: tree(config.mountpoint))
    assert online == GIT_FILES
    assert json.loads(config.block_map_file.read_text())["layout"] == "git-memory"
    fake.down = True  # a local-first mount: the layout the history recorded
    offline = await _serve_until(config, fake, lambda: (
        tree(config.mountpoint), (config.mountpoint / "notes/todo.md").read_bytes(),
        Status.load(config.status_file).render()))
    assert offline[0] == GIT_FILES and offline[1].endswith(b"- one\n")
    assert "layout         git-memory" in offline[2]


@pytest.mark.real_clock
async def test_a_classic_history_whose_agent_got_tagged_mounts_in_the_new_layout(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    fake = FakeLetta()
    agent = fake.add_agent()
    fake.add_block("system/human", "The human.\n", agent=agent)
    config = Config.build(agent, base_url="http://letta.test", quiet_period=0.05,
                          poll_interval=0.05, full_poll_interval=0.05, retry_budget=0.2)
    assert await _serve_until(config, fake, lambda: tree(config.mountpoint)) == [
        "system/system/human.md"]
    fake.agent_tags[agent] = [GIT_MEMORY_TAG]
    assert await _serve_until(config, fake, lambda: tree(config.mountpoint)) == [
        "system/human.md"]
    repo = HistoryRepo(config.history_dir)
    repo.open()
    try:
        assert sorted(repo.files()) == ["system/human.md"]
    finally:
        repo.close()
