"""The suite leaves the user's home alone: onnxsparse's cache points at a project-local (or chosen) folder."""

from __future__ import annotations

from pathlib import Path

from onnxsparse.finetune.runtime import cache_dir


def test_cache_is_not_the_users() -> None:
    assert cache_dir() != Path.home() / ".cache" / "onnxsparse"


def test_run_ort_leaves_a_spilled_model_readable(tmp_path: Path) -> None:
    """``run_ort`` on a Model whose external weights were edited (spilled to its pack) must not hand the
    caller's store a data file in a folder it then deletes: the model is run again, read and saved after."""
    import numpy as np
    import onnx
    from conftest import run_ort
    from onnx import TensorProto, helper

    from onnxsparse.ir.model_io import Model, load_model, save_model
    from onnxsparse.ir.tensors import is_spilled, set_array, to_array

    rng = np.random.default_rng(0)
    w0, w1 = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])],
        [onnx.numpy_helper.from_array(w0, "w0"), onnx.numpy_helper.from_array(w1, "w1")],
    )
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "mlp.onnx"
    save_model(Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])), path, external_data=True)
    model = load_model(path)
    t = model.proto.graph.initializer[0]
    set_array(t, w0 * 2, model)
    assert is_spilled(t, model) and model.has_external_data()
    x = rng.standard_normal((3, 64)).astype(np.float32)
    want = (x @ (w0 * 2)) @ w1
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(to_array(t, model), w0 * 2)  # the edited weight is still readable
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], want, rtol=1e-4, atol=1e-4)  # and runs again
    out = save_model(model, tmp_path / "out.onnx")
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], want, rtol=1e-4, atol=1e-4)
