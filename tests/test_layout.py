"""The import rules of DESIGN.md, read from the source: no import loops, the library never
reaches up into configs/ or edits sys.path, layers import only downwards, files stay small."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ("ettin_jax", "data_pipeline")
# Modules the model core (what a checkpoint or an HF directory becomes) may not depend on:
# applications and the training loop sit above it.
APPLICATIONS = ("ettin_jax.train", "ettin_jax.glue", "ettin_jax.generate", "ettin_jax.compare",
                "ettin_jax.hf.__main__", "ettin_jax.plan", "ettin_jax.pairs")
CORE = ("ettin_jax.model", "ettin_jax.model_config", "ettin_jax.attention", "ettin_jax.kernels",
        "ettin_jax.model_loader", "ettin_jax.sharding", "ettin_jax.checkpoint", "ettin_jax.hf")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _library_files():
    for package in LIBRARY:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in sorted(files):
                if name.endswith(".py"):
                    yield os.path.join(folder, name)


MODULES = {_module_name(p): p for p in _library_files()}


def _imports(path: str) -> set[str]:
    """Project modules `path` imports anywhere in the file (function-level imports count too:
    a loop through them still ties the two modules together)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in MODULES or name.split(".")[0] == "configs"}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_is_read():
    assert "ettin_jax.model_loader" in GRAPH["ettin_jax.train"]
    assert "ettin_jax.sharding" in GRAPH["ettin_jax.kernels.flash_attention"]


def test_no_import_loops():
    loops = sorted(name for name in GRAPH if name in _reachable(name))
    assert not loops, f"modules that import themselves through others: {loops}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_library_never_reaches_up(name):
    with open(MODULES[name], encoding="utf-8") as f:
        source = f.read()
    assert not any(m.split(".")[0] == "configs" for m in GRAPH[name]), \
        f"{MODULES[name]} imports configs/ (configs are read by entry points only)"
    assert "sys.path.insert" not in source and "sys.path.append" not in source, \
        f"{MODULES[name]} edits sys.path"


def test_data_layer_does_not_import_the_model_layer():
    for name in MODULES:
        if name.startswith("data_pipeline"):
            # ettin_jax.cli is a leaf shared by every command line (`from ettin_jax import cli`
            # also names the package, whose __init__ imports nothing).
            bad = {m for m in GRAPH[name] if m.startswith("ettin_jax")} - {"ettin_jax", "ettin_jax.cli"}
            assert not bad, f"{name} imports {bad}; data_pipeline sits below ettin_jax"


def test_core_does_not_import_applications():
    for name in MODULES:
        if _under(name, CORE):
            bad = {m for m in _reachable(name) if _under(m, APPLICATIONS)}
            assert not bad, f"{name} reaches {bad}"


def test_generation_does_not_pull_in_glue():
    assert not any(_under(m, ("ettin_jax.glue",)) for m in _reachable("ettin_jax.generate"))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_files_stay_small(name):
    with open(MODULES[name], encoding="utf-8") as f:
        lines = sum(1 for _ in f)
    assert lines <= 500, f"{MODULES[name]} has {lines} lines; split it by concern (DESIGN.md)"
