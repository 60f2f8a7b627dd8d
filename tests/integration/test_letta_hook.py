"""letta-code's real pre-commit hook (`memory-git-hooks`, shipped inside the
@letta-ai/letta-code package that scripts/letta-code installs) accepts every file memfuse
renders for a git-memory agent: in a clone of the mount's history, every file is edited,
staged and committed through the hook. The hook also rejects a known-bad file and a rendered
file without its description, so the check cannot pass on nothing."""
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import make_agent, start_mount, stop_mount, wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
TAG = "git-memory-enabled"
HOOK_SOURCE = r"""
const fs = require("fs");
const text = fs.readFileSync(process.argv[1], "utf8");
const found = text.match(/PRE_COMMIT_HOOK_SCRIPT = (`#!\/usr\/bin\/env bash[\s\S]*?`), POST_COMMIT/);
if (!found) { console.error("no PRE_COMMIT_HOOK_SCRIPT in " + process.argv[1]); process.exit(1); }
process.stdout.write(eval(found[1]));
"""


@pytest.fixture(scope="session")
def hook_script() -> str:
    """The pre-commit hook letta-code installs in a memory repository, taken verbatim from its
    bundle (the template literal `PRE_COMMIT_HOOK_SCRIPT`, evaluated by node as letta-code
    does before writing it)."""
    result = subprocess.run([str(ROOT / "scripts/letta-code"), "path"], capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"scripts/letta-code could not install letta-code: {result.stderr}")
    letta = Path(result.stdout.strip().splitlines()[-1]).resolve()
    bundle = letta.parent / "letta.js"
    script = subprocess.run(["node", "-e", HOOK_SOURCE, str(bundle)], capture_output=True,
                            text=True, timeout=60)
    assert script.returncode == 0, script.stderr
    assert "Validate frontmatter in staged memory .md files" in script.stdout
    return script.stdout


@pytest.fixture
def git_agent(api):
    """A tagged agent whose blocks cover what memfuse renders: descriptions given and missing,
    a read-only block, a skill, and paths in system/, reference/ and elsewhere."""
    agent_id = make_agent(api, [
        {"label": "system/human", "value": "The human.\n", "limit": 2000,
         "description": "About the human"},
        {"label": "system/persona", "value": "I am a test agent.\n", "limit": 2000}])
    api.patch(f"/v1/agents/{agent_id}", json={"tags": [TAG]}).raise_for_status()
    for label, extra in (("reference/api", {}), ("notes/todo", {}), ("skills/pdf", {}),
                         ("system/rules", {"read_only": True, "description": "Rules: fixed"}),
                         ("reference/style", {"description": "How to write: 'short'"})):
        made = api.post("/v1/blocks/", json={"label": label, "value": f"{label} text\n",
                                             "limit": 2000, **extra})
        made.raise_for_status()
        api.patch(f"/v1/agents/{agent_id}/core-memory/blocks/attach/{made.json()['id']}"
                  ).raise_for_status()
    yield agent_id
    api.delete(f"/v1/agents/{agent_id}")


def git(clone: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    return subprocess.run(["git", "-C", str(clone), *args], capture_output=True, text=True,
                          check=check, env=env, timeout=60)


def test_letta_codes_hook_accepts_every_rendered_file_and_rejects_bad_ones(
        git_agent, home, hook_script, tmp_path):
    m = start_mount(git_agent, home)
    try:
        history = m.state / "memory.git"
        rendered = sorted(str(p.relative_to(m.path)) for p in m.path.rglob("*.md"))
        assert rendered == ["notes/todo.md", "reference/api.md", "reference/style.md",
                            "skills/pdf/SKILL.md", "system/human.md", "system/persona.md",
                            "system/rules.md"]
        assert (m.path / "reference/api.md").read_text().startswith(
            "---\ndescription: reference/api block\nlimit: 2000\n---\n")
        clone = tmp_path / "clone"
        wait_for(lambda: subprocess.run(["git", "clone", "-q", str(history), str(clone)],
                                        capture_output=True).returncode == 0
                 and sorted(git(clone, "ls-files").stdout.split()) == rendered, timeout=20)
    finally:
        stop_mount(m)
    hook = clone / ".git/hooks/pre-commit"
    hook.write_text(hook_script)
    hook.chmod(0o755)
    for path in rendered:
        if path != "system/rules.md":  # read-only: memfuse refuses the write too (EACCES)
            with open(clone / path, "a") as file:
                file.write("edited\n")
    git(clone, "add", "-A")
    done = git(clone, "commit", "-m", "edit every file", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(git(clone, "show", "--name-only", "--format=", "HEAD").stdout.split()) == [
        p for p in rendered if p != "system/rules.md"]

    # the hook really runs: a known-bad file, a rendered file without its description and an
    # edit of the read-only one are refused
    (clone / "system/bad.md").write_text("---\nfoo: bar\n---\nvalue\n")
    api_file = clone / "reference/api.md"
    api_file.write_text(api_file.read_text().replace("description: reference/api block\n", ""))
    with open(clone / "system/rules.md", "a") as file:
        file.write("edited\n")
    git(clone, "add", "-A")
    refused = git(clone, "commit", "-m", "bad", check=False)
    said = refused.stdout + refused.stderr  # git passes the hook's output on to stderr
    assert refused.returncode == 1 and "Frontmatter validation failed" in said
    assert "system/bad.md: unknown frontmatter key 'foo'" in said
    assert "system/bad.md: missing required field 'description'" in said
    assert "reference/api.md: missing required field 'description'" in said
    assert "system/rules.md: file is read_only and cannot be modified" in said


def test_a_write_that_omits_limit_or_description_leaves_them_on_the_server(git_agent, home,
                                                                          api):
    m = start_mount(git_agent, home)
    try:
        (m.path / "reference/style.md").write_text("---\nlimit: 2000\n---\nNew style.\n")
        (m.path / "reference/api.md").write_text("---\ndescription: reference/api block\n"
                                                 "---\nNew api.\n")
        (m.path / "notes/todo.md").write_text("Just the value.\n")

        def block(label):
            blocks = api.get(f"/v1/agents/{git_agent}/core-memory/blocks").json()
            return next(b for b in blocks if b["label"] == label)
        wait_for(lambda: block("notes/todo")["value"] == "Just the value.\n")
        wait_for(lambda: block("reference/api")["value"] == "New api.\n")
        style, api_block = block("reference/style"), block("reference/api")
        assert style["value"] == "New style.\n"
        assert style["description"] == "How to write: 'short'"  # omitted: left as it was
        assert api_block["description"] is None  # the default shown, never sent
        assert api_block["limit"] == 2000 and block("notes/todo")["limit"] == 2000
        assert (m.path / "reference/api.md").read_text().startswith(
            "---\ndescription: reference/api block\nlimit: 2000\n---\n")
    finally:
        stop_mount(m)

