"""Shared set-up of the filesystem-level tests: Operations over the in-memory fake API."""
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

from memfuse.files import BlockFiles
from memfuse.replay import Replayer
from memfuse.fs import MemoryFs
from memfuse.grace import Graveyard
from memfuse.journal import Journal
from memfuse.layout import GIT_MEMORY_TAG, layout_for_tags
from memfuse.letta import LettaClient
from memfuse.namespace import Namespace
from memfuse.remote import Remote
from memfuse.state import MountState
from memfuse.tree import ROOT_INODE, Tree

from .fakeletta import FakeLetta

HUMAN = b"---\ndescription: desc\nlimit: 20000\n---\nThe human.\n"


def git_memory_agent(fake: FakeLetta) -> tuple[str, dict[str, str]]:
    """An agent tagged `git-memory-enabled` with path labels, as Letta's git memory has them:
    system/human, system/persona (limit 20), notes/todo, skills/pdf, projects/policy
    (read-only) attached; `scratchpad` detached and owned (no file in this layout).
    Returns (agent id, key -> block id)."""
    agent = fake.add_agent(tags=[GIT_MEMORY_TAG])
    return agent, {
        "human": fake.add_block("system/human", "The human.\n", agent=agent),
        "persona": fake.add_block("system/persona", "I am.", agent=agent, limit=20),
        "todo": fake.add_block("notes/todo", "- one\n", agent=agent),
        "pdf": fake.add_block("skills/pdf", "Read PDFs.\n", agent=agent),
        "policy": fake.add_block("projects/policy", "Rules.", agent=agent, read_only=True),
        "scratchpad": fake.add_block("scratchpad", "s", agent=agent, attached=False,
                                     tags=[f"owner:{agent}"]),
    }


async def make_world(nursery, grace: float = 0.2, journal: bool = True, after=None,
                     git_memory: bool = False):
    """A mount's Operations over a FakeLetta agent with human, persona (limit 20),
    projects/policy (read-only) attached and notes detached; the retirer runs in `nursery`.
    git_memory: the agent of `git_memory_agent` instead, mounted in the layout its tags
    choose (as daemon.py does).

    `records` lists every (path, content, origin) the state recorded after the load;
    `loaded` is the tree's files right after the load (what the mount snapshot commits);
    `journal` the journal (in a fresh temporary directory) unless journal=False.
    after: an earlier world whose daemon died: the new mount has its server and a fresh read
    of its journal file (a restart)."""
    if after is None and git_memory:
        fake = FakeLetta()
        agent, ids = git_memory_agent(fake)
    elif after is None:
        fake = FakeLetta()
        agent = fake.add_agent()
        ids = {
            "human": fake.add_block("human", "The human.\n", agent=agent),
            "persona": fake.add_block("persona", "I am.", agent=agent, limit=20),
            "policy": fake.add_block("projects/policy", "Rules.", agent=agent, read_only=True),
            "notes": fake.add_block("notes", "n", agent=agent, attached=False,
                                    tags=[f"owner:{agent}"]),
        }
    else:
        fake, agent, ids = after.fake, after.agent, after.ids
    records, reasons = [], []  # reasons: of each rejected edit recorded, in order
    client = LettaClient("http://letta.test", transport=fake.transport(), retry_budget=0.2)
    journal_path = (after.journal.path if after is not None else
                    Path(tempfile.mkdtemp(prefix="memfuse-journal-")) / "memory.journal")
    journal_file = Journal(journal_path) if journal else None
    remote = Remote(client, agent)
    gitfile = b"/somewhere/memory.git" if git_memory else b"gitdir: /somewhere/memory.git\n"
    state = MountState(Tree(gitfile=gitfile, gitlink=git_memory),  # as daemon.py makes it
                       lambda path, content, origin, reason=None, durable=False: (
                           records.append((path, content, origin)),
                           reasons.append(reason) if origin.value == "rejected" else None),
                       graveyard=Graveyard(grace),
                       journal=journal_file,
                       layout=layout_for_tags(await remote.agent_tags()))
    state.load(*await remote.listing(), 0.0, {})
    state.show_journal()
    loaded = state.tree.files()
    records.clear()  # the load is the mount's snapshot, committed as one
    files = BlockFiles(state, remote, revalidate=3600)
    replayer = Replayer(state, remote, files.block_order, files.note_conflict)
    namespace = Namespace(state, remote, files)
    nursery.start_soon(namespace.run)
    return SimpleNamespace(fake=fake, ids=ids, fs=MemoryFs(state, files, namespace), state=state,
                           remote=remote, files=files, replayer=replayer, namespace=namespace,
                           records=records,
                           reasons=reasons,
                           loaded=loaded, agent=agent, client=client, journal=journal_file)


def setattr_fields(**given: bool) -> SimpleNamespace:
    """The `fields` of a FUSE setattr (pyfuse3.SetattrFields, whose attributes cannot be set
    from Python): every update_* False but those `given`."""
    names = ("size", "mode", "uid", "gid", "atime", "mtime", "ctime")
    fields = {f"update_{n}": False for n in names}
    assert set(given) <= fields.keys(), given
    return SimpleNamespace(**{**fields, **given})


def replay(files: dict[str, bytes], records) -> dict[str, bytes]:
    """`files` with the recorded changes applied in order: what history would hold."""
    result = dict(files)
    for path, content, _origin in records:
        if content is None:
            result.pop(path, None)
        else:
            result[path] = content
    return result


def check_invariants(world) -> None:
    """The state is sound (s3ql runs fsck after each test the same way): the tree's own
    invariants, history replays to the tree's files, scratch bytes add up."""
    state = world.state
    assert state.tree.problems() == []
    assert replay(world.loaded, world.records) == state.tree.files(), \
        "the recorded history does not replay to the tree's files"
    scratch_inodes = [n.inode for n in state.tree.walk(state.tree.root)
                      if n.kind.value == "scratch"]
    assert state.scratch.used == sum(len(state.scratch.content(i)) for i in state.scratch._data)
    assert all(state.scratch.size(i) >= 0 for i in scratch_inodes)
    assert state.kept_used == sum(len(n.content) for n in state.tree.kept())


async def inode_of(fs: MemoryFs, path: str) -> int:
    inode = ROOT_INODE
    for name in path.split("/"):
        inode = (await fs.lookup(inode, name.encode(), None)).st_ino
    return inode


async def read_all(fs: MemoryFs, path: str) -> bytes:
    info = await fs.open(await inode_of(fs, path), os.O_RDONLY, None)
    try:
        return await fs.read(info.fh, 0, 1 << 20)
    finally:
        await fs.flush(info.fh)
        await fs.release(info.fh)


async def write_file(fs: MemoryFs, path: str, data: bytes, flags=os.O_WRONLY | os.O_TRUNC):
    info = await fs.open(await inode_of(fs, path), flags, None)
    try:
        await fs.write(info.fh, 0, data)
        await fs.flush(info.fh)
    finally:
        await fs.release(info.fh)
