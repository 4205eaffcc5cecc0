"""The onnx-ir view of a Model (``onnxsparse.ir.onnxir.IrView``): rewrites land in the same proto, weights untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, numpy_helper

from onnxsparse.ir.graph import iter_graphs
from onnxsparse.ir.model_io import Model, load_model, ort_session, save_model
from onnxsparse.ir.onnxir import IrView, ModelTensor
from onnxsparse.ir.tensors import inline_origin, is_spilled, to_array

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
ALL = ["cnn.onnx", "if_model.onnx", "loop_model.onnx", "transformer_block.onnx", "mlp_gemm.onnx", "qdq_model.onnx"]


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("name", ALL)
def test_a_view_committed_unchanged_is_byte_identical(name: str, lazy: bool) -> None:
    model = load_model(FIXTURES / name, lazy=lazy)
    before = model.proto.SerializeToString()
    proto_object = model.proto
    view = IrView.of(model)
    assert all(isinstance(v.const_value, ModelTensor) for g in _graphs(view.ir) for v in g.initializers.values())
    view.commit()
    assert model.proto is proto_object, "written back into the same ModelProto"
    assert model.proto.SerializeToString() == before


def test_model_tensors_read_the_models_own_values() -> None:
    model = load_model(FIXTURES / "cnn.onnx", lazy=True)
    ref = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(FIXTURES / "cnn.onnx")).graph.initializer}
    view = IrView.of(model)
    for name, value in view.ir.graph.initializers.items():
        assert value.const_value is not None
        np.testing.assert_array_equal(value.const_value.numpy(), ref[name])


def _graphs(model: ir.Model) -> list[ir.Graph]:
    out = [model.graph]
    for node in model.graph.all_nodes():
        for a in node.attributes.values():
            if a.type == ir.AttributeType.GRAPH:
                out.append(a.value)
            elif a.type == ir.AttributeType.GRAPHS:
                out.extend(a.value)
    return out


def _first_conv(graph: ir.Graph) -> ir.Node:
    return next(n for n in graph if n.op_type == "Conv")


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_a_rewrite_through_producer_and_uses_runs_and_keeps_untouched_weights(tmp_path: Path, lazy: bool) -> None:
    """Double the first Conv's output (a Mul after it, found through uses()) and give it a new weight."""
    path = FIXTURES / "cnn.onnx"
    model = load_model(path, lazy=lazy)
    ref_model = load_model(path)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    feed = {model.proto.graph.input[0].name: x}
    kept_before = {t.name: bytes(t.SerializeToString()) for t in model.proto.graph.initializer}

    view = IrView.of(model)
    conv = _first_conv(view.ir.graph)
    out = conv.outputs[0]
    readers = list(out.uses())
    assert readers, "the conv's output is read"
    two = ir.Value(name="onnxsparse_test_two", const_value=view.new_tensor(np.array(2.0, np.float32), "two"))
    view.ir.graph.register_initializer(two)
    mul = ir.node("Mul", [out, two], name="onnxsparse_test_mul")
    view.ir.graph.insert_after(conv, mul)
    for use in readers:
        use.node.replace_input_with(use.idx, mul.outputs[0])
    assert mul.outputs[0].producer() is mul
    view.commit()

    assert [n.op_type for n in model.proto.graph.node].count("Mul") == 1
    for t in model.proto.graph.initializer:
        if t.name in kept_before:
            assert t.SerializeToString() == kept_before[t.name], f"{t.name} kept as it was"
            if lazy and t.data_location == TensorProto.EXTERNAL:
                assert inline_origin(t), "a lazily loaded weight still points into the model file"
    onnx.checker.check_model(_saved(model, tmp_path / "m.onnx"), full_check=True)
    # the same rewrite by hand on the reference proto
    ref = ref_model.proto
    conv_ref = next(n for n in ref.graph.node if n.op_type == "Conv")
    old = conv_ref.output[0]
    for n in ref.graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = "doubled"
    ref.graph.initializer.append(numpy_helper.from_array(np.array(2.0, np.float32), "two_ref"))
    pos = list(ref.graph.node).index(conv_ref)
    ref.graph.node.insert(pos + 1, onnx.helper.make_node("Mul", [old, "two_ref"], ["doubled"]))
    got = ort_session(model).run(None, feed)[0]
    want = ort_session(ref_model).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_new_weights_of_an_external_model_go_to_its_spill_store(tmp_path: Path) -> None:
    src = tmp_path / "src.onnx"
    proto = onnx.load(str(FIXTURES / "cnn.onnx"))
    onnx.save(proto, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="src.onnx.data")
    data_before = (tmp_path / "src.onnx.data").read_bytes()
    model = load_model(src)
    assert model.has_external_data()
    view = IrView.of(model)
    conv = _first_conv(view.ir.graph)
    w = conv.inputs[1]
    assert w is not None and w.const_value is not None and w.name
    halved = np.asarray(w.const_value.numpy()) * np.float32(0.5)
    w.const_value = view.new_tensor(halved, w.name)
    view.commit()
    t = next(t for t in model.proto.graph.initializer if t.name == w.name)
    assert is_spilled(t, model), "a new weight of an external-data model goes to the spill store, not inline"
    np.testing.assert_array_equal(to_array(t, model), halved)
    out = save_model(model, tmp_path / "out.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    back = load_model(out)
    saved = next(x for x in back.proto.graph.initializer if x.name == w.name)
    np.testing.assert_array_equal(to_array(saved, back), halved)
    assert (tmp_path / "src.onnx.data").read_bytes() == data_before, "the input's data file is untouched"


def test_removing_a_weight_and_moving_a_subgraph_tensor(tmp_path: Path) -> None:
    """A pass that drops a main-graph initializer: it leaves the proto; everything else is unchanged."""
    model = load_model(FIXTURES / "if_model.onnx")
    names_before = [t.name for g in iter_graphs(model.proto.graph) for t in g.initializer]
    view = IrView.of(model)
    unused = ir.Value(name="unused_weight", const_value=view.new_tensor(np.ones(3, np.float32), "unused_weight"))
    view.ir.graph.register_initializer(unused)
    view.commit()
    assert "unused_weight" in [t.name for t in model.proto.graph.initializer]
    view = IrView.of(model)
    view.ir.graph.initializers.pop("unused_weight")
    view.commit()
    assert [t.name for g in iter_graphs(model.proto.graph) for t in g.initializer] == names_before
    onnx.checker.check_model(_saved(model, tmp_path / "m.onnx"), full_check=True)


def _saved(model: Model, path: Path) -> str:
    return str(save_model(model, path))
