"""The layers, read from the source with ``ast``: imports point down only and form no circle.

core (``rlhf/core``) <- ``rollout/`` and ``reward/`` (neither imports the other) <- the orchestration (the rest of
``rlhf/``). Function-local imports count like any other: hiding a circle inside a function is still a circle.
"""
import ast
from pathlib import Path

from tests.paths import REPO

PACKAGES = ("rlhf", "reward", "rollout")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports, anywhere in the file (``from a import b`` counts a.b when b is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def layer(module: str) -> str:
    if module == "rlhf.core" or module.startswith("rlhf.core."):
        return "base"
    if module.split(".")[0] in ("rollout", "reward"):
        return module.split(".")[0]
    return "orchestration"


# What each layer may import besides itself.
ALLOWED = {"base": {"base"}, "rollout": {"base", "rollout"}, "reward": {"base", "reward"},
           "orchestration": {"base", "rollout", "reward", "orchestration"}}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_imports_point_down_only():
    upward = sorted(f"{src} ({layer(src)}) imports {dst} ({layer(dst)})"
                    for src, targets in _graph().items() for dst in targets if layer(dst) not in ALLOWED[layer(src)])
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    graph, state, circles = _graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not circles, "\n".join(circles)


def test_the_layer_test_sees_an_upward_import(tmp_path):
    """The check itself can fail: an orchestration import inside reward/ is seen, even inside a function."""
    source = "def f():\n    from rlhf.stages.run_dir import run\n"
    modules = {"rlhf.stages.run_dir": Path("x"), "reward.bad": tmp_path / "bad.py"}
    (tmp_path / "bad.py").write_text(source)
    found = _imports(tmp_path / "bad.py", modules)
    assert found == {"rlhf.stages.run_dir"} and layer("rlhf.stages.run_dir") not in ALLOWED[layer("reward.bad")]
