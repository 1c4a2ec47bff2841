"""The import graph of lorakit/ goes one way, bottom up, between folders as between files (docs/design.md): read
from the source with `ast`.

Each module lives in a folder, one per part of the design; the folders are in FOLDERS, bottom first. A module may
import modules of its own folder and of the folders below it, never above: at its top (the modules that subclass
torch at import time are imported inside functions, to keep `import lorakit` cheap), never another module's
private name, and with no cycle anywhere. A new folder must be given its place here, which is the point: its place
in the graph is a decision.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lorakit

PACKAGE = Path(lorakit.__file__).parent
FOLDERS = ["core", "spec", "plan", "model", "cost", "adapter", "train", "gguf", "deploy", "cli"]
# Modules that subclass torch classes at import time: importing them is importing torch, so (like torch
# itself) they are imported inside the functions that need them, to keep `import lorakit` cheap.
HEAVY = {"cost.counting", "cost.stepping"}
TOP = ("__init__", "__main__")  # lorakit's own: the public API and `python -m lorakit`, above every folder


def module_name(path: Path) -> str:
    """lorakit/cost/report.py -> "cost.report"; a package's __init__ is named by its folder."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def relative_imports(source: str, module: str, is_package: bool) -> list[tuple[str, list[str], bool]]:
    """(module imported, names imported, at module top?) for each relative import in `source`, resolved to
    lorakit-relative dotted names; `from . import x` of a module counts as importing that module."""
    tree = ast.parse(source)
    top = {id(stmt) for stmt in tree.body}
    here = module.split(".") if module != "__init__" else []
    package = here if is_package else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[:len(package) - (node.level - 1)]
            target = ".".join(base + (node.module.split(".") if node.module else []))
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{n}".lstrip(".") for n in names if f"{target}.{n}".lstrip(".") in MODULES]
            if submodules:
                found += [(m, [], id(node) in top) for m in submodules]
            else:
                found.append((target, names, id(node) in top))
    return found


def folder_of(module: str) -> str:
    return module.split(".")[0]


def rank(module: str) -> int:
    folder = folder_of(module)
    return len(FOLDERS) if folder in TOP else FOLDERS.index(folder)


def wrong_imports(module: str, source: str, is_package: bool = False) -> list[str]:
    """What `source`, as lorakit's `module`, imports against the rules."""
    wrong = []
    for imported, names, at_top in relative_imports(source, module, is_package):
        if imported not in MODULES:
            wrong.append(f"{module} imports {imported}, which is no module of lorakit")
            continue
        if rank(imported) > rank(module):
            wrong.append(f"{module} imports {imported}: folder {folder_of(imported)} is above {folder_of(module)}")
        if not at_top and imported not in HEAVY:
            wrong.append(f"{module} imports {imported} inside a function")
        wrong += [f"{module} imports private {imported}.{n}" for n in names if n.startswith("_")]
    return wrong


def graph() -> dict[str, set[str]]:
    return {m: {i for i, _, _ in relative_imports(p.read_text(), m, p.name == "__init__.py")}
            for m, p in MODULES.items()}


def test_every_module_sits_in_a_folder_of_the_design():
    loose = [m for m in MODULES if folder_of(m) not in FOLDERS and m not in TOP]
    assert loose == [], "put each module in one of FOLDERS (or give a new folder its place there)"
    assert {folder_of(m) for m in MODULES} - set(TOP) == set(FOLDERS)


def test_imports_go_down_between_folders_at_the_top_and_never_for_private_names():
    assert [w for m, p in MODULES.items() for w in wrong_imports(m, p.read_text(), p.name == "__init__.py")] == []


def test_a_planted_back_import_is_caught():
    """The check above must be able to fail: a model module that imports the trainer, a folder above it."""
    planted = MODULES["model.wrap"].read_text() + "\nfrom ..train.trainer import LoraTrainer\n"
    assert wrong_imports("model.wrap", planted) == ["model.wrap imports train.trainer: folder train is above model"]


def test_the_graph_has_no_cycle():
    edges = graph()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join(path + (module,))
        if module not in done:
            for child in edges.get(module, ()):
                visit(child, path + (module,))
            done.add(module)

    for module in MODULES:
        visit(module, ())


def test_no_module_is_longer_than_one_sitting():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 300}
    assert long == {}, "split it along a real seam (STYLE.md, point 1)"
