"""evaluation's statistics modules stand alone (numpy and scipy, no farm, Ray or torch), and the report reads
the store through one module only."""
import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STATISTICS = ("lira", "rmia", "competition", "twosample", "ulira", "vulnerability", "precision", "scores")


def _imported_after(statement: str) -> set[str]:
    """The top-level packages among farm, ray and torch that a fresh interpreter holds after ``statement``."""
    code = (f"{statement}\nimport sys\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'farm', 'ray', 'torch'})))")
    path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": path})
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_statistics_modules_import_nothing_from_farm_ray_or_torch():
    assert _imported_after("; ".join(f"import evaluation.{m}" for m in STATISTICS)) == set()


def test_report_does_not_import_ray():
    assert "ray" not in _imported_after("import evaluation.report")


def _imports(path: str) -> list[ast.ImportFrom | ast.Import]:
    return [n for n in ast.walk(ast.parse(open(path).read())) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_only_store_io_touches_the_farm_and_no_private_name_crosses_a_module():
    root = os.path.join(REPO, "evaluation")
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, REPO)
            for node in _imports(path):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m == "farm" or m.startswith("farm.") for m in modules):
                    assert rel == os.path.join("evaluation", "report", "store_io.py"), rel
                if isinstance(node, ast.ImportFrom):
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert not private, (rel, node.module, private)
