"""Start-up: ``import onnxsparse.cli`` and ``onnxsparse --help`` import no onnx, numpy or onnxruntime.

Time itself is measured by tools/bench_startup.py (not a timed test: the machine is shared); what makes it
fast is checked here, in a fresh interpreter, through ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from onnxsparse.cli import main

CNN = Path(__file__).resolve().parents[1] / "fixtures" / "cnn.onnx"
HEAVY = ("onnx", "numpy", "onnxruntime", "tqdm")

_PROBE = """
import json, sys
from click.testing import CliRunner
import onnxsparse.cli
after_import = sorted(m for m in {heavy} if m in sys.modules)
r = CliRunner().invoke(onnxsparse.cli.main, {args})
print(json.dumps({{"import": after_import, "help": sorted(m for m in {heavy} if m in sys.modules),
                  "code": r.exit_code, "out": r.output}}))
"""


def _probe(args: list[str]) -> dict[str, object]:
    code = _PROBE.format(heavy=HEAVY, args=args)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], []])
def test_help_imports_no_onnx_numpy_or_onnxruntime(args: list[str]) -> None:
    got = _probe(args)
    assert got["import"] == [] and got["help"] == [], got
    assert got["code"] == 0
    out = str(got["out"])
    for name in (
        "run",
        "check",
        "calibrate",
        "inspect",
        "build",
        "passes",
        "finetune",
        "bench",
        "compare",
        "sensitivity",
    ):
        assert f"\n  {name} " in out, out  # every command listed, with its short help, none imported


def test_lazy_commands_match_their_modules() -> None:
    """The short help read from source equals the imported command's, for every command."""
    group = main
    ctx = group.make_context("onnxsparse", ["passes"], resilient_parsing=True)
    lazy = dict(group._lazy)  # type: ignore[attr-defined]
    assert {"run", "check", "calibrate", "inspect", "build", "passes", "setup-training"} <= set(lazy)
    for name, (_, doc) in lazy.items():
        command = group.get_command(ctx, name)
        assert command is not None and command.name == name
        shown = click.Command(name, help=doc).get_short_help_str(80)
        assert command.get_short_help_str(80) == shown, name


def test_bare_command_shows_help_and_usage_errors_are_one_line() -> None:
    res = CliRunner().invoke(main, [], prog_name="onnxsparse")
    assert res.exit_code == 0 and "Usage: onnxsparse" in res.output
    for args, where in (
        (["run"], "onnxsparse run"),
        (["nosuch"], "onnxsparse"),
        (["check", "--bogus", "m.onnx"], "onnxsparse check"),
    ):
        res = CliRunner().invoke(main, args, prog_name="onnxsparse")
        lines = res.output.strip().splitlines()
        assert res.exit_code == 1, (args, res.output)
        assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(f"(see '{where} --help')")


_COMMAND_HELP = """
import sys
from click.testing import CliRunner
import onnxsparse.cli as cli
r = CliRunner().invoke(cli.main, [{name!r}, "--help"])
print(r.exit_code, sorted(m for m in {heavy} if m in sys.modules))
"""

#: commands whose module still imports onnx/numpy at module level (owner: see the module)
_HEAVY_AT_IMPORT: set[str] = set()


@pytest.mark.parametrize("name", sorted(main._lazy))  # type: ignore[attr-defined]
def test_command_help_imports_no_onnx(name: str) -> None:
    """``onnxsparse CMD --help`` imports the command's module only: no onnx, numpy or onnxruntime either."""
    if name in _HEAVY_AT_IMPORT:
        pytest.xfail(f"commands/{name}.py imports onnx/numpy at module level")
    code = _COMMAND_HELP.format(name=name, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split(None, 1) == ["0", "[]\n"], out.stdout + out.stderr


def test_prune_and_validate_do_not_import_onnx_ir(tmp_path: Path) -> None:
    """onnx-ir costs ~0.2 s to import; only the passes that rewrite on it (to-fp16, gemm-to-conv, qdq) load it,
    inside their run, so the prune → validate path of ``onnxsparse run`` never pays for it."""
    out = tmp_path / "o.onnx"
    code = (
        "import sys, json\n"
        "from click.testing import CliRunner\n"
        "import onnxsparse.cli\n"
        f"args = ['run', {str(CNN)!r}, '-o', {str(out)!r}, '-p', 'prune,validate']\n"
        "r = CliRunner().invoke(onnxsparse.cli.main, args)\n"
        "print(json.dumps({'code': r.exit_code, 'onnx_ir': 'onnx_ir' in sys.modules, 'out': r.output}))\n"
    )
    got = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert got["code"] == 0, got["out"]
    assert out.is_file()
    assert got["onnx_ir"] is False
