"""The package's layers (DESIGN §2): each imports only the layers below it, and nothing imports in
a circle. Checked on the source, so a new import that breaks the layering fails here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Lowest first. A module may import its own layer and those before it.
LAYERS = ["durable.core", "durable.runtime", "storage", "durable.host", "durable"]
# The core is pure: no I/O, no event loop, no Azure.
FORBIDDEN_IN_CORE = ("asyncio", "aiohttp", "azure", "os", "socket", "storage", "durable.runtime", "durable.host")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports (absolute names), including imports inside functions."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    paths = [*ROOT.joinpath("durable").rglob("*.py"), *ROOT.joinpath("storage").rglob("*.py")]
    modules = {_module_name(p): p for p in paths}
    return {name: {m for m in _imports(p) if m in modules and m != name} for name, p in modules.items()}


def _layer(module: str) -> int:
    """The position of the layer a module belongs to (its longest matching package)."""
    matching = [layer for layer in LAYERS if module == layer or module.startswith(layer + ".")]
    return LAYERS.index(max(matching, key=len))


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(module) and target != "durable"
    ]
    assert wrong == []


def test_the_core_does_no_io() -> None:
    wrong = [
        f"{_module_name(path)} imports {name}"
        for path in ROOT.joinpath("durable", "core").rglob("*.py")
        for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_CORE)
    ]
    assert wrong == []


def test_no_import_circles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert cycles == []
