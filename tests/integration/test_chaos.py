"""The short form of scripts/chaos: kill -9 of the real daemon at a random moment while a writer
runs, once online and once with the server cut off (journaled writes), against the real Letta
server. Every acknowledged write must be on the server and the history must pass git fsck.
The 50-trial run is `scripts/chaos 50`; its figures are in bench/results.md.

Then one short run of each fault mode of `scripts/chaos --faults MODE` (bench/faults.py; issue
17 point 7): flapping, slow, injected errors, a lost answer per request kind, a full tmpfs
HOME. Each: 0 lost, 0 duplicate blocks, fsck clean, the journal empty within a minute."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location(
    "memfuse_chaos", Path(__file__).resolve().parents[2] / "bench" / "chaos.py")
chaos = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = chaos  # dataclasses look their module up while it loads
_spec.loader.exec_module(chaos)


def test_kill_9_online_and_offline_loses_no_acknowledged_write(letta_url):
    result = chaos.run(letta_url, trials=2, seed=7)
    assert result.acknowledged > 0
    assert (result.lost, result.fsck_errors) == (0, 0), result.details


# The short form of `scripts/chaos --faults MODE` (bench/faults.py): a few seconds of each fault
# with a writer going on; the 20- and 5-run figures are in bench/results.md.
_spec = importlib.util.spec_from_file_location(
    "memfuse_faults", Path(__file__).resolve().parents[2] / "bench" / "faults.py")
faults = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = faults
_spec.loader.exec_module(faults)


def _fault_run(letta_url, mode: str, seconds: float):
    import random

    import httpx
    with httpx.Client(base_url=letta_url, timeout=30) as api:
        run = faults.run_mode(api, letta_url, mode, seconds, 0, random.Random(17))
    assert run.acknowledged > 0 and run.faults > 0, run
    assert (run.lost, run.duplicates, run.fsck_errors) == (0, 0, 0), run.details
    assert run.drain_s < faults.DRAIN_BOUND, run
    return run


def test_flapping_link_loses_nothing_and_drains(letta_url):
    _fault_run(letta_url, "flapping", 6)


def test_slow_server_loses_nothing_and_drains(letta_url):
    _fault_run(letta_url, "slow", 5)


def test_injected_500_503_429_504_lose_nothing_and_drain(letta_url):
    _fault_run(letta_url, "errors", 5)


def test_lost_answer_to_each_create_and_write_request_loses_nothing(letta_url):
    run = _fault_run(letta_url, "lost", 40)
    assert run.missed == [], run.notes  # every kind of request had its answer lost


def test_full_tmpfs_home_gives_enospc_and_loses_nothing(letta_url):
    _fault_run(letta_url, "tmpfs", 2)  # faults: ENOSPC the writer saw
