"""Pass ``qdq``: TensorRT placement per op kind, per-channel axes, residual skip inputs, options, opset handling,
pruned zeros, planning once, and the quantized models running in ONNX Runtime close to float (whole models:
test_qdq_models.py; the onnx-ir rewrite: test_qdq_ir.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import parse, parse_checked
from conftest import copy_proto, fixture_path, make_feeds, run_ort
from onnx import TensorProto, helper
from onnx import numpy_helper as nh
from qdq_support import (
    EXPECTED_AXIS,
    F,
    QGraph,
    calib_batches,
    cosine,
    op_zoo,
    rand_init,
    run_qdq,
    two_upgrades_model,
)

from onnxsparse.errors import OnnxSparseError
from onnxsparse.grammar import parse_pipeline
from onnxsparse.ir.layers import find_layers
from onnxsparse.ir.model_io import Model, load_model
from onnxsparse.ir.onnxir import IrView
from onnxsparse.passes.qdq import QdqPass
from onnxsparse.pipeline import PassContext, Pipeline
from onnxsparse.qdq_plan import QdqPlan
from onnxsparse.sparsity import is_nm

# ---------------------------------------------------------------------------------------------- placement


def test_placement_and_axes_per_op_kind() -> None:
    result = run_qdq(op_zoo())
    g = QGraph(result.model.proto)
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
    g = QGraph(run_qdq(model).model.proto)
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
    after = find_layers(run_qdq(model).model.proto)
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
    result = run_qdq(model)
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
    text = """
        <opset_import: ["" : 17]>
        g (float[N,16] x) => (float[N,8] y) {
            [q_proj] q = MatMul (x, wq)
            [k_proj] k = MatMul (x, wk)
            [sum] y = Add (q, k)
        }
    """
    model = parse(text, rand_init(rng, "wq", 16, 8), rand_init(rng, "wk", 16, 8))
    result = run_qdq(model)
    g = QGraph(result.model.proto)
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
        rand_init(rng, "stem.w", 8, 4, 3, 3),
        rand_init(rng, "c1.w", 8, 8, 3, 3),
        rand_init(rng, "c2.w", 8, 8, 3, 3),
        rand_init(rng, "ds.w", 8, 8, 1, 1),
    ]
    ds, skip = ('[ds] ds = Conv ("s.relu", "ds.w")', "ds") if downsample else ("", '"s.relu"')
    text = f"""
        <opset_import: ["" : 17]>
        g (float[N,4,8,8] x) => (float[N,8,8,8] y) {{
            [stem] s = Conv <pads = [1, 1, 1, 1]> (x, "stem.w")
            ["stem.relu"] "s.relu" = Relu (s)
            [c1] a = Conv <pads = [1, 1, 1, 1]> ("s.relu", "c1.w")
            ["c1.relu"] "a.relu" = Relu (a)
            [c2] b = Conv <pads = [1, 1, 1, 1]> ("a.relu", "c2.w")
            {ds}
            [residual] sum = Add (b, {skip})
            ["out.relu"] y = Relu (sum)
        }}
    """
    return parse_checked(text, *(inits if downsample else inits[:3]))


@pytest.mark.parametrize("downsample", [False, True])
def test_residual_add_gets_qdq_on_its_skip_input_only(downsample: bool) -> None:
    result = run_qdq(_resnet_block(downsample))
    g = QGraph(result.model.proto)
    add = g.nodes["residual"]
    assert add.input[0] == "b"  # the branch the Add fuses into stays float
    assert g.prod[add.input[1]].op_type == "DequantizeLinear"
    skip = g.prod[g.prod[add.input[1]].input[0]].input[0]
    assert skip == ("ds" if downsample else "s.relu")
    assert result.results[0].report.details["residual_inputs"] == [{"add": "residual", "skip_input": skip}]
    plain = run_qdq(_resnet_block(downsample), skip_residual=False)
    assert QGraph(plain.model.proto).nodes["residual"].input[1] == skip


def test_quantize_outputs_puts_qdq_after_the_epilogue() -> None:
    result = run_qdq(_resnet_block(False), quantize_outputs=True)
    g = QGraph(result.model.proto)
    # c1 → Relu → Q/DQ (after the activation, not between Conv and Relu)
    assert g.nodes["c1.relu"].input[0] == "a"
    assert g.prod[g.nodes["c2"].input[0]].op_type == "DequantizeLinear"
    # c2 → residual Add (skip quantized) → Relu → Q/DQ only for the consumers (the graph output stays float)
    outputs = result.results[0].report.details["output_tensors"]
    assert "y" in outputs and g.prod["y"].op_type == "Relu"
    assert g.nodes["residual"].input[0] == "b"


# ---------------------------------------------------------------------------------------------- options


def test_include_and_exclude_select_layers_by_regex() -> None:
    result = run_qdq(op_zoo(), exclude="^gemm")
    changed = [c["name"] for c in result.results[0].report.changed]
    assert changed == ["conv", "deconv", "mm"]
    skipped = {s["name"]: s["reason"] for s in result.results[0].report.skipped}
    assert skipped["gemm0"] == "excluded by '^gemm'"
    g = QGraph(result.model.proto)
    assert g.nodes["gemm0"].input[1] == "gemm0.w" and g.inits["gemm0.w"].data_type == F
    only = run_qdq(op_zoo(), include="^mm$|deconv.w")
    assert [c["name"] for c in only.results[0].report.changed] == ["deconv", "mm"]


def test_per_tensor_weights() -> None:
    g = QGraph(run_qdq(op_zoo(), per_channel=False).model.proto)
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
        run_qdq(op_zoo(), calib=bad)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- opsets


def test_old_opset_is_upgraded_to_13() -> None:
    model = op_zoo(opset=11)
    result = run_qdq(model)
    assert result.model.opset == 13
    assert result.results[0].report.details["opset"] == {"before": 11, "after": 13}
    feeds = make_feeds(model, dims={"N": 3}, seed=42)
    assert cosine(run_ort(model, feeds)[0], run_ort(result.model, feeds)[0]) > 0.99


def test_float16_model_gets_float16_scales_and_opset_19() -> None:
    model = op_zoo(opset=17, dtype=TensorProto.FLOAT16)
    result = run_qdq(model)
    assert result.model.opset == 19
    g = QGraph(result.model.proto)
    for layer in EXPECTED_AXIS:
        w_dq = g.prod[g.nodes[layer].input[1]]
        assert g.array(w_dq.input[1]).dtype == np.float16
        assert g.array(g.prod[g.nodes[layer].input[0]].input[1]).dtype == np.float16
    feeds = make_feeds(model, dims={"N": 3}, seed=42)
    assert cosine(run_ort(model, feeds)[0], run_ort(result.model, feeds)[0]) > 0.99


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
        QdqPass().run(Model(model), PassContext(calibration=calib_batches(op_zoo(opset=11))))
    assert "\n" not in str(err.value)


def test_nothing_to_quantize_leaves_the_model_alone() -> None:
    model = parse('<opset_import: ["" : 11]> g (float[2] x) => (float[2] y) { y = Relu (x) }')
    before = model.SerializeToString()
    result = QdqPass().run(Model(model), PassContext(calibration=[{"x": np.ones(2, np.float32)}]))
    assert not result.modified and result.model.proto.SerializeToString() == before


def test_the_pass_alone_leaves_a_valid_sorted_graph() -> None:
    model = Model(proto=op_zoo(opset=13))
    result = QdqPass().run(model, PassContext(calibration=calib_batches(model)))
    onnx.checker.check_model(result.model.proto, full_check=True)  # topological order included
    feeds = make_feeds(model, dims={"N": 2}, seed=3)
    assert cosine(run_ort(op_zoo(opset=13), feeds)[0], run_ort(result.model, feeds)[0]) > 0.99


def test_double_weights_are_skipped_with_a_reason() -> None:
    rng = np.random.default_rng(4)
    text = """
        <opset_import: ["" : 17]>
        g (double[N,8] x) => (double[N,4] y) {
            [mm64] y = MatMul (x, w)
        }
    """
    model = parse(text, w=rng.standard_normal((8, 4)))
    result = QdqPass().run(Model(model), PassContext(calibration=[{"x": np.ones((2, 8))}]))
    assert not result.modified
    assert result.report.skipped == [
        {"name": "mm64", "reason": "weight 'w' is double: Q/DQ here handles float32 and float16 weights"}
    ]


# ---------------------------------------------------------------------------------------------- planning once


@pytest.mark.parametrize(
    ("model", "options", "opset"),
    [
        (op_zoo(opset=11), {}, 13),
        (op_zoo(opset=17, dtype=TensorProto.FLOAT16), {}, 19),
        (two_upgrades_model(), {"activation_matmuls": True}, 19),
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
    # the onnx-ir view is made once, after the last opset upgrade, and the plan binds to it at the first try
    views: list[int] = []
    binds: list[bool] = []
    real_bind = QdqPlan.bind

    class CountingView(IrView):
        @classmethod
        def of(cls, m: Model) -> IrView:
            views.append(m.opset)
            return IrView.of(m)

    def counting_bind(plan: QdqPlan, graph: object) -> object:
        bound = real_bind(plan, graph)  # type: ignore[arg-type]
        binds.append(bound is not None)
        return bound

    monkeypatch.setattr(qdq_module, "IrView", CountingView)
    monkeypatch.setattr(QdqPlan, "bind", counting_bind)
    result = run_qdq(model, **options)
    report = result.results[0].report
    assert calls == [model.opset_import[0].version] and result.model.opset == opset
    assert views == [opset] and binds == [True]
    assert result.results[0].modified and report.details["opset"]["after"] == opset
    assert {c["name"] for c in report.changed} >= ({"bmm", "conv"} if "activation_matmuls" in options else {"conv"})
    feeds = make_feeds(model, dims={"N": 2}, seed=7)
    for want, got in zip(run_ort(model, feeds), run_ort(result.model, feeds), strict=True):
        assert cosine(want.astype(np.float32), got.astype(np.float32)) > 0.99


def test_modified_is_what_it_changed() -> None:
    """Every layer excluded: nothing to quantize, the model is untouched and modified is False."""
    model = Model(copy_proto(op_zoo(opset=17)))
    before = model.proto.SerializeToString()
    result = QdqPass(exclude=".*").run(model, PassContext(calibration=calib_batches(model)))
    assert not result.modified and model.proto.SerializeToString() == before and result.report.skipped
