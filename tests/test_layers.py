"""The package is a stack of layers with no import cycle; a plain GRPO run loads nothing of P²O or GEPA.

Every import statement of p2o_hpc (module level and inside functions) is read from the source. An import may
go down the stack or stay in its layer, never up; and no set of modules may import each other in a circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "p2o_hpc"

# Top to bottom. A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry points", ("p2o_hpc.launch", "p2o_hpc.eval", "p2o_hpc.gepa.service", "p2o_hpc.cluster.sweep_launcher")),
    ("orchestration", ("p2o_hpc.cluster",)),
    ("training driver", ("p2o_hpc.trainer",)),
    ("evaluation", ("p2o_hpc.evaluation",)),
    ("P²O", ("p2o_hpc.p2o",)),
    ("GEPA", ("p2o_hpc.gepa", "p2o_hpc.reflection")),
    ("rollout, reward, algorithms, data", ("p2o_hpc.rollout", "p2o_hpc.reward", "p2o_hpc.algo", "p2o_hpc.data")),
    ("megatron", ("p2o_hpc.megatron",)),
    ("base: config, run dir, records, files", ("p2o_hpc",)),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    best = max(((len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} is in no layer"
    return best[1]


def resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The package modules `module` imports (a package's __init__ counts as the package)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found.update(target for target in map(resolve, targets) if target and target != module)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_the_package():
    # A package's __init__ re-exports its modules: an edge into a package counts as an edge into its __init__,
    # which is exactly how Python resolves it.
    assert cycles(GRAPH) == []


def test_imports_go_down_the_layers():
    upward = sorted(f"{source} ({LAYERS[layer_of(source)][0]}) → {target} ({LAYERS[layer_of(target)][0]})"
                    for source, targets in GRAPH.items() for target in targets
                    if layer_of(target) < layer_of(source))
    assert upward == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("p2o_hpc.trainer.driver") < layer_of("p2o_hpc.p2o.hooks") < layer_of("p2o_hpc.run_dir")


def test_the_training_driver_reaches_p2o_only_through_its_hook_factory():
    """The one trainer → P²O import sits in trainer/hooks.py's factory, taken only when algorithm.p2o.enabled."""
    edges = sorted((source, target) for source, targets in GRAPH.items() for target in targets
                   if source.startswith("p2o_hpc.trainer") and target.startswith(("p2o_hpc.p2o", "p2o_hpc.gepa")))
    assert edges == [("p2o_hpc.trainer.hooks", "p2o_hpc.p2o.hooks")]


@pytest.mark.parametrize("p2o_enabled", [False, True])
def test_a_grpo_run_imports_no_gepa_module(p2o_enabled):
    """What a learner rank imports for a GRPO run (the driver, its roles, the hooks the config asks for)."""
    script = f"""
import sys
from p2o_hpc.config import RunConfig
import p2o_hpc.cluster.local_run, p2o_hpc.trainer.driver, p2o_hpc.rollout.rollout_worker
from p2o_hpc.trainer.hooks import algorithm_hooks
cfg = RunConfig()
cfg.algorithm.p2o.enabled = {p2o_enabled}
algorithm_hooks(cfg, run_dir="/nonexistent", rank=0, console=None)
print(sorted(name for name in sys.modules if name.startswith(("p2o_hpc.gepa", "p2o_hpc.p2o", "p2o_hpc.reflection"))))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = eval(result.stdout.strip().splitlines()[-1])
    if p2o_enabled:
        assert "p2o_hpc.p2o.hooks" in loaded  # the check sees P²O when it is there
    else:
        assert loaded == []
