"""GPU bench (cuSPARSELt through nvmath-python vs cuBLAS through torch); skipped where there is no CUDA GPU."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxsparse.bench import gpu
from onnxsparse.errors import OnnxSparseError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(gpu.gpu_available() is not None, reason=f"no GPU bench: {gpu.gpu_available()}"),
]


@pytest.fixture(scope="module")
def lt():
    with gpu.SparseLt() as handle:
        yield handle


def test_fp16_result_matches_dense_and_times_are_sane(lt):
    t = gpu.time_gemm(lt, 1024, 768, 512, dtype="fp16", repeats=3, iters=10)
    assert t.ok and t.error < 1e-3  # fp16 output rounding: ~2e-4
    assert t.dense_ms > 0 and t.sparse_ms > 0 and len(t.dense_runs) == 3 and len(t.sparse_runs) == 3
    assert t.alg_id is not None and t.out_dtype == "fp16"


def test_int8_is_exact(lt):
    t = gpu.time_gemm(lt, 512, 256, 512, dtype="int8", repeats=2, iters=5)
    assert t.ok and t.error == 0


def test_graph_mode(lt):
    t = gpu.time_gemm(lt, 1024, 1024, 1024, dtype="fp16", repeats=2, iters=10, mode="graph")
    assert t.ok and t.mode == "graph" and t.sparse_ms > 0


def test_weight_pruned_along_the_wrong_axis_is_rejected(lt):
    import torch

    w = torch.randn(256, 256, device="cuda").half()
    wrong = gpu.prune_2to4_rows(w.t().contiguous()).t().contiguous()  # 2:4 along N instead of K
    with pytest.raises(OnnxSparseError, match="prune_check"):
        gpu.SparsePlan(lt, wrong, 256, "fp16")
    right = gpu.prune_2to4_rows(w)
    assert int((right.reshape(256, 64, 4) != 0).sum(-1).max()) <= 2
    gpu.SparsePlan(lt, right, 256, "fp16").close()


def test_cli_end_to_end(tmp_path):
    from onnxsparse.commands.bench import command

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 256])],
        [
            numpy_helper.from_array(rng.standard_normal((256, 512)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal((512, 256)).astype(np.float32), "w2"),
        ],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        command, [str(path), "--shapes", "x:1000x256", "--repeats", "3", "--iters", "5", "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert [(s["m"], s["n"], s["k"]) for s in data["shapes"]] == [(1008, 512, 256), (1008, 256, 512)]
    assert all(layer["ok"] and layer["choice"] in ("sparse", "dense") for layer in data["layers"])
    assert data["device"]["gpu"]


def test_search_rounds_keep_the_fastest_plan(lt):
    t = gpu.time_gemm(lt, 2048, 1024, 1024, dtype="fp16", repeats=2, iters=5, search_rounds=3)
    assert t.ok and len(t.search) == 3
    assert t.alg_id == min(t.search, key=lambda s: s["ms"])["config"]


@pytest.mark.parametrize("epilogue", ["bias", "bias+relu", "bias+gelu", ""])
def test_fused_epilogue_matches_the_dense_product_with_epilogue(lt, epilogue):
    from onnxsparse.bench.fused import time_gemm_epilogue

    t = time_gemm_epilogue(lt, 1024, 768, 512, epilogue=epilogue, m_dense=1000, repeats=3, iters=10)
    assert t.ok, t.to_dict()
    assert t.error < 5e-3 and t.unfused_error < 5e-3 and t.dense_error < 5e-3
    assert t.m == 1024 and t.m_dense == 1000 and t.dense_ms > 0 and t.sparse_ms > 0 and t.sparse_unfused_ms > 0
    assert len(t.unfused_runs) == 3


def test_plan_with_bias_and_relu_computes_the_epilogue(lt):
    """The fused plan itself, checked elementwise: negative pre-activations must come out as exact zeros."""
    import torch

    from onnxsparse.bench.fused import reference

    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(256, 512, device="cuda", generator=gen).half()
    w = gpu.prune_2to4_rows(torch.randn(384, 512, device="cuda", generator=gen).half() / 22)
    b = torch.randn(384, device="cuda", generator=gen).half()
    y = torch.full((256, 384), float("nan"), device="cuda", dtype=torch.float16)
    plan = gpu.SparsePlan(lt, w, 256, "fp16", bias=b, activation="relu")
    try:
        plan.run(x, y)
        torch.cuda.synchronize()
    finally:
        plan.close()
    ref = reference(x, w, b, "relu")
    assert bool(torch.isfinite(y).all())
    assert bool((y[ref == 0] == 0).all())
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=1e-2)


def test_cli_epilogues_e2e_and_buckets(tmp_path):
    from onnxsparse.commands.bench import command

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 256])],
        [
            numpy_helper.from_array(rng.standard_normal((256, 512)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal(512).astype(np.float32), "b1"),
            numpy_helper.from_array(rng.standard_normal((512, 256)).astype(np.float32), "w2"),
        ],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        command,
        [
            str(path),
            "--shapes",
            "x:1000x256",
            "--repeats",
            "3",
            "--iters",
            "5",
            "--total-ms",
            "1.0",
            "--m-buckets",
            "64",
            "--json",
            str(out),
            "--gpu-warmup",
            "0.2",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    by_name = {row["name"]: row for row in data["layers"]}
    assert by_name["fc1"]["epilogue"] == "bias+relu" and by_name["fc2"]["epilogue"] == ""
    assert all(row["ok"] and row["sparse_unfused_ms"] for row in data["layers"])
    assert data["e2e"]["e2e"]["source"] == "total-ms" and 0 < data["e2e"]["e2e"]["gemm_share"] < 1
    assert {row["plan_m"] for row in data["m_buckets"]["layers"]} == {1024}
    assert "end to end (--total-ms)" in res.output and "M buckets of 64 rows" in res.output
