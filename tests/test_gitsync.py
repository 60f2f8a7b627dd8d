"""gitsync: an agent's live blocks as the files of its layout, committed as the server's."""
from memfuse import blockfile, blockmap, gitsync
from memfuse.history import HistoryRepo
from memfuse.layout import CLASSIC, GIT_MEMORY
from memfuse.model import Block
from memfuse.remote import Remote
from memfuse.letta import LettaClient

from .fakeletta import FakeLetta


def block(label: str, value: str = "v\n", block_id: str | None = None) -> Block:
    return Block(block_id or f"block-{label}", label, value, 100, "d")


def test_a_path_taken_by_an_earlier_block_or_a_directory_is_left_out():
    found = gitsync.Live()
    for b, attached in ((block("human"), True), (block("human", block_id="block-2"), True),
                        (block("a"), False), (block("a.md/x"), False),
                        (block("bad\x00"), True)):
        found.add(b, attached, CLASSIC)
    assert sorted(found.files) == ["a.md", "system/human.md"]
    assert found.files["system/human.md"] == blockfile.render(block("human"))
    assert len(found.left_out) == 3


def test_changes_remove_what_the_server_no_longer_has_but_keep_a_layouts_kept_files():
    committed = {"system/old.md": b"x", "skills/pdf/extract.py": b"y", "system/human.md": b"z"}
    live = {"system/human.md": b"new"}
    assert gitsync.changes(committed, live, GIT_MEMORY) == {
        "system/human.md": b"new", "system/old.md": None}
    assert gitsync.changes(committed, live, CLASSIC) == {
        "system/human.md": b"new", "system/old.md": None, "skills/pdf/extract.py": None}
    assert gitsync.changes(committed, {"system/human.md": b"z"}, GIT_MEMORY) == {
        "system/old.md": None}  # a file whose bytes are committed already is no change


async def test_take_records_the_layout_in_the_block_map(tmp_path):
    """A mount started while the server is away mounts in the layout the map names."""
    fake = FakeLetta()
    agent = fake.add_agent(tags=["git-memory-enabled"])
    fake.add_block("notes/todo", "- one\n", agent=agent)
    repo = HistoryRepo(tmp_path / "memory.git")
    repo.open()
    async with LettaClient("http://letta.test", transport=fake.transport()) as client:
        found = await gitsync.live(Remote(client, agent), GIT_MEMORY)
    map_file = tmp_path / "memory.blocks"
    blockmap.save(map_file, blockmap.records(found.shown))  # as an older serve left it
    assert gitsync.take(repo, found, GIT_MEMORY, map_file) is not None
    assert blockmap.read(map_file)[0] == "git-memory"
    repo.close()


async def test_take_commits_as_the_server_and_saves_the_block_map(tmp_path):
    fake = FakeLetta()
    agent = fake.add_agent()
    fake.add_block("human", "The human.\n", agent=agent)
    fake.add_block("notes", "n\n", agent=agent, attached=False, tags=[f"owner:{agent}"])
    repo = HistoryRepo(tmp_path / "memory.git")
    repo.open()
    async with LettaClient("http://letta.test", transport=fake.transport()) as client:
        found = await gitsync.live(Remote(client, agent), CLASSIC)
    map_file = tmp_path / "memory.blocks"
    sha = gitsync.take(repo, found, CLASSIC, map_file)
    commit = repo.repo[sha]
    assert commit.author == b"Letta server <server@letta>"
    assert commit.message.startswith(b"Server change: notes.md, system/human.md")
    assert [r.path for r in blockmap.load(map_file)] == ["notes.md", "system/human.md"]
    assert gitsync.take(repo, found, CLASSIC, map_file) is None  # nothing new
    repo.close()


def test_a_file_whose_bytes_say_what_its_block_is_keeps_its_bytes(tmp_path):
    human = Block("block-1", "human", "Pushed.\n", 100, "About them")
    found = gitsync.Live()
    found.add(human, True, CLASSIC)
    pushed = b"---\ndescription: About them\n---\nPushed.\n"  # no limit: the server's stands
    assert found.over({"system/human.md": pushed}) == {"system/human.md": pushed}
    for stale in (b"---\ndescription: About them\n---\nOld.\n",
                  b"---\ndescription: Other\n---\nPushed.\n",
                  b"---\nlimit: 7\n---\nPushed.\n"):
        assert found.over({"system/human.md": stale}) == found.files
    locked = Block("block-2", "persona", "v\n", 100, read_only=True)
    assert not blockfile.shows(b"v\n", locked)  # read_only left out says false
    assert blockfile.shows(blockfile.render(locked), locked)


def test_a_take_reads_only_the_committed_blobs_that_differ_and_removes_the_rest(tmp_path,
                                                                                monkeypatch):
    # compared by object id: at 1,000 blocks, reading every committed blob was a third of a
    # take. A path the server no longer shows is removed, a kept file of the layout is not.
    repo = HistoryRepo(tmp_path / "memory.git")
    repo.open()
    before = gitsync.Live()
    for label in ("system/a", "system/b", "system/c"):
        before.add(block(label), True, GIT_MEMORY)
    gitsync.take(repo, before, GIT_MEMORY, tmp_path / "memory.blocks")
    repo.commit({"skills/pdf/extract.py": b"print()\n"}, b"p <p@x>", "Local edit")
    read = []
    real_blob = HistoryRepo.blob
    monkeypatch.setattr(HistoryRepo, "blob", lambda self, sha: read.append(sha) or real_blob(
        self, sha))
    after = gitsync.Live()
    for b in (block("system/a"), block("system/b", "changed\n")):
        after.add(b, True, GIT_MEMORY)
    old_b = repo.entries()["system/b.md"][1]
    gitsync.take(repo, after, GIT_MEMORY, tmp_path / "memory.blocks")
    assert read == [old_b]
    assert sorted(repo.files()) == ["skills/pdf/extract.py", "system/a.md", "system/b.md"]
    assert repo.files()["system/b.md"] == blockfile.render(block("system/b", "changed\n"))
    repo.close()
