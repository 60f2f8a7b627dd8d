"""Which mount and which daemon `memfuse umount` and `memfuse status` are asked about: an agent
id (its pid file under this HOME), or a mountpoint path, whoever mounted it.

A path is looked up in the kernel's mount table (mounttable.py), which every user can read and
which names a FUSE mount's owner, so another user's mount, or one made under another HOME, is
found for what it is. Its daemon's record (the pid file under the HOME the daemon started
with) is looked for, when this user may read it (its owner, or root): under this HOME, beside a
default mountpoint (`<state dir>/memory`), under the owner's home directory, and under the
HOME of each memfuse daemon the owner runs (procs.py).
"""
from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from . import mounttable, procs
from .config import RunningMount, agent_dir, running_mounts
from .daemon import answers, is_mounted
from .mounttable import KernelMount


@dataclass
class Found:
    """A mount asked about: its path, the kernel's entry at that path (None: nothing is
    mounted there) and its daemon's record with the pid file it came from (None: no record
    was found)."""

    mountpoint: Path
    kernel: KernelMount | None
    pid_file: Path | None = None
    record: RunningMount | None = None

    @property
    def owner_uid(self) -> int | None:
        """The uid that made the mount (a FUSE mount's `user_id`), None when not known."""
        return self.kernel.owner_uid if self.kernel is not None else None

    @property
    def owner(self) -> str:
        """The owner's login name (`uid N` without one); `another user` when unknown."""
        uid = self.owner_uid
        return mounttable.user_name(uid) if uid is not None else "another user"

    @property
    def foreign(self) -> bool:
        """Whether another user made the mount."""
        return self.owner_uid is not None and self.owner_uid != os.getuid()

    @property
    def private(self) -> bool:
        """Whether its daemon and records are out of this user's reach: another user's mount,
        and we are not root."""
        return self.foreign and os.geteuid() != 0

    @property
    def alien(self) -> bool:
        """Whether something that is not memfuse is mounted there (and no record names it)."""
        return self.kernel is not None and not self.kernel.is_memfuse and self.record is None

    @property
    def status_file(self) -> Path | None:
        """The daemon's status file, beside its pid file."""
        return self.pid_file.with_name("memfuse.status.json") if self.pid_file else None

    def daemon_gone(self) -> bool:
        """Whether nothing serves the mount for certain: its FUSE connection is gone, or, when
        this user cannot probe it (another user's mount, as root), its record names a daemon
        that no longer runs. False when a daemon may still serve it: it is then never
        cleared."""
        served = answers(self.mountpoint)
        if served is not None:
            return not served
        return self.record is not None and not self.record.alive()


def find(target: str) -> Found:
    """The mount `target` names: an agent id (no `/`, and no directory or mount of that name
    here) by its pid file under this HOME, else a path (made absolute) by the kernel's table.
    Raises ConfigError for a name that is no agent id; OSError when /proc cannot be read."""
    if os.sep not in target and not os.path.isdir(target) and not is_mounted(Path(target)):
        pid_file = agent_dir(target) / "memfuse.pid"
        record = RunningMount.load(pid_file)
        mountpoint = Path(record.mountpoint) if record else agent_dir(target) / "memory"
        return Found(mountpoint, mounttable.mount_at(mountpoint), pid_file, record)
    return by_path(Path(target).expanduser().absolute())


def by_path(mountpoint: Path) -> Found:
    """The mount at the absolute `mountpoint` and its daemon's record, wherever it is kept
    (see the module's doc): a live daemon's record before a dead one's. Raises OSError when
    /proc cannot be read."""
    found = Found(mountpoint, mounttable.mount_at(mountpoint))
    mine = [(p, r) for p, r in running_mounts() if mounttable.same_path(r.mountpoint, mountpoint)]
    elsewhere = []
    if found.kernel is not None and found.kernel.is_memfuse and not found.private:
        elsewhere = [(p, r) for p, r in _records_of(found) if p not in dict(mine)]
    candidates = mine + elsewhere
    best = next(((p, r) for p, r in candidates if r.alive()), None) or next(iter(candidates),
                                                                             None)
    if best is not None:
        found.pid_file, found.record = best
    return found


def _records_of(found: Found) -> list[tuple[Path, RunningMount]]:
    """The records outside this HOME that name `found.mountpoint`."""
    homes = []
    uid = found.owner_uid
    if uid is not None:
        try:
            homes.append(Path(pwd.getpwuid(uid).pw_dir))
        except KeyError:
            pass
        homes += [home for pid in procs.daemons(uid) if (home := procs.home_of(pid))]
    records = []
    sibling = found.mountpoint.parent / "memfuse.pid"  # the default layout
    if (record := RunningMount.load(sibling)) is not None:
        records.append((sibling, record))
    for home in dict.fromkeys(homes):
        records += running_mounts(home)
    return [(p, r) for p, r in dict(records).items()
            if mounttable.same_path(r.mountpoint, found.mountpoint)]


def mine() -> list[Found]:
    """A Found for every pid file under this HOME (`umount --all`, `status`), by agent id.
    Raises OSError when /proc cannot be read."""
    table = mounttable.mounts()
    return [Found(Path(r.mountpoint), mounttable.mount_at(Path(r.mountpoint), table), p, r)
            for p, r in running_mounts()]
