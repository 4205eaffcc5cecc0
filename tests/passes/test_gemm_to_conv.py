"""gemm-to-conv: structure, ONNX Runtime numerics over several shapes, full checker, skip reasons, subgraphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import gemm_cases, if_model, loop_model, matmul_ranks, scan_model
from conftest import copy_proto, run_ort

from onnxsparse.ir.graph import iter_nodes, op_counts
from onnxsparse.ir.model_io import Model
from onnxsparse.passes.gemm_to_conv import GemmToConvPass
from onnxsparse.pipeline import PassContext, Pipeline


def _rewrite(model: onnx.ModelProto, **options: str) -> tuple[onnx.ModelProto, object]:
    result = Pipeline([GemmToConvPass(**options)]).run(Model(copy_proto(model)), PassContext())
    return result.model.proto, result


def _assert_close(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        scale = max(float(np.abs(x).max()), 1e-6)
        assert float(np.abs(x - y).max()) / scale <= 1e-5


def test_gemm_attribute_cases_numerics_and_skips() -> None:
    model = gemm_cases()
    out, result = _rewrite(model)
    onnx.checker.check_model(out, full_check=True)
    report = result.results[0].report  # type: ignore[attr-defined]
    changed = {c["name"] for c in report.changed}
    skipped = {s["name"]: s["reason"] for s in report.skipped}
    assert changed == {"fc_a", "fc_b", "fc_c"}
    assert "shared" in skipped["fc_s1"] and "shared" in skipped["fc_s2"]
    assert "run time" in skipped["fc_dyn"] or "graph input" in skipped["fc_dyn"] or "computed" in skipped["fc_dyn"]
    assert op_counts(out.graph)["Conv"] == 3 and op_counts(out.graph)["Gemm"] == 3
    assert result.results[0].modified  # type: ignore[attr-defined]
    for batch in (1, 3, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 16)).astype(np.float32)
        _assert_close(run_ort(model, {"x": x}), run_ort(out, {"x": x}))


def test_matmul_rank3_dynamic_dims_and_constant_node_weight() -> None:
    model = matmul_ranks()
    out, _ = _rewrite(model)
    onnx.checker.check_model(out, full_check=True)
    counts = op_counts(out.graph)
    assert counts.get("MatMul", 0) == 0 and counts["Conv"] == 2
    # weights are folded into Conv initializers, the Constant node and old initializer are gone
    assert "Constant" not in counts
    assert not any(t.name == "W_q" for t in out.graph.initializer)
    for b, s in ((1, 1), (2, 5), (4, 9)):
        x = np.random.default_rng(b * 10 + s).standard_normal((b, s, 8)).astype(np.float32)
        _assert_close(run_ort(model, {"x": x}), run_ort(out, {"x": x}))


def test_conv_weight_layout_is_n_k_1_1() -> None:
    out, _ = _rewrite(gemm_cases())
    inits = {t.name: t for t in out.graph.initializer}
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    shapes = sorted(tuple(inits[c.input[1]].dims) for c in convs)
    assert shapes == [(24, 32, 1, 1), (32, 16, 1, 1), (32, 32, 1, 1)]
    assert all(n.doc_string.startswith("onnxsparse gemm-to-conv") for n in out.graph.node if n.op_type == "Conv")


@pytest.mark.parametrize("cond", [True, False])
def test_if_branches_are_rewritten(cond: bool) -> None:
    model = if_model()
    out, _ = _rewrite(model)
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for _, n in iter_nodes(out.graph)]
    assert "MatMul" not in ops and ops.count("Conv") == 2
    for b in (1, 6):
        feeds = {"x": np.random.default_rng(b).standard_normal((b, 8)).astype(np.float32), "cond": np.array(cond)}
        _assert_close(run_ort(model, feeds), run_ort(out, feeds))


def test_loop_body_is_rewritten() -> None:
    model = loop_model()
    out, _ = _rewrite(model)
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for _, n in iter_nodes(out.graph)]
    assert "MatMul" not in ops and "Conv" in ops
    for b in (1, 5):
        x = np.random.default_rng(b).standard_normal((b, 16)).astype(np.float32)
        _assert_close(run_ort(model, {"x": x}), run_ort(out, {"x": x}))


def test_scan_body_is_rewritten() -> None:
    model = scan_model()
    out, _ = _rewrite(model)
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for _, n in iter_nodes(out.graph)]
    assert "MatMul" not in ops and "Conv" in ops
    for s in (1, 4):
        x = np.random.default_rng(s).standard_normal((2, s, 8)).astype(np.float32)
        _assert_close(run_ort(model, {"x": x}), run_ort(out, {"x": x}))


def test_include_exclude() -> None:
    _, result = _rewrite(gemm_cases(), exclude="fc_b")
    assert {c["name"] for c in result.results[0].report.changed} == {"fc_a", "fc_c"}  # type: ignore[attr-defined]
    _, result = _rewrite(gemm_cases(), include="^fc_c$")
    assert {c["name"] for c in result.results[0].report.changed} == {"fc_c"}  # type: ignore[attr-defined]


def test_nothing_to_do_is_not_modified() -> None:
    out, _ = _rewrite(matmul_ranks())
    again = Pipeline([GemmToConvPass()]).run(Model(out), PassContext())
    assert not again.modified
    assert op_counts(again.model.proto.graph) == op_counts(out.graph)


def test_transA_and_runtime_bias_are_skipped_with_reason() -> None:
    rng = np.random.default_rng(0)
    from builders import make_model, rand
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["h"], name="ta", transA=1),
        helper.make_node("Gemm", ["h", "W2", "c"], ["y"], name="rb"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4]),
        helper.make_tensor_value_info("c", TensorProto.FLOAT, [8]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])]
    inits = [nh.from_array(rand(rng, 8, 8), "W"), nh.from_array(rand(rng, 8, 8), "W2")]
    model = make_model(nodes, inputs, outputs, inits)
    _, result = _rewrite(model)
    skipped = {s["name"]: s["reason"] for s in result.results[0].report.skipped}  # type: ignore[attr-defined]
    assert "transA" in skipped["ta"]
    assert "bias C is computed at run time" in skipped["rb"]
    assert not result.modified  # type: ignore[attr-defined]
