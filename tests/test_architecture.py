"""The structure the code promises (ARCHITECTURE.md), checked on the source: one owner
writes the mount's state and records its history, and imports go one way."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "memfuse"
TREE_WRITERS = {"add", "makedirs", "bind", "unbind", "move", "unlink", "looked_up", "forget"}
NODE_FIELDS = {"kind", "block", "content", "children", "parent", "name", "lookups", "mode",
               "mtime_ns", "ctime_ns", "atime_ns", "mtime_given", "checked_at"}
OWNER = {"state.py", "tree.py"}  # tree.py defines the data; state.py is its only writer


def modules():
    return sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")


def source_of(node: ast.AST) -> str:
    return ast.unparse(node)


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
def test_only_the_owner_writes_the_tree_or_records_history(path):
    if path.name in OWNER:
        return
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = source_of(node.func.value)
            if node.func.attr in TREE_WRITERS and target.split(".")[-1] == "tree":
                found.append(f"line {node.lineno}: {source_of(node.func)}()")
            if node.func.attr in ("record", "_record") and path.name != "history.py":
                found.append(f"line {node.lineno}: {source_of(node.func)}() records history")
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for item in ast.walk(target):
                    if (isinstance(item, ast.Attribute) and item.attr in NODE_FIELDS
                            and source_of(item.value) in ("node", "src", "dst", "handle.node")):
                        found.append(f"line {node.lineno}: assigns {source_of(item)}")
    assert not found, f"{path.name} changes the mount's state outside state.py: {found}"


ARCHITECTURE = Path(__file__).parent.parent / "ARCHITECTURE.md"


def floors() -> list[set[str]]:
    """The floors table of ARCHITECTURE.md, `| floor | modules | ... |`: the modules of each
    floor, lowest first. A module may import only modules of lower floors (floor 1's leaves
    may also import each other)."""
    found: dict[int, set[str]] = {}
    for line in ARCHITECTURE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].isdigit():
            found[int(cells[0])] = {name.strip() for name in cells[1].split(",")}
    assert sorted(found) == list(range(len(found))), "floors must be numbered 0, 1, 2, ..."
    return [found[floor] for floor in sorted(found)]


LAYERS = floors()


def layer_of(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
def test_imports_go_one_way(path):
    """No module imports one above it: a call from FUSE down to the server and into history
    never climbs back up."""
    me = layer_of(path.stem)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            for name in names:
                assert layer_of(name) <= me, f"{path.stem} imports {name}, a layer above it"
                if layer_of(name) == me and name != path.stem:
                    assert me == 1, f"{path.stem} imports {name} of its own layer"


def test_every_module_has_a_layer():
    """ARCHITECTURE.md's floors name every module, and only modules that exist."""
    assert {p.stem for p in modules()} == set().union(*LAYERS)
    assert sum(len(layer) for layer in LAYERS) == len(set().union(*LAYERS)), "a module twice"


SEAM = {"remote.py"}  # the server seam: the one module that imports the client, letta.py


def memfuse_imports(path: Path) -> set[str]:
    """The memfuse modules `path` imports, however spelt (`from .letta import`, `from . import
    letta`, `from memfuse.letta import`, `import memfuse.letta`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            package = node.level >= 1 or (node.module or "").split(".")[0] == "memfuse"
            module = (node.module or "").removeprefix("memfuse").lstrip(".")
            if package and module:
                found.add(module.split(".")[0])
            elif package:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("memfuse."))
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
def test_only_the_seam_imports_the_client(path):
    """Every other module reaches the server through remote.py and its errors (errors.py):
    one error contract, one place that knows the client."""
    if path.name not in SEAM:
        assert "letta" not in memfuse_imports(path), f"{path.name} imports letta.py"


def test_the_errors_import_nothing_from_memfuse():
    """errors.py is the contract every floor catches: it stands on nothing of memfuse."""
    assert memfuse_imports(PACKAGE / "errors.py") == set()


def test_the_import_finder_sees_every_spelling(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from .letta import X\nfrom . import a, b\nfrom memfuse.c import Y\n"
                      "from memfuse import d\nimport memfuse.e\nimport os\nfrom typing import Z\n")
    assert memfuse_imports(source) == {"letta", "a", "b", "c", "d", "e"}
