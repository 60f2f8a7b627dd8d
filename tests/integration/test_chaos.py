"""The short form of scripts/chaos: kill -9 of the real daemon at a random moment while a writer
runs, once online and once with the server cut off (journaled writes), against the real Letta
server. Every acknowledged write must be on the server and the history must pass git fsck.
The 50-trial run is `scripts/chaos 50`; its figures are in bench/results.md."""
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
