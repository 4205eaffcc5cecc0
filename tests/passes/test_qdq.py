"""Pass ``qdq``: TensorRT placement per op kind, per-channel axes, residual skip inputs, opset handling,
pruned zeros, and the quantized models running in ONNX Runtime close to float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import copy_proto, fixture_path, make_feeds, run_ort
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from onnxsparse.errors import OnnxSparseError
from onnxsparse.grammar import parse_pipeline
from onnxsparse.ir.layers import find_layers
from onnxsparse.ir.model_io import Model, load_model
from onnxsparse.passes.qdq import QdqPass
from onnxsparse.pipeline import PassContext, Pipeline, PipelineResult
from onnxsparse.sparsity import is_nm

F = TensorProto.FLOAT


def _init(rng: np.random.Generator, name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
    return nh.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def op_zoo(opset: int = 17, dtype: int = F) -> onnx.ModelProto:
    """One of each weighted op: Conv (+bias), ConvTranspose, Gemm transB=0, Gemm transB=1 (+bias), MatMul."""
    rng = np.random.default_rng(0)
    inits = [
        _init(rng, "conv.w", 16, 8, 3, 3),
        _init(rng, "conv.b", 16),
        _init(rng, "deconv.w", 16, 8, 2, 2),
        _init(rng, "gemm0.w", 8, 12),
        _init(rng, "gemm1.w", 20, 12),
        _init(rng, "gemm1.b", 20),
        _init(rng, "mm.w", 20, 6),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["c.relu"], name="conv.relu"),
        helper.make_node("ConvTranspose", ["c.relu", "deconv.w"], ["d"], name="deconv", strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["d"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "gemm0.w"], ["g0"], name="gemm0"),
        helper.make_node("Gemm", ["g0", "gemm1.w", "gemm1.b"], ["g1"], name="gemm1", transB=1),
        helper.make_node("MatMul", ["g1", "mm.w"], ["y"], name="mm"),
    ]
    if dtype != F:
        for t in inits:
            t.CopyFrom(nh.from_array(nh.to_array(t).astype(np.float16), t.name))
    graph = helper.make_graph(
        nodes,
        "zoo",
        [helper.make_tensor_value_info("x", dtype, ["N", 8, 8, 8])],
        [helper.make_tensor_value_info("y", dtype, ["N", 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


EXPECTED_AXIS = {"conv": 0, "deconv": 1, "gemm0": 1, "gemm1": 0, "mm": 1}


def _calib(model: onnx.ModelProto | Model, n: int = 6, seed: int = 0) -> list[dict[str, np.ndarray]]:
    return [make_feeds(model, dims={"N": 4}, seed=seed + i) for i in range(n)]


def _run(model: onnx.ModelProto | Model, calib: object = None, **options: object) -> PipelineResult:
    m = model if isinstance(model, Model) else Model(proto=copy_proto(model))
    ctx = PassContext(calibration=calib if calib is not None else _calib(m))
    return Pipeline([QdqPass(**options)]).run(m, ctx)  # the pipeline ends with the full checker


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class _Graph:
    def __init__(self, proto: onnx.ModelProto) -> None:
        self.g = proto.graph
        self.prod = {o: n for n in self.g.node for o in n.output}
        self.inits = {t.name: t for t in self.g.initializer}
        self.nodes = {n.name: n for n in self.g.node}

    def array(self, name: str) -> np.ndarray:
        return nh.to_array(self.inits[name])


# ---------------------------------------------------------------------------------------------- placement


def test_placement_and_axes_per_op_kind() -> None:
    result = _run(op_zoo())
    g = _Graph(result.model.proto)
    for layer, axis in EXPECTED_AXIS.items():
        node = g.nodes[layer]
        # activation: Q -> DQ, per-tensor int8 with zero point 0
        act_dq = g.prod[node.input[0]]
        assert act_dq.op_type == "DequantizeLinear"
        q = g.prod[act_dq.input[0]]
        assert q.op_type == "QuantizeLinear" and q.input[1] == act_dq.input[1] and q.input[2] == act_dq.input[2]
        assert g.array(q.input[1]).shape == () and g.array(q.input[1]) > 0
        zp = g.array(q.input[2])
        assert zp.dtype == np.int8 and zp.shape == () and zp == 0
        # weight: int8 initializer -> DequantizeLinear on the output-channel axis
        w_dq = g.prod[node.input[1]]
        assert w_dq.op_type == "DequantizeLinear"
        assert {a.name: helper.get_attribute_value(a) for a in w_dq.attribute} == {"axis": axis}
        stored = g.array(w_dq.input[0])
        assert stored.dtype == np.int8 and np.abs(stored).max() == 127
        scale, wzp = g.array(w_dq.input[1]), g.array(w_dq.input[2])
        assert scale.shape == (stored.shape[axis],) and wzp.dtype == np.int8 and not wzp.any()
        # no Q/DQ on biases
        if len(node.input) > 2:
            assert node.input[2] in g.inits and g.inits[node.input[2]].data_type == F
    assert result.ops_after["QuantizeLinear"] == 5 and result.ops_after["DequantizeLinear"] == 10


def test_weight_scales_are_per_channel_amax_over_127() -> None:
    model = op_zoo()
    floats = {t.name: nh.to_array(t) for t in model.graph.initializer}
    g = _Graph(_run(model).model.proto)
    for layer, axis in EXPECTED_AXIS.items():
        w_dq = g.prod[g.nodes[layer].input[1]]
        w = floats[f"{layer}.w"]
        others = tuple(i for i in range(w.ndim) if i != axis)
        scale = g.array(w_dq.input[1])
        np.testing.assert_allclose(scale, np.abs(w).max(axis=others) / 127, rtol=1e-6)
        shape = [1] * w.ndim
        shape[axis] = -1
        err = np.abs(g.array(w_dq.input[0]) * scale.reshape(shape) - w)
        assert np.all(err <= scale.reshape(shape) / 2 + 1e-7)


def test_find_layers_still_sees_the_stored_int8_weights() -> None:
    model = op_zoo()
    before = {layer.name: layer for layer in find_layers(model)}
    after = find_layers(_run(model).model.proto)
    assert {layer.name for layer in after} == set(before)
    for layer in after:
        assert layer.dequantized and layer.source is not None and layer.reason is None
        assert layer.source.tensor.data_type == TensorProto.INT8
        assert layer.source_reduction_axis == before[layer.name].source_reduction_axis
        assert layer.source_channel_axis == before[layer.name].source_channel_axis


def test_2to4_zeros_stay_exactly_zero_and_validate_sees_them() -> None:
    model = op_zoo()
    for layer in find_layers(model):  # a tiny numpy 2:4 prune along each layer's reduction axis
        assert layer.source is not None and layer.source_reduction_axis is not None
        w = nh.to_array(layer.source.tensor)
        axis = layer.source_reduction_axis
        moved = np.moveaxis(w, axis, -1)
        groups = moved.reshape(-1, 4)
        order = np.argsort(np.abs(groups), axis=1)
        pruned = groups.copy()
        np.put_along_axis(pruned, order[:, :2], 0.0, axis=1)
        new = np.moveaxis(pruned.reshape(moved.shape), -1, axis)
        layer.source.tensor.CopyFrom(nh.from_array(np.ascontiguousarray(new), layer.source.name))
    zeros = {t.name: nh.to_array(t) == 0 for t in model.graph.initializer}
    result = _run(model)
    for layer in find_layers(result.model.proto):
        assert layer.source is not None and layer.source_reduction_axis is not None
        stored = nh.to_array(layer.source.tensor)
        float_name = layer.source.name.removesuffix("_quantized")
        np.testing.assert_array_equal(stored == 0, zeros[float_name])
        assert is_nm(stored, layer.source_reduction_axis, 2, 4)
    # the validate pass (another module, reading through find_layers) sees every layer as 2:4 sparse
    report = Pipeline(parse_pipeline("validate{require-all=true}")).run(result.model, PassContext())
    rows = report.results[0].report.details["layers"]
    assert len(rows) == 5 and {r["status"] for r in rows} == {"sparse"}, rows


def test_prune_then_qdq_then_validate_pipeline_on_the_cnn_fixture() -> None:
    model = load_model(fixture_path("cnn"))
    calib = [make_feeds(model, seed=i) for i in range(4)]
    pruned = Pipeline(parse_pipeline("prune")).run(model, PassContext()).model
    sparse_before = {
        r["layer"]
        for r in Pipeline(parse_pipeline("validate")).run(pruned, PassContext()).results[0].report.details["layers"]
        if r["status"] == "sparse"
    }
    result = Pipeline(parse_pipeline("qdq,validate")).run(pruned, PassContext(calibration=calib))
    rows = result.results[1].report.details["layers"]
    assert sparse_before and {r["layer"] for r in rows if r["status"] == "sparse"} == sparse_before
    assert all(layer.dequantized for layer in find_layers(result.model.proto) if layer.name in sparse_before)


def test_shared_activation_gets_one_qdq_pair() -> None:
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("Add", ["q", "k"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F, ["N", 16])],
        [helper.make_tensor_value_info("y", F, ["N", 8])],
        [_init(rng, "wq", 16, 8), _init(rng, "wk", 16, 8)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = _run(model)
    g = _Graph(result.model.proto)
    assert g.nodes["q_proj"].input[0] == g.nodes["k_proj"].input[0]
    assert [n.input[0] for n in g.g.node if n.op_type == "QuantizeLinear"].count("x") == 1
    # both inputs of 'sum' come from quantized layers and neither is a skip connection with fewer ops: the
    # shallower one (equal depth → the first) gets Q/DQ so TensorRT can fuse the Add into the other MatMul
    assert g.prod[g.nodes["sum"].input[0]].op_type == "DequantizeLinear"
    assert g.nodes["sum"].input[1] == "k"


# ---------------------------------------------------------------------------------------------- residuals


def _resnet_block(downsample: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    inits = [
        _init(rng, "stem.w", 8, 4, 3, 3),
        _init(rng, "c1.w", 8, 8, 3, 3),
        _init(rng, "c2.w", 8, 8, 3, 3),
        _init(rng, "ds.w", 8, 8, 1, 1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "stem.w"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["s.relu"], name="stem.relu"),
        helper.make_node("Conv", ["s.relu", "c1.w"], ["a"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a.relu"], name="c1.relu"),
        helper.make_node("Conv", ["a.relu", "c2.w"], ["b"], name="c2", pads=[1, 1, 1, 1]),
    ]
    skip = "s.relu"
    if downsample:
        nodes.append(helper.make_node("Conv", ["s.relu", "ds.w"], ["ds"], name="ds"))
        skip = "ds"
    nodes += [
        helper.make_node("Add", ["b", skip], ["sum"], name="residual"),
        helper.make_node("Relu", ["sum"], ["y"], name="out.relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", F, ["N", 8, 8, 8])],
        inits if downsample else inits[:3],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("downsample", [False, True])
def test_residual_add_gets_qdq_on_its_skip_input_only(downsample: bool) -> None:
    result = _run(_resnet_block(downsample))
    g = _Graph(result.model.proto)
    add = g.nodes["residual"]
    assert add.input[0] == "b"  # the branch the Add fuses into stays float
    assert g.prod[add.input[1]].op_type == "DequantizeLinear"
    skip = g.prod[g.prod[add.input[1]].input[0]].input[0]
    assert skip == ("ds" if downsample else "s.relu")
    assert result.results[0].report.details["residual_inputs"] == [{"add": "residual", "skip_input": skip}]
    plain = _run(_resnet_block(downsample), skip_residual=False)
    assert _Graph(plain.model.proto).nodes["residual"].input[1] == skip


def test_quantize_outputs_puts_qdq_after_the_epilogue() -> None:
    result = _run(_resnet_block(False), quantize_outputs=True)
    g = _Graph(result.model.proto)
    # c1 → Relu → Q/DQ (after the activation, not between Conv and Relu)
    assert g.nodes["c1.relu"].input[0] == "a"
    assert g.prod[g.nodes["c2"].input[0]].op_type == "DequantizeLinear"
    # c2 → residual Add (skip quantized) → Relu → Q/DQ only for the consumers (the graph output stays float)
    outputs = result.results[0].report.details["output_tensors"]
    assert "y" in outputs and g.prod["y"].op_type == "Relu"
    assert g.nodes["residual"].input[0] == "b"


# ---------------------------------------------------------------------------------------------- options


def test_include_and_exclude_select_layers_by_regex() -> None:
    result = _run(op_zoo(), exclude="^gemm")
    changed = [c["name"] for c in result.results[0].report.changed]
    assert changed == ["conv", "deconv", "mm"]
    skipped = {s["name"]: s["reason"] for s in result.results[0].report.skipped}
    assert skipped["gemm0"] == "excluded by '^gemm'"
    g = _Graph(result.model.proto)
    assert g.nodes["gemm0"].input[1] == "gemm0.w" and g.inits["gemm0.w"].data_type == F
    only = _run(op_zoo(), include="^mm$|deconv.w")
    assert [c["name"] for c in only.results[0].report.changed] == ["deconv", "mm"]


def test_per_tensor_weights() -> None:
    g = _Graph(_run(op_zoo(), per_channel=False).model.proto)
    for layer in EXPECTED_AXIS:
        w_dq = g.prod[g.nodes[layer].input[1]]
        assert not w_dq.attribute and g.array(w_dq.input[1]).shape == ()


def test_text_pipeline_and_bad_options() -> None:
    (p,) = parse_pipeline("qdq{percentile=99.9;method=max;exclude='^head|fc.*';quantize-outputs=true}")
    assert isinstance(p, QdqPass)
    assert (p.config.percentile, p.config.method, p.config.exclude) == (99.9, "max", "^head|fc.*")
    assert p.config.quantize_outputs and p.config.per_channel
    with pytest.raises(OnnxSparseError, match="method must be percentile or max"):
        parse_pipeline("qdq{method=entropy}")
    with pytest.raises(OnnxSparseError, match="percentile must be in"):
        QdqPass(percentile=0)
    with pytest.raises(OnnxSparseError, match="bad exclude regex"):
        QdqPass(exclude="(")


def test_without_calibration_data_it_says_what_to_pass() -> None:
    with pytest.raises(OnnxSparseError, match="qdq needs calibration data: pass --calib"):
        Pipeline([QdqPass()]).run(Model(op_zoo()), PassContext())


def test_bad_calibration_data_is_one_line() -> None:
    bad = [{"x": np.zeros((2, 8, 8, 8), np.float64)}]
    with pytest.raises(OnnxSparseError, match="input 'x' is float64, the model takes float32") as err:
        _run(op_zoo(), calib=bad)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- opsets


def test_old_opset_is_upgraded_to_13() -> None:
    model = op_zoo(opset=11)
    result = _run(model)
    assert result.model.opset == 13
    assert result.results[0].report.details["opset"] == {"before": 11, "after": 13}
    feeds = make_feeds(model, dims={"N": 3}, seed=42)
    assert _cosine(run_ort(model, feeds)[0], run_ort(result.model, feeds)[0]) > 0.99


def test_float16_model_gets_float16_scales_and_opset_19() -> None:
    model = op_zoo(opset=17, dtype=TensorProto.FLOAT16)
    result = _run(model)
    assert result.model.opset == 19
    g = _Graph(result.model.proto)
    for layer in EXPECTED_AXIS:
        w_dq = g.prod[g.nodes[layer].input[1]]
        assert g.array(w_dq.input[1]).dtype == np.float16
        assert g.array(g.prod[g.nodes[layer].input[0]].input[1]).dtype == np.float16
    feeds = make_feeds(model, dims={"N": 3}, seed=42)
    assert _cosine(run_ort(model, feeds)[0], run_ort(result.model, feeds)[0]) > 0.99


def test_upgrade_failure_says_why() -> None:
    model = op_zoo(opset=11)
    # an op without a schema (an old experimental op here) stops onnx's version converter
    model.graph.node.append(helper.make_node("DynamicSlice", ["y", "s", "e"], ["z"]))
    model.graph.input.extend([helper.make_tensor_value_info(n, TensorProto.INT64, [1]) for n in ("s", "e")])
    with pytest.raises(
        OnnxSparseError,
        # the converter's own words differ by onnx release ("Op ... has no registered schema" in 1.23,
        # "unordered_map::at" in 1.20); the sentence around them is ours
        match=r"qdq needs opset >= 13 .* cannot upgrade this model from opset 11: \S",
    ) as err:
        QdqPass().run(Model(model), PassContext(calibration=_calib(op_zoo(opset=11))))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.mark.parametrize("name", ["cnn", "transformer_block", "mlp_gemm", "if_model", "loop_model"])
def test_fixture_models_stay_close_to_float(name: str, tmp_path: Path) -> None:
    path = fixture_path(name)
    model = load_model(path)
    calib = [make_feeds(model, seed=i) for i in range(8)]
    result = Pipeline([QdqPass()]).run(model, PassContext(calibration=calib))
    assert result.modified and result.ops_after["QuantizeLinear"] >= 1
    for seed in (100, 101):
        feeds = make_feeds(path, seed=seed)
        ref = run_ort(path, feeds)
        # As written (exact ONNX semantics of the Q/DQ graph) and with ORT's int8 kernel fusions. On x86 CPUs
        # without VNNI, ORT's fused u8s8 kernels saturate int16 partial sums (ORT's documented "saturation
        # issue"), so the fused run is a weaker check of the graph and gets a looser bound.
        for optimize, bound in ((False, 0.99), (True, 0.95)):
            got = run_ort(result.model, feeds, optimize=optimize)
            for a, b in zip(ref, got, strict=True):
                if a.dtype.kind == "f":
                    assert _cosine(a, b) >= bound, (name, seed, optimize)


def test_subgraph_layers_and_prequantized_weights_are_skipped_with_reasons() -> None:
    model = load_model(fixture_path("if_model"))
    result = Pipeline([QdqPass()]).run(model, PassContext(calibration=[make_feeds(model, seed=i) for i in range(2)]))
    reasons = {s["name"]: s["reason"] for s in result.results[0].report.skipped}
    assert reasons and all("main graph only" in r for r in reasons.values() if "subgraph" in r)
    assert any("inside subgraph" in r for r in reasons.values())
    qdq = load_model(fixture_path("qdq_model"))
    res = Pipeline([QdqPass()]).run(qdq, PassContext(calibration=[make_feeds(qdq, seed=i) for i in range(2)]))
    pre = [s for s in res.results[0].report.skipped if s["reason"] == "weight already arrives through DequantizeLinear"]
    assert len(pre) == 6


def test_nothing_to_quantize_leaves_the_model_alone() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", F, [2])],
        [helper.make_tensor_value_info("y", F, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    before = model.SerializeToString()
    result = QdqPass().run(Model(model), PassContext(calibration=[{"x": np.ones(2, np.float32)}]))
    assert not result.modified and result.model.proto.SerializeToString() == before


def test_shared_weight_on_different_axes_falls_back_to_one_scale() -> None:
    model = load_model(fixture_path("mlp_gemm"))
    result = Pipeline([QdqPass()]).run(model, PassContext(calibration=[make_feeds(model, seed=i) for i in range(3)]))
    changed = {c["name"]: c for c in result.results[0].report.changed}
    assert changed["fc3"]["weight_axis"] is None and "different channel axes" in changed["fc3"]["weight_note"]
    assert changed["fc0"]["weight_axis"] == 0 and changed["fc2"]["weight_axis"] == 1


def test_model_with_external_data_is_calibrated_and_quantized(tmp_path: Path) -> None:
    from onnxsparse.ir.model_io import save_model

    src = Model(proto=op_zoo())
    save_model(src, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    model = load_model(tmp_path / "ext.onnx")
    assert model.has_external_data()
    result = Pipeline([QdqPass()]).run(model, PassContext(calibration=_calib(model)))
    assert not list(tmp_path.glob(".calib.*"))  # the temporary model ORT read next to the data is gone
    out = save_model(result.model, tmp_path / "q.onnx")
    feeds = make_feeds(model, dims={"N": 3}, seed=5)
    assert _cosine(run_ort(tmp_path / "ext.onnx", feeds)[0], run_ort(out, feeds)[0]) > 0.99


def _wide_mlp() -> onnx.ModelProto:
    """Four MatMuls with 21 MB of float weights: their int8 copies stored inline would add 5 MB to the proto."""
    rng = np.random.default_rng(1)
    inits = [
        _init(rng, "fc0.w", 64, 1024),
        _init(rng, "fc1.w", 1024, 2048, scale=0.03),
        _init(rng, "fc2.w", 2048, 1024, scale=0.03),
        _init(rng, "fc3.w", 1024, 1024, scale=0.03),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "fc0.w"], ["h0"], name="fc0"),
        helper.make_node("Relu", ["h0"], ["a0"], name="relu0"),
        helper.make_node("MatMul", ["a0", "fc1.w"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("MatMul", ["a1", "fc2.w"], ["h2"], name="fc2"),
        helper.make_node("MatMul", ["h2", "fc3.w"], ["y"], name="fc3"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", F, ["N", 64])],
        [helper.make_tensor_value_info("y", F, ["N", 1024])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_external_weights_get_external_int8_weights_and_the_proto_stays_small(tmp_path: Path) -> None:
    """A model whose weights are external data: the int8 weights the pass adds are not inlined into the proto
    (on a model over 2 GB that would add a quarter of its size and could pass protobuf's limit); the saved
    result runs and equals the inline model's result exactly."""
    from onnxsparse.ir.model_io import save_model
    from onnxsparse.ir.tensors import external_info

    proto = _wide_mlp()
    save_model(Model(proto=copy_proto(proto)), tmp_path / "ext.onnx", external_data=True)
    ext = load_model(tmp_path / "ext.onnx")
    assert ext.proto.ByteSize() < 100_000 and ext.has_external_data()
    calib = _calib(ext)
    ext_result = Pipeline([QdqPass()]).run(ext, PassContext(calibration=calib))
    size = ext_result.model.proto.ByteSize()
    assert size < 1_000_000, f"the proto grew to {size} bytes: int8 weights were stored inline"
    int8 = [t for t in ext_result.model.proto.graph.initializer if t.name.endswith(".w_quantized")]
    assert len(int8) == 4 and all(external_info(t) is not None for t in int8)

    inline_result = Pipeline([QdqPass()]).run(Model(proto=copy_proto(proto)), PassContext(calibration=calib))
    assert inline_result.model.proto.ByteSize() > 5_000_000  # the inline model keeps its int8 weights inline
    ext_out = save_model(ext_result.model, tmp_path / "q_ext.onnx")
    inline_out = save_model(inline_result.model, tmp_path / "q_inline.onnx", external_data=False)
    saved = onnx.load(str(ext_out), load_external_data=False)
    assert saved.ByteSize() < 1_000_000
    onnx.checker.check_model(str(ext_out), full_check=True)
    ext_q = {t.name: nh.to_array(t) for t in onnx.load(str(ext_out)).graph.initializer}
    inline_q = {t.name: nh.to_array(t) for t in onnx.load(str(inline_out)).graph.initializer}
    assert ext_q.keys() == inline_q.keys()
    for name, arr in inline_q.items():
        np.testing.assert_array_equal(ext_q[name], arr, err_msg=name)
    feeds = make_feeds(proto, dims={"N": 3}, seed=5)
    np.testing.assert_array_equal(run_ort(ext_out, feeds)[0], run_ort(inline_out, feeds)[0])


def test_the_pass_alone_leaves_a_valid_sorted_graph() -> None:
    model = Model(proto=op_zoo(opset=13))
    result = QdqPass().run(model, PassContext(calibration=_calib(model)))
    onnx.checker.check_model(result.model.proto, full_check=True)  # topological order included
    feeds = make_feeds(model, dims={"N": 2}, seed=3)
    assert _cosine(run_ort(op_zoo(opset=13), feeds)[0], run_ort(result.model, feeds)[0]) > 0.99


@pytest.mark.slow
@pytest.mark.parametrize("name", ["common", "common_det", "common_old"])
def test_real_ddddocr_models(real_models: dict[str, Path], name: str) -> None:
    path = real_models[name]
    model = load_model(path)
    dims = {"batch": 1, "image_width": 128}
    result = Pipeline([QdqPass()]).run(
        model, PassContext(calibration=[make_feeds(model, dims, seed=i) for i in range(4)])
    )
    report = result.results[0].report
    if name == "common_old":  # already dynamically quantized (ConvInteger/MatMulInteger): nothing to do
        assert not result.modified and report.details["note"] == "no layer to quantize"
        return
    assert report.details["opset"]["after"] == 13 and len(report.changed) >= 20 and not report.skipped
    feeds = make_feeds(path, dims, seed=99)
    for a, b in zip(run_ort(path, feeds), run_ort(result.model, feeds), strict=True):
        if a.dtype.kind == "f":
            assert _cosine(a, b) >= 0.99


def test_double_weights_are_skipped_with_a_reason() -> None:
    rng = np.random.default_rng(4)
    D = TensorProto.DOUBLE
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm64")],
        "g",
        [helper.make_tensor_value_info("x", D, ["N", 8])],
        [helper.make_tensor_value_info("y", D, ["N", 4])],
        [nh.from_array(rng.standard_normal((8, 4)), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = QdqPass().run(Model(model), PassContext(calibration=[{"x": np.ones((2, 8))}]))
    assert not result.modified
    assert result.report.skipped == [
        {"name": "mm64", "reason": "weight 'w' is double: Q/DQ here handles float32 and float16 weights"}
    ]


@pytest.mark.parametrize("name", ["cnn", "transformer_block"])
def test_after_to_fp16_the_qdq_is_float16_at_opset_19(name: str) -> None:
    path = fixture_path(name)
    model = load_model(path)
    result = Pipeline("to-fp16,qdq").run(model, PassContext(calibration=[make_feeds(model, seed=i) for i in range(4)]))
    assert result.results[1].report.details["opset"] == {"before": 17, "after": 19}
    g = _Graph(result.model.proto)
    q_nodes = [n for n in g.g.node if n.op_type == "QuantizeLinear"]
    assert q_nodes and all(g.array(n.input[1]).dtype == np.float16 for n in q_nodes)
    feeds = make_feeds(path, seed=9)
    for a, b in zip(run_ort(path, feeds), run_ort(result.model, feeds), strict=True):
        assert _cosine(a, b) >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "mobilenet_v3_small",
        "efficientnet_b0",
        "bert_base",
        "vit_tiny",
        "if_branches",
        "loop_recurrence",
        "small_cnn_opset11",
        "small_cnn_opset21",
    ],
)
def test_corpus_models_quantize_and_stay_close(name: str, tmp_path: Path) -> None:
    """Real architectures (exported graphs, seeded weights). Measured cosines: 0.998 (BERT-base, ViT-tiny:
    attention MatMuls of two activations are left float and reported) to 0.9999+ (CNNs)."""
    import corpus

    path = corpus.materialize(name, tmp_path)
    model = load_model(path)
    calib = [corpus.example_inputs(name, seed=i) for i in range(4)]
    result = Pipeline([QdqPass()]).run(model, PassContext(calibration=calib))
    report = result.results[0].report
    assert result.modified and report.changed
    assert report.details["opset"]["after"] >= 13
    assert all(s["reason"].startswith(("weight is computed at run time", "inside subgraph")) for s in report.skipped)
    feeds = corpus.example_inputs(name, seed=99)
    for a, b in zip(run_ort(path, feeds), run_ort(result.model, feeds), strict=True):
        if a.dtype.kind == "f":
            assert _cosine(a, b) >= 0.99


def test_activation_matmuls_option_quantizes_both_attention_inputs() -> None:
    path = fixture_path("transformer_block")
    model = load_model(path)
    calib = [make_feeds(model, seed=i) for i in range(6)]
    plain = Pipeline([QdqPass()]).run(load_model(path), PassContext(calibration=calib))
    assert {s["name"] for s in plain.results[0].report.skipped} == {"attn.qk", "attn.pv"}
    result = Pipeline("qdq{activation-matmuls=true}").run(model, PassContext(calibration=calib))
    report = result.results[0].report
    assert not report.skipped and len(report.changed) == 8
    g = _Graph(result.model.proto)
    for name in ("attn.qk", "attn.pv"):
        node = g.nodes[name]
        assert [g.prod[i].op_type for i in node.input] == ["DequantizeLinear", "DequantizeLinear"]
        entry = next(c for c in report.changed if c["name"] == name)
        assert entry["weight"] is None and entry["activation_scale"] > 0 and entry["activation_scale_b"] > 0
    assert "attn.qk" in QdqPass().render(result.results[0])  # type: ignore[operator]
    feeds = make_feeds(path, seed=77)
    assert _cosine(run_ort(path, feeds)[0], run_ort(result.model, feeds)[0]) >= 0.99


# ---------------------------------------------------------------------------------------------- planning once


def _two_upgrades_model() -> onnx.ModelProto:
    """opset 11, a float32 Conv (per-axis Q/DQ: opset 13) and a MatMul of two float16 activations (found float16
    by calibration: opset 19): before the plan was keyed by names, qdq planned three times here."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["a", "b"], ["z"], name="bmm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", F, ["N", 4, 6, 6]),
            helper.make_tensor_value_info("a", TensorProto.FLOAT16, ["N", 4, 8]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT16, ["N", 8, 5]),
        ],
        [
            helper.make_tensor_value_info("y", F, ["N", 8, 6, 6]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT16, ["N", 4, 5]),
        ],
        [_init(rng, "w", 8, 4, 3, 3)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize(
    ("model", "options", "opset"),
    [
        (op_zoo(opset=11), {}, 13),
        (op_zoo(opset=17, dtype=TensorProto.FLOAT16), {}, 19),
        (_two_upgrades_model(), {"activation_matmuls": True}, 19),
    ],
    ids=["11-to-13", "float16-to-19", "11-to-13-to-19"],
)
def test_the_plan_is_computed_once_across_opset_upgrades(
    model: onnx.ModelProto, options: dict[str, object], opset: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxsparse.passes.qdq as qdq_module

    calls: list[int] = []
    real = qdq_module.plan_qdq

    def counting(m: Model, cfg: object) -> object:
        calls.append(m.opset)
        return real(m, cfg)  # type: ignore[arg-type]

    monkeypatch.setattr(qdq_module, "plan_qdq", counting)
    result = _run(model, **options)
    report = result.results[0].report
    assert calls == [model.opset_import[0].version] and result.model.opset == opset
    assert result.results[0].modified and report.details["opset"]["after"] == opset
    assert {c["name"] for c in report.changed} >= ({"bmm", "conv"} if "activation_matmuls" in options else {"conv"})
    feeds = make_feeds(model, dims={"N": 2}, seed=7)
    for want, got in zip(run_ort(model, feeds), run_ort(result.model, feeds), strict=True):
        assert _cosine(want.astype(np.float32), got.astype(np.float32)) > 0.99


def test_modified_is_what_it_changed() -> None:
    """Every layer excluded: nothing to quantize, the model is untouched and modified is False."""
    model = Model(copy_proto(op_zoo(opset=17)))
    before = model.proto.SerializeToString()
    result = QdqPass(exclude=".*").run(model, PassContext(calibration=_calib(model)))
    assert not result.modified and model.proto.SerializeToString() == before and result.report.skipped
