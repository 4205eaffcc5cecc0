"""``onnxsparse calibrate`` through click's runner: output model, table, JSON, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import fixture_path, make_feeds, run_ort

from onnxsparse.cli import main


@pytest.fixture()
def calib_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.standard_normal((24, 3, 32, 32)).astype(np.float32))
    return path


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_calibrate_writes_a_qdq_model_and_a_table(calib_npz: Path, tmp_path: Path) -> None:
    src, out = fixture_path("cnn"), tmp_path / "int8.onnx"
    res = CliRunner().invoke(
        main,
        [
            "calibrate",
            str(src),
            "--calib",
            str(calib_npz),
            "-o",
            str(out),
            "--batch-size",
            "8",
            "--calib-samples",
            "20",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "calibrated 9 tensors on 20 samples in 3 batches (percentile 99.99" in res.output
    assert "wrote" in res.output and "9 layers quantized" in res.output
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 9 and ops.count("DequantizeLinear") == 18
    feeds = make_feeds(src, seed=7)
    assert _cos(run_ort(src, feeds)[0], run_ort(out, feeds)[0]) > 0.99


def test_calibrate_json_and_options(calib_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8.onnx"
    res = CliRunner().invoke(
        main,
        [
            "calibrate",
            str(fixture_path("cnn")),
            "--calib",
            str(calib_npz),
            "-o",
            str(out),
            "--method",
            "max",
            "--per-tensor",
            "--exclude",
            "^head$",
            "--json",
            "-",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    (qdq,) = data["passes"]
    assert data["pipeline"].startswith("qdq{") and "method=max" in data["pipeline"]
    assert qdq["details"]["calibration"]["method"] == "max"
    assert all(c["weight_axis"] is None for c in qdq["changed"])
    assert {"name": "head", "reason": "excluded by '^head$'"}.items() <= qdq["skipped"][0].items()


def test_bad_calibration_data_is_one_red_line_and_no_output(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((4, 3, 32, 32), np.float32))
    out = tmp_path / "int8.onnx"
    res = CliRunner().invoke(main, ["calibrate", str(fixture_path("cnn")), "--calib", str(bad), "-o", str(out)])
    assert res.exit_code == 1
    assert res.output.strip().count("\n") == 0
    assert "has 'image', which is not a model input (inputs: x: float32[batchx3x32x32])" in res.output
    assert not out.exists() and not list(tmp_path.glob(".int8.onnx*"))


def test_calibrate_needs_calib_and_refuses_the_input_as_output(calib_npz: Path) -> None:
    res = CliRunner().invoke(main, ["calibrate", str(fixture_path("cnn")), "-o", "x.onnx"])
    assert res.exit_code == 1 and "--calib" in res.output
    src = fixture_path("cnn")
    res = CliRunner().invoke(main, ["calibrate", str(src), "--calib", str(calib_npz), "-o", str(src)])
    assert res.exit_code == 1 and "is the input model" in res.output


def test_run_command_feeds_calib_to_the_qdq_pass(calib_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "sparse_int8.onnx"
    res = CliRunner().invoke(
        main,
        [
            "run",
            str(fixture_path("cnn")),
            "-p",
            "prune,qdq{percentile=99.9},validate",
            "--calib",
            str(calib_npz),
            "--calib-samples",
            "16",
            "-o",
            str(out),
            "--json",
            "-",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    qdq = next(p for p in data["passes"] if p["pass"] == "qdq")
    assert qdq["details"]["calibration"]["samples"] == 16 and qdq["details"]["calibration"]["percentile"] == 99.9
    validate = next(p for p in data["passes"] if p["pass"] == "validate")
    assert any(row["status"] == "sparse" for row in validate["details"]["layers"])
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("QuantizeLinear") == 9


def test_calibrate_attention_and_residual_flags(tmp_path: Path) -> None:
    src = fixture_path("transformer_block")
    calib = tmp_path / "tr.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 8, 64)).astype(np.float32))
    out = tmp_path / "tr_int8.onnx"
    res = CliRunner().invoke(
        main,
        [
            "calibrate",
            str(src),
            "--calib",
            str(calib),
            "-o",
            str(out),
            "--activation-matmuls",
            "--no-skip-residual",
            "--json",
            "-",
        ],
    )
    assert res.exit_code == 0, res.output
    (qdq,) = json.loads(res.output)["passes"]
    assert {c["name"] for c in qdq["changed"]} >= {"attn.qk", "attn.pv"}
    assert qdq["details"]["residual_inputs"] == []


def test_include_matching_nothing_is_an_error(calib_npz: Path, tmp_path: Path) -> None:
    """Issue 12: a filter that leaves nothing to quantize used to write a model with 0 layers quantized."""
    out = tmp_path / "int8.onnx"
    before = sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(
        main, ["calibrate", str(fixture_path("cnn")), "--calib", str(calib_npz), "-o", str(out), "--include", "nomatch"]
    )
    assert res.exit_code == 1
    assert res.output.startswith("error: no layer matched --include 'nomatch': nothing to quantize, no model written")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
