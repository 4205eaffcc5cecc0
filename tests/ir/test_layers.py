"""Weighted-layer discovery: weight sources, axes mapped through DQ/Transpose/Cast/Reshape, GEMM shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import if_model, rand
from onnx import TensorProto
from onnx import numpy_helper as nh

from onnxsparse.ir.layers import find_layers
from onnxsparse.ir.reasons import Reason
from onnxsparse.ir.shapes import infer_shapes

F = TensorProto.FLOAT


def _model(
    body: str, inits: dict[str, np.ndarray] | None = None, *, opset: int = 17, ir_version: int = 8, check: bool = True
) -> onnx.ModelProto:
    """Parse a graph in the ONNX text format and attach the initializers from numpy: seeded random weights are
    drawn with numpy, and text literals would only repeat them digit by digit."""
    model = onnx.parser.parse_model(f'<ir_version: {ir_version}, opset_import: ["" : {opset}]>\n{body}')
    model.graph.initializer.extend(nh.from_array(v, k) for k, v in (inits or {}).items())
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def _chain_model() -> onnx.ModelProto:
    """Conv weight stored [kh, kw, Cin, Cout] → Transpose(3,2,0,1); MatMul weights via DQ, Cast and Reshape."""
    rng = np.random.default_rng(0)
    inits = {
        "w_hwio": rand(rng, 3, 3, 8, 16),
        "q_w": rng.integers(-127, 127, (16, 32)).astype(np.int8),
        "q_scale": np.full(32, 0.01, np.float32),
        "w_fp16": rand(rng, 8, 8).astype(np.float16),
        "w_flat": rand(rng, 8 * 4),
        "shape84": np.array([8, 4], np.int64),
        "w_ct": rand(rng, 16, 8, 2, 2),
    }
    body = """
        g (float[n, 8, 10, 10] x, float[4, 16] h16) => (float[4, 32] m1, float[n, 4] m2) {
            w_oihw = Transpose <perm = [3, 2, 0, 1]> (w_hwio)
            [conv] c = Conv <pads = [1, 1, 1, 1]> (x, w_oihw)
            [deconv] ct = ConvTranspose <strides = [2, 2]> (c, w_ct)
            p = GlobalAveragePool (ct)
            f = Flatten (p)
            wcast = Cast <to = 1> (w_fp16)
            [mm_cast] m0 = MatMul (f, wcast)
            w_dq = DequantizeLinear <axis = 1> (q_w, q_scale)
            [mm_dq] m1 = MatMul (h16, w_dq)
            w84 = Reshape (w_flat, shape84)
            [mm_reshape] m2 = MatMul (m0, w84)
        }
    """
    return _model(body, inits, opset=19)


def test_axes_map_through_chains() -> None:
    layers = {L.name: L for L in find_layers(_chain_model())}
    conv = layers["conv"]
    assert conv.weight_name == "w_hwio" and [n.op_type for n in conv.chain] == ["Transpose"]
    assert conv.weight_shape == (16, 8, 3, 3) and conv.reduction_axis == 1
    assert conv.source_reduction_axis == 2 and conv.source_channel_axis == 3  # perm[1] = 2, perm[0] = 3
    deconv = layers["deconv"]
    assert (deconv.reduction_axis, deconv.channel_axis) == (0, 1) and deconv.reduction_size == 16
    assert layers["mm_dq"].weight_name == "q_w" and layers["mm_dq"].dequantized
    assert layers["mm_dq"].source_reduction_axis == 0 and layers["mm_dq"].source_channel_axis == 1
    assert layers["mm_cast"].source_reduction_axis == 0
    reshaped = layers["mm_reshape"]
    assert reshaped.weight_shape == (8, 4) and reshaped.reduction_axis == 0
    assert reshaped.source_reduction_axis is None and "Reshape" in str(reshaped.reason or "")
    assert reshaped.reason is not None and reshaped.reason.code is Reason.AXIS_LOST_IN_RESHAPE
    assert all(L.check_pattern(4) is None for n, L in layers.items() if n != "mm_reshape")


def test_gemm_shapes_and_flops() -> None:
    model = _chain_model()
    shapes = infer_shapes(model, {"x": (2, 8, 10, 10)})
    layers = {L.name: L for L in find_layers(model, shapes)}
    g = layers["conv"].gemm_shape(shapes)
    assert g is not None and (g.m, g.n, g.k) == (2 * 10 * 10, 16, 8 * 9) and g.flops == 2 * 200 * 16 * 72
    d = layers["deconv"].gemm_shape(shapes)
    assert d is not None and (d.m, d.n, d.k) == (200, 8 * 4, 16)
    assert layers["mm_dq"].gemm_shape(shapes) is not None
    assert layers["mm_dq"].gemm_shape(shapes).m == 4  # type: ignore[union-attr]


def test_depthwise_and_runtime_weights_are_ineligible() -> None:
    rng = np.random.default_rng(1)
    body = """
        g (float[1, 8, 4, 4] x, float[4, 8, 1, 1] x_as_w) => (float[1, 4, 4, 4] b) {
            [dw] a = Conv <group = 8, pads = [1, 1, 1, 1]> (x, dw)
            [dyn] b = Conv (a, x_as_w)
        }
    """
    layers = {L.name: L for L in find_layers(_model(body, {"dw": rand(rng, 8, 1, 3, 3)}))}
    why = layers["dw"].check_pattern(4)
    assert why is not None and why.code is Reason.NOT_DIVISIBLE and str(why) == "C_in/group=1 is not divisible by 4"
    assert "graph input" in str(layers["dyn"].reason or "")
    assert layers["dyn"].reason is not None and layers["dyn"].reason.code is Reason.WEIGHT_INPUT


def test_subgraph_layers_find_outer_scope_weights() -> None:
    layers = {L.name: L for L in find_layers(if_model())}
    assert layers["then_mm"].graph_path.endswith("branch.then_branch")
    assert layers["else_mm"].weight_name == "W_outer" and layers["else_mm"].reason is None


def test_shared_weight_with_conflicting_axes() -> None:
    rng = np.random.default_rng(2)
    body = """
        g (float[2, 8] x) => (float[2, 8] a, float[2, 8] b) {
            [m1] a = MatMul (x, W)
            [g1] b = Gemm <transB = 1> (x, W)
        }
    """
    layers = {L.name: L for L in find_layers(_model(body, {"W": rand(rng, 8, 8)}))}
    assert "shared with g1" in str(layers["m1"].reason or "")
    assert "different axis" in str(layers["g1"].reason or "")
    codes = {r.code for r in (layers["m1"].reason, layers["g1"].reason) if r is not None}
    assert codes == {Reason.SHARED_AXIS_CONFLICT}


def test_reshape_target_stored_as_external_data_is_not_read_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """find_layers sees the proto only: a weight chain's Reshape target saved as external data is not looked up
    relative to the working directory (that crashed, or read whichever file happened to be there); the weight
    shape comes from inferred shapes instead."""
    from onnx.external_data_helper import convert_model_to_external_data

    from onnxsparse.ir.model_io import load_model

    rng = np.random.default_rng(0)
    body = """
        g (float[2, 8] x) => (float[2, 12] y) {
            [reshape] w2 = Reshape (w, shape)
            [mm] y = MatMul (x, w2)
        }
    """
    inits = {"w": rng.standard_normal(96).astype(np.float32), "shape": np.array([8, 12], np.int64)}
    proto = _model(body, inits, ir_version=onnx.IR_VERSION, check=False)
    inline_layers = find_layers(proto)
    assert inline_layers[0].weight_shape == (8, 12)
    convert_model_to_external_data(proto, location="m.data", size_threshold=0)
    (tmp_path / "model").mkdir()
    onnx.save(proto, str(tmp_path / "model" / "m.onnx"))
    monkeypatch.chdir(tmp_path)
    model = load_model(tmp_path / "model" / "m.onnx")
    assert [t.data_location for t in model.proto.graph.initializer] == [TensorProto.EXTERNAL] * 2
    assert find_layers(model.proto)[0].weight_shape is None
    layers = find_layers(model.proto, shapes={"w2": (8, 12)})
    assert layers[0].weight_shape == (8, 12) and layers[0].reduction_axis == inline_layers[0].reduction_axis


def _sibling_branches(seed: int = 3) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Two unnamed If nodes whose then-branches each hold an initializer called ``W`` (legal: siblings are
    separate scopes) — equal ``graph_path``s, different tensors; the second W is read by two MatMuls. The
    else-branches both read the main graph's ``W_outer``."""
    rng = np.random.default_rng(seed)
    w = {"W0": rand(rng, 8, 12), "W1": rand(rng, 8, 12), "W_outer": rand(rng, 8, 12)}

    body = """
        g (float[b, 8] x, bool cond) => (float[b, 12] y0, float[b, 12] y1) {
            y0 = If <else_branch = else0 () => (float[b, 12] e0) { e0 = MatMul (x, W_outer) },
                     then_branch = then0 () => (float[b, 12] t0) { t0 = MatMul (x, W) }> (cond)
            y1 = If <else_branch = else1 () => (float[b, 12] e1) { e1 = MatMul (x, W_outer) },
                     then_branch = then1 () => (float[b, 12] t1s) {
                         t1 = MatMul (x, W)
                         t1b = MatMul (x, W)
                         t1s = Add (t1, t1b)
                     }> (cond)
        }
    """
    model = _model(body, {"W_outer": w["W_outer"]}, check=False)
    for i, node in enumerate(model.graph.node):
        next(a.g for a in node.attribute if a.name == "then_branch").initializer.append(nh.from_array(w[f"W{i}"], "W"))
    onnx.checker.check_model(model, full_check=True)
    return model, w


def test_keys_tell_sibling_graphs_apart_and_survive_a_copy() -> None:
    """``Layer.key`` / ``graph_key`` / ``Source.key`` are names, not ``id()``s: equal ``graph_path``s of two
    unnamed If nodes get different graph keys, a weight is shared only within its own graph, and a copy of the
    proto gives the same keys."""
    from onnxsparse.pipeline import PassReport
    from onnxsparse.pruning.targets import group_targets

    proto, _ = _sibling_branches()
    layers = find_layers(proto)  # graph order; else_branch is written first, so it is walked first
    assert [L.graph_path for L in layers] == ["main/If.else_branch", "main/If.then_branch"] * 2 + [
        "main/If.then_branch"
    ]
    assert [L.graph_key for L in layers] == [
        "main/0.else_branch",
        "main/0.then_branch",
        "main/1.else_branch",
        "main/1.then_branch",
        "main/1.then_branch",
    ]
    assert [L.key for L in layers] == ["e0", "t0", "e1", "t1", "t1b"]
    assert [L.source.key for L in layers if L.source] == [
        ("main", "initializer", "W_outer"),
        ("main/0.then_branch", "initializer", "W"),
        ("main", "initializer", "W_outer"),
        ("main/1.then_branch", "initializer", "W"),
        ("main/1.then_branch", "initializer", "W"),
    ]
    assert [L.shared_with for L in layers] == [["MatMul(e1)"], [], ["MatMul(e0)"], ["MatMul(t1b)"], ["MatMul(t1)"]]
    assert all(L.reason is None for L in layers)
    targets = group_targets(layers, PassReport())
    assert [(t.name, [L.key for L in t.layers]) for t in targets] == [
        ("W_outer", ["e0", "e1"]),
        ("W", ["t0"]),
        ("W", ["t1", "t1b"]),
    ]
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    again = find_layers(copy)
    assert [(L.key, L.graph_key, L.source and L.source.key) for L in again] == [
        (L.key, L.graph_key, L.source and L.source.key) for L in layers
    ]


def test_validate_counts_each_sibling_weight_from_its_own_values() -> None:
    """``validate`` caches a stored tensor's counts by ``Source.key``: the first branch's ``W`` is already 2:4,
    the second's (same name, same ``graph_path``) is dense, and each layer gets its own tensor's numbers."""
    from onnxsparse.ir.model_io import Model
    from onnxsparse.passes.validate import ValidatePass
    from onnxsparse.pipeline import PassContext
    from onnxsparse.sparsity import nm_keep

    proto, w = _sibling_branches()
    sparse_w0 = np.where(nm_keep(np.abs(w["W0"]), 0, 2, 4), w["W0"], 0).astype(np.float32)
    then0 = next(a.g for a in proto.graph.node[0].attribute if a.name == "then_branch")
    then0.initializer[0].CopyFrom(nh.from_array(sparse_w0, "W"))
    rows = {r["layer"]: r for r in ValidatePass().analyse(Model(proto), PassContext()).details["layers"]}
    assert rows["MatMul(t0)"]["status"] == "sparse" and rows["MatMul(t0)"]["violations"] == 0
    assert rows["MatMul(t0)"]["zeros"] == 0.5
    for name in ("MatMul(t1)", "MatMul(t1b)"):
        assert rows[name]["status"] == "eligible" and rows[name]["violations"] == rows[name]["groups"] == 24
        assert rows[name]["zeros"] == 0.0
