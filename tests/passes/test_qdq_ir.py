"""Pass ``qdq``'s rewrite on onnx-ir (``IrView``): weights it does not quantize stay byte-identical, nodes that were
there stay and are only rewired, lazily loaded models give the eager result, and the edge cases the IR makes
explicit (a weight shared with an excluded layer, a weight from a Constant node, readers inside a subgraph)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import copy_proto, fixture_path, make_feeds, run_ort
from onnx import helper
from onnx import numpy_helper as nh
from qdq_support import F, QGraph, assert_same_saved, calib_batches, cosine, op_zoo, rand_init, two_upgrades_model

from onnxsparse.ir.model_io import Model, load_model, save_model
from onnxsparse.ir.tensors import external_info
from onnxsparse.passes.qdq import QdqPass
from onnxsparse.pipeline import PassContext, Pipeline

#: op_zoo's initializers that ``exclude='^gemm'`` leaves alone (biases are never quantized)
UNTOUCHED = {"conv.b", "gemm0.w", "gemm1.w", "gemm1.b"}
QUANTIZED = {"conv.w", "deconv.w", "mm.w"}


def _load(kind: str, tmp_path: Path) -> Model:
    """op_zoo in memory ('eager'), saved with external data and loaded, or saved inline and loaded lazily."""
    if kind == "eager":
        return Model(proto=op_zoo())
    if kind == "external":
        save_model(Model(proto=op_zoo()), tmp_path / "ext.onnx", external_data=True)
        return load_model(tmp_path / "ext.onnx")
    onnx.save(op_zoo(), str(tmp_path / "m.onnx"))
    return load_model(tmp_path / "m.onnx", lazy=True)


@pytest.mark.parametrize("kind", ["eager", "external", "lazy"])
def test_untouched_weights_stay_byte_identical(kind: str, tmp_path: Path) -> None:
    model = _load(kind, tmp_path)
    before = {t.name: t.SerializeToString() for t in model.proto.graph.initializer}
    if kind != "eager":  # the weights are references to a file, and stay the same references
        assert any(external_info(t) is not None for t in model.proto.graph.initializer)
    result = QdqPass(exclude="^gemm").run(model, PassContext(calibration=calib_batches(model)))
    assert result.modified and {c["name"] for c in result.report.changed} == {"conv", "deconv", "mm"}
    after = {t.name: t.SerializeToString() for t in model.proto.graph.initializer}
    for name in UNTOUCHED:
        assert after[name] == before[name], name
    # the float weights the int8 copies replaced are read by nothing any more: gone, not left beside them
    assert not QUANTIZED & after.keys() and {f"{n}_quantized" for n in QUANTIZED} <= after.keys()
    out = save_model(model, tmp_path / "q.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    saved = {t.name: nh.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    for t in op_zoo().graph.initializer:
        if t.name in UNTOUCHED:
            assert saved[t.name].tobytes() == nh.to_array(t).tobytes(), t.name
    feeds = make_feeds(op_zoo(), dims={"N": 3}, seed=11)
    assert cosine(run_ort(op_zoo(), feeds)[0], run_ort(out, feeds)[0]) > 0.99


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def test_nodes_that_were_there_stay_and_are_only_rewired() -> None:
    model = Model(proto=op_zoo())
    original = {n.name: _copy(n) for n in model.proto.graph.node}
    QdqPass().run(model, PassContext(calibration=calib_batches(model)))
    onnx.checker.check_model(model.proto, full_check=True)  # sorted without a toposort: inserted in place
    nodes = {n.name: n for n in model.proto.graph.node}
    assert original.keys() <= nodes.keys()
    assert {n.op_type for name, n in nodes.items() if name not in original} == {"QuantizeLinear", "DequantizeLinear"}
    for name, old in original.items():
        new = nodes[name]
        assert (new.op_type, list(new.output), list(new.attribute)) == (
            old.op_type,
            list(old.output),
            list(old.attribute),
        )
        for was, now in zip(old.input, new.input, strict=True):
            assert now in (was, f"{was}_dequantized"), (name, was, now)
    # a Q/DQ pair sits right after the producer of its activation, a weight's DQ right before its reader
    order = [n.name for n in model.proto.graph.node]
    after_relu = order.index("conv.relu") + 1
    assert order[after_relu : after_relu + 2] == ["c.relu_QuantizeLinear", "c.relu_DequantizeLinear"]
    assert order[order.index("deconv") - 1] == "deconv.w_DequantizeLinear"


@pytest.mark.parametrize("case", ["op_zoo-11", "op_zoo-17", "cnn"])
def test_a_lazily_loaded_model_gives_the_eager_result(case: str, tmp_path: Path) -> None:
    """``load_model(path, lazy=True)``: weights stay in the file until read; the converter (opset 11) and the
    IR rewrite keep those references, and the saved result equals the eagerly loaded model's, value for value."""
    path = tmp_path / "m.onnx"
    if case == "cnn":
        path = fixture_path("cnn")
    else:
        onnx.save(op_zoo(opset=int(case.split("-")[1])), str(path))
    eager, lazy = load_model(path), load_model(path, lazy=True)
    assert any(external_info(t) is not None for t in lazy.proto.graph.initializer)
    calib = [make_feeds(eager, dims={"N": 4}, seed=i) for i in range(4)]
    want = Pipeline([QdqPass()]).run(eager, PassContext(calibration=calib))
    got = Pipeline([QdqPass()]).run(lazy, PassContext(calibration=calib))  # the pipeline ends with full_check
    assert got.ops_after == want.ops_after and got.model.opset == want.model.opset
    assert [(n.op_type, list(n.input), list(n.output)) for n in got.model.proto.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in want.model.proto.graph.node
    ]
    assert got.results[0].report.changed == want.results[0].report.changed
    assert lazy.proto.ByteSize() < eager.proto.ByteSize()  # int8 weights did not land inline in the proto
    lazy_out = save_model(got.model, tmp_path / "q_lazy.onnx")
    eager_out = save_model(want.model, tmp_path / "q_eager.onnx")
    assert_same_saved(lazy_out, eager_out, make_feeds(eager, dims={"N": 3}, seed=21))


def _shared_weight_model(constant: bool = False) -> onnx.ModelProto:
    """Two MatMuls reading one weight ``w`` (from an initializer, or from a Constant node)."""
    rng = np.random.default_rng(5)
    w = rand_init(rng, "w", 16, 16)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("MatMul", ["a", "w"], ["y"], name="second"),
    ]
    if constant:
        nodes.insert(0, helper.make_node("Constant", [], ["w"], name="w.const", value=w))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F, ["N", 16])],
        [helper.make_tensor_value_info("y", F, ["N", 16])],
        [] if constant else [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_weight_shared_with_an_excluded_layer_stays_float_for_it() -> None:
    model = Model(proto=_shared_weight_model())
    before = next(t for t in model.proto.graph.initializer if t.name == "w").SerializeToString()
    result = QdqPass(exclude="^second$").run(model, PassContext(calibration=calib_batches(model)))
    g = QGraph(model.proto)
    assert g.prod[g.nodes["first"].input[1]].op_type == "DequantizeLinear"
    assert g.nodes["second"].input[1] == "w" and g.inits["w"].SerializeToString() == before
    assert [c["name"] for c in result.report.changed] == ["first"]
    onnx.checker.check_model(model.proto, full_check=True)
    feeds = make_feeds(model, dims={"N": 3}, seed=1)
    assert cosine(run_ort(_shared_weight_model(), feeds)[0], run_ort(model, feeds)[0]) > 0.99


def test_a_weight_from_a_constant_node_is_quantized_and_the_constant_goes() -> None:
    proto = _shared_weight_model(constant=True)
    model = Model(proto=copy_proto(proto))
    result = QdqPass().run(model, PassContext(calibration=calib_batches(model)))
    assert {c["name"] for c in result.report.changed} == {"first", "second"}
    g = QGraph(model.proto)
    assert "Constant" not in {n.op_type for n in g.g.node}
    dq = g.prod[g.nodes["first"].input[1]]
    assert dq is g.prod[g.nodes["second"].input[1]] and g.array(dq.input[0]).dtype == np.int8
    onnx.checker.check_model(model.proto, full_check=True)
    feeds = make_feeds(proto, dims={"N": 3}, seed=2)
    assert cosine(run_ort(proto, feeds)[0], run_ort(model, feeds)[0]) > 0.99


def _subgraph_reader_model() -> onnx.ModelProto:
    """A layer's output read in the main graph (Add) and, captured, inside both branches of an If."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x, bool c) => (float[N, 8] y, float[N, 8] z) {
            h0 = MatMul(x, w)
            h = Relu(h0)
            z = Add(h, h)
            y = If(c) <
                then_branch = t () => (float[N, 8] ty) { ty = Identity(h) },
                else_branch = e () => (float[N, 8] ey) { ey = Neg(h) }
            >
        }
        """
    )
    model.graph.initializer.append(rand_init(np.random.default_rng(6), "w", 8, 8))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_output_qdq_rewires_main_graph_readers_only() -> None:
    """``quantize-outputs`` puts Q/DQ on each reader of a layer's output in the main graph; the If branches
    (out of scope) keep reading the float value, as before the port."""
    proto = _subgraph_reader_model()
    model = Model(proto=copy_proto(proto))
    calib = [{"x": f["x"], "c": np.array(i % 2 == 0)} for i, f in enumerate(calib_batches(proto))]
    result = Pipeline([QdqPass(quantize_outputs=True)]).run(model, PassContext(calibration=calib))
    assert "h" in result.results[0].report.details["output_tensors"]
    g = QGraph(result.model.proto)
    add = next(n for n in g.g.node if n.op_type == "Add")
    assert list(add.input) == ["h_dequantized", "h_dequantized"]
    branch = next(n for n in g.g.node if n.op_type == "If")
    assert [list(n.input) for a in branch.attribute for n in a.g.node] == [["h"], ["h"]]
    for cond in (True, False):
        feeds = {**make_feeds(proto, dims={"N": 3}, seed=3), "c": np.array(cond)}
        for want, got in zip(run_ort(proto, feeds), run_ort(result.model, feeds), strict=True):
            assert cosine(want, got) > 0.99


def test_a_plan_that_no_longer_binds_is_made_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the version converter rename a value the plan names (onnx's keeps names; this one is made to
    rename the Conv's output on the float16 upgrade, after calibration), the plan is made once more on the
    converted model rather than rewiring the wrong inputs."""
    import onnxsparse.passes.qdq as qdq_module

    real_upgrade, real_plan = qdq_module._upgrade, qdq_module.plan_qdq
    plans: list[int] = []

    def renaming(model: Model, target: int, why: str) -> None:
        real_upgrade(model, target, why)
        if target == 19:
            for n in model.proto.graph.node:
                n.output[:] = ["y.renamed" if o == "y" else o for o in n.output]
            next(o for o in model.proto.graph.output if o.name == "y").name = "y.renamed"

    def counting(m: Model, cfg: object) -> object:
        plans.append(m.opset)
        return real_plan(m, cfg)  # type: ignore[arg-type]

    monkeypatch.setattr(qdq_module, "_upgrade", renaming)
    monkeypatch.setattr(qdq_module, "plan_qdq", counting)
    proto = two_upgrades_model()
    model = Model(proto=copy_proto(proto))
    result = Pipeline([QdqPass(activation_matmuls=True)]).run(model, PassContext(calibration=calib_batches(proto)))
    assert plans == [11, 19] and result.model.opset == 19
    assert {c["name"] for c in result.results[0].report.changed} == {"conv", "bmm"}
    feeds = make_feeds(proto, dims={"N": 2}, seed=7)
    for want, got in zip(run_ort(proto, feeds), run_ort(result.model, feeds), strict=True):
        assert cosine(want.astype(np.float32), got.astype(np.float32)) > 0.99
