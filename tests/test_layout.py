"""The layout's promises: the runtime and what serves (engine, api, serve, jobs) never import exporter/
or optimize/ (nor torch); the engine stands below both the HTTP server and offline jobs."""

import subprocess
import sys

CODE = """
import importlib, pkgutil, sys
leaks = []
for root in ("cpm_deploy.runtime", "cpm_deploy.engine", "cpm_deploy.api", "cpm_deploy.serve", "cpm_deploy.jobs"):
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

    for folder in SERVING + ("runtime",):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                for name in names:
                    parts = name.split(".")
                    assert "exporter" not in parts and "optimize" not in parts and parts[0] != "torch", (path, name)


SERVING = ("engine", "api", "serve", "jobs")


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


# what each package may not import: each stands only on the layers below it
FORBIDDEN = {
    "runtime": ("cpm_deploy.engine", "cpm_deploy.api", "cpm_deploy.serve", "cpm_deploy.jobs"),
    "engine": ("onnxruntime", "fastapi", "starlette", "uvicorn", "cpm_deploy.api", "cpm_deploy.serve", "cpm_deploy.jobs"),
    "api": ("onnxruntime", "fastapi", "starlette", "cpm_deploy.serve", "cpm_deploy.jobs"),
    "serve": ("onnxruntime", "cpm_deploy.jobs"),
    "jobs": ("onnxruntime", "fastapi", "starlette", "cpm_deploy.serve"),
}


def test_each_layer_imports_only_what_lies_below_it():
    """The runtime owns sessions and KV memory and knows nothing above it; the engine knows no HTTP
    and no API; the HTTP server and offline jobs both stand on the engine and the API rules, never
    on each other."""
    from conftest import ROOT

    for folder, forbidden in FORBIDDEN.items():
        for path in (ROOT / folder).rglob("*.py"):
            for name in imported_modules(path, ROOT):
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), (path, name)
