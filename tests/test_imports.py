"""The import graph of lorakit/ goes one way, bottom up (DESIGN.md): read from the source with `ast`.

Each module has a layer; a module may import only modules of lower layers, at its top (imports under
`if TYPE_CHECKING:` are for annotations only and do not count), and never another module's private name.
A new module must be given its layer here, which is the point: its place in the graph is a decision.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lorakit

PACKAGE = Path(lorakit.__file__).parent
LAYERS = [
    ["errors", "console"],
    ["serving_rules"],
    ["files", "specs", "levers"],
    ["names", "zoo", "allocator", "materialise", "stepping", "gguf_source", "batches", "memplot", "shard_writer"],
    ["sharding", "per_gpu"],
    ["state", "counting", "gguf_families", "llama_cpp", "zero_replay"],
    ["gguf_vocab", "modelfile"],
    ["targeting"],
    ["plan"],
    ["quantize", "accounting"],
    ["load", "wrap", "training_step"],
    ["rebuild"],
    ["simulate"],
    ["report", "verify"],
    ["gguf_verify"],
    ["render", "data", "metrics", "fit"],
    ["adapter", "chat", "arguments"],
    ["streaming", "checkpoints", "gguf_export", "serving"],
    ["verify_streamed"],
    ["trainer", "merging"],
    ["cli_args"],
    ["cli"],
]
# Modules that subclass torch classes at import time: importing them is importing torch, so (like torch
# itself) they are imported inside the functions that need them, to keep `import lorakit` cheap.
HEAVY = {"counting", "stepping"}
LAYER = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def lorakit_imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module imported, names imported, at module top?) for each relative import in a file."""
    tree = ast.parse(path.read_text())
    type_checking = {id(node) for stmt in tree.body if isinstance(stmt, ast.If)
                     and getattr(stmt.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(stmt)}
    top = {id(stmt) for stmt in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in type_checking:
            if node.module is None:  # from . import x
                found += [(alias.name, [], id(node) in top) for alias in node.names]
            else:
                found.append((node.module, [alias.name for alias in node.names], id(node) in top))
    return found


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))


def test_every_module_has_a_layer():
    assert sorted(set(MODULES) - set(LAYER)) == [], "give each new module its place in LAYERS"


def test_imports_go_down_only_at_the_top_and_never_for_private_names():
    wrong = []
    for module in MODULES:
        for imported, names, at_top in lorakit_imports(PACKAGE / f"{module}.py"):
            if LAYER.get(imported, -1) >= LAYER[module]:
                wrong.append(f"{module} imports {imported} (layer {LAYER.get(imported)} >= {LAYER[module]})")
            if not at_top and imported not in HEAVY:
                wrong.append(f"{module} imports {imported} inside a function")
            wrong += [f"{module} imports private {imported}.{n}" for n in names if n.startswith("_")]
    assert wrong == []


def test_the_graph_has_no_cycle():
    graph = {m: {i for i, _, _ in lorakit_imports(PACKAGE / f"{m}.py")} for m in MODULES}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join(path + (module,))
        if module not in done:
            for child in graph.get(module, ()):
                visit(child, path + (module,))
            done.add(module)

    for module in MODULES:
        visit(module, ())

