"""The package's layers, read from its source: the engine imports nothing of rge outside itself (the
encoder, the server and the trainer use it, never the other way), and no two modules import each other
(imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import rge

ROOT = Path(rge.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The rge modules (or names in them) that ``path`` imports, absolute."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return {target for target in found if target == "rge" or target.startswith("rge.")}


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in ROOT.rglob("*.py")}

    def resolve(target: str) -> str:
        while target not in modules and "." in target:
            target = target.rpartition(".")[0]
        return target

    return {name: {resolve(target) for target in imported(path)} - {name} for name, path in modules.items()}


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "rge.engine.stream" in graph["rge.engine.decoder"]
    assert "rge.engine.decoder" in graph["rge.encoder"]


def test_the_engine_imports_only_itself():
    graph = import_graph()
    outside = {name: sorted(target for target in targets if not target.startswith("rge.engine"))
               for name, targets in graph.items() if name.startswith("rge.engine")}  # fmt: skip
    assert not {name: targets for name, targets in outside.items() if targets}


def test_no_two_modules_import_each_other():
    graph = import_graph()
    nested = lambda a, b: b.startswith(a + ".") or a.startswith(b + ".")  # noqa: E731 (a package and its own module)
    mutual = sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph.get(b, ()) and not nested(a, b))
    assert not mutual


def test_the_stream_does_not_know_the_decoder():
    graph = import_graph()
    assert "rge.engine.decoder" not in graph["rge.engine.stream"]
    assert not {t for t in graph["rge.engine.batches"] if t in ("rge.engine.stream", "rge.engine.decoder")}
