"""The training copy on onnx-ir: subgraph readers of a masked weight, the input untouched, rewrites equal."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from training_support import training_runtime  # noqa: F401

from onnxsparse.finetune import graph as fg
from onnxsparse.ir.model_io import Model


def _model(graph: onnx.GraphProto, opset: int = 17) -> Model:
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return Model(proto=proto)


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, feeds)]


def _if_model(w: np.ndarray) -> Model:
    """y = If(c, then: x @ W, else: x @ W + 1) with W read from the outer scope; z = x @ W outside."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])
    t_out = helper.make_tensor_value_info("t_y", TensorProto.FLOAT, [2, 4])
    e_out = helper.make_tensor_value_info("e_y", TensorProto.FLOAT, [2, 4])
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t_y"])], "then", [], [t_out])
    else_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["e_p"]), helper.make_node("Add", ["e_p", "one"], ["e_y"])],
        "else",
        [],
        [e_out],
    )
    nodes = [
        helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
        helper.make_node("MatMul", ["x", "W"], ["z"]),
    ]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    return _model(helper.make_graph(nodes, "g", [x, c], [y, z], inits))


def _mask24(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    m = np.zeros(shape, bool).reshape(-1, 4)
    for row in m:
        row[rng.choice(4, 2, replace=False)] = True
    return m.reshape(shape)


def test_if_subgraph_reads_the_masked_weight_and_input_is_unchanged() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    mask = _mask24((4, 4), rng)
    model = _if_model(w)
    before = model.proto.SerializeToString()
    copy = fg.training_copy(model, {"W": mask})
    assert model.proto.SerializeToString() == before
    onnx.checker.check_model(copy, full_check=True)
    assert [i.name for i in copy.graph.input] == ["x", "c"]
    assert [o.name for o in copy.graph.output] == ["y", "z"]
    x = rng.standard_normal((2, 4)).astype(np.float32)
    masked = Model(proto=onnx.ModelProto())
    masked.proto.CopyFrom(model.proto)
    masked.proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w * mask, "W"))
    for cond in (True, False):
        feeds = {"x": x, "c": np.array(cond)}
        got = _run(copy, feeds)
        want = _run(masked.proto, feeds)
        dense = _run(model.proto, feeds)
        for g, e, d in zip(got, want, dense, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
            assert not np.allclose(g, d)  # the mask does act, in both branches and outside
    readers = [n for g in fg.iter_graphs(copy.graph) for n in g.node if "W" in n.input]
    assert [n.op_type for n in readers] == ["Mul"]  # nothing reads W but its mask product


def _single(op_nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], shape: list[int]) -> Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)  # every op here keeps the shape
    return _model(helper.make_graph(op_nodes, "g", [x], [y], inits))


def test_batchnorm_hardswish_pow_rewrites_equal_in_ort() -> None:
    rng = np.random.default_rng(1)
    c = 3
    params = {
        "s": rng.random(c).astype(np.float32) + 0.5,
        "b": rng.standard_normal(c).astype(np.float32),
        "m": rng.standard_normal(c).astype(np.float32),
        "v": rng.random(c).astype(np.float32) + 0.1,
    }
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"], name="bn0", epsilon=1e-3),
        helper.make_node("HardSwish", ["bn"], ["hs"], name="hs0"),
        helper.make_node("HardSigmoid", ["hs"], ["hg"], name="hg0", alpha=0.3, beta=0.4),
        helper.make_node("Constant", [], ["three"], value=numpy_helper.from_array(np.array(3.0, np.float32))),
        helper.make_node("Pow", ["hg", "three"], ["y"], name="pow0"),
    ]
    inits = [numpy_helper.from_array(a, k) for k, a in params.items()]
    model = _single(nodes, inits, [2, c, 5, 5])
    before = model.proto.SerializeToString()
    copy = fg.training_copy(model, {})
    assert model.proto.SerializeToString() == before
    onnx.checker.check_model(copy, full_check=True)
    ops = [n.op_type for n in copy.graph.node]
    for gone in ("BatchNormalization", "HardSwish", "HardSigmoid", "Pow"):
        assert gone not in ops
    x = rng.standard_normal((2, c, 5, 5)).astype(np.float32) * 3
    np.testing.assert_allclose(_run(copy, {"x": x})[0], _run(model.proto, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_layernorm_gets_its_statistics_outputs() -> None:
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln", axis=-1)]
    inits = [
        numpy_helper.from_array(np.ones(4, np.float32), "g"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b"),
    ]
    model = _single(nodes, inits, [2, 4])
    copy = fg.training_copy(model, {})
    (ln,) = [n for n in copy.graph.node if n.op_type == "LayerNormalization"]
    assert list(ln.output) == ["y", "ln__onnxsparse_ln_stat1", "ln__onnxsparse_ln_stat2"]
    onnx.checker.check_model(copy, full_check=True)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(_run(copy, {"x": x})[0], _run(model.proto, {"x": x})[0], rtol=1e-6)


def _qdq_model(rng: np.random.Generator) -> Model:
    """x → Q/DQ → MatMul(DQ(Wq)) → y, per-tensor int8 weight, uint8 activations."""
    wq = rng.integers(-100, 100, (4, 4)).astype(np.int8)
    wq[:, ::2] = 0
    inits = [
        numpy_helper.from_array(wq, "Wq"),
        numpy_helper.from_array(np.array(0.02, np.float32), "ws"),
        numpy_helper.from_array(np.array(0, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["Wd"], name="dq_w"),
        helper.make_node("MatMul", ["xd", "Wd"], ["y"], name="mm"),
    ]
    return _single(nodes, inits, [2, 4])


def test_qat_copy_structure() -> None:
    from onnxsparse.finetune import qat

    model = _qdq_model(np.random.default_rng(2))
    before = model.proto.SerializeToString()
    qweights, skipped = qat.quantized_weights(model, {})
    assert list(qweights) == ["Wq"] and not skipped
    copy = fg.training_copy(model, {}, qweights)
    assert model.proto.SerializeToString() == before
    ops = [n.op_type for n in copy.graph.node]
    assert ops.count("FakeQuant") == 2
    assert "DequantizeLinear" not in ops and "QuantizeLinear" not in ops
    inits = {t.name for t in copy.graph.initializer}
    assert "Wq__onnxsparse_master" in inits and "Wq" not in inits
    read = {i for n in copy.graph.node for i in n.input}
    assert inits <= read  # no unread initializer left
    produced: set[str] = {"x"} | inits
    for n in copy.graph.node:  # in order without a sort
        assert all(i in produced for i in n.input if i), n.name
        produced.update(n.output)
    assert "Wd" in produced and "xd" in produced
    mm = next(n for n in copy.graph.node if n.op_type == "MatMul")
    assert list(mm.input) == ["xd", "Wd"]
    assert any(o.domain == "com.microsoft" for o in copy.opset_import)


def _loop_model(w: np.ndarray) -> Model:
    """y = Loop(3): v ← v @ W, W read from the outer scope by the body."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["v_in", "W"], ["v_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [2, 4]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [2, 4]),
        ],
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(3, np.int64), "n")]
    return _model(helper.make_graph([helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)], "g", [x], [y], inits))


def test_loop_body_reads_the_masked_weight() -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    mask = _mask24((4, 4), rng)
    model = _loop_model(w)
    before = model.proto.SerializeToString()
    copy = fg.training_copy(model, {"W": mask})
    assert model.proto.SerializeToString() == before
    onnx.checker.check_model(copy, full_check=True)
    body = next(a.g for n in copy.graph.node if n.op_type == "Loop" for a in n.attribute if a.name == "body")
    matmul = next(n for n in body.node if n.op_type == "MatMul")
    assert list(matmul.input) == ["v_in", "W" + fg.MASKED_SUFFIX]
    x = rng.standard_normal((2, 4)).astype(np.float32)
    wm = w * mask
    np.testing.assert_allclose(_run(copy, {"x": x})[0], x @ wm @ wm @ wm, rtol=1e-5, atol=1e-5)
    assert not np.allclose(_run(model.proto, {"x": x})[0], x @ wm @ wm @ wm, atol=1e-3)


def test_an_input_out_of_order_gives_a_copy_in_order() -> None:
    """A node list out of order (as a file may come, before the pipeline's final sort) is sorted."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["a"], ["y"], name="relu"), helper.make_node("MatMul", ["x", "W"], ["a"])]
    model = _single(nodes, [numpy_helper.from_array(w, "W")], [4, 4])
    mask = _mask24((4, 4), rng)
    copy = fg.training_copy(model, {"W": mask})
    assert [n.op_type for n in copy.graph.node] == ["Mul", "MatMul", "Relu"]
    onnx.checker.check_model(copy, full_check=True)
    x = rng.standard_normal((4, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(copy, {"x": x})[0], np.maximum(x @ (w * mask), 0), rtol=1e-5, atol=1e-6)


def test_masks_are_made_one_at_a_time_and_kept_as_they_are() -> None:
    """The masks are initializers of the copy's proto before the view is built: one float mask alive at a time
    (peak of traced memory below half the masks' total; as ``ir.Tensor``s in the view all of them were alive at
    once, then serialised), each mask once in the copy with the mask's values."""
    rng = np.random.default_rng(6)
    k, n, layers = 256, 128, 8
    nodes, inits, masks = [], [], {}
    for i in range(layers):
        w = rng.standard_normal((k, n if i == layers - 1 else k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        masks[f"W{i}"] = _mask24(w.shape, rng)
        nodes.append(
            helper.make_node("MatMul", [f"h{i}" if i else "x", f"W{i}"], ["y" if i == layers - 1 else f"h{i + 1}"])
        )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])
    model = _model(helper.make_graph(nodes, "g", [x], [y], inits))
    total = sum(m.size * 4 for m in masks.values())
    tracemalloc.start()
    try:
        copy = fg.training_copy(model, masks)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < total / 2, (peak, total)
    found = {t.name: t for t in copy.graph.initializer if t.name.endswith(fg.MASK_SUFFIX)}
    assert len(found) == layers
    for name, mask in masks.items():
        np.testing.assert_array_equal(numpy_helper.to_array(found[name + fg.MASK_SUFFIX]), mask.astype(np.float32))
    xv = rng.standard_normal((2, k)).astype(np.float32)
    want = xv
    for i in range(layers):
        want = want @ (numpy_helper.to_array(inits[i]) * masks[f"W{i}"])
    np.testing.assert_allclose(_run(copy, {"x": xv})[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("training_runtime")
def test_qat_copy_equals_the_qdq_model_in_ort_training(tmp_path: Path) -> None:
    """Plain onnxruntime has no com.microsoft FakeQuant kernel ("not a registered function/op"); the training
    runtime has one: the QAT copy, masters at their dequantized values, computes what the Q/DQ model does."""
    from onnxsparse.finetune import qat
    from onnxsparse.finetune.runtime import find_runtime

    rng = np.random.default_rng(7)
    model = _qdq_model(rng)
    qweights, _ = qat.quantized_weights(model, {})
    copy = fg.training_copy(model, {}, qweights)
    onnx.checker.check_model(copy, full_check=True)
    x = (rng.standard_normal((2, 4)) * 3).astype(np.float32)
    want = _run(model.proto, {"x": x})[0]
    rt = find_runtime()
    assert rt is not None
    onnx.save(copy, str(tmp_path / "qat.onnx"))
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]) if sys.argv[1] else None; import numpy as np, onnxruntime as o; "
        "s = o.InferenceSession(sys.argv[2] + '/qat.onnx', providers=['CPUExecutionProvider']); "
        "np.save(sys.argv[2] + '/y.npy', s.run(None, {'x': np.load(sys.argv[2] + '/x.npy')})[0])"
    )
    where = str(rt.path) if rt.mode == "subprocess" else ""
    subprocess.run(
        [sys.executable, "-c", code, where, str(tmp_path)], check=True, env={**os.environ, "PYTHONNOUSERSITE": "1"}
    )
    got = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 1  # not a trivially zero output
