"""Shared set-up of the filesystem-level tests: Operations over the in-memory fake API."""
import os
from types import SimpleNamespace

from memfuse.fs import MemoryFs
from memfuse.letta import LettaClient
from memfuse.memory import AgentMemory
from memfuse.namespace import Namespace
from memfuse.tree import ROOT_INODE, Tree

from .fakeletta import FakeLetta

HUMAN = b"---\ndescription: desc\nlimit: 20000\n---\nThe human.\n"


async def make_world(nursery, grace: float = 0.2):
    """A mount's Operations over a FakeLetta agent with human, persona (limit 20),
    projects/policy (read-only) attached and notes detached; the retirer runs in `nursery`."""
    fake = FakeLetta()
    agent = fake.add_agent()
    ids = {
        "human": fake.add_block("human", "The human.\n", agent=agent),
        "persona": fake.add_block("persona", "I am.", agent=agent, limit=20),
        "policy": fake.add_block("projects/policy", "Rules.", agent=agent, read_only=True),
        "notes": fake.add_block("notes", "n", agent=agent, attached=False,
                                tags=[f"owner:{agent}"]),
    }
    records = []
    client = LettaClient("http://letta.test", transport=fake.transport(), retry_budget=0.2)
    tree = Tree(gitfile=b"gitdir: /somewhere/memory.git\n")
    memory = AgentMemory(client, agent, tree, revalidate=3600,
                         record=lambda *change: records.append(change))
    await memory.load()
    namespace = Namespace(memory, grace=grace)
    nursery.start_soon(namespace.run)
    return SimpleNamespace(fake=fake, ids=ids, fs=MemoryFs(memory, namespace), memory=memory,
                           namespace=namespace, records=records, agent=agent, client=client)


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


