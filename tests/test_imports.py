"""The layering of DESIGN.md, checked by walking every import in megagpt/ (module level and inside functions):
no cycles, config.py imports nothing of megagpt, and the lower layers never import the upper ones."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "megagpt"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str:
    """The megagpt module an import names (`from megagpt.parallel import comm` names megagpt.parallel.comm)."""
    while name not in MODULES:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str) -> set[str]:
    """megagpt modules imported anywhere in `module`'s source (lazy imports included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found |= {_resolve(n) for n in names if n == "megagpt" or n.startswith("megagpt.")}
    return found - {module, "megagpt"}


GRAPH = {m: imports_of(m) for m in MODULES}


def _find_cycle() -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m], _ = 1, stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        stack.pop()
        return []

    for m in sorted(GRAPH):
        if m not in state and (cycle := visit(m)):
            return cycle
    return []


def test_the_walker_sees_imports():
    assert "megagpt.config" in GRAPH["megagpt.training"]
    assert "megagpt.parallel.comm" in GRAPH["megagpt.parallel.mappings"]       # `from megagpt.parallel import comm`
    assert "megagpt.engines.deepspeed" in GRAPH["megagpt.engines"]            # a lazy import inside a function


def test_no_import_cycles():
    assert _find_cycle() == []


def test_config_is_the_ground_floor():
    """The config package imports nothing of megagpt outside itself."""
    config = [m for m in GRAPH if m == "megagpt.config" or m.startswith("megagpt.config.")]
    assert len(config) > 1
    assert {m: sorted(n for n in GRAPH[m] if not n.startswith("megagpt.config")) for m in config} == \
        {m: [] for m in config}


# (layer, what it may not import): DESIGN.md "Data flows one way".
FORBIDDEN = [
    ("megagpt.parallel", ("megagpt.model", "megagpt.optim", "megagpt.pipeline", "megagpt.engines",
                          "megagpt.checkpoint", "megagpt.data", "megagpt.training", "megagpt.cli")),
    ("megagpt.model", ("megagpt.optim", "megagpt.checkpoint", "megagpt.engines", "megagpt.training", "megagpt.cli")),
    ("megagpt.data", ("megagpt.model", "megagpt.parallel", "megagpt.optim", "megagpt.engines", "megagpt.training")),
    ("megagpt.plan", ("megagpt.parallel", "megagpt.engines", "megagpt.training")),
    ("megagpt", ("megagpt.training",)),
]


@pytest.mark.parametrize("layer, forbidden", FORBIDDEN)
def test_lower_layers_do_not_import_upper_ones(layer, forbidden):
    bad = [f"{m} imports {n}" for m in GRAPH if (m == layer or m.startswith(layer + ".")) and m != "megagpt.training"
           for n in GRAPH[m] if any(n == f or n.startswith(f + ".") for f in forbidden)]
    assert bad == []
