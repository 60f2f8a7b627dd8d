"""Fixtures of the fast tests: a mount over the fake API, checked after every test.

Every fast trio test runs on trio's MockClock with autojump: sleeps and timeouts take no real
time, so grace periods and retries are deterministic (tests marked `real_clock` excepted: a
real FUSE mount is served to worker threads in real time). Every test fails on an ERROR log record
it did not declare with `@pytest.mark.expect_error("words")`: an error is memfuse's own failure.
"""
import inspect
import logging

import pytest
import trio
from trio.testing import MockClock

from .fsworld import check_invariants, make_world


def _run_on_autojump_clock(fn, clock=None, instruments=()):
    return trio.run(fn, clock=clock or MockClock(autojump_threshold=0), instruments=instruments)


def pytest_collection_modifyitems(items):
    for item in items:
        if (item.get_closest_marker("integration") is None
                and item.get_closest_marker("real_clock") is None
                and inspect.iscoroutinefunction(getattr(item, "obj", None))):
            item.add_marker(pytest.mark.trio(run=_run_on_autojump_clock))


@pytest.fixture(autouse=True)
def no_unexpected_errors(request, caplog):
    """Fail the test on an ERROR (or worse) log record from memfuse that it did not expect."""
    caplog.set_level(logging.INFO, logger="memfuse")
    yield
    expected = [m.args[0] for m in request.node.iter_markers("expect_error")]
    unexpected = [r.getMessage() for r in caplog.get_records("call")
                  if r.levelno >= logging.ERROR and r.name.startswith("memfuse")
                  and not any(words in r.getMessage() for words in expected)]
    assert not unexpected, f"unexpected ERROR log records: {unexpected}"


@pytest.fixture
async def world(nursery):
    """Operations of a mount over the fake API (see fsworld.make_world); after the test, the
    state's invariants are checked."""
    result = await make_world(nursery)
    yield result
    check_invariants(result)
    await result.client.aclose()


@pytest.fixture
async def git_world(nursery):
    """As `world`, over an agent tagged `git-memory-enabled` (fsworld.git_memory_agent),
    mounted in the git-memory layout."""
    result = await make_world(nursery, git_memory=True)
    yield result
    check_invariants(result)
    await result.client.aclose()
