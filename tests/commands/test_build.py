"""``onnxsparse build``: the trtexec fallback where TensorRT is missing (the real situation here), and the
API path against ``tests/fake_tensorrt`` — a MOCK of the ``tensorrt`` module. No test builds an engine."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner, Result
from fake_tensorrt import MOCK_ENGINE_BYTES, make

from onnxsparse.cli import main
from onnxsparse.ir.model_io import load_model

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
CNN = FIXTURES / "cnn.onnx"  # x[batch,3,32,32]
QDQ = FIXTURES / "qdq_model.onnx"  # x[batch,16,8,8], opset 19


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import tensorrt` fails, whatever is installed (it is not, here)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def build(*args: str) -> Result:
    return CliRunner().invoke(main, ["build", *args])


def test_without_tensorrt_prints_trtexec_and_exits_1(tmp_path: Path, no_tensorrt: None) -> None:
    engine = tmp_path / "cnn.engine"
    res = build(str(CNN), "-o", str(engine), "--shapes", "x:1x3x32x32")
    assert res.exit_code == 1
    assert "TensorRT's Python package cannot be imported" in res.stderr and "no engine was built" in res.stderr
    assert "Traceback" not in res.output
    out = res.stdout
    assert "trtexec" in out and f"--onnx={CNN.resolve()}" in out and f"--saveEngine={engine.resolve()}" in out
    assert "--sparsity=enable" in out and "--fp16" in out
    assert "--minShapes=x:1x3x32x32" in out and "--maxShapes=x:1x3x32x32" in out
    assert not engine.exists()


@pytest.mark.parametrize(
    ("args", "present", "absent"),
    [
        ([], ["--fp16"], ["--int8", "--best", "--stronglyTyped"]),
        (["--precision", "fp32"], [], ["--fp16", "--int8", "--best"]),
        (["--precision", "best"], ["--best"], ["--fp16"]),
        (["--workspace", "4G"], ["--memPoolSize=workspace:4096M"], []),
        (["--workspace", "1536"], ["--memPoolSize=workspace:1536M"], []),
        (["--timing-cache", "{tmp}/t.cache"], ["--timingCacheFile={tmp}/t.cache"], []),
        (
            ["--min-shapes", "x:1x3x32x32", "--opt-shapes", "x:8x3x32x32", "--max-shapes", "x:32x3x32x32"],
            ["--minShapes=x:1x3x32x32", "--optShapes=x:8x3x32x32", "--maxShapes=x:32x3x32x32"],
            [],
        ),
        (
            ["--trt-version", "11"],
            ["--stronglyTyped", "onnxsparse run", "-p to-fp16", "cnn.fp16.onnx"],
            ["--fp16", "--best"],
        ),
        (["--trt-version", "11", "--precision", "fp32"], ["--stronglyTyped"], ["to-fp16"]),
    ],
)
def test_trtexec_command_for_each_option(
    tmp_path: Path, no_tensorrt: None, args: list[str], present: list[str], absent: list[str]
) -> None:
    fmt = [a.replace("{tmp}", str(tmp_path.resolve())) for a in args]
    if not any(a.startswith("--min-shapes") for a in fmt):
        fmt += ["--shapes", "x:2x3x32x32"]
    res = build(str(CNN), "-o", str(tmp_path / "cnn.engine"), *fmt)
    assert res.exit_code == 1, res.output
    for text in present:
        assert text.replace("{tmp}", str(tmp_path.resolve())) in res.stdout, (text, res.stdout)
    for text in absent:
        assert text not in res.stdout, (text, res.stdout)


def test_int8_commands_need_qdq(tmp_path: Path, no_tensorrt: None) -> None:
    res = build(str(QDQ), "-o", str(tmp_path / "q.engine"), "--precision", "int8", "--shapes", "x:4x16x8x8")
    assert res.exit_code == 1 and "--int8" in res.stdout
    res = build(str(CNN), "-o", str(tmp_path / "c.engine"), "--precision", "int8", "--shapes", "x:4x3x32x32")
    assert res.exit_code == 1 and "Q/DQ" in res.stderr and "trtexec" not in res.stdout


def test_trtexec_script_is_written_executable(tmp_path: Path, no_tensorrt: None) -> None:
    script = tmp_path / "build.sh"
    res = build(
        str(CNN),
        "-o",
        str(tmp_path / "cnn.engine"),
        "--shapes",
        "x:1x3x32x32",
        "--workspace",
        "2G",
        "--trtexec-script",
        str(script),
    )
    assert res.exit_code == 1
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert "--sparsity=enable" in text and "--memPoolSize=workspace:2048M" in text and "--fp16" in text
    assert os.access(script, os.X_OK)
    assert "did not run it" in text


def test_json_report_without_tensorrt(tmp_path: Path, no_tensorrt: None) -> None:
    res = build(str(CNN), "-o", str(tmp_path / "cnn.engine"), "--shapes", "x:1x3x32x32", "--json", "-")
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert data["built"] is False and data["trt_major"] == 10
    assert data["commands"][-1][0] == "trtexec" and "--sparsity=enable" in data["commands"][-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "dynamic dims"),
        (["--shapes", "y:1x3x32x32"], "not a model input"),
        (["--shapes", "x:1x3x32x32", "--workspace", "lots"], "bad size"),
        (["--min-shapes", "x:8x3x32x32", "--max-shapes", "x:1x3x32x32", "--opt-shapes", "x:4x3x32x32"], "min <= opt"),
    ],
)
def test_user_errors_exit_1_before_anything(tmp_path: Path, no_tensorrt: None, args: list[str], message: str) -> None:
    res = build(str(CNN), "-o", str(tmp_path / "cnn.engine"), *args)
    assert res.exit_code == 1 and message in res.stderr
    assert "trtexec" not in res.stdout
    assert list(tmp_path.iterdir()) == []


def test_output_may_not_be_the_model(tmp_path: Path, no_tensorrt: None) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(CNN.read_bytes())
    res = build(str(model), "-o", str(model), "--shapes", "x:1x3x32x32")
    assert res.exit_code == 1 and "input model" in res.stderr
    assert model.read_bytes() == CNN.read_bytes()


# ---------------------------------------------------------------------------------------------- MOCK tensorrt


def test_mock_trt10_cli_build_reports_sparsity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MOCK TensorRT 10 through the CLI: exit 0, placeholder bytes written, the (Sparsity) counts reported."""
    trt = make("10.8.0.43")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    pruned = tmp_path / "pruned.onnx"
    assert CliRunner().invoke(main, ["run", str(CNN), "-p", "prune", "-o", str(pruned)]).exit_code == 0
    engine = tmp_path / "cnn.engine"
    script = tmp_path / "b.sh"
    res = build(
        str(pruned),
        "-o",
        str(engine),
        "--min-shapes",
        "x:1x3x32x32",
        "--opt-shapes",
        "x:4x3x32x32",
        "--max-shapes",
        "x:16x3x32x32",
        "--workspace",
        "1G",
        "--trtexec-script",
        str(script),
        "--json",
        str(tmp_path / "r.json"),
    )
    assert res.exit_code == 0, res.output
    assert engine.read_bytes() == MOCK_ENGINE_BYTES
    assert "TensorRT found 3 eligible and chose sparse tactics for 2" in res.stdout
    assert "eligible but dense (a dense kernel was faster): fc" in res.stdout
    assert trt.state["flags"] == {"FP16", "SPARSE_WEIGHTS"}  # type: ignore[attr-defined]
    assert trt.state["profiles"] == [{"x": ((1, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32))}]  # type: ignore[attr-defined]
    assert trt.state["pool_limits"] == {"WORKSPACE": 2**30}  # type: ignore[attr-defined]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["built"] is True and data["sparsity"]["chosen"] == 2
    assert data["two_four_layers"] == len(_two_four(pruned)) > 0
    assert "--fp16" in script.read_text()


def _two_four(path: Path) -> list[str]:
    from onnxsparse.trt.builder import two_four_layers

    return two_four_layers(load_model(path))


def test_mock_trt11_cli_build_feeds_fp16_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trt = make("11.4.1")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    res = build(str(CNN), "-o", str(tmp_path / "cnn.engine"), "--shapes", "x:2x3x32x32")
    assert res.exit_code == 0, res.output
    assert "strongly typed" in res.stdout and "to-fp16" in res.stdout
    elems = trt.state["parsed_elem_types"]  # type: ignore[attr-defined]
    assert elems["x"] == onnx.TensorProto.FLOAT  # I/O kept float32
    weights = [v for k, v in elems.items() if k != "x"]
    assert onnx.TensorProto.FLOAT16 in weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.engine"]  # the float16 copy was temporary


def test_mock_version_mismatch_and_failed_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", make("10.8.0"))
    res = build(str(CNN), "-o", str(tmp_path / "e"), "--shapes", "x:1x3x32x32", "--trt-version", "11")
    assert res.exit_code == 1 and "TensorRT 10 is installed" in res.stderr
    monkeypatch.setitem(sys.modules, "tensorrt", make("10.8.0", build_fails=True))
    res = build(str(CNN), "-o", str(tmp_path / "e"), "--shapes", "x:1x3x32x32")
    assert res.exit_code == 1 and "did not build an engine" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_precision_choices_match_the_engine() -> None:
    """build.py spells engine.PRECISIONS out so that `build --help` need not import onnx; they must agree."""
    from onnxsparse.commands import build as build_cmd
    from onnxsparse.trt import builder as engine

    assert build_cmd.PRECISIONS == engine.PRECISIONS
