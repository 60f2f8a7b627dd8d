"""Fixtures for tests against the real Letta server and a real FUSE mount.

scripts/test starts the server and exports MEMFUSE_TEST_LETTA_URL. Without it these tests fail
(never skip): a green run must mean the real thing was exercised.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from urllib.parse import urlparse

import httpx
import pytest

from .proxy import Proxy

MEMFUSE = str(Path(sys.executable).parent / "memfuse")


@pytest.fixture(scope="session")
def letta_url() -> str:
    url = os.environ.get("MEMFUSE_TEST_LETTA_URL")
    if not url:
        pytest.fail("MEMFUSE_TEST_LETTA_URL is not set: run the tests with scripts/test, which "
                    "starts the real Letta server")
    try:
        httpx.get(f"{url}/v1/health/", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(f"the Letta server at {url} does not answer: {exc}")
    return url


@pytest.fixture
def proxy(letta_url):
    """A loopback TCP proxy to the server that a test cuts and restores (a real fault)."""
    url = urlparse(letta_url)
    p = Proxy((url.hostname, url.port))
    yield p
    p.close()


@pytest.fixture
def api(letta_url):
    with httpx.Client(base_url=letta_url, timeout=30) as client:
        yield client


DEFAULT_BLOCKS = [
    {"label": "human", "value": "The human.\n", "limit": 2000, "description": "About the human"},
    {"label": "persona", "value": "I am a test agent.\n", "limit": 40, "description": "Who I am"},
]


def make_agent(api, blocks: list[dict]) -> str:
    """A new agent with `blocks` attached (no LLM key needed: letta-free, no tools)."""
    response = api.post("/v1/agents/", json={
        "name": f"memfuse-test-{uuid.uuid4().hex[:8]}",
        "model": "letta/letta-free", "embedding": "letta/letta-free",
        "include_base_tools": False, "memory_blocks": blocks,
    })
    response.raise_for_status()
    return response.json()["id"]


@pytest.fixture
def agent(api) -> str:
    """A fresh agent with the DEFAULT_BLOCKS attached."""
    agent_id = make_agent(api, DEFAULT_BLOCKS)
    yield agent_id
    api.delete(f"/v1/agents/{agent_id}")


def block_by_label(api, agent_id: str, label: str) -> dict:
    blocks = api.get(f"/v1/agents/{agent_id}/core-memory/blocks").json()
    return next(b for b in blocks if b["label"] == label)


@dataclass
class Mount:
    """A memfuse mount started with the real CLI; `env` has HOME pointed at a fresh dir."""

    agent_id: str
    path: Path
    env: dict
    state: Path

    def memfuse(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([MEMFUSE, *args], env=self.env, capture_output=True, text=True,
                                timeout=240)
        if check and result.returncode != 0:
            raise AssertionError(f"memfuse {' '.join(args)} failed: {result.stderr}")
        return result

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", "-c", script], cwd=self.path, env=self.env,
                              capture_output=True, text=True, check=check, timeout=60)

    def log(self) -> str:
        return (self.state / "memfuse.log").read_text()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.1):
    """Poll `predicate` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@pytest.fixture
def home(letta_url) -> dict:
    """An environment whose HOME is a fresh directory, pointed at the test server.

    It is under ~/.cache, not /tmp: editors treat files under /tmp specially (vim's
    'backupskip', emacs's backup predicate) and the tests must see what users get.
    """
    root = Path(os.environ.get("MEMFUSE_TEST_HOMES",
                               Path.home() / ".cache" / "memfuse" / "test-homes"))
    path = root / uuid.uuid4().hex[:12]
    path.mkdir(parents=True)
    env = dict(os.environ, HOME=str(path), LETTA_BASE_URL=letta_url)
    env.pop("LETTA_API_KEY", None)
    yield env
    shutil.rmtree(path, ignore_errors=True)


def start_mount(agent_id: str, env: dict, *args: str) -> Mount:
    """Mount `agent_id` at its default mountpoint under env's HOME with the real CLI."""
    state = Path(env["HOME"]) / ".letta" / "agents" / agent_id
    m = Mount(agent_id, state / "memory", env, state)
    m.memfuse("mount", agent_id, "--revalidate", "0.5", *args)
    assert os.path.ismount(m.path)
    return m


def stop_mount(m: Mount) -> None:
    """Unmount; fail the test if the mount stays."""
    if os.path.ismount(m.path):
        result = m.memfuse("umount", m.agent_id, check=False)
        if os.path.ismount(m.path):
            subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False)
            pytest.fail(f"umount left the mount in place: {result.stderr}")


@pytest.fixture
def mount(agent, home):
    m = start_mount(agent, home)
    yield m
    stop_mount(m)
