"""The layout's promises: the runtime and serving never import exporter/ or optimize/ (nor torch)."""

import subprocess
import sys

CODE = """
import importlib, pkgutil, sys
leaks = []
for root in ("cpm_deploy.runtime", "cpm_deploy.serve"):
    pkg = importlib.import_module(root)
    for info in pkgutil.walk_packages(pkg.__path__, root + "."):
        if info.name.endswith(("ray_app", "ray_job")):
            continue  # need Ray; checked below by reading their imports
        importlib.import_module(info.name)
bad = sorted(m for m in sys.modules if m.startswith(("cpm_deploy.exporter", "cpm_deploy.optimize")) or m == "torch")
print(bad)
"""


def test_runtime_and_serving_import_no_exporter_optimize_or_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_module_of_runtime_or_serve_imports_exporter_or_optimize():
    """Read, not run: covers modules the first test cannot import (ray_app without Ray)."""
    import ast

    from conftest import ROOT

    for folder in ("runtime", "serve"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                for name in names:
                    parts = name.split(".")
                    assert "exporter" not in parts and "optimize" not in parts and parts[0] != "torch", (path, name)


def imported_modules(path, root) -> list[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    import ast

    package = ["cpm_deploy", *path.relative_to(root).parent.parts]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            names += [".".join([*base, node.module] if node.module else base)]
    return names


def test_serve_allocates_no_onnxruntime_memory_and_the_runtime_knows_no_serve():
    """serve sits on the runtime's surface (the runtime owns sessions and KV memory); the runtime
    never reaches up into serve."""
    from conftest import ROOT

    for folder, forbidden in (("serve", "onnxruntime"), ("runtime", "cpm_deploy.serve")):
        for path in (ROOT / folder).rglob("*.py"):
            for name in imported_modules(path, ROOT):
                assert name != forbidden and not name.startswith(forbidden + "."), (path, name)
