"""SEMANTICS.md stays honest: every table row names tests, and every named test exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIXES = {"fs": "tests/test_fs.py", "ns": "tests/test_namespace.py",
            "sync": "tests/test_sync.py", "history": "tests/test_history.py",
            "mount": "tests/integration/test_mount.py",
            "ns-mount": "tests/integration/test_namespace.py",
            "editors": "tests/integration/test_editors.py",
            "live": "tests/integration/test_live.py",
            "daemon": "tests/test_daemon.py", "guards": "tests/test_guards.py",
            "hostile": "tests/test_hostile.py", "file": "tests/test_blockfile.py",
            "cli": "tests/test_cli.py", "hostile-mount": "tests/integration/test_hostile.py",
            "offline": "tests/test_offline.py", "journal": "tests/test_journal.py",
            "offline-mount": "tests/integration/test_offline.py",
            "chaos": "tests/integration/test_chaos.py",
            "cache-mount": "tests/integration/test_cache.py",
            "pagecache": "tests/test_pagecache.py",
            "local-first": "tests/test_local_first.py",
            "local-first-mount": "tests/integration/test_local_first.py",
            "blockmap": "tests/test_blockmap.py", "poller": "tests/test_poller.py",
            "fileattrs": "tests/test_fileattrs.py",
            "client": "tests/test_letta_client.py", "many": "tests/test_many.py",
            "service": "tests/test_service.py",
            "many-mount": "tests/integration/test_many.py",
            "gitremote": "tests/test_gitremote.py",
            "gitremote-mount": "tests/integration/test_gitremote.py",
            "mounttable": "tests/test_mounttable.py",
            "owner-mount": "tests/integration/test_owner.py",
            "create": "tests/test_create.py", "order": "tests/test_ordering.py",
            "model": "tests/test_ordering_model.py",
            "order-mount": "tests/integration/test_ordering.py",
            "order-chaos": "tests/integration/test_ordering_chaos.py",
            "git": "tests/test_git_memory.py",
            "git-mount": "tests/integration/test_git_memory.py",
            "git-enable": "tests/test_git_memory_enable.py",
            "git-enable-mount": "tests/integration/test_git_memory_enable.py",
            "hook-mount": "tests/integration/test_letta_hook.py",
            "serve": "tests/test_serve.py", "gitsync": "tests/test_gitsync.py",
            "writerlock": "tests/test_writerlock.py",
            "serve-mount": "tests/integration/test_serve.py",
            "mountgit": "tests/test_mountgit.py"}


def rows():
    for line in (ROOT / "SEMANTICS.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(line) <= set("|- ") and cells[0] not in (
                "operation", "event", "change on the server", "policy", "input"):
            yield cells[0], cells[-1]


def test_every_row_names_a_test_or_points_to_one():
    for operation, tests in rows():
        assert re.search(r"`test_\w+`", tests) or tests in ("same", "(the create rows)"), operation


def test_every_named_test_exists_in_the_file_its_prefix_names():
    sources = {prefix: (ROOT / path).read_text() for prefix, path in PREFIXES.items()}
    for operation, tests in rows():
        prefix = None
        for token in re.findall(r"([\w-]+(?= (?:\(\w+\) )?`)|`test_\w+`)", tests):
            if token.startswith("`"):
                assert prefix, f"{operation}: {token} has no file prefix"
                name = token.strip("`")
                assert f"def {name}(" in sources[prefix], f"{operation}: {prefix} {name} missing"
            elif token in PREFIXES:
                prefix = token
