"""CLI: run / inspect / passes through click's runner, and exit codes through a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from builders import gemm_cases, matmul_ranks
from click.testing import CliRunner

from onnxsparse.cli import main


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "m.onnx"
    onnx.save(matmul_ranks(), str(p))
    return p


def test_run_writes_model_and_json(model_path: Path, tmp_path: Path) -> None:
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(main, ["run", str(model_path), "-p", "gemm-to-conv", "-o", str(out), "--json", str(rep)])
    assert res.exit_code == 0, res.output
    assert "gemm-to-conv: 2 changed" in res.output
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    data = json.loads(rep.read_text())
    assert data["pipeline"] == "gemm-to-conv" and data["ops_after"]["Conv"] == 2


def test_inspect_lists_layers(model_path: Path) -> None:
    res = CliRunner().invoke(main, ["inspect", str(model_path), "--shapes", "x:2x3x8", "--json", "-"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert [L["name"] for L in data["layers"]] == ["proj_q", "proj_k"]
    assert data["layers"][0]["gemm"] == {"m": 6, "n": 32, "k": 8, "flops": 2 * 6 * 32 * 8}


def test_passes_lists_options_from_configs() -> None:
    res = CliRunner().invoke(main, ["passes", "--json"])
    assert res.exit_code == 0
    names = {p["name"]: p for p in json.loads(res.output)}
    assert {o["name"] for o in names["gemm-to-conv"]["options"]} == {"include", "exclude"}


def test_skipped_reasons_are_printed(tmp_path: Path) -> None:
    src = tmp_path / "g.onnx"
    onnx.save(gemm_cases(), str(src))
    res = CliRunner().invoke(main, ["run", str(src), "-p", "gemm-to-conv", "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code == 0, res.output
    assert "shared with another consumer" in res.output


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxsparse", *args], capture_output=True, text=True, timeout=120)


def test_subprocess_exit_codes(model_path: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx at all")
    before = model_path.read_bytes()
    r = _cli("run", str(bad), "-p", "gemm-to-conv", "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:")
    assert not (tmp_path / "x.onnx").exists()
    r = _cli("run", str(model_path), "-p", "nosuch", "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == 1 and "unknown pass" in r.stderr
    r = _cli("run", str(model_path), "-p", "gemm-to-conv", "-o", str(model_path))
    assert r.returncode == 1 and "is the input model" in r.stderr
    assert model_path.read_bytes() == before
    r = _cli("--verbose", "run", str(bad), "-p", "gemm-to-conv", "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == 1 and "Traceback" in r.stderr
    r = _cli("run", str(model_path), "-p", "gemm-to-conv", "-o", str(tmp_path / "ok.onnx"))
    assert r.returncode == 0, r.stderr


def test_preset_and_gate_table(tmp_path: Path) -> None:
    from conftest import fixture_path

    src = str(fixture_path("cnn"))
    out = tmp_path / "o.onnx"
    runner = CliRunner()
    res = runner.invoke(main, ["run", src, "--preset", "trt8", "-o", str(out), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text())["pipeline"] == "gemm-to-conv,prune,validate"
    res = runner.invoke(main, ["run", src, "--preset", "trt8", "-p", "prune", "-o", str(out)])
    assert res.exit_code == 1 and "not both" in res.output
    res = runner.invoke(main, ["run", src, "-p", "validate{require-all=true}", "-o", str(tmp_path / "gate.onnx")])
    assert res.exit_code == 2
    assert "block1.conv1" in res.output and "eligible" in res.output  # the failing gate's per-layer table
    assert not (tmp_path / "gate.onnx").exists()


def test_calib_read_by_no_pass_warns(model_path: Path, tmp_path: Path) -> None:
    calib = tmp_path / "c.npz"
    calib.write_bytes(b"unused")
    res = CliRunner().invoke(
        main,
        ["run", str(model_path), "-p", "gemm-to-conv,validate", "--calib", str(calib), "-o", str(tmp_path / "o.onnx")],
    )
    assert res.exit_code == 0, res.output
    assert "--calib is given but no pass of 'gemm-to-conv,validate' reads calibration data" in res.output
    res = CliRunner().invoke(main, ["run", str(model_path), "-p", "gemm-to-conv", "-o", str(tmp_path / "p.onnx")])
    assert "--calib" not in res.output


def test_calib_warning_follows_what_prune_and_finetune_read(model_path: Path, tmp_path: Path) -> None:
    """Magnitude prune reads no --calib (warn); sparsegpt prune and a finetune without data= do."""
    from onnxsparse.passes.finetune import FinetunePass
    from onnxsparse.passes.prune import PrunePass

    assert PrunePass().reads_calibration() is False
    assert PrunePass(method="sparsegpt").reads_calibration() is True
    assert PrunePass(method="wanda").reads_calibration() is True
    assert FinetunePass().reads_calibration() is True
    assert FinetunePass(data="train.npz").reads_calibration() is False
    calib = tmp_path / "c.npz"
    calib.write_bytes(b"unused")
    res = CliRunner().invoke(
        main, ["run", str(model_path), "-p", "prune", "--calib", str(calib), "-o", str(tmp_path / "o.onnx")]
    )
    assert res.exit_code == 0, res.output
    assert "--calib is given but no pass of 'prune' reads calibration data" in res.output


def test_inspect_shows_op_shape_and_stored_k_axis_like_check() -> None:
    """fc2's weight is stored [48,64] and transposed for the MatMul ([64,48]): inspect shows both, and its K
    axis is the stored tensor's, the same axis check reports."""
    from conftest import fixture_path

    src = str(fixture_path("qdq_model"))
    info = json.loads(CliRunner().invoke(main, ["inspect", src, "--json", "-"]).output)
    fc2 = next(L for L in info["layers"] if L["name"] == "fc2")
    assert fc2["weight_shape"] == [64, 48] and fc2["weight_k_axis"] == 0
    assert (
        fc2["stored_shape"] == [48, 64]
        and fc2["reduction_axis"] == 1
        and fc2["via"] == ["DequantizeLinear", "Transpose"]
    )
    check = json.loads(CliRunner().invoke(main, ["check", src, "--json", "-"]).output)
    row = next(r for r in check["layers"] if r["layer"] == "fc2")
    assert (row["shape"], row["axis"]) == (fc2["stored_shape"], fc2["reduction_axis"])
    text = CliRunner().invoke(main, ["inspect", src, "--wide"]).output
    line = next(ln for ln in text.splitlines() if ln.startswith("fc2 "))
    assert "[64,48]" in line and "[48,64]" in line and "DequantizeLinear→Transpose" in line
