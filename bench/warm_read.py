"""Warm open+read+close of a small file, side by side: tmpfs, the minimal pyfuse3 filesystem
(bench/minimalfs.py) and a memfuse block file. Rounds alternate between the three so machine
noise hits them alike; prints the median microseconds per open+read+close of each and the
ratios.

Usage: python bench/warm_read.py TMPFS_FILE MINIMAL_FILE MEMFUSE_FILE [ROUNDS] [PER_ROUND]
"""
from __future__ import annotations

import statistics
import sys
import time


def per_op_us(path: str, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        with open(path, "rb") as f:
            f.read()
    return (time.perf_counter() - started) / count * 1e6


def main() -> None:
    paths = sys.argv[1:4]
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 15
    per_round = int(sys.argv[5]) if len(sys.argv) > 5 else 300
    for path in paths:
        per_op_us(path, 50)  # warm every cache
    times: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(rounds):
        for path in paths:
            times[path].append(per_op_us(path, per_round))
    tmpfs, minimal, memfuse = (statistics.median(times[p]) for p in paths)
    print(f"tmpfs {tmpfs:.1f} us, minimal pyfuse3 {minimal:.1f} us, memfuse {memfuse:.1f} us; "
          f"memfuse / minimal = {memfuse / minimal:.2f}x")


if __name__ == "__main__":
    main()
