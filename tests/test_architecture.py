"""The import rule of docs/architecture.md, held on the real source: layers only look down, no
import cycle between packages, no private name imported across packages.

Every ``import`` in ``llmopt/`` counts, including the ones inside functions and under
``TYPE_CHECKING`` (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "llmopt"

# Bottom to top. A package may import packages of its own layer or below, never above; within a
# layer, packages may import each other as long as no cycle forms.
LAYERS: list[set[str]] = [
    {"formats", "config"},  # block layouts + torch reference quantize/dequantize; plain settings
    {"kernels"},  # native ops and their torch twins
    {"models"},  # the decoder, loader, tokenizer, registry
    {"quant", "reasoning"},  # produce weights / formats; reasoning format and budgets
    {"engine"},  # scheduler, runner, fused decode step, sampler, async stepping thread
    # front ends; train too: its rollouts come from the engine and its rewards from the tasks'
    # graders, and what it produces (a LoRA adapter) is read by models/adapter.py below it
    # (distributed: Ray cluster and engine replicas, used by serve and batch, importing neither)
    {"llm", "serve", "batch", "bench", "tasks", "report", "tune", "train", "distributed", "cli", "__init__"},
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _package(module: str) -> str:
    """``llmopt.kernels.qlinear`` -> ``kernels``; ``llmopt.config`` -> ``config``; ``llmopt`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path) -> list[tuple[str, list[str], int]]:
    """(imported llmopt module, imported names, line) for every import in ``path``."""
    module = _module_name(path, root)
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "llmopt"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "llmopt":
                continue
            names = [a.name for a in node.names]
            if node.module is None or (node.level and not node.module):  # from . import x
                out += [(f"{target}.{n}", [], node.lineno) for n in names]
            else:
                out.append((target, names, node.lineno))
    return out


def _graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[str]]:
    """Package import graph and every import that breaks a rule (as readable lines)."""
    edges: dict[str, set[str]] = {}
    problems: list[str] = []
    for path in sorted(root.rglob("*.py")):
        src_pkg = _package(_module_name(path, root))
        for target, names, line in _imports(path, root):
            dst_pkg = _package(target)
            where = f"{path.relative_to(root.parent)}:{line} imports {target}"
            for pkg in (src_pkg, dst_pkg):
                if pkg not in RANK:
                    problems.append(f"{where}: package {pkg!r} has no layer in tests/test_architecture.py "
                                    "(add it to LAYERS and docs/architecture.md)")
            if src_pkg == dst_pkg or src_pkg not in RANK or dst_pkg not in RANK:
                continue
            edges.setdefault(src_pkg, set()).add(dst_pkg)
            if RANK[dst_pkg] > RANK[src_pkg]:
                problems.append(f"{where}: upward import ({src_pkg} is below {dst_pkg})")
            private = [n for n in names if n.startswith("_")] + \
                      [p for p in target.split(".")[1:] if p.startswith("_") and p != "__init__"]
            if private:
                problems.append(f"{where}: private {private} used across packages ({src_pkg} -> {dst_pkg})")
    return edges, problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return cycles


def test_packages_only_import_downward_and_nothing_private():
    _, problems = _graph()
    assert not problems, "\n".join(problems)


def test_no_import_cycle_between_packages():
    edges, _ = _graph()
    cycles = _cycles(edges)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_distributed_imports_neither_of_the_front_ends_built_on_it():
    edges, _ = _graph()
    assert "distributed" in edges.get("serve", set()) and "distributed" in edges.get("batch", set())
    assert not edges.get("distributed", set()) & {"serve", "batch", "cli", "llm", "__init__"}


def test_kernels_import_only_formats_config_and_themselves():
    edges, _ = _graph()
    assert edges.get("kernels", set()) <= {"formats", "config"}
    assert edges.get("formats", set()) <= {"config"}


@pytest.mark.parametrize("src,bad", [
    ("from llmopt.quant.linear import QuantLinear\n", "upward import"),
    ("from llmopt.engine.engine import _x\n", "private"),
])
def test_the_checker_catches_a_bad_import(tmp_path, src, bad):
    """The rule is not vacuous: a kernels module importing upward (or a private name) is reported."""
    import shutil

    root = tmp_path / "llmopt"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("csrc", "data", "__pycache__"))
    (root / "kernels" / "zz_bad.py").write_text(src)
    _, problems = _graph(root)
    assert any("zz_bad.py" in p and bad in p for p in problems), problems
