"""gemm-to-conv on every committed fixture and on the real ddddocr models: nothing rewritable is left and the
outputs equal the original in ONNX Runtime (fp32, 1e-5 relative), for several input shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_feeds, run_ort

from onnxsparse.ir.layers import find_layers
from onnxsparse.ir.model_io import load_model
from onnxsparse.passes.gemm_to_conv import GemmToConvPass
from onnxsparse.pipeline import PassContext, Pipeline

#: skip reasons that mean "cannot be rewritten by design", as opposed to a missed rewrite
_EXPECTED = ("shared", "computed at run time", "transA", "bias C", "through", "graph input")


def _check(path: Path, dims_list: list[dict[str, int]], tmp_path: Path, tol: float = 1e-5) -> None:
    model = load_model(path)
    ref = onnx.ModelProto()
    ref.CopyFrom(model.proto)
    result = Pipeline([GemmToConvPass()]).run(model, PassContext())
    report = result.results[0].report
    for s in report.skipped:
        assert any(key in s["reason"] for key in _EXPECTED), s
    # no Gemm/MatMul with a direct, unshared constant weight remains
    for layer in find_layers(result.model.proto):
        if layer.op_type in ("Gemm", "MatMul") and layer.source is not None and not layer.chain:
            assert layer.shared_with or layer.node.op_type == "Gemm", layer.name
    onnx.checker.check_model(result.model.proto, full_check=True)
    for dims in dims_list:
        for cond in (True, False):
            feeds = make_feeds(ref, dims=dims, seed=sum(dims.values()), cond=cond)
            for a, b in zip(run_ort(ref, feeds), run_ort(result.model, feeds), strict=True):
                assert a.shape == b.shape
                scale = max(float(np.abs(a).max()), 1e-6)
                assert float(np.abs(a - b).max()) / scale <= tol


@pytest.mark.parametrize("name", ["mlp_gemm", "transformer_block", "cnn", "if_model", "loop_model", "qdq_model"])
def test_fixture(name: str, tmp_path: Path) -> None:
    from conftest import fixture_path

    _check(fixture_path(name), [{"batch": 1, "seq": 3}, {"batch": 3, "seq": 8}], tmp_path)


@pytest.mark.slow
def test_ddddocr_models(real_models: dict[str, Path], tmp_path: Path) -> None:
    for path in real_models.values():
        _check(path, [{"batch": 1, "image_width": 64}], tmp_path)
