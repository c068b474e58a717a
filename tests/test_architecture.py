"""The layout's promises, checked on the source: Ray only under farm/run/, torch never in the statistics,
no import cycles, no private names across modules, and a reason beside every import inside a function."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

from tests.conftest import REPO

ROOT = pathlib.Path(REPO)
PACKAGES = ("farm", "evaluation")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, top_level_only: bool):
    """(line, imported module, names) of a module's imports, those inside functions too unless told."""
    tree = ast.parse(MODULES[module].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            names = [a.name for a in node.names]
            # `from pkg import submodule` imports the submodule
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            yield node.lineno, target, [n for n in names if f"{target}.{n}" not in MODULES]
            for sub in subs:
                yield node.lineno, sub, []


def test_ray_is_imported_only_under_farm_run():
    offenders = [f"{m}:{line} imports {target}" for m in MODULES for line, target, _ in _imports(m, False)
                 if target.split(".")[0] == "ray" and not m.startswith("farm.run")]
    assert not offenders, offenders


def test_training_store_and_statistics_import_without_ray():
    light = [m for m in MODULES if m.startswith(("farm.train", "farm.store")) or m in (
        "farm.spec", "farm.plan", "farm.data", "farm.settings", "farm.status", "farm.export", "farm.cli",
        "farm.run.prepare", "farm.run.scheduler", "farm.run.local", "farm.run.ray_executor")]
    code = ("import importlib, sys\n"
            f"for m in {light!r}:\n    importlib.import_module(m)\n"
            "print(sorted(n for n in sys.modules if n == 'ray' or n.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    stats = [m for m in MODULES if m.startswith("evaluation") and not m.startswith("evaluation.report")]
    code = ("import importlib, sys\n"
            f"for m in {stats!r}:\n    importlib.import_module(m)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('ray', 'torch', 'farm')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_import_cycles_between_modules():
    graph = {m: {t for _, t, _ in _imports(m, True) if t in MODULES and t != m} for m in MODULES}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    # a package's __init__ re-exporting its own submodules is not a cycle through another module
    real = [c for c in cycles if not all(part.startswith(c.split(" -> ")[0]) for part in c.split(" -> "))]
    assert not real, real


def test_no_private_names_imported_across_modules():
    offenders = [f"{m}:{line} imports {n} from {t}" for m in MODULES for line, t, names in _imports(m, False)
                 if t.split(".")[0] in PACKAGES for n in names if n.startswith("_") and not n.startswith("__")]
    assert not offenders, offenders


def test_every_import_inside_a_function_says_why():
    offenders = []
    for m, path in MODULES.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        inner = sorted({sub.lineno for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))})
        for i in inner:
            line, above = lines[i - 1], lines[i - 2].strip() if i > 1 else ""
            # a block of imports shares the reason given on its first line
            if "#" not in line and not above.startswith("#") and (i - 1) not in inner:
                offenders.append(f"{m}:{i}: {line.strip()}")
    assert not offenders, offenders
