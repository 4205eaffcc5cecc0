"""The README tells the truth: its test command is what CI runs, and its Python example runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block, "README must start with a bash block of two commands"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def test_ci_runs_the_readme_test_command() -> None:
    install_run, test_cmd = _commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    assert test_cmd in ci.splitlines()
    assert "pytest" in test_cmd and "onnxsparse run" in install_run


def test_main_job_command_runs(tmp_path: Path) -> None:
    """README command (a), after its install step: writes a valid 2:4 model and prints the report."""
    import shlex

    import onnx

    install_run, _ = _commands()
    run = install_run.split("&&")[-1].strip()
    argv = shlex.split(run)
    assert argv[0] == ".venv/bin/onnxsparse"
    out = tmp_path / argv[argv.index("-o") + 1]
    argv[argv.index("-o") + 1] = str(out)
    r = subprocess.run(
        [sys.executable, "-m", "onnxsparse", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "2:4 coverage" in r.stdout and "FLOP-weighted" in r.stdout
    onnx.checker.check_model(str(out), full_check=True)


def test_python_example_runs(tmp_path: Path) -> None:
    code = re.search(r"```python\n(.*?)```", README, re.S)
    assert code
    text = code.group(1).replace("/tmp/", f"{tmp_path}/")
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", text], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "changed" in r.stdout
