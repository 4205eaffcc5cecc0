"""tools/bench_onnx_ir.py compares like with like: every variant writes the same pruned weights (the same zeros
as ``onnxsparse run -p prune``), in a file the checker accepts, on a small copy of each workload."""

from __future__ import annotations

from pathlib import Path

import bench_onnx_ir
import bench_scale
import numpy as np
import onnx
import onnx_ir as ir
import pytest


def _weights(path: Path) -> dict[str, np.ndarray]:
    model = ir.load(str(path))
    return {name: np.array(v.const_value.numpy()) for name, v in model.graph.initializers.items()}


@pytest.mark.parametrize("workload", ["scale", "cnn"])
def test_variants_write_the_same_pruned_model(workload: str, tmp_path: Path) -> None:
    if workload == "scale":
        src = bench_scale.make_model(tmp_path / "in", total_gb=0.005, tensor_mb=1)
        variants = bench_onnx_ir.VARIANTS
    else:
        src = tmp_path / "in" / "cnn.onnx"
        src.parent.mkdir()
        onnx.save(bench_onnx_ir.bench_prune.make_yolo_like(size=64), str(src))
        variants = bench_onnx_ir.VARIANTS[:2]
    dense = _weights(src)
    written = {}
    for variant in variants:
        out = tmp_path / variant / "out.onnx"
        out.parent.mkdir()
        info = bench_onnx_ir.child(variant, src, out)
        assert set(info["seconds"]) == {"load", "prune", "save"}
        assert info["peak_rss_mb"] is None or info["peak_rss_mb"] > 0
        assert bench_onnx_ir._verify(out) == info["pruned"] > 0
        assert (out.parent / "out.onnx.data").exists() == (workload == "scale")
        written[variant] = _weights(out)
    ours = written["onnxsparse"]
    assert any(not np.array_equal(ours[n], dense[n]) for n in dense)  # something was pruned
    for variant, weights in written.items():
        assert weights.keys() == ours.keys(), variant
        for name, values in ours.items():
            np.testing.assert_array_equal(weights[name], values, err_msg=f"{variant}: {name}")
