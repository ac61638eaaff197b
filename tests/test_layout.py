"""The house rules a newcomer relies on (STYLE.md): no import cycles between the project's modules, data
flowing one way between the stages, and no function over about 60 lines outside the tests."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from common import ROOT

PACKAGES = ("gradserve", "training", "handlers", "server", "client", "bench")
MAX_FUNCTION_LINES = 60
# What a stage may not import (ARCHITECTURE.md): the handler ships in the archive with nothing but the model's
# code beside it; training builds its model and preprocessing with the handler's own code (handlers/factory.py,
# handlers/preprocess.py: what is trained is what is served) and never imports the serving side; the server
# never imports training or its clients.
FORBIDDEN = {"handlers": ("server", "client", "bench", "gradserve", "training"),
             "training": ("server", "client", "bench"),
             "server": ("training", "client", "bench"),
             "client": ("training", "bench")}


def modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).parts
            if "generated" in relative or any(part.startswith(".") for part in relative):
                continue  # generated stubs; hidden folders (e.g. the bench's peer environments)
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, anywhere in the file (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_no_import_cycles_and_stages_import_only_earlier_ones() -> None:
    found = dict(modules())
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    for name, targets in graph.items():
        for target in targets:
            assert not target.startswith(FORBIDDEN.get(name.split(".")[0], ("-",))), f"{name} imports {target}"

    cycles, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state[target] == 1:
                cycles.append(path[path.index(target):] + [target])
            elif state[target] == 0:
                visit(target, [*path, target])
        state[node] = 2

    for node in graph:
        if state[node] == 0:
            visit(node, [node])
    assert cycles == [], cycles


def test_no_function_over_sixty_lines() -> None:
    long = []
    for name, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno is not None and node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {node.end_lineno - start + 1} lines")
    assert long == [], long
