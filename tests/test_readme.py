"""The README's examples run as written, in an empty temporary folder (the vocabulary ships in the package)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(kind: str) -> list[str]:
    pattern = rf"<!-- readme-test: {kind} -->\s*```{kind}\n(.*?)```"
    return re.findall(pattern, README.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.slow
def test_readme_examples_run(tmp_path):
    bash, python = blocks("bash"), blocks("python")
    assert bash and python, "README lost its tested examples"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for script in bash:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "decode tokens/s" in r.stdout and "Traceback" not in r.stderr
    for code in python:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert "generated_text" in r.stdout
