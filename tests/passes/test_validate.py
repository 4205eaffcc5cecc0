"""validate: per-layer status / zeros / violating groups / FLOPs / hints, coverage, gates inside a pipeline,
and agreement with Polygraphy 0.53's ``inspect sparsity`` (as a library and as its CLI)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import copy_proto, fixture_path, make_feeds, run_ort
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from onnxsparse.errors import GateFailure, OnnxSparseError
from onnxsparse.ir.model_io import Model, load_model
from onnxsparse.passes.prune import PrunePass
from onnxsparse.passes.validate import ValidateConfig, ValidatePass, render_report
from onnxsparse.pipeline import PassContext, Pipeline

F = TensorProto.FLOAT
POLY_WARNING = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


def _pruned(name: str, **options: object) -> onnx.ModelProto:
    return Pipeline([PrunePass(**options)]).run(Model(onnx.load(fixture_path(name))), PassContext()).model.proto


def _analyse(model: onnx.ModelProto, shapes: dict | None = None, **options: object):
    report = ValidatePass(**options).analyse(Model(copy_proto(model)), PassContext(shapes=shapes or {}))
    return {r["layer"]: r for r in report.details["layers"]}, report.details["summary"], report


def _conv_output_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Output shape of every weighted node, measured by ORT (independent of our shape inference)."""
    m = copy_proto(model)
    nodes = [n for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    for n in nodes:
        m.graph.output.append(helper.make_tensor_value_info(n.output[0], F, None))
    outs = run_ort(m, feeds)
    by_name = dict(zip([o.name for o in m.graph.output], outs, strict=True))
    return {n.name: by_name[n.output[0]].shape for n in nodes}


def test_pruned_cnn_rows_and_flops():
    model = _pruned("cnn")
    rows, summary, report = _analyse(model, {"x": (2, 3, 32, 32)})
    assert rows["stem"]["status"] == "ineligible" and "C_in/group=3" in rows["stem"]["reason"]
    assert rows["dw"]["status"] == "ineligible"
    for name in ("block1.conv1", "block1.conv2", "pw", "grouped", "up", "down", "head"):
        assert rows[name]["status"] == "sparse", name
        assert rows[name]["violations"] == 0 and rows[name]["zeros"] == 0.5
    assert rows["up"]["axis"] == 0 and rows["head"]["axis"] == 1
    assert rows["stem"]["zeros"] == 0.0  # zeros are reported for ineligible layers too
    # FLOPs = 2 * (output pixels) * C_out * (C_in/group * kh * kw), output shapes measured by ORT
    feeds = make_feeds(model, dims={"batch": 2})
    out_shapes = _conv_output_shapes(model, feeds)
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv":
            y = out_shapes[node.name]
            w = weights[node.input[1]]
            assert rows[node.name]["flops"] == 2 * y[0] * y[2] * y[3] * w[0] * w[1] * w[2] * w[3], node.name
    assert rows["head"]["flops"] == 2 * 2 * 12 * 32
    total = sum(r["flops"] for r in rows.values())
    sparse = sum(r["flops"] for r in rows.values() if r["status"] == "sparse")
    assert summary["coverage_basis"] == "flops"
    assert summary["coverage"] == pytest.approx(sparse / total)
    assert summary["eligible_coverage"] == 1.0
    assert (summary["sparse"], summary["eligible"], summary["layers"]) == (7, 7, 9)
    text = render_report(report)
    assert "7/7 eligible layers are 2:4" in text and "FLOP-weighted" in text


def test_dense_model_counts_every_violating_group():
    model = onnx.load(fixture_path("transformer_block"))
    rows, summary, _ = _analyse(model, {"x": (2, 8, 64)})
    for name, row in rows.items():
        if row["weight"] is None:
            assert row["status"] == "ineligible" and "run time" in row["reason"]
            continue
        size = int(np.prod(row["shape"]))
        assert row["status"] == "eligible"
        assert row["groups"] == size // 4 and row["violations"] == row["groups"], name  # random weights
    assert summary["sparse"] == 0 and summary["coverage"] == 0.0


def test_violations_counted_exactly():
    """Break k groups of a 2:4 weight: exactly k violating groups are reported (not just 'the first one')."""
    model = _pruned("transformer_block")
    t = next(t for t in model.graph.initializer if t.name == "ffn.fc1.weight")
    w = nh.to_array(t).copy()  # [64, 256], K = axis 0
    rng = np.random.default_rng(0)
    broken = rng.choice(16 * 256, size=37, replace=False)
    for g in broken:
        block, col = divmod(int(g), 256)
        w[block * 4 : block * 4 + 4, col] = 1.0
    t.CopyFrom(nh.from_array(w, t.name))
    rows, summary, _ = _analyse(model)
    assert rows["ffn.fc1.matmul"]["violations"] == 37 and rows["ffn.fc1.matmul"]["status"] == "eligible"
    assert summary["sparse"] == summary["eligible"] - 1


def test_coverage_falls_back_to_params_without_shapes():
    model = _pruned("transformer_block", exclude="ffn")
    rows, summary, _ = _analyse(model)  # batch and seq symbolic: no FLOPs
    assert summary["coverage_basis"] == "params"
    params = {r["layer"]: r["params"] for r in rows.values()}
    sparse = sum(p for n, p in params.items() if rows[n]["status"] == "sparse")
    assert summary["coverage"] == pytest.approx(sparse / sum(params.values()))
    rows, summary, _ = _analyse(model, {"x": (1, 8, 64)})
    assert summary["coverage_basis"] == "flops" and rows["ffn.fc1.matmul"]["flops"] == 2 * 8 * 64 * 256
    # attention MatMuls (two activations) count as dense FLOPs: 4 heads of 16, seq 8
    assert rows["attn.qk"]["flops"] == 2 * (4 * 8) * 8 * 16 and rows["attn.qk"]["status"] == "ineligible"


def test_pattern_option_and_progressive_step():
    model = _pruned("transformer_block", pattern="3:4")
    rows34, s34, _ = _analyse(model, pattern="3:4")
    rows24, s24, _ = _analyse(model, pattern="2:4")
    assert s34["sparse"] == s34["eligible"] > 0
    assert s24["sparse"] == 0
    assert all(r["violations"] == r["groups"] for r in rows24.values() if r["status"] == "eligible")
    assert all(r["zeros"] == 0.25 for r in rows34.values() if r["status"] == "sparse")


def test_qdq_layers_and_int8_hints():
    model = _pruned("qdq_model")
    rows, _, _ = _analyse(model, {"x": (1, 16, 8, 8)})
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3", "fc4"):
        assert rows[name]["status"] == "sparse", (name, rows[name])
    assert rows["conv2"]["axis"] == 2  # [kh,kw,Cin,Cout] behind Transpose(3,2,0,1)
    assert rows["fc5"]["status"] == "ineligible" and "Reshape" in rows["fc5"]["reason"]
    assert rows["conv1"]["dtype"] == "int8" and rows["fc3"]["dtype"] == "float16"
    assert any("%32 (int8)" in h for h in rows["conv1"]["hints"])  # C_in=16 is not a multiple of 32
    assert not any("%16" in h for h in rows["fc3"]["hints"])  # fp16 fc3: K=48, N=32 are multiples of 16


def test_hints():
    rows, _, _ = _analyse(onnx.load(fixture_path("mlp_gemm")), {"x": (4, 32), "aux": (8, 16)})
    assert any("N=36" in h and "%16" in h for h in rows["fc1"]["hints"])
    assert any(h.startswith("small") for h in rows["fc0"]["hints"])
    assert any("M=4" in h for h in rows["fc0"]["hints"])
    assert rows["fc3"]["hints"] == []  # ineligible layers get a reason, not hints


def test_validate_does_not_modify():
    model = onnx.load(fixture_path("cnn"))
    before = model.SerializeToString()
    result = Pipeline([ValidatePass()]).run(Model(model), PassContext())
    assert not result.modified and result.model.proto.SerializeToString() == before


def test_gates_in_pipeline():
    model = onnx.load(fixture_path("cnn"))
    ctx = PassContext(shapes={"x": (1, 3, 32, 32)})
    # dense model, min-coverage: the pipeline stops at validate (prune after it never runs)
    with pytest.raises(GateFailure) as info:
        Pipeline("validate{min-coverage=0.5},prune").run(Model(copy_proto(model)), ctx)
    assert "below min-coverage 50.0%" in str(info.value)
    partial = info.value.result  # type: ignore[attr-defined]
    assert partial.results == [] and not partial.modified
    assert info.value.pass_result.report.details["gate"]["passed"] is False  # type: ignore[attr-defined]
    # prune then gate: passes
    result = Pipeline("prune,validate{min-coverage=0.9;require-all=true}").run(Model(copy_proto(model)), ctx)
    assert result.results[-1].report.details["gate"]["passed"]
    # require-all with one eligible layer left dense
    with pytest.raises(GateFailure) as info:
        Pipeline("prune{exclude=^down$},validate{require-all=true}").run(Model(copy_proto(model)), ctx)
    assert "1 eligible layer(s) are not 2:4: down" in str(info.value)
    # the coverage of that model is still high: a low threshold passes
    cov = Pipeline("prune{exclude=^down$},validate{min-coverage=0.5}").run(Model(copy_proto(model)), ctx)
    s = cov.results[-1].report.details["summary"]
    assert 0.5 < s["coverage"] < 1.0


def test_bad_options():
    for opts in ({"pattern": "2:2"}, {"min_coverage": 1.5}, {"min_coverage": -0.1}):
        with pytest.raises(OnnxSparseError):
            ValidateConfig(**opts)
    with pytest.raises(OnnxSparseError):
        Pipeline("validate{min-coverage=abc}")


def test_subgraph_layers():
    rows, summary, _ = _analyse(_pruned("if_model"))
    assert {"then.fc1", "else.fc2", "in.matmul"} <= set(rows)
    assert summary["sparse"] == summary["layers"] == 5
    assert rows["then.fc1"]["graph"] != "main"


# ------------------------------------------------------------------------------------ Polygraphy oracle


def _poly_sparse(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """(tensors Polygraphy's checker examines, those it reports 2:4), through its pure-Python checker."""
    from polygraphy.tools.sparse import SparsityPruner

    pruner = SparsityPruner(copy_proto(model))
    pruner.check()
    inits = {t.name: t for t in model.graph.initializer}
    examined = {
        p.name
        for p in pruner.prune_infos.values()
        if inits[p.name].data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and inits[p.name].dims[p.axis] % 4 == 0
    }
    return examined, set(pruner.sparse_tensors)


def _our_sparse(model: onnx.ModelProto) -> set[str]:
    rows, _, _ = _analyse(model)
    return {r["weight"] for r in rows.values() if r["status"] == "sparse"}


@POLY_WARNING
@pytest.mark.parametrize("name", ["cnn", "mlp_gemm", "transformer_block", "qdq_model"])
@pytest.mark.parametrize("state", ["dense", "pruned", "partly"])
def test_check_agrees_with_polygraphy(name, state):
    """On every tensor Polygraphy examines, it and we agree on which are 2:4 — dense, pruned, or partly
    pruned models. Known, explained exceptions: shared.weight in mlp_gemm (two Gemms with different K axes:
    we call it ineligible, Polygraphy checks the axis of whichever consumer it saw last)."""
    if state == "dense":
        model = onnx.load(fixture_path(name))
    elif state == "pruned":
        model = _pruned(name)
    else:
        model = _pruned(name, exclude="conv1|fc1|fc0|q_proj|ffn.fc2")
    examined, theirs = _poly_sparse(model)
    ours = _our_sparse(model)
    examined.discard("shared.weight")
    theirs.discard("shared.weight")
    if name == "qdq_model":
        # Polygraphy skips int8 tensors; the fp16 fc3 weight behind a Cast is the one it checks.
        assert examined == {"fc3.weight_fp16"}
    assert examined
    assert theirs & examined == ours & examined
    if state == "pruned":
        assert examined <= ours
    if state == "dense":
        assert not ours


@POLY_WARNING
def test_polygraphy_cli_agrees(tmp_path):
    """`polygraphy inspect sparsity` (its CLI, run as a subprocess; no TensorRT needed) on a partly pruned
    model names as sparse exactly the tensors `check` calls 2:4 among those it examines."""
    model = _pruned("cnn", exclude="^pw$|^head$")
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    poly = subprocess.run(
        [sys.executable, "-m", "polygraphy", "inspect", "sparsity", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if poly.returncode != 0 and "No module named polygraphy.__main__" in poly.stderr:
        exe = sys.executable.rsplit("/", 1)[0] + "/polygraphy"
        poly = subprocess.run([exe, "inspect", "sparsity", str(path)], capture_output=True, text=True, timeout=300)
    assert poly.returncode == 0, poly.stderr
    out = poly.stdout + poly.stderr
    sparse = set(re.findall(r"Found sparse tensor: (\S+)", out))
    dense = set(re.findall(r"Found non-sparse tensor: (\S+)", out))
    assert sparse and dense == {"pw.weight", "head.weight"}
    ours = _our_sparse(load_model(path).proto)
    assert sparse == ours & (sparse | dense)


@pytest.mark.slow
@POLY_WARNING
def test_real_models_prune_check_polygraphy(real_models, tmp_path):
    """ddddocr: prune, the result runs in ORT, check calls every eligible layer 2:4, Polygraphy agrees."""
    for name in ("common", "common_det"):
        model = load_model(real_models[name])
        result = Pipeline("prune,validate{require-all=true}").run(model, PassContext())
        pruned = result.model.proto
        _, summary, _ = _analyse(pruned)
        assert summary["sparse"] == summary["eligible"] > 0
        examined, theirs = _poly_sparse(pruned)
        assert examined and theirs & examined == _our_sparse(pruned) & examined
        feeds = make_feeds(pruned, dims={"image_width": 64})
        assert all(np.isfinite(o).all() for o in run_ort(pruned, feeds) if o.dtype.kind == "f")
