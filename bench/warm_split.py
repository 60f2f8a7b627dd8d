"""Where a warm open+read+close goes, per system call, and what it costs the daemon.

For each file: the median microseconds of each system call Python's `open(path, "rb").read()`
and the close make (open, fstat, the isatty ioctl, read until EOF, close), rounds alternating
between the files; then, when a daemon pid is given, the daemon's CPU time (user + system, from
/proc) per open+read+close over COUNT more of them. A system call that waits for the daemon
costs one FUSE round trip (the close waits for FLUSH; RELEASE is sent in the background).

Usage: python bench/warm_split.py FILE[:PID] FILE[:PID] ... [--rounds N] [--count N]
   e.g. python bench/warm_split.py /mnt/min/file.md:1234 ~/memory/system/human.md:5678
"""
from __future__ import annotations

import fcntl
import os
import statistics
import sys
import termios
import time

CALLS = ("open", "fstat", "ioctl", "read", "close")


def split_us(path: str, count: int) -> dict[str, float]:
    """Median microseconds of each system call of `count` open+read+close of `path`."""
    times: dict[str, list[int]] = {call: [] for call in CALLS}
    clock = time.perf_counter_ns
    for _ in range(count):
        a = clock()
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        b = clock()
        os.fstat(fd)
        c = clock()
        try:
            fcntl.ioctl(fd, termios.TCGETS, bytes(64))
        except OSError:
            pass  # not a terminal: what isatty() learns
        d = clock()
        while os.read(fd, 65536):
            pass
        e = clock()
        os.close(fd)
        f = clock()
        for call, spent in zip(CALLS, (b - a, c - b, d - c, e - d, f - e)):
            times[call].append(spent)
    return {call: statistics.median(v) / 1000 for call, v in times.items()}


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    args, rounds, count = sys.argv[1:], 9, 30000
    for flag in ("--rounds", "--count"):
        if flag in args:
            i = args.index(flag)
            value = int(args[i + 1])
            del args[i:i + 2]
            rounds, count = (value, count) if flag == "--rounds" else (rounds, value)
    targets = [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) if ":" in a else (a, None)
               for a in args]
    for path, _pid in targets:
        split_us(path, 200)  # warm every cache
    runs: dict[str, list[dict[str, float]]] = {path: [] for path, _pid in targets}
    for _ in range(rounds):
        for path, _pid in targets:
            runs[path].append(split_us(path, 300))
    for path, pid in targets:
        medians = {call: statistics.median(r[call] for r in runs[path]) for call in CALLS}
        line = "  ".join(f"{call} {us:5.1f}" for call, us in medians.items())
        line = f"{path}: {line}  sum {sum(medians.values()):5.1f} us"
        if pid is not None:
            before, started = cpu_seconds(pid), time.perf_counter()
            for _ in range(count):
                with open(path, "rb") as f:
                    f.read()
            wall = (time.perf_counter() - started) / count * 1e6
            line += (f"; daemon CPU {(cpu_seconds(pid) - before) / count * 1e6:.1f} us per "
                     f"open+read+close (wall {wall:.1f} us)")
        print(line)


if __name__ == "__main__":
    main()
