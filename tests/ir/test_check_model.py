"""``pipeline.check_model`` checks models with external data (on disk, or edited into scratch files) as a file
in a temporary folder: the process's working directory never changes, and a broken model is one line."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.model_io import Model, load_model, save_model
from onnxsparse.ir.tensors import is_spilled, set_array, to_array
from onnxsparse.pipeline import check_model


def _external(tmp_path: Path) -> Path:
    """A MatMul chain saved with its weights in a data file beside it."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{i}") for i in (0, 1)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 64])],
        inits,
    )
    path = tmp_path / "in" / "mlp.onnx"
    path.parent.mkdir()
    save_model(Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])), path, external_data=True)
    return path


def _spilled(tmp_path: Path) -> Model:
    model = load_model(_external(tmp_path))
    t = model.proto.graph.initializer[1]
    set_array(t, np.asarray(to_array(t, model)) * 2, model)
    assert is_spilled(t, model)
    return model


@pytest.fixture
def no_chdir(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: object) -> None:
        raise AssertionError(f"os.chdir({path!r}) called during the check")

    monkeypatch.setattr(os, "chdir", refuse)


@pytest.mark.parametrize("kind", ["external", "spilled"])
def test_check_never_changes_the_working_directory(tmp_path: Path, no_chdir: None, kind: str) -> None:
    model = load_model(_external(tmp_path)) if kind == "external" else _spilled(tmp_path)
    assert model.has_external_data()
    locations = [e.value for t in model.proto.graph.initializer for e in t.external_data if e.key == "location"]
    cwd = os.getcwd()
    check_model(model)
    assert os.getcwd() == cwd
    # the stand-in locations were restored, and the stand-in folder is gone
    assert [e.value for t in model.proto.graph.initializer for e in t.external_data if e.key == "location"] == (
        locations
    )
    assert not list(Path(tempfile.gettempdir()).glob("onnxsparse-check-*/model.onnx"))


@pytest.mark.parametrize("kind", ["external", "spilled", "inline"])
def test_a_broken_model_fails_with_one_line(tmp_path: Path, no_chdir: None, kind: str) -> None:
    if kind == "inline":
        model = load_model(_external(tmp_path))
        onnx.load_external_data_for_model(model.proto, str(tmp_path / "in"))
        assert not model.has_external_data()
    else:
        model = load_model(_external(tmp_path)) if kind == "external" else _spilled(tmp_path)
    model.proto.graph.node.append(helper.make_node("Add", ["y", "undefined"], ["z"]))
    with pytest.raises(OnnxSparseError, match="the result fails the ONNX checker") as err:
        check_model(model)
    assert "\n" not in str(err.value)


def test_an_external_data_file_that_is_gone_is_a_one_line_error(tmp_path: Path) -> None:
    path = _external(tmp_path)
    model = load_model(path)
    (path.parent / "mlp.onnx.data").unlink()
    with pytest.raises(OnnxSparseError) as err:
        check_model(model)
    assert "\n" not in str(err.value) and "mlp.onnx.data" in str(err.value)
