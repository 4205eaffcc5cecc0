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
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 10])],
        [
            numpy_helper.from_array(rng.standard_normal((64, 128)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal((128, 10)).astype(np.float32), "w2"),
        ],
    )
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
    res = CliRunner().invoke(
        main, ["bench", str(path), "--shapes", "x:2x50x64", "--shapes-only", "--dtype", "int8", "--json", "-"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["dtype"] == "int8" and data["shapes"] == [
        {"m": 128, "n": 128, "k": 64, "epilogue": "", "m_real": 100, "count": 1, "layers": ["fc1"]}
    ]
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


def test_shapes_only_with_no_timed_layer_says_so(tmp_path):
    path, _ = _save(tmp_path)
    res = CliRunner().invoke(main, ["bench", str(path), "--shapes", "x:2x50x64", "--shapes-only", "--exclude", "fc1"])
    assert res.exit_code == 0, res.output
    assert "no layer would be timed" in res.output and "excluded by 'fc1': stays dense" in res.output


def test_shapes_only_m_buckets_and_epilogues(tmp_path):
    path, _ = _save(tmp_path)
    res = CliRunner().invoke(
        main, ["bench", str(path), "--shapes", "x:2x50x64", "--shapes-only", "--m-buckets", "64", "--json", "-"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["m_buckets"] == [{"name": "fc1", "m": 100, "plan_m": 128}]
    assert data["shapes"][0]["m"] == 112  # exact M: cuSPARSELt's multiple of 16
    assert data["layers"][0]["epilogue"] == ""  # a MatMul with nothing after it


def test_bench_option_errors(tmp_path):
    path, before = _save(tmp_path)
    prof = tmp_path / "p.json"
    prof.write_text("[]")
    res = CliRunner().invoke(main, ["bench", str(path), "--total-ms", "3", "--trt-profile", str(prof)])
    assert res.exit_code == 1 and "not both" in res.output
    res = CliRunner().invoke(main, ["bench", str(path), "--trt-profile", str(prof)])
    assert res.exit_code == 1 and "not a trtexec profile" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["bench", str(path), "--shapes-only", "--json", str(path)])
    assert res.exit_code == 1 and "--json" in res.output
    res = CliRunner().invoke(main, ["bench", str(path), "--shapes-only", "--exclude", "("])
    assert res.exit_code == 1 and "bad exclude regex" in res.output
    assert path.read_bytes() == before


class _Timing:
    """Stand-in for a GPU measurement (needs no GPU): dense / fused sparse / unfused sparse ms."""

    def __init__(self, dense, sparse, unfused):
        self.dense_ms, self.sparse_ms, self.sparse_unfused_ms, self.ok = dense, sparse, unfused, True

    def to_dict(self):
        return {
            "m": 0,
            "n": 0,
            "k": 0,
            "dense_ms": self.dense_ms,
            "sparse_ms": self.sparse_ms,
            "speedup": self.dense_ms / self.sparse_ms,
            "sparse_unfused_ms": self.sparse_unfused_ms,
        }


def test_report_json_with_total_and_buckets(tmp_path):
    """The CLI's report assembly (bench._reports) on hand-made timings: JSON and text of every section."""
    import onnx

    from onnxsparse.bench.gemms import extract_gemms, unique_gemms, with_m_bucket
    from onnxsparse.commands.bench import _reports
    from onnxsparse.ir.shapes import parse_shapes

    path, _ = _save(tmp_path)
    layers = extract_gemms(onnx.load(path), parse_shapes("x:2x50x64"), epilogues=True)
    bucketed = with_m_bucket(layers, 64, "fp16")
    (exact,) = unique_gemms(layers)
    (bucket,) = unique_gemms(bucketed)
    timings = {exact.key: _Timing(0.010, 0.008, 0.015), bucket.key: _Timing(0.010, 0.009, 0.016)}
    settings = {"mode": "graph", "iters": 50, "repeats": 7, "m_buckets": 64}
    data, lines = _reports(layers, bucketed, timings, "fp16", 1.0, settings, 0.05, None, {"gpu": "stand-in"})
    json.dumps(data)  # serialisable
    assert data["e2e"]["e2e"]["total_sparse_ms"] == pytest.approx(0.05 - 0.010 + 0.008)
    assert data["summary"]["sparse_unfused_ms"] == pytest.approx(0.015)
    assert data["m_buckets"]["e2e"]["e2e"]["total_sparse_ms"] == pytest.approx(0.05 - 0.010 + 0.009)
    assert data["m_buckets"]["layers"][0]["plan_m"] == 128
    text = "\n".join(lines)
    assert "weighted GEMMs only" in text and "end to end (--total-ms)" in text and "M buckets of 64 rows" in text
    assert "without sparse epilogue fusion" in text and "assumption:" in text


def test_tables_fit_columns_and_wide_keeps_full_names(tmp_path):
    """Long node names (as exporters write them) are shortened in the table to fit COLUMNS, kept in --wide."""
    rng = np.random.default_rng(0)
    names = [f"/model/encoder/layer.{i}/attention/output/dense/MatMul" for i in range(3)]
    nodes, prev, inits = [], "x", []
    for i, name in enumerate(names):
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=name))
        inits.append(numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{i}"))
        prev = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["b", 64])],
        inits,
    )
    path = tmp_path / "long.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    args = ["bench", str(path), "--shapes", "x:8x64", "--shapes-only"]
    res = CliRunner().invoke(main, args, env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert max(len(line) for line in res.output.splitlines()) <= 80
    assert names[0] not in res.output  # shortened in the middle
    res = CliRunner().invoke(main, [*args, "--wide"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert all(name in res.output for name in names)
