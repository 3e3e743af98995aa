"""Docs that cannot go stale: every path, module and config key that README.md and docs/*.md name in backticks
exists (a renamed file, a moved module or a dropped config key fails here, not in a user's hands)."""
import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

from rlhf.core.config.describe import _keys
from rlhf.core.config.run_config import RunConfig
from tests.paths import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
PACKAGES = ("rlhf", "reward", "rollout")
PATH = re.compile(r"^(?:rlhf|reward|rollout|configs|benchmarks|tests|docs)/[\w./-]*$")
CONFIG_KEYS = set(_keys(RunConfig, ""))
SECTIONS = set(RunConfig.model_fields)


def _spans(text: str) -> list[str]:
    """Inline code spans (fenced blocks are left out: they hold commands and code, checked by their own tests)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"``?([^`\n]+?)``?", text)


@lru_cache(maxsize=None)
def _top_level_names(path: Path) -> frozenset:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):  # a lazy package's name table
            names.update(k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
    return frozenset(names)


def _module_problem(dotted: str) -> str | None:
    """None when ``dotted`` is a module of ours, or a name defined at the top of one (``pkg.mod.Name.attr``)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:i])
        module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if base.is_dir() and not module.exists() and i == len(parts):
            return None  # a package folder without __init__ named as a whole
        if module.exists():
            rest = parts[i:]
            if not rest or rest[0] in _top_level_names(module) or (base.is_dir() and (base / rest[0]).exists()):
                return None
            return f"{dotted}: {module.relative_to(REPO)} defines no {rest[0]}"
    return f"{dotted}: no such module"


def _problems(text: str) -> list[str]:
    problems = []
    for span in _spans(text):
        token = re.split(r"[\s=:(,\[{]", span.strip(), maxsplit=1)[0].rstrip(".")
        first, _, rest = token.partition(".")
        if token in CONFIG_KEYS or (not PATH.match(token) and re.search(r"\.(py|md|yaml|jsonl?|sh|png)$", token)):
            continue  # a key that exists, or a file name
        names_a_module = (REPO / first / rest.split(".")[0]).exists() or (REPO / first / f"{rest.split('.')[0]}.py").exists()
        if PATH.match(token):
            if not (REPO / token.rstrip("/")).exists() and "*" not in token:
                problems.append(f"{token}: no such path")
        elif re.match(r"^(rlhf|reward|rollout)\.[\w.]+$", token) and (names_a_module or first == "rlhf"):
            problem = _module_problem(token)
            if problem:
                problems.append(problem)
        elif "." in token and token.split(".")[0] in SECTIONS and re.match(r"^[\w.]+$", token):
            # reward.components.NAME is a component's weight: the names are a registry's, not declared keys
            if not re.match(r"^reward\.components\.\w+$", token):
                problems.append(f"{token}: no such config key")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_name_only_what_exists(doc):
    problems = _problems(doc.read_text())
    assert not problems, f"{doc.relative_to(REPO)} names what does not exist:\n" + "\n".join(problems)


def test_the_docs_check_can_fail():
    text = "See `rlhf/ppo.py`, `rlhf.core.algorithms.PPOLoop`, `rollout.top_q` and `rlhf/core/`.\n"
    assert _problems(text) == ["rlhf/ppo.py: no such path",
                               "rlhf.core.algorithms.PPOLoop: rlhf/core/algorithms/__init__.py defines no PPOLoop",
                               "rollout.top_q: no such config key"]
