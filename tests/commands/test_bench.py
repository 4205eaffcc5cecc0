"""`onnxsparse bench` on CPU: --shapes-only output and JSON, and the error where no GPU bench is possible."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxsparse.bench import gpu
from onnxsparse.cli import main


def _save(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 10])],
        [numpy_helper.from_array(rng.standard_normal((64, 128)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((128, 10)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path, model.SerializeToString()


def test_shapes_only_table_and_json(tmp_path):
    path, before = _save(tmp_path)
    res = CliRunner().invoke(main, ["bench", str(path), "--shapes", "x:2x50x64", "--shapes-only"])
    assert res.exit_code == 0, res.output
    assert "100x128x64" in res.output and "112" in res.output  # M=100 timed as 112 (fp16 multiple of 16)
    assert "N=10 not a multiple of 16" in res.output
    assert "1 of 2 weighted layers" in res.output
    res = CliRunner().invoke(main, ["bench", str(path), "--shapes", "x:2x50x64", "--shapes-only", "--dtype", "int8",
                                    "--json", "-"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["dtype"] == "int8" and data["shapes"] == [
        {"m": 128, "n": 128, "k": 64, "epilogue": "", "m_real": 100, "count": 1, "layers": ["fc1"]}]
    assert path.read_bytes() == before  # input untouched


def test_bad_inputs_are_one_line_errors(tmp_path):
    path, _ = _save(tmp_path)
    res = CliRunner().invoke(main, ["bench", str(path), "--shapes", "nope:1x2", "--shapes-only"])
    assert res.exit_code == 1 and "not a model input" in res.output
    res = CliRunner().invoke(main, ["bench", str(tmp_path / "missing.onnx")])
    assert res.exit_code == 1 and "no such file" in res.output


def test_without_gpu_exits_1_with_the_reason(tmp_path):
    why = gpu.gpu_available()
    if why is None:  # only on a GPU machine
        pytest.skip("a GPU bench is possible here")
    path, _ = _save(tmp_path)
    res = CliRunner().invoke(main, ["bench", str(path), "--shapes", "x:2x50x64"])
    assert res.exit_code == 1
    assert "cannot bench on the GPU" in res.output and "--shapes-only" in res.output
