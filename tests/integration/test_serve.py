"""`memfuse serve` as a person runs it, with the real `git` CLI against the real Letta server:
clone, a pull after an API edit, an unknown agent, a push (applied, refused, stale then rebased),
a mounted agent, status, and a clean stop on SIGTERM."""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from .conftest import (DEFAULT_BLOCKS, MEMFUSE, block_by_label, make_agent, start_mount,
                       stop_mount)

pytestmark = pytest.mark.integration

KEY = "sk-memfuse-test-key"  # the 0.16.8 test server wants none; git may send it or not


class Serve:
    """A `memfuse serve --listen 127.0.0.1:0` subprocess; `url` from the line it prints."""

    def __init__(self, env: dict):
        self.env = env
        self.proc = subprocess.Popen([MEMFUSE, "serve", "--listen", "127.0.0.1:0"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        if match is None:
            self.proc.kill()
            pytest.fail(f"memfuse serve printed no URL: {line!r} {self.proc.stderr.read()}")
        self.url = match[0]
        self.netloc = self.url.removeprefix("http://")

    def git_url(self, agent_id: str, key: str | None = KEY) -> str:
        auth = f"letta:{key}@" if key else ""
        return f"http://{auth}{self.netloc}/v1/git/{agent_id}/state.git"

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then (exit status, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _out, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
            pytest.fail(f"memfuse serve did not stop within 20 s on SIGTERM: {err}")
        return self.proc.returncode, err


@pytest.fixture
def serve(home):
    s = Serve(home)
    yield s
    s.stop()


def git(*args: str, cwd: Path | None = None, env: dict, check: bool = True
        ) -> subprocess.CompletedProcess:
    env = dict(env, GIT_TERMINAL_PROMPT="0")
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {result.stderr}")
    return result


def test_clone_then_a_pull_after_an_api_edit_shows_it_at_once(serve, agent, api, home,
                                                              tmp_path):
    clone = tmp_path / "clone"
    git("clone", serve.git_url(agent), str(clone), env=home)
    human = (clone / "system/human.md").read_text()
    assert human.startswith("---\ndescription: About the human\nlimit: 2000\n---\n")
    assert human.endswith("---\nThe human.\n")
    assert (clone / "system/persona.md").read_text().endswith("---\nI am a test agent.\n")
    log = git("log", "--format=%an|%s", cwd=clone, env=home).stdout.splitlines()
    assert log[0].startswith("Letta server|Server change: ")

    block = block_by_label(api, agent, "human")
    api.patch(f"/v1/blocks/{block['id']}", json={"value": "Edited through the API.\n"}
              ).raise_for_status()
    started = time.monotonic()
    git("pull", "--ff-only", cwd=clone, env=home)
    assert time.monotonic() - started < 5
    assert (clone / "system/human.md").read_text().endswith("---\nEdited through the API.\n")
    assert git("status", "--porcelain", cwd=clone, env=home).stdout == ""

    # a later mount continues the same history: nothing to commit at mount
    head = git("rev-parse", "HEAD", cwd=clone, env=home).stdout.strip()
    history = Path(home["HOME"]) / ".letta/agents" / agent / "memory.git"
    assert git("--git-dir", str(history), "rev-parse", "main", env=home).stdout.strip() == head
    code, err = serve.stop()
    assert code == 0, err
    m = start_mount(agent, home)
    try:
        assert (m.path / "system/human.md").read_text() == (clone / "system/human.md").read_text()
    finally:
        stop_mount(m)
    assert git("--git-dir", str(history), "rev-parse", "main", env=home).stdout.strip() == head


def test_an_unknown_agent_is_not_found(serve, home, tmp_path):
    result = git("clone", serve.git_url("agent-00000000-0000-4000-8000-000000000000"),
                 str(tmp_path / "clone"), env=home, check=False)
    assert result.returncode != 0
    assert "not found" in result.stderr


def commit(clone: Path, message: str, env: dict) -> str:
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", message, cwd=clone,
        env=env)
    return git("rev-parse", "HEAD", cwd=clone, env=env).stdout.strip()


def test_a_push_is_on_the_server_when_it_returns(serve, agent, api, home, tmp_path):
    clone = tmp_path / "clone"
    git("clone", serve.git_url(agent), str(clone), env=home)
    (clone / "system/human.md").write_text("---\ndescription: About the human\n---\nPushed.\n")
    (clone / "notes.md").write_text("---\ndescription: Notes\n---\n- a note\n")
    git("add", "notes.md", cwd=clone, env=home)
    git("rm", "-q", "system/persona.md", cwd=clone, env=home)
    pushed = commit(clone, "edit, create, rm", home)
    git("push", "-q", "origin", "main", cwd=clone, env=home)
    # when git push returns, every change is on the server
    assert block_by_label(api, agent, "human")["value"] == "Pushed.\n"
    attached = {b["label"] for b in api.get(f"/v1/agents/{agent}/core-memory/blocks").json()}
    assert attached == {"human"}  # persona detached (not deleted), notes.md is detached
    owned = api.get("/v1/blocks/", params={"tags": f"owner:{agent}"}).json()
    assert [b["value"] for b in owned if b["label"] == "notes"] == ["- a note\n"]
    history = Path(home["HOME"]) / ".letta/agents" / agent / "memory.git"
    assert git("--git-dir", str(history), "rev-parse", "main", env=home).stdout.strip() == pushed
    git("pull", "--ff-only", cwd=clone, env=home)  # nothing normalises the pushed bytes
    assert git("rev-parse", "HEAD", cwd=clone, env=home).stdout.strip() == pushed
    git("--git-dir", str(history), "fsck", "--strict", env=home)


def test_a_refused_push_names_the_file_and_the_rule(serve, agent, api, home, tmp_path):
    clone = tmp_path / "clone"
    git("clone", serve.git_url(agent), str(clone), env=home)
    (clone / "system/persona.md").write_text("---\ndescription: Who I am\n---\n" + "x" * 41)
    commit(clone, "over the limit", home)
    result = git("push", "origin", "main", cwd=clone, env=home, check=False)
    assert result.returncode != 0
    assert ("remote:   system/persona.md: value is 41 characters, over the limit of 40 (EFBIG)"
            in result.stderr), result.stderr
    assert "[remote rejected] main -> main" in result.stderr
    assert block_by_label(api, agent, "persona")["value"] == "I am a test agent.\n"


def test_a_stale_push_is_refused_then_pull_rebase_and_push_land(serve, agent, api, home,
                                                               tmp_path):
    clone = tmp_path / "clone"
    git("clone", serve.git_url(agent), str(clone), env=home)
    block = block_by_label(api, agent, "persona")
    api.patch(f"/v1/blocks/{block['id']}", json={"value": "Edited by the API.\n"}
              ).raise_for_status()
    (clone / "system/human.md").write_text("---\ndescription: About the human\n---\nMine.\n")
    commit(clone, "edit", home)
    result = git("push", "origin", "main", cwd=clone, env=home, check=False)
    assert result.returncode != 0 and "rejected" in result.stderr, result.stderr
    assert block_by_label(api, agent, "human")["value"] == "The human.\n"
    git("-c", "user.name=t", "-c", "user.email=t@t", "pull", "-q", "--rebase", "origin", "main",
        cwd=clone, env=home)
    git("push", "-q", "origin", "main", cwd=clone, env=home)
    assert block_by_label(api, agent, "human")["value"] == "Mine.\n"
    assert block_by_label(api, agent, "persona")["value"] == "Edited by the API.\n"


def test_with_the_server_cut_off_a_recent_key_fetches_the_last_history_a_push_is_refused(
        agent, api, home, proxy, tmp_path):
    env = dict(home, LETTA_BASE_URL=proxy.url)  # serve reaches Letta through a real proxy
    unseen = make_agent(api, DEFAULT_BLOCKS)
    serve = Serve(env)
    try:
        clone = tmp_path / "clone"
        git("clone", "-q", serve.git_url(agent), str(clone), env=env)
        (clone / "system/human.md").write_text("---\ndescription: About the human\n---\nOff.\n")
        commit(clone, "edit while the server is away", env)
        proxy.cut()
        again = tmp_path / "again"
        git("clone", "-q", serve.git_url(agent), str(again), env=env)  # the last known history
        assert (again / "system/human.md").read_text().endswith("The human.\n")
        # git sends no key unless asked (the test server wants none), so the key Letta
        # accepted is "none"; an agent no request fetched lately is refused
        other = git("clone", serve.git_url(unseen), str(tmp_path / "o"), env=env, check=False)
        assert other.returncode != 0
        assert "has not accepted this request's key" in other.stderr, other.stderr
        pushed = git("push", "origin", "main", cwd=clone, env=env, check=False)
        assert pushed.returncode != 0
        assert "nothing was applied" in pushed.stderr, pushed.stderr
        proxy.restore()
        assert block_by_label(api, agent, "human")["value"] == "The human.\n"
        git("push", "-q", "origin", "main", cwd=clone, env=env)  # back: it lands
        assert block_by_label(api, agent, "human")["value"] == "Off.\n"
    finally:
        serve.stop()
        api.delete(f"/v1/agents/{unseen}")


def tree(root: Path) -> dict[str, bytes]:
    """Path -> bytes of every file under `root` but `.git`."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(root).parts}


def test_a_mounted_agent_is_served_by_its_daemon_live_both_ways(serve, agent, api, home,
                                                               tmp_path):
    status = subprocess.run([MEMFUSE, "status"], env=home, capture_output=True, text=True,
                            timeout=30)
    assert f"memfuse serve at {serve.url}" in status.stdout
    m = start_mount(agent, home)
    clone = tmp_path / "clone"
    try:
        git("clone", serve.git_url(agent), str(clone), env=home)
        assert tree(clone) == tree(m.path)
        # an edit in the mount is in the very next pull
        (m.path / "system/human.md").write_text("Written in the mount.\n")
        git("pull", "--ff-only", cwd=clone, env=home)
        assert (clone / "system/human.md").read_text().endswith("---\nWritten in the mount.\n")
        # a push of an edit (no limit key: not the mount's rendering), a create and a git rm
        (clone / "system/human.md").write_text("---\ndescription: About them\n---\nPushed.\n")
        (clone / "todo.md").write_text("---\ndescription: Things\n---\nbuy milk\n")
        git("rm", "-q", "system/persona.md", cwd=clone, env=home)
        git("add", "-A", cwd=clone, env=home)
        git("commit", "-q", "-m", "edit, create, remove", cwd=clone, env=home)
        git("push", "-q", "origin", "main", cwd=clone, env=home)
        # on the server and in the mount when git push returns, with the pushed bytes
        assert block_by_label(api, agent, "human")["value"] == "Pushed.\n"
        assert (m.path / "system/human.md").read_bytes() == (
            b"---\ndescription: About them\n---\nPushed.\n")
        assert (m.path / "todo.md").read_text().endswith("---\nbuy milk\n")
        assert not (m.path / "system/persona.md").exists()
        pushed = git("rev-parse", "HEAD", cwd=clone, env=home).stdout.strip()
        history = m.state / "memory.git"
        assert git("--git-dir", str(history), "rev-parse", "main", env=home
                   ).stdout.strip() == pushed  # no commit normalised it

        # writes in the mount and pushes from the clone at once, then both agree byte for byte
        def write_in_the_mount() -> None:
            for i in range(20):
                (m.path / "notes.md").write_text(f"note {i}\n")
        writer = threading.Thread(target=write_in_the_mount)
        writer.start()
        for i in range(5):
            (clone / "todo.md").write_text(f"---\ndescription: Things\n---\nitem {i}\n")
            git("commit", "-q", "-am", f"item {i}", cwd=clone, env=home)
            after_writes = 0  # refusals once the writes ended
            while True:  # a write in the mount moved main: git's refusal, rebase, push again
                refused = git("push", "-q", "origin", "main", cwd=clone, env=home, check=False)
                if refused.returncode == 0:
                    break
                assert re.search(r"fetch first|non-fast-forward", refused.stderr), refused.stderr
                after_writes += not writer.is_alive()
                assert after_writes <= 2, "a push kept being refused after the writes ended"
                git("pull", "-q", "--rebase", cwd=clone, env=home)
            assert (m.path / "todo.md").read_text().endswith(f"---\nitem {i}\n")
        writer.join(60)
        git("pull", "-q", "--ff-only", cwd=clone, env=home)
        assert tree(clone) == tree(m.path)
        assert (m.path / "notes.md").read_text().endswith("---\nnote 19\n")
        git("fsck", "--strict", cwd=clone, env=home)
        git("--git-dir", str(history), "fsck", "--strict", env=home)
    finally:
        stop_mount(m)
    git("pull", "-q", "--ff-only", cwd=clone, env=home)  # served by serve itself again
    code, err = serve.stop()
    assert code == 0 and "serve stopped" in err
    assert not list((Path(home["HOME"]) / ".letta/serve").glob("*.json"))
    assert KEY not in err
    assert not any(KEY.encode() in p.read_bytes()
                   for p in (Path(home["HOME"]) / ".letta").rglob("*") if p.is_file())



def test_a_mount_written_without_a_pause_is_fetched_at_once_and_a_push_is_never_a_503(
        serve, agent, home, tmp_path):
    # a listing a local write raced is dropped; a git request's listing holds the mount's
    # writes back while it runs instead (Remote.changes_held), so it is not starved: before,
    # each request waited 30 s and a push was refused as if the server were away
    m = start_mount(agent, home)
    clone = tmp_path / "clone"
    stop, written = threading.Event(), []

    def write_without_a_pause() -> None:
        while not stop.is_set():
            (m.path / "notes.md").write_text(f"note {len(written)}\n")
            written.append(1)
    try:
        git("clone", "-q", serve.git_url(agent), str(clone), env=home)
        writer = threading.Thread(target=write_without_a_pause)
        writer.start()
        try:
            while len(written) < 3:
                time.sleep(0.01)
            before = len(written) - 1  # a write acknowledged before the pull started
            git("pull", "-q", "--ff-only", cwd=clone, env=home)
            note = int((clone / "notes.md").read_text().rsplit("note ", 1)[1])
            assert note >= before
            (clone / "todo.md").write_text("---\ndescription: Things\n---\nwhile written\n")
            git("add", "-A", cwd=clone, env=home)
            git("commit", "-q", "-m", "todo", cwd=clone, env=home)
            for _attempt in range(3):  # main moves with each write: git's own refusal, at once
                pushed = git("push", "-q", "origin", "main", cwd=clone, env=home, check=False)
                if pushed.returncode == 0:
                    break
                assert "does not answer" not in pushed.stderr and "503" not in pushed.stderr
                assert re.search(r"fetch first|non-fast-forward", pushed.stderr), pushed.stderr
                git("pull", "-q", "--rebase", cwd=clone, env=home)
        finally:
            stop.set()
            writer.join(30)
        git("pull", "-q", "--rebase", cwd=clone, env=home)
        git("push", "-q", "origin", "main", cwd=clone, env=home)
        assert (m.path / "todo.md").read_text().endswith("---\nwhile written\n")
        git("pull", "-q", "--ff-only", cwd=clone, env=home)
        assert tree(clone) == tree(m.path)
        assert (m.path / "notes.md").read_text().endswith(f"note {len(written) - 1}\n")
    finally:
        stop.set()
        stop_mount(m)

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="session")
def letta_code() -> str:
    """The `letta` command of letta-code 0.25 (scripts/letta-code installs it once, cached)."""
    result = subprocess.run([str(ROOT / "scripts/letta-code"), "path"], capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"scripts/letta-code could not install letta-code: {result.stderr}")
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture
def tagged_agent(api):
    """An agent tagged `git-memory-enabled`: created with the tag, 0.16.8 renames its labels to
    `system/<label>` but drops the tag; a PATCH then sets it."""
    response = api.post("/v1/agents/", json={
        "name": f"memfuse-test-{uuid.uuid4().hex[:8]}", "model": "letta/letta-free",
        "embedding": "letta/letta-free", "include_base_tools": False,
        "tags": ["git-memory-enabled"], "memory_blocks": DEFAULT_BLOCKS})
    response.raise_for_status()
    agent_id = response.json()["id"]
    labels = {b["label"] for b in api.get(f"/v1/agents/{agent_id}/core-memory/blocks").json()}
    assert labels == {"system/human", "system/persona"}
    api.patch(f"/v1/agents/{agent_id}", json={"tags": ["git-memory-enabled"]}).raise_for_status()
    yield agent_id
    api.delete(f"/v1/agents/{agent_id}")


def test_letta_codes_memfs_startup_sync_clones_through_serve(serve, tagged_agent, home, api,
                                                           letta_code, letta_url, tmp_path):
    env = dict(home, LETTA_BASE_URL=letta_url, LETTA_MEMFS_BASE_URL=serve.url,
               LETTA_MEMFS_LOCAL="1")
    # run in a directory of its own: letta-code keeps project settings in ./.letta
    run = subprocess.run([letta_code, "--agent", tagged_agent, "-p", "hi", "--memfs-startup",
                          "blocking"], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=180)
    output = run.stdout + run.stderr
    assert "Memory git sync failed" not in output, output  # the model call then fails: no network
    memory = Path(home["HOME"]) / ".letta/agents" / tagged_agent / "memory"
    assert (memory / "system/human.md").read_text().endswith("---\nThe human.\n")
    assert (memory / "system/persona.md").exists()
    origin = git("remote", "get-url", "origin", cwd=memory, env=home).stdout.strip()
    assert origin == f"{serve.url}/v1/git/{tagged_agent}/state.git"
    status = subprocess.run([letta_code, "memory", "status", "--agent", tagged_agent], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert '"summary": "clean"' in status.stdout, status.stdout + status.stderr
    # a commit through letta-code's pre-commit hook, and its push, land on the server
    human = (memory / "system/human.md").read_text()
    (memory / "system/human.md").write_text(human.replace("The human.\n", "Pushed by git.\n"))
    git("commit", "-qam", "edit through the hook", cwd=memory, env=env)
    git("push", "-q", "origin", "main", cwd=memory, env=env)
    assert block_by_label(api, tagged_agent, "system/human")["value"] == "Pushed by git.\n"
    status = subprocess.run([letta_code, "memory", "status", "--agent", tagged_agent], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert '"summary": "clean"' in status.stdout, status.stdout + status.stderr


def test_letta_code_on_the_live_mount_finds_its_repository_and_has_nothing_to_do(
        serve, tagged_agent, home, api, letta_code, letta_url, tmp_path):
    env = dict(home, LETTA_BASE_URL=letta_url, LETTA_MEMFS_BASE_URL=serve.url,
               LETTA_MEMFS_LOCAL="1")
    m = start_mount(tagged_agent, env)  # at its default place: letta-code's memory directory
    history = m.state / "memory.git"
    try:
        assert git("remote", "get-url", "origin", cwd=m.path, env=home).stdout.strip() == (
            f"{serve.url}/v1/git/{tagged_agent}/state.git")
        before = git("rev-parse", "main", cwd=m.path, env=home).stdout.strip()
        run = subprocess.run([letta_code, "--agent", tagged_agent, "-p", "hi",
                              "--memfs-startup", "blocking"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=180)
        output = run.stdout + run.stderr
        assert "Memory git sync failed" not in output, output
        assert os.path.ismount(m.path)
        # its startup pull had nothing to do: the mount is live
        assert git("rev-parse", "main", cwd=m.path, env=home).stdout.strip() == before
        assert not list((history / "refs").rglob("letta-backup*"))  # no reset to recover
        status = subprocess.run([letta_code, "memory", "status", "--agent", tagged_agent],
                                env=env, cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert '"summary": "clean"' in status.stdout, status.stdout + status.stderr
        # an edit in the mount is live at once; letta-code's commit (through its hook) and
        # push then succeed with nothing left to send
        human = m.path / "system/human.md"
        human.write_text(human.read_text().replace("The human.\n", "Edited in the mount.\n"))
        assert block_by_label(api, tagged_agent, "system/human")["value"] == (
            "Edited in the mount.\n")
        assert (history / "hooks/pre-commit").exists()  # written through the mount's .git
        # letta-code's commit (its pre-commit hook runs) and push exit 0; the snapshot may
        # have committed the edit already, so the commit may hold no change
        git("commit", "-qa", "--allow-empty", "-m", "edit through the hook", cwd=m.path,
            env=env)
        committed = git("rev-parse", "HEAD", cwd=m.path, env=home).stdout.strip()
        git("push", "-q", "origin", "main", cwd=m.path, env=env)
        assert git("rev-parse", "main", cwd=m.path, env=home).stdout.strip() == committed
        assert git("rev-list", "--count", "main@{u}..main", cwd=m.path, env=home
                   ).stdout.strip() == "0"
        assert git("status", "--porcelain", cwd=m.path, env=home).stdout == ""
        assert git("show", "main:system/human.md", cwd=m.path, env=home).stdout.endswith(
            "---\nEdited in the mount.\n")
        status = subprocess.run([letta_code, "memory", "status", "--agent", tagged_agent],
                                env=env, cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert '"summary": "clean"' in status.stdout, status.stdout + status.stderr
        assert block_by_label(api, tagged_agent, "system/human")["value"] == (
            "Edited in the mount.\n")
        # its hooks and config stay out of the history: no key, no hook in any commit
        git("--git-dir", str(history), "fsck", "--strict", env=home)
        listed = git("--git-dir", str(history), "log", "--all", "--name-only", "--format=",
                     env=home).stdout
        assert ".git" not in listed and "hooks" not in listed
    finally:
        stop_mount(m)
