"""The short form of scripts/chaos --ordering for what tests/integration/test_ordering.py does not
cover already: system/dir renamed to dir2 and back every 0.3 s while 3 processes create files in
it, against the real server and a real mount. Every acknowledged file must end under the name
the directory ended in, and the mount, the server's blocks and the history (before and after
unmount) agree. The 30 s run is `scripts/chaos --ordering dirrename`; its figures are in
bench/results.md ("Ordering under load (issue 22)")."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location(
    "memfuse_ordering_chaos", Path(__file__).resolve().parents[2] / "bench" / "ordering_chaos.py")
ordering_chaos = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ordering_chaos  # dataclasses look their module up while it loads
_spec.loader.exec_module(ordering_chaos)


def test_a_directory_renamed_under_three_creators_ends_where_the_mount_server_and_history_agree(
        letta_url):
    out = ordering_chaos.run_scenario(letta_url, "dirrename", ordering_chaos.Knobs(seconds=4))
    assert out.ok, (out.figures, out.failures)
    assert out.figures["renames"] >= 2 and out.figures["files acknowledged"] >= 3, out.figures
