"""The project's structure rules, checked from the source: the trainer knows nothing of the sweep layer, Ray or
MLflow; worker-side code never imports MLflow; no import circle in sweeps/; the CLI stays thin."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER_SIDE = ("trial.py", "train_relay.py", "records.py", "protocol.py", "compile_cache.py", "spaces.py", "sweep_data.py")


def imported(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (relative imports resolved inside its package)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = f"{path.parent.name}.{base}".rstrip(".")
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("path", sorted((ROOT / "speedrun").glob("*.py")), ids=lambda p: p.name)
def test_the_trainer_imports_no_sweep_layer(path):
    assert not top(imported(path)) & {"sweeps", "benchmarks", "ray", "mlflow", "optuna"}


@pytest.mark.parametrize("name", WORKER_SIDE)
def test_worker_side_modules_never_import_mlflow(name):
    names = imported(ROOT / "sweeps" / name)
    assert "mlflow" not in top(names) and "sweeps.tracking" not in names


def test_no_import_circle_in_sweeps():
    modules = {p.stem: p for p in (ROOT / "sweeps").glob("*.py")}
    edges = {m: {n.split(".")[1] for n in imported(p) if n.startswith("sweeps.") and n.split(".")[1] in modules}
             - {m} for m, p in modules.items()}

    def visit(m, stack):
        if m in stack:
            raise AssertionError(" -> ".join([*stack[stack.index(m):], m]))
        for n in edges[m]:
            visit(n, [*stack, m])

    for m in modules:
        visit(m, [])


def test_importing_the_trainer_touches_no_cuda_ray_or_mlflow():
    code = ("import sys, torch, speedrun, speedrun.config, speedrun.train, speedrun.model, speedrun.data, "
            "speedrun.sample, speedrun.optim\n"
            "print(sorted(m for m in ('ray', 'mlflow', 'optuna', 'sweeps') if m in sys.modules), "
            "torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[] False"


def test_the_cli_is_thin_and_functions_are_short():
    assert len((ROOT / "sweeps" / "run.py").read_text().splitlines()) < 250
    long = []
    for path in sorted((ROOT / "sweeps").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long
