"""The layout shows the plan: each package is one role, and imports flow one way.

From the top down: `cli` and the manager process, then operations (status, dead letters,
metrics, the keeper and its page), the worker process, the clients' API, the Redis layer,
and `common` at the bottom. A module imports only from its own package, from the layers
below it, and from the shared top-level modules (`config`, `errors`, `logs`), which
themselves import only from below the worker. Lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rqworkers"
# The rank of each place, lowest first: a module imports only from its own place and from
# places ranked lower. The shared top-level modules sit where what they import puts them:
# `errors` imports nothing; `config` and `logs` read settings of every layer up to the clients.
# `cli`, `__main__` and `__init__` are entry points: they may import anything.
RANKS = {
    "errors": 0, "common": 1, "store": 2, "client": 3, "config": 4, "logs": 5, "examples": 1,
    "worker": 6, "ops": 7, "manager": 8,
}  # fmt: skip
ENTRY = {"cli", "__main__", "__init__", ""}


def _place(module: str) -> str:
    """`worker` for rqworkers.worker.loop, `config` for rqworkers.config."""
    return module.split(".")[1] if module.count(".") else ""


def _imports(path: Path) -> set[str]:
    """Every rqworkers module `path` imports, at the top or inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "rqworkers":
                found.update(f"rqworkers.{alias.name}" for alias in node.names)
            elif node.module.startswith("rqworkers."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rqworkers."))
    return found


MODULES = sorted(
    (".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts), path)
    for path in PACKAGE.rglob("*.py")
)


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_imports_flow_down_the_layers(module: str, path: Path) -> None:
    here = _place(module)
    if here in ENTRY:
        return
    upward = sorted(
        target
        for target in _imports(path)
        if _place(target) != here and RANKS.get(_place(target), 99) >= RANKS[here]
    )
    assert not upward, f"{module} ({here}) imports from its own level or above: {upward}"


def test_every_module_sits_in_a_package_by_role_or_is_shared() -> None:
    places = {_place(module) for module, _ in MODULES}
    assert places <= {*RANKS, *ENTRY}, f"modules with no role: {sorted(places - {*RANKS, *ENTRY})}"
