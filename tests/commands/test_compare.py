"""``onnxsparse compare``: its numbers against numpy on ORT outputs, JSON, the gate, and bad input.

Every expected value is recomputed here from the two models' ONNX Runtime outputs (``conftest.run_ort``),
not taken from the command.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import copy_proto, fixture_path, run_ort

from onnxsparse.cli import main


def _invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture()
def cnn_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(dense cnn, its magnitude-2:4 copy, 20 samples of inputs)."""
    pruned = tmp_path / "cnn_sparse.onnx"
    res = _invoke("run", fixture_path("cnn"), "-p", "prune", "-o", pruned)
    assert res.exit_code == 0, res.output
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(3)
    np.savez(data, x=rng.standard_normal((20, 3, 32, 32)).astype(np.float32))
    return fixture_path("cnn"), pruned, data


def _expected(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """The reported figures, computed directly (samples along axis 0)."""
    r = ref.reshape(ref.shape[0], -1).astype(np.float64)
    c = cand.reshape(cand.shape[0], -1).astype(np.float64)
    cos = (r * c).sum(1) / np.linalg.norm(r, axis=1) / np.linalg.norm(c, axis=1)
    d = c - r
    return {
        "cosine": cos.mean(),
        "cosine_min": cos.min(),
        "cosine_p5": np.percentile(cos, 5),
        "rel_l2": np.linalg.norm(d) / np.linalg.norm(r),
        "max_abs": np.abs(d).max(),
        "mean_abs": np.abs(d).mean(),
        "top1": float((ref.argmax(-1) == cand.argmax(-1)).mean()),
    }


def test_numbers_match_numpy(cnn_pair: tuple[Path, Path, Path]) -> None:
    dense, pruned, data = cnn_pair
    res = _invoke("compare", dense, pruned, "--data", data, "--top1", "--batch-size", "6", "--json", "-")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    x = np.load(data)["x"]
    ref, cand = run_ort(dense, {"x": x})[0], run_ort(pruned, {"x": x})[0]
    want = _expected(ref, cand)
    assert want["cosine"] < 0.999  # pruning changed the outputs: the comparison is not trivially 1
    (out,) = report["outputs"]
    assert out["name"] == "logits" and out["samples"] == 20 and out["elements"] == ref.size
    assert report["batches"] == 4 and report["samples"] == 20  # 6 + 6 + 6 + 2, streamed
    for key, value in want.items():
        assert out[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert report["rel_l2"] == pytest.approx(want["rel_l2"], rel=1e-4)


def test_identical_models_and_table(cnn_pair: tuple[Path, Path, Path]) -> None:
    dense, _, data = cnn_pair
    res = _invoke("compare", dense, dense, "--data", data, "--min-cosine", "0.999999")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    header = next(line for line in lines if line.startswith("output "))
    assert header.split()[:4] == ["output", "dtype", "shape", "cosine"] and header.split()[-1] == "status"
    row = next(line for line in lines if line.startswith("logits "))
    assert "1.000000" in row and "0.000e+00" in row and row.endswith("PASSED")
    assert "PASSED | 1/1 outputs with cosine >= 0.999999" in res.stdout
    assert "20 samples in 1 batches" in res.stdout


def test_gate_exit_2_and_json_file(cnn_pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    dense, pruned, data = cnn_pair
    x = np.load(data)["x"]
    cos = _expected(run_ort(dense, {"x": x})[0], run_ort(pruned, {"x": x})[0])["cosine"]
    out = tmp_path / "report.json"
    res = _invoke("compare", dense, pruned, "--data", data, "--min-cosine", f"{cos + 1e-4:.6f}", "--json", out)
    assert res.exit_code == 2, res.output
    assert "FAILED" in res.stdout.splitlines()[-1]  # the table is printed before the gate's verdict
    assert "gate failed: output 'logits' cosine" in res.stderr
    report = json.loads(out.read_text())
    assert report["gate"] == {"min_cosine": pytest.approx(cos + 1e-4, abs=1e-6), "passed": False, "failed": ["logits"]}
    res = _invoke("compare", dense, pruned, "--data", data, "--min-cosine", f"{cos - 1e-4:.6f}")
    assert res.exit_code == 0, res.output


def test_dynamic_seq_and_sample_axis(tmp_path: Path) -> None:
    """transformer_block: batch and seq symbolic; cosine is per sample over [seq, 64]."""
    dense = fixture_path("transformer_block")
    pruned = tmp_path / "tb.onnx"
    assert _invoke("run", dense, "-p", "prune", "-o", pruned).exit_code == 0
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 5, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    res = _invoke("compare", dense, pruned, "--data", tmp_path / "d.npz", "--batch-size", "4", "--json", "-")
    assert res.exit_code == 0, res.output
    (out,) = json.loads(res.stdout)["outputs"]
    want = _expected(run_ort(dense, {"x": x})[0], run_ort(pruned, {"x": x})[0])
    assert out["samples"] == 9 and out["shape"] == [4, 5, 64]
    assert out["cosine"] == pytest.approx(want["cosine"], rel=1e-5)
    assert out["cosine_min"] == pytest.approx(want["cosine_min"], rel=1e-5)
    assert out["top1"] is None  # not asked for


def _renamed_output(src: Path, dst: Path, new_name: str | None = None, dtype: int | None = None) -> Path:
    proto = copy_proto(onnx.load(src))
    if new_name is not None:
        old = proto.graph.output[0].name
        proto.graph.output[0].name = new_name
        for node in proto.graph.node:
            for i, o in enumerate(node.output):
                if o == old:
                    node.output[i] = new_name
    if dtype is not None:
        proto.graph.input[0].type.tensor_type.elem_type = dtype
    onnx.save(proto, dst)
    return dst


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"new_name": "scores"},
            "error: the models have different outputs (reference only: logits; candidate only: scores)",
        ),
        (
            {"dtype": onnx.TensorProto.DOUBLE},
            "error: input 'x' differs: reference float32 rank 4, candidate float64 rank 4",
        ),
    ],
)
def test_different_interfaces_exit_1(
    cnn_pair: tuple[Path, Path, Path], tmp_path: Path, change: dict, message: str
) -> None:
    dense, _, data = cnn_pair
    other = _renamed_output(dense, tmp_path / "other.onnx", **change)
    out = tmp_path / "r.json"
    res = _invoke("compare", dense, other, "--data", data, "--json", out)
    assert res.exit_code == 1
    assert res.stderr.strip() == message
    assert not out.exists()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((2, 3, 32, 32), np.float32)}, "has 'images', which is not a model input"),
        ({"x": np.zeros((2, 3, 32, 32), np.float64)}, "input 'x' is float64, the model takes float32"),
        ({"x": np.zeros((2, 3, 16, 32), np.float32)}, "dim 2 must be 32"),
    ],
)
def test_bad_data_exit_1(cnn_pair: tuple[Path, Path, Path], tmp_path: Path, arrays: dict, message: str) -> None:
    dense, pruned, _ = cnn_pair
    np.savez(tmp_path / "bad.npz", **arrays)
    res = _invoke("compare", dense, pruned, "--data", tmp_path / "bad.npz")
    assert res.exit_code == 1
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr
    assert "Traceback" not in res.output


def test_integer_output_equal_share(tmp_path: Path) -> None:
    """An ArgMax output: no cosine, the share of equal indices; --min-cosine has nothing to gate on."""
    cnn = onnx.load(fixture_path("cnn"))
    for name, src in (("dense", fixture_path("cnn")), ("pruned", None)):
        proto = copy_proto(cnn)
        if src is None:
            assert _invoke("run", fixture_path("cnn"), "-p", "prune", "-o", tmp_path / "p.onnx").exit_code == 0
            proto = onnx.load(tmp_path / "p.onnx")
        logits = proto.graph.output[0].name
        proto.graph.node.append(onnx.helper.make_node("ArgMax", [logits], ["cls"], axis=-1, keepdims=0))
        del proto.graph.output[:]
        proto.graph.output.append(onnx.helper.make_tensor_value_info("cls", onnx.TensorProto.INT64, ["batch"]))
        onnx.save(proto, tmp_path / f"{name}_cls.onnx")
    x = np.random.default_rng(5).standard_normal((16, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    res = _invoke(
        "compare",
        tmp_path / "dense_cls.onnx",
        tmp_path / "pruned_cls.onnx",
        "--data",
        tmp_path / "d.npz",
        "--json",
        "-",
    )
    assert res.exit_code == 0, res.output
    (out,) = json.loads(res.stdout)["outputs"]
    a = run_ort(tmp_path / "dense_cls.onnx", {"x": x})[0]
    b = run_ort(tmp_path / "pruned_cls.onnx", {"x": x})[0]
    assert out["cosine"] is None and out["equal"] == pytest.approx(float((a == b).mean()))
    res = _invoke(
        "compare",
        tmp_path / "dense_cls.onnx",
        tmp_path / "pruned_cls.onnx",
        "--data",
        tmp_path / "d.npz",
        "--min-cosine",
        "0.5",
    )
    assert res.exit_code == 1 and "no output is floating point" in res.stderr
