"""The layouts (memfuse/layout.py): the classic one is model.py's mapping unchanged; the
git-memory one maps paths to labels exactly as Letta's `memory_block_label_from_markdown_path`
does, checked against the real function of the Letta server scripts/letta-server installs."""
from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import textwrap
from pathlib import Path

import pytest

from memfuse import layout as layout_module
from memfuse.layout import (CLASSIC, GIT_MEMORY, GIT_MEMORY_TAG, PathKind, is_scratch_name,
                            label_from_path, layout_for_tags)
from memfuse.model import MAX_PATH, Location

# Where scripts/letta-server keeps the server's venv (its `home` and `venv`).
LETTA_HOME = Path(os.environ.get("MEMFUSE_LETTA_HOME")
                  or Path(os.environ.get("HOME") or "/root") / ".cache/memfuse/letta-server")
LETTA_PYTHON = LETTA_HOME / "venv/bin/python"
LETTA_VERSION = "0.16.8"

# Runs in the server's venv. It loads path_mapping.py from the installed letta by its file:
# importing the letta package itself takes over 10 s (it pulls in the whole server).
REAL_LABELS = textwrap.dedent("""
    import importlib.metadata, importlib.util, json, sys
    dist = importlib.metadata.distribution("letta")
    source = dist.locate_file("letta/services/memory_repo/path_mapping.py")
    spec = importlib.util.spec_from_file_location("letta_path_mapping", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = json.load(sys.stdin)
    labels = [module.memory_block_label_from_markdown_path(p) for p in paths]
    json.dump({"version": dist.version, "labels": labels}, sys.stdout)
""")


def real_labels(paths: list[str]) -> list[str | None]:
    """Letta's own labels for `paths`, from the server's venv. Fails (never skips) when that
    venv is missing: this test is only worth something against the real function."""
    if not LETTA_PYTHON.exists():
        pytest.fail(f"{LETTA_PYTHON} is missing: run scripts/letta-server start (scripts/test "
                    f"does), which installs Letta {LETTA_VERSION} there")
    done = subprocess.run([str(LETTA_PYTHON), "-c", REAL_LABELS], input=json.dumps(paths),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the server venv's python failed: {done.stderr}"
    answer = json.loads(done.stdout)
    assert answer["version"] == LETTA_VERSION, (
        f"the server venv has letta {answer['version']}; layout.py mirrors {LETTA_VERSION}: "
        f"read path_mapping.py again before changing this")
    return answer["labels"]


# Names that touch every rule: skills and SKILL.md in every case, `.md` in odd places, dots,
# empty and dot components, scratch names, control characters, a lone surrogate (a name that
# is not UTF-8), long names.
ATOMS = ["skills", "Skills", "SKILLS", "SKILL.md", "skill.md", "SKILL.MD", "SKILL", "system",
         "human.md", "notes", "todo.md", "pdf", "x.md.md", ".md", "md", "", ".", "..", "a.b",
         "v1.2", "notes.md", ".#x.md", "#x.md#", "x.md~", ".x.md.swp", "4913", "sedAb12Cd",
         "profile.png", ".letta", "config.json", "é.md", "skills.md", "x\n.md", " .md", ".git",
         ".GIT", "a" * 252 + ".md", "a" * 256 + ".md", "\udcff.md", "a\x7f.md"]
SMALL = ["skills", "SKILL.md", "skill.md", "x.md", "", ".md", "a", "system"]


def generated_paths() -> list[str]:
    """Every path of up to four names from SMALL, random paths of ATOMS, random strings from
    the characters the rules look at, and long paths around MAX_PATH."""
    paths = set()
    for depth in range(1, 5):
        for names in itertools.product(SMALL, repeat=depth):
            paths.add("/".join(names))
    rng = random.Random(19)
    for _ in range(20000):
        paths.add("/".join(rng.choice(ATOMS) for _ in range(rng.randint(1, 5))))
    letters = "skilSKILmd./_x"
    for _ in range(10000):
        paths.add("".join(rng.choice(letters) for _ in range(rng.randint(0, 24))))
    for size in range(MAX_PATH - 8, MAX_PATH + 8):
        paths.add("a/" * ((size - 4) // 2) + "x.md")
        paths.add("skills/" + "b" * (size - len("skills//SKILL.md")) + "/SKILL.md")
    return sorted(paths)


LABELS = ["system/human", "system/persona", "notes/todo", "skills/pdf", "skills/PDF",
          "Skills/pdf", "SKILLS/pdf/SKILL", "skills", "system", "human", "v1.2/notes.md",
          "a.b.c", ".md", "a/b/c/d/e", "system/projects/letta", "Notes/TODO", "é/ü", "x y",
          "skills/pdf/SKILL", "skills/pdf/notes", "skills/a/b/c", "skills/", "", "/", "a//b",
          "a/", "/a", ".", "..", "a/./b", "a/../b", "x\ny", "x\x7f", ".git/x", "a/.GIT/b",
          "a" * 300, "a/" * 2100 + "b", "\udcff", ".#lock", "#x", "4913", "sedAb12Cd",
          "memory_filesystem", "skills/.git", "skills/..", "skills/pdf/"]


def generated_labels() -> list[str]:
    rng = random.Random(1919)
    labels = set(LABELS)
    for _ in range(20000):
        labels.add("/".join(rng.choice(ATOMS + LABELS[:20]).removesuffix(".md")
                            for _ in range(rng.randint(1, 4))))
    return sorted(labels)


@pytest.fixture(scope="module")
def letta():
    """{path: Letta's label} for the generated paths and the paths of the generated labels."""
    paths = set(generated_paths())
    for label in generated_labels():
        parts = GIT_MEMORY.parts(Location(True, label))
        if parts is not None:
            paths.add("/".join(parts))
    paths = sorted(paths)
    return dict(zip(paths, real_labels(paths)))


def test_label_from_path_is_lettas_rule_on_every_generated_path(letta):
    assert len(letta) > 30000
    wrong = {p: (label_from_path(p), want) for p, want in letta.items()
             if label_from_path(p) != want}
    assert not wrong, f"{len(wrong)} paths differ from Letta's, e.g. {list(wrong.items())[:5]}"


def test_a_git_memory_block_file_is_one_letta_reads_as_that_block(letta):
    """Where memfuse shows a block, Letta reads that block; where Letta reads a label memfuse
    shows no block, memfuse cannot show that label anywhere (a path maps to one label)."""
    blocks = 0
    for path, want in letta.items():
        parts = tuple(path.split("/"))
        location = GIT_MEMORY.location_at(parts)
        kind = GIT_MEMORY.kind(parts)
        if location is not None:
            blocks += 1
            assert location == Location(True, want), path
            assert kind is PathKind.BLOCK, path
        elif want is not None:
            assert GIT_MEMORY.parts(Location(True, want)) is None, path
            assert kind in (PathKind.REFUSED, PathKind.SCRATCH), path
        elif layout_module._keepable(parts):
            assert kind in (PathKind.KEPT, PathKind.SCRATCH), path
        else:  # `.git`, `..`, a control character: no file at all
            assert kind in (PathKind.REFUSED, PathKind.SCRATCH), path
    assert blocks > 1000


def test_every_shown_label_is_at_the_path_letta_reads_it_from(letta):
    for label in generated_labels():
        parts = GIT_MEMORY.parts(Location(True, label))
        if parts is not None:
            assert letta["/".join(parts)] == label, label


@pytest.mark.parametrize("label, parts", [
    ("system/human", ("system", "human.md")),
    ("system/persona", ("system", "persona.md")),
    ("notes/todo", ("notes", "todo.md")),
    ("system/projects/letta", ("system", "projects", "letta.md")),
    ("a/b/c/d/e", ("a", "b", "c", "d", "e.md")),
    ("human", ("human.md",)),  # a classic core label that was never prefixed: a root file
    ("system", ("system.md",)),
    ("skills", ("skills.md",)),  # not under skills/: an ordinary block
    ("skills/pdf", ("skills", "pdf", "SKILL.md")),
    ("skills/PDF", ("skills", "PDF", "SKILL.md")),
    ("Skills/pdf", ("Skills", "pdf.md")),  # path_mapping is case-sensitive
    ("SKILLS/pdf/SKILL", ("SKILLS", "pdf", "SKILL.md")),
    ("v1.2/notes.md", ("v1.2", "notes.md.md")),
    ("a.b.c", ("a.b.c.md",)),
    (".md", (".md.md",)),
    (".", ("..md",)),  # a dot in the name, not a `.` component: as in the classic layout
    ("..", ("...md",)),
    ("Notes/TODO", ("Notes", "TODO.md")),
    ("é/ü", ("é", "ü.md")),
    ("x y", ("x y.md",)),
    ("4913", ("4913.md",)),
    ("memory_filesystem", ("memory_filesystem.md",)),
])
def test_git_memory_labels_and_their_paths(label, parts):
    assert GIT_MEMORY.parts(Location(True, label)) == parts
    assert GIT_MEMORY.location_at(parts) == Location(True, label)
    assert GIT_MEMORY.kind(parts) is PathKind.BLOCK
    assert label_from_path("/".join(parts)) == label


@pytest.mark.parametrize("label", [
    "skills/pdf/SKILL",  # the legacy skill label: its path is skills/pdf's
    "skills/pdf/notes", "skills/a/b/c", "skills/", "skills/.git", "skills/..", "skills/pdf/",
    "", "/", "a//b", "a/", "/a", "a/./b", "a/../b", "./a", "../a",
    "x\ny", "x\x7f", "\udcff",  # control characters; not UTF-8
    ".git/x", "a/.GIT/b",  # git refuses the path
    "a" * 300, "a/" * 2100 + "b",  # a name over 255 bytes; a path over 4,095
    ".#lock", "#x",  # emacs's names
])
def test_git_memory_labels_that_cannot_be_files(label):
    assert GIT_MEMORY.parts(Location(True, label)) is None


def test_a_detached_block_is_no_file_of_a_git_memory_agent():
    assert GIT_MEMORY.parts(Location(False, "notes/todo")) is None
    assert GIT_MEMORY.parts(Location(False, "human")) is None


def test_git_memory_round_trip_on_generated_labels():
    shown = 0
    for label in generated_labels():
        parts = GIT_MEMORY.parts(Location(True, label))
        if parts is None:
            # No other path stands for it either.
            for candidate in (label + ".md", label + "/SKILL.md"):
                assert GIT_MEMORY.location_at(tuple(candidate.split("/"))) != \
                    Location(True, label), label
            continue
        shown += 1
        assert GIT_MEMORY.location_at(parts) == Location(True, label), label
        assert GIT_MEMORY.kind(parts) is PathKind.BLOCK, label
    assert shown > 5000


@pytest.mark.parametrize("parts, kind", [
    (("system", "human.md"), PathKind.BLOCK),
    (("SKILL.md",), PathKind.BLOCK),  # label SKILL: outside skills/ it is an ordinary name
    (("Skills", "pdf", "SKILL.md"), PathKind.BLOCK),  # label Skills/pdf/SKILL
    (("skills", "pdf", "SKILL.md"), PathKind.BLOCK),
    (("skills", "pdf", "notes.md"), PathKind.KEPT),  # a skill's companion files
    (("skills", "pdf", "extract.py"), PathKind.KEPT),
    (("skills", "pdf", "skill.md"), PathKind.KEPT),
    (("skills", "pdf", "sub", "SKILL.md"), PathKind.KEPT),
    (("skills", "pdf.md"), PathKind.KEPT),  # Letta ignores a flat skill file
    (("skills", "SKILL.md"), PathKind.KEPT),
    (("profile.png",), PathKind.KEPT),
    ((".letta", "config.json"), PathKind.KEPT),
    (("notes", "index"), PathKind.KEPT),
    (("4914",), PathKind.KEPT),
    (("tmpsmall",), PathKind.KEPT),
    (("system", ".human.md.swp"), PathKind.SCRATCH),
    (("system", ".human.md.swx"), PathKind.SCRATCH),
    (("system", "4913"), PathKind.SCRATCH),
    (("5036",), PathKind.SCRATCH),
    (("notes", "todo.md~"), PathKind.SCRATCH),
    (("notes", "todo.md.~1~"), PathKind.SCRATCH),
    (("notes", ".#todo.md"), PathKind.SCRATCH),  # emacs's lock: Letta would read label .#todo
    (("notes", "#todo.md#"), PathKind.SCRATCH),
    (("sedAb12Cd",), PathKind.SCRATCH),
    (("XXe8iTEJ",), PathKind.SCRATCH),
    (("tmpa1b2c_d4",), PathKind.SCRATCH),
    (("tmp.AbCdEf1234",), PathKind.SCRATCH),
    ((".md",), PathKind.REFUSED),  # Letta would read label "", which no block can have
    (("notes", ".md"), PathKind.REFUSED),
    (("a\nb.md",), PathKind.REFUSED),
    (("a" * 256 + ".md",), PathKind.REFUSED),
    (("a",) * 2100 + ("b.md",), PathKind.REFUSED),
])
def test_what_each_file_is_in_the_git_memory_layout(parts, kind):
    assert GIT_MEMORY.kind(parts) is kind


def test_scratch_names_are_the_tools_own():
    assert is_scratch_name("4913") and is_scratch_name(str(4913 + 123 * 7))
    assert not is_scratch_name("4912") and not is_scratch_name(str(4913 + 122))
    assert not is_scratch_name("sedAb12C") and not is_scratch_name("sedAb12Cde")
    assert not is_scratch_name("notes.md") and not is_scratch_name(".swp")
    assert not is_scratch_name("٤٩١٣")  # digits, but not ASCII


def test_classic_layout_is_models_mapping():
    for label in generated_labels():
        for attached in (True, False):
            location = Location(attached, label)
            assert CLASSIC.parts(location) == location.parts()
    for path in generated_paths():
        parts = tuple(path.split("/"))
        assert CLASSIC.location_at(parts) == Location.at(parts)


@pytest.mark.parametrize("parts, kind", [
    (("system", "human.md"), PathKind.BLOCK),
    (("human.md",), PathKind.BLOCK),
    (("notes", "todo.md"), PathKind.BLOCK),
    (("skills", "pdf", "SKILL.md"), PathKind.BLOCK),  # classic: a detached skills/pdf/SKILL
    (("system", "notes", "todo.md"), PathKind.BLOCK),
    (("skills", "pdf", "extract.py"), PathKind.SCRATCH),  # classic has no kept files
    (("system", ".human.md.swp"), PathKind.SCRATCH),
    (("system", "4913"), PathKind.SCRATCH),
    (("system", ".#human.md"), PathKind.SCRATCH),
    ((".md",), PathKind.SCRATCH),
    (("system", "a\nb.md"), PathKind.REFUSED),
    (("system", "system.md"), PathKind.BLOCK),  # attached label `system`
])
def test_what_each_file_is_in_the_classic_layout(parts, kind):
    assert CLASSIC.kind(parts) is kind


def test_the_paths_of_the_issue_in_each_layout():
    """Issue 19: a tagged agent with system/human and notes/todo showed as
    system/system/human.md and system/notes/todo.md."""
    human, todo = Location(True, "system/human"), Location(True, "notes/todo")
    assert CLASSIC.parts(human) == ("system", "system", "human.md")
    assert CLASSIC.parts(todo) == ("system", "notes", "todo.md")
    assert GIT_MEMORY.parts(human) == ("system", "human.md")
    assert GIT_MEMORY.parts(todo) == ("notes", "todo.md")


@pytest.mark.parametrize("tags, layout", [
    (None, CLASSIC), ([], CLASSIC), (["owner:agent-1"], CLASSIC),
    (["Git-Memory-Enabled"], CLASSIC),  # Letta compares the tag exactly (orm/agent.py)
    ([GIT_MEMORY_TAG], GIT_MEMORY), (("owner:agent-1", "git-memory-enabled"), GIT_MEMORY),
])
def test_the_layout_follows_the_agents_tag(tags, layout):
    assert layout_for_tags(tags) is layout


@pytest.mark.parametrize("path", [".git/config", "evil/.git/config", "a/.GIT/HEAD", "a/.Git",
                                  "a/../b.txt", "a/\x01.txt"])
def test_a_path_with_git_s_directory_or_a_bad_name_is_refused_not_kept(path):
    assert GIT_MEMORY.kind(tuple(path.split("/"))) is PathKind.REFUSED
