"""prune: the n:m mask function (property tests), the pass on fixtures and hand-built models (structure,
ORT numerics, full checker), every skip reason, dtypes, DQ/Transpose/Cast/Reshape chains, progressive
sparsity, masks, and Polygraphy 0.53 as an oracle."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import parse, parse_checked
from conftest import copy_proto, fixture_path, make_feeds, run_ort
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from onnxsparse.errors import OnnxSparseError
from onnxsparse.grammar import parse_pipeline
from onnxsparse.ir.graph import iter_graphs
from onnxsparse.ir.layers import find_layers
from onnxsparse.ir.model_io import Model, load_model, save_model
from onnxsparse.passes.prune import PROGRESSIVE, PruneConfig, PrunePass, load_masks
from onnxsparse.pipeline import PassContext, Pipeline
from onnxsparse.sparsity import count_violations, is_nm, nm_keep, parse_pattern

F = TensorProto.FLOAT
#: Polygraphy's pruner compares numpy floats with sys.float_info.max and numpy warns; not ours to fix.
POLY_WARNING = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


# ------------------------------------------------------------------------------------------------ helpers


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer and Constant tensor (all graphs) as arrays."""
    out = {}
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            out[t.name] = nh.to_array(t)
        for node in g.node:
            if node.op_type == "Constant":
                out[node.output[0]] = nh.to_array(node.attribute[0].t)
    return out


def _prune(model: onnx.ModelProto, ctx: PassContext | None = None, **options: object):
    result = Pipeline([PrunePass(**options)]).run(Model(copy_proto(model)), ctx or PassContext())
    return result.model.proto, result.results[0]


def _op_weights(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weight each main-graph layer actually sees (its input 1, after DQ/Transpose/Cast/Reshape), by
    running the model in ORT with those tensors exposed as outputs: independent of our axis mapping."""
    m = copy_proto(model)
    names = [n.input[1] for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    inits = {t.name for t in m.graph.initializer}
    wanted = [n for n in names if n not in inits]
    for name in wanted:
        m.graph.output.append(helper.make_tensor_value_info(name, F, None))  # weights are float here
    outs = run_ort(m, feeds)
    got = dict(zip([o.name for o in m.graph.output], outs, strict=True))
    arrays = _inits(model)
    return {
        n.name: (got[n.input[1]] if n.input[1] in got else arrays[n.input[1]])
        for n in m.graph.node
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
    }


def _mlp(w: np.ndarray) -> onnx.ModelProto:
    """x[b,K] @ W[K,N] → y, one MatMul; a weight that is not fp32 reaches it through a Cast."""
    k, n = w.shape
    cast = w.dtype != np.float32
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[b,{k}] x) => (float[b,{n}] y) {{
            {"W_f = Cast <to = 1> (W)" if cast else ""}
            [layer] y = MatMul (x, {"W_f" if cast else "W"})
        }}
    """
    return parse_checked(text, W=w)


# ------------------------------------------------------------------------------------------ mask function


@st.composite
def _mask_case(draw):
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    rank = draw(st.integers(1, 4))
    axis = draw(st.integers(0, rank - 1))
    shape = [draw(st.integers(1, 4)) for _ in range(rank)]
    shape[axis] = m * draw(st.integers(1, 3))
    # small integers make ties common, which is where determinism matters
    values = draw(hnp.arrays(np.float32, tuple(shape), elements=st.integers(-3, 3).map(float)))
    return values, axis, n, m


@settings(max_examples=300, deadline=None)
@given(_mask_case())
def test_nm_keep_properties(case):
    values, axis, n, m = case
    mag = np.abs(values)
    keep = nm_keep(mag, axis, n, m)
    assert keep.shape == values.shape and keep.dtype == np.bool_
    g_keep = np.moveaxis(keep, axis, -1).reshape(-1, m)
    g_mag = np.moveaxis(mag, axis, -1).reshape(-1, m)
    # exactly n kept per group, so at most n non-zeros after pruning
    assert (g_keep.sum(axis=1) == n).all()
    pruned = np.where(keep, values, 0)
    assert count_violations(pruned != 0, axis, n, m)[0] == 0
    # kept = largest magnitudes: every kept entry >= every dropped entry of its group
    kept_min = np.where(g_keep, g_mag, np.inf).min(axis=1)
    dropped_max = np.where(g_keep, -np.inf, g_mag).max(axis=1)
    assert (kept_min >= dropped_max).all()
    # deterministic ties: the same keep-set as a stable sort by decreasing magnitude (lower index wins)
    order = np.argsort(-g_mag, axis=1, kind="stable")[:, :n]
    ref = np.zeros_like(g_keep)
    np.put_along_axis(ref, order, True, axis=1)
    assert (g_keep == ref).all()
    # idempotent: pruning the pruned values again changes nothing
    again = np.where(nm_keep(np.abs(pruned), axis, n, m), pruned, 0)
    assert np.array_equal(again, pruned)


@settings(max_examples=100, deadline=None)
@given(_mask_case(), st.data())
def test_nm_keep_prefers_preferred(case, data):
    """Entries outside ``prefer`` are kept only when a group has fewer than n preferred entries."""
    values, axis, n, m = case
    prefer = data.draw(hnp.arrays(np.bool_, values.shape))
    keep = nm_keep(np.abs(values), axis, n, m, prefer=prefer)
    g_keep = np.moveaxis(keep, axis, -1).reshape(-1, m)
    g_pref = np.moveaxis(prefer, axis, -1).reshape(-1, m)
    kept_pref = (g_keep & g_pref).sum(axis=1)
    assert (kept_pref == np.minimum(g_pref.sum(axis=1), n)).all()


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern(" 3 : 4 ") == (3, 4)
    assert parse_pattern("1:8") == (1, 8)
    for bad in ("4:4", "0:4", "2-4", "5:4", "", "a:b"):
        with pytest.raises(OnnxSparseError):
            parse_pattern(bad)


def test_nm_keep_large_is_fast_enough():
    """Vectorised: a 4.7 M-element weight takes well under a second (a Python loop over groups takes minutes)."""
    import time

    w = np.random.default_rng(0).standard_normal((512, 1024, 3, 3)).astype(np.float32)
    t0 = time.perf_counter()
    keep = nm_keep(np.abs(w), 1, 2, 4)
    assert time.perf_counter() - t0 < 2.0
    assert is_nm(np.where(keep, w, 0), 1)


# ------------------------------------------------------------------------------------------- on fixtures


@pytest.mark.parametrize("name", ["cnn", "mlp_gemm", "transformer_block", "if_model", "loop_model", "qdq_model"])
def test_prune_fixture_structure_and_numerics(name):
    """Every pruned tensor is 2:4 along its layer's axis, nothing else changed, the model passes the full
    checker, runs in ORT, and gives exactly the outputs of the original with the masks applied by hand."""
    path = fixture_path(name)
    original = onnx.load(path)
    ctx = PassContext()
    pruned, result = _prune(original, ctx)
    onnx.checker.check_model(pruned, full_check=True)
    assert [n.op_type for n in pruned.graph.node] == [n.op_type for n in original.graph.node]
    before, after = _inits(original), _inits(pruned)
    masks = ctx.masks
    changed = {c["name"] for c in result.report.changed}
    assert result.modified == bool(changed)
    assert changed, f"nothing pruned in {name}"
    for layer in find_layers(pruned):
        w = layer.weight_name
        if w in changed:
            assert count_violations(after[w] != 0, layer.source_reduction_axis, 2, 4)[0] == 0
    for key in before:
        if key in changed:
            assert after[key].dtype == before[key].dtype
            assert after[key].shape == before[key].shape
            mask = masks[key]
            assert not after[key][~mask].any(), "a value outside the mask survived"
            if after[key].dtype.kind == "f":
                assert not np.signbit(after[key][~mask]).any(), "pruned entries must be +0.0, not -0.0"
            assert np.array_equal(after[key][mask], before[key][mask]), "a kept value changed"
        else:
            assert np.array_equal(after[key], before[key], equal_nan=True), f"{key} changed but is not reported"
    # ORT: the pruned model equals the original with masks applied by hand
    manual = copy_proto(original)
    for g in iter_graphs(manual.graph):
        for t in g.initializer:
            if t.name in changed:
                arr = nh.to_array(t)
                t.CopyFrom(nh.from_array(np.where(masks[t.name], arr, np.zeros((), arr.dtype)), t.name))
    for seed in (0, 1):
        for batch in (1, 3):
            feeds = make_feeds(pruned, dims={"batch": batch}, seed=seed)
            got, want = run_ort(pruned, feeds), run_ort(manual, feeds)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b)
                assert np.isfinite(a).all()


def test_prune_cnn_reasons_and_axes():
    pruned, result = _prune(onnx.load(fixture_path("cnn")))
    skipped = {s["name"]: s["reason"] for s in result.report.skipped}
    assert set(skipped) == {"stem", "dw"}
    assert "C_in/group=3 is not divisible by 4" in skipped["stem"]
    assert "C_in/group=1" in skipped["dw"]
    changed = {c["name"]: c for c in result.report.changed}
    assert changed["up.weight"]["axis"] == 0  # ConvTranspose reduces over C_in = axis 0
    assert changed["grouped.weight"]["axis"] == 1
    assert changed["head.weight"]["axis"] == 1  # Gemm transB=1
    after = _inits(pruned)
    assert is_nm(after["up.weight"], 0) and not is_nm(after["up.weight"], 1)
    assert all(abs(c["zeros"] - 0.5) < 1e-9 for c in changed.values())


def test_prune_mlp_skip_reasons():
    _, result = _prune(onnx.load(fixture_path("mlp_gemm")))
    skipped = {s["name"]: s["reason"] for s in result.report.skipped}
    assert "different axis" in skipped["fc3"] and "different axis" in skipped["fc4"]
    assert "computed at run time" in skipped["head"]
    assert {c["name"] for c in result.report.changed} == {
        "fc0.weight",
        "fc1.weight",
        "fc2.weight",
        "aux0.weight",
        "aux1.weight",
    }


def test_qdq_chains_prune_what_the_layer_sees():
    """int8 weights behind DQ (per-channel), a rank-4 Transpose (perm 3,2,0,1), Cast from fp16 and a Reshape
    that keeps K: the weight *as each layer sees it* (computed by ORT) is 2:4 along the layer's reduction axis."""
    original = onnx.load(fixture_path("qdq_model"))
    pruned, result = _prune(original)
    feeds = make_feeds(original, dims={"batch": 2})
    seen = _op_weights(pruned, feeds)
    axes = {"conv1": 1, "conv2": 1, "fc1": 0, "fc2": 0, "fc3": 0, "fc4": 0}
    for layer, axis in axes.items():
        assert is_nm(seen[layer], axis), layer
        assert not is_nm(_op_weights(original, feeds)[layer], axis), layer  # it really was dense before
    assert not is_nm(seen["fc5"], 0)  # ineligible: Reshape loses K
    skipped = {s["name"]: s["reason"] for s in result.report.skipped}
    assert set(skipped) == {"fc5"} and "Reshape" in skipped["fc5"]
    dtypes = {c["name"]: c["dtype"] for c in result.report.changed}
    assert dtypes["conv1.weight.q"] == "int8" and dtypes["fc3.weight_fp16"] == "float16"
    assert _inits(pruned)["conv1.weight.q"].dtype == np.int8


def test_dq_ranks_by_q_times_scale_and_prunes_to_zero_point():
    """Per-K-channel scales: |q*scale| decides, not |q|; pruned entries become the zero point (value exactly 0)."""
    q = np.array([[100, 10, 10, 100], [1, 2, 3, 4]], dtype=np.int8).T.copy()  # [K=4, N=2]
    q[:, 1] = [-3, 5, 9, -7]
    scale = np.array([0.001, 1.0, 1.0, 0.001], dtype=np.float32)  # per-axis on K (axis 0)
    zp = np.array([0, 0, 0, 0], dtype=np.int8)
    text = """
        <ir_version: 9, opset_import: ["" : 19]>
        g (float[b,4] x) => (float[b,2] y) {
            W = DequantizeLinear <axis = 0> (Wq, s, zp)
            [layer] y = MatMul (x, W)
        }
    """
    model = parse_checked(text, Wq=q, s=scale, zp=zp)
    pruned, _ = _prune(model)
    got = _inits(pruned)["Wq"]
    # column 0: |q*s| = [0.1, 10, 10, 0.1] → keep rows 1, 2 although |q| is largest in rows 0, 3
    assert got[:, 0].tolist() == [0, 10, 10, 0]
    assert got[:, 1].tolist() == [0, 5, 9, 0]


def test_dq_nonzero_zero_point_uint8():
    rng = np.random.default_rng(3)
    q = rng.integers(0, 255, (8, 4)).astype(np.uint8)
    zp = np.array([128, 120, 130, 127], dtype=np.uint8)  # per output channel (axis 1)
    scale = np.array([0.1, 0.2, 0.05, 0.3], dtype=np.float32)
    text = """
        <ir_version: 9, opset_import: ["" : 19]>
        g (float[b,8] x) => (float[b,4] y) {
            W = DequantizeLinear <axis = 1> (Wq, s, zp)
            [layer] y = MatMul (x, W)
        }
    """
    model = parse_checked(text, Wq=q, s=scale, zp=zp)
    pruned, _ = _prune(model)
    seen = _op_weights(pruned, {"x": np.ones((1, 8), np.float32)})["layer"]
    assert is_nm(seen, 0)
    deq = (q.astype(np.float32) - zp) * scale
    np.testing.assert_array_equal(np.where(seen != 0, deq, 0), seen)  # kept entries are the original values
    expected = np.where(nm_keep(np.abs(deq), 0, 2, 4), deq, 0)
    np.testing.assert_allclose(seen, expected)


def test_dq_blocked_scale_and_per_axis_after_transpose():
    """opset 21 blocked DequantizeLinear (block_size along K): scales broadcast per block. A per-axis DQ that
    follows a Transpose of the stored integers is skipped with a reason (its axis is not the stored one)."""
    rng = np.random.default_rng(4)
    q = rng.integers(-127, 128, (8, 4)).astype(np.int8)
    scale = rng.uniform(0.01, 1.0, (2, 4)).astype(np.float32)  # blocks of 4 along K (axis 0)
    text = """
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[b,8] x) => (float[b,8] z) {
            W = DequantizeLinear <axis = 0, block_size = 4> (Wq, s)
            [layer] y = MatMul (x, W)
            Vt = Transpose <perm = [1, 0]> (Vq)
            V = DequantizeLinear <axis = 1> (Vt, vs)
            [after_transpose] z = MatMul (y, V)
        }
    """
    vq = rng.integers(-127, 128, (8, 4)).astype(np.int8)
    model = parse_checked(text, Wq=q, s=scale, Vq=vq, vs=np.full(8, 0.1, np.float32))
    pruned, result = _prune(model)
    deq = q.astype(np.float32) * np.repeat(scale, 4, axis=0)
    seen = _op_weights(pruned, {"x": np.ones((1, 8), np.float32)})["layer"]
    np.testing.assert_array_equal(seen, np.where(nm_keep(np.abs(deq), 0, 2, 4), deq, 0))
    reasons = {s["name"]: s["reason"] for s in result.report.skipped}
    assert (
        set(reasons) == {"after_transpose"}
        and "per-axis DequantizeLinear follows a Transpose" in reasons["after_transpose"]
    )


def test_skip_weight_that_is_a_graph_output():
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[8,8] x) => (float[8,8] y, float[8,8] W_out) {
            W_out = Identity (W)
            [mm] y = MatMul (x, W)
        }
    """
    _, result = _prune(parse_checked(text, W=w))
    assert not result.modified and "also feeds Identity" in result.report.skipped[0]["reason"]
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[8,8] x) => (float[8,8] y, float[8,8] W) {
            [mm] y = MatMul (x, W)
        }
    """
    _, result = _prune(parse_checked(text, W=w))
    assert not result.modified and "also feeds graph output W" in result.report.skipped[0]["reason"]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, "bfloat16"])
def test_dtypes_kept(dtype):
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    w = np.random.default_rng(1).standard_normal((16, 8)).astype(np_dtype)
    model = _mlp(w)
    pruned, result = _prune(model)
    t = pruned.graph.initializer[0]
    assert t.data_type == model.graph.initializer[0].data_type
    got = nh.to_array(t)
    assert got.dtype == w.dtype
    assert is_nm(got.astype(np.float32), 0)
    kept = got.astype(np.float32) != 0
    assert not np.signbit(got.astype(np.float32)[~kept]).any()  # +0.0 bits, also for bf16/fp16
    np.testing.assert_array_equal(got.astype(np.float32)[kept], w.astype(np.float32)[kept])
    assert result.report.changed[0]["dtype"] == ("bfloat16" if dtype == "bfloat16" else np.dtype(dtype).name)
    if dtype != "bfloat16":  # ORT's CPU provider has no bf16 Cast kernel
        x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
        (y,) = run_ort(pruned, {"x": x})
        np.testing.assert_allclose(y, x @ got.astype(np.float32), rtol=1e-5, atol=1e-5)


def test_rank3_transpose_constant_node_and_reshape():
    """A Constant-node weight [kh,kw,Cin,Cout] through Transpose(3,2,0,1) into a Conv; a Reshape [K,N/4,4]→[K,N]."""
    rng = np.random.default_rng(5)
    w_hwio = rng.standard_normal((3, 3, 8, 12)).astype(np.float32)
    w_r = rng.standard_normal((8, 3, 4)).astype(np.float32)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[b,8,6,6] x) => (float[b,12] y) {
            Wt = Transpose <perm = [3, 2, 0, 1]> (Wc)
            [conv] c = Conv <pads = [1, 1, 1, 1]> (x, Wt)
            p = GlobalAveragePool (c)
            f = Flatten (p)
            f8 = Slice (f, st, en, ax)
            Wm = Reshape (Wr, shape)
            [mm] y = MatMul (f8, Wm)
        }
    """
    i64 = np.int64
    model = parse(
        text, Wr=w_r, shape=np.array([8, 12], i64), st=np.array([0], i64), en=np.array([8], i64), ax=np.array([1], i64)
    )
    # the text format writes a Constant's tensor only as a literal: this one comes from numpy
    model.graph.node.insert(0, helper.make_node("Constant", [], ["Wc"], value=nh.from_array(w_hwio, "Wc_value")))
    onnx.checker.check_model(model, full_check=True)
    pruned, result = _prune(model)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 8, 6, 6)).astype(np.float32)}
    seen = _op_weights(pruned, feeds)
    assert is_nm(seen["conv"], 1) and is_nm(seen["mm"], 0)
    changed = {c["name"]: c["axis"] for c in result.report.changed}
    assert changed == {"Wc": 2, "Wr": 0}
    const = next(n for n in pruned.graph.node if n.op_type == "Constant")
    assert is_nm(nh.to_array(const.attribute[0].t), 2)
    onnx.checker.check_model(pruned, full_check=True)


# ----------------------------------------------------------------------------------------- skip reasons


def test_skip_options():
    model = onnx.load(fixture_path("cnn"))
    _, r = _prune(model, exclude="^block1")
    assert {s["name"] for s in r.report.skipped if "excluded" in s["reason"]} == {"block1.conv1", "block1.conv2"}
    _, r = _prune(model, include=r"down\.weight")  # matches the weight name
    assert [c["name"] for c in r.report.changed] == ["down.weight"]
    _, r = _prune(model, op_types=("ConvTranspose",))
    assert [c["name"] for c in r.report.changed] == ["up.weight"]
    assert any("op-types" in s["reason"] for s in r.report.skipped)
    _, r = _prune(model, min_params=16 * 16 * 9 + 1)  # only down.weight [32,16,3,3] has more
    assert {c["name"] for c in r.report.changed} == {"down.weight"}
    assert any("min-params" in s["reason"] for s in r.report.skipped)
    _, r = _prune(model, min_channels=16)  # grouped has C_in/group 8, head C_out 12
    assert {c["name"] for c in r.report.changed} == {
        "block1.conv1.weight",
        "block1.conv2.weight",
        "pw.weight",
        "up.weight",
        "down.weight",
    }
    assert any("min-channels" in s["reason"] for s in r.report.skipped)


def test_skip_weight_with_other_readers_and_graph_input():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[8,8] x, float[8,8] G) => (float[8,8] y, float[8,8] z) {
            [mm] h = MatMul (x, W)
            [uses_w] y = Add (h, W)
            [mm_input] z = MatMul (x, G)
        }
    """
    model = parse_checked(text, W=w)
    pruned, r = _prune(model)
    reasons = {s["name"]: s["reason"] for s in r.report.skipped}
    assert "also feeds Add 'uses_w'" in reasons["mm"]
    assert "graph input" in reasons["mm_input"]
    assert not r.modified
    assert pruned.graph.initializer[0] == model.graph.initializer[0]


def test_skip_unsupported_weights():
    """float8 storage, an integer MatMul weight without a DequantizeLinear, a DQ whose scale is an input."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    w8 = rng.standard_normal((8, 8)).astype(ml_dtypes.float8_e4m3fn)
    text = """
        <ir_version: 9, opset_import: ["" : 19]>
        g (float[2,8] x, int32[2,8] xi, float scale_in) => (float[2,8] h, int32[2,8] hi, float[2,8] hq) {
            W8f = Cast <to = 1> (W8)
            [fp8] h = MatMul (x, W8f)
            [int32] hi = MatMul (xi, Wi)
            Wd = DequantizeLinear (Wq, scale_in)
            [dyn_scale] hq = MatMul (x, Wd)
        }
    """
    wi = rng.integers(-5, 5, (8, 8)).astype(np.int32)
    model = parse_checked(text, W8=w8, Wi=wi, Wq=rng.integers(-5, 5, (8, 8)).astype(np.int8))
    _, result = _prune(model)
    reasons = {s["name"]: s["reason"] for s in result.report.skipped}
    assert "unsupported type FLOAT8E4M3FN" in reasons["fp8"]
    assert "does not reach the layer through a DequantizeLinear" in reasons["int32"]
    assert "non-constant scale" in reasons["dyn_scale"]
    assert not result.modified


def test_skip_shared_with_excluded_layer_and_prunes_shared_same_axis():
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[n,8] x) => (float[n,8] y) {
            [a] h = MatMul (x, W)
            [b] y = MatMul (h, W)
        }
    """
    model = parse_checked(text, W=w)
    pruned, r = _prune(model)
    assert [c["layers"] for c in r.report.changed] == [["a", "b"]]
    assert is_nm(nh.to_array(pruned.graph.initializer[0]), 0)
    _, r = _prune(model, exclude="^b$")
    assert not r.modified and {s["name"] for s in r.report.skipped} == {"a", "b"}
    assert all("excluded" in s["reason"] for s in r.report.skipped)


def test_bad_options():
    for opts in ({"pattern": "4:2"}, {"include": "("}, {"op_types": ("Relu",)}, {"min_params": -1}):
        with pytest.raises(OnnxSparseError):
            PrunePass(**opts)
    with pytest.raises(OnnxSparseError):
        parse_pipeline("prune{pattern=2;4}")
    (p,) = parse_pipeline("prune{pattern=3:4;exclude='head.*';op-types=Conv,Gemm;min-channels=8}")
    assert p.config == PruneConfig(pattern="3:4", exclude="head.*", op_types=("Conv", "Gemm"), min_channels=8)
    assert parse_pipeline(p.text())[0].config == p.config


def test_masks_bad_path(tmp_path):
    model = onnx.load(fixture_path("cnn"))
    with pytest.raises(OnnxSparseError):
        _prune(model, masks=str(tmp_path / "nope" / "m.npz"))
    with pytest.raises(OnnxSparseError):
        _prune(model, masks=str(tmp_path / "m.txt"))


# ---------------------------------------------------------------------------------- honesty, progressive


def test_already_sparse_is_untouched_and_unmodified():
    model = onnx.load(fixture_path("transformer_block"))
    once, r1 = _prune(model)
    assert r1.modified
    ctx = PassContext()
    twice, r2 = _prune(once, ctx)
    assert not r2.modified and not r2.report.changed
    assert len(r2.report.details["already_sparse"]) == len(r1.report.changed)
    assert [t.SerializeToString() for t in twice.graph.initializer] == [
        t.SerializeToString() for t in once.graph.initializer
    ]
    for name, mask in ctx.masks.items():  # masks still given, and they describe the weights
        assert np.array_equal(mask, _inits(twice)[name] != 0)


def test_masks_file_and_artifacts(tmp_path):
    path = tmp_path / "m.npz"
    ctx = PassContext()
    pruned, r = _prune(onnx.load(fixture_path("cnn")), ctx, masks=str(path))
    masks = load_masks(path)
    assert set(masks) == {c["name"] for c in r.report.changed} == set(ctx.masks)
    after = _inits(pruned)
    for name, mask in masks.items():
        assert mask.dtype == np.bool_ and mask.shape == after[name].shape
        assert np.array_equal(mask, ctx.masks[name])
        assert np.array_equal(mask, after[name] != 0)  # True = kept (non-zero)
    assert not list(tmp_path.glob(".m.npz*"))  # no temp file left behind


def test_progressive_3_4_then_2_4_keeps_every_zero():
    """3:4, then a fake fine-tune that changes every surviving weight (so magnitudes reorder), then 2:4:
    every zero of the first step is still zero, and the result is 2:4."""
    model = onnx.load(fixture_path("transformer_block"))
    step1, _ = _prune(model, pattern="3:4")
    rng = np.random.default_rng(7)
    for t in step1.graph.initializer:
        a = nh.to_array(t)
        if a.ndim == 2:
            t.CopyFrom(nh.from_array((a * rng.uniform(0.01, 3.0, a.shape)).astype(a.dtype), t.name))
    zeros1 = {k: v == 0 for k, v in _inits(step1).items() if v.ndim == 2}
    step2, r = _prune(step1, pattern="2:4")
    after = _inits(step2)
    for name, z in zeros1.items():
        assert not after[name][z].any(), name
        assert is_nm(after[name], 0), name
    assert r.modified


def test_progressive_respects_previous_masks_in_pipeline():
    """In one pipeline the 2:4 keep-set is chosen inside the 3:4 mask left in ctx.masks, even when a
    (mask-ignoring) step in between made masked-out entries non-zero again."""
    w = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    model = _mlp(w)
    ctx = PassContext()
    step1, _ = _prune(model, ctx, pattern="3:4")
    mask34 = ctx.masks["W"].copy()
    t = step1.graph.initializer[0]
    revived = np.where(mask34, nh.to_array(t), 100.0).astype(np.float32)  # larger than every kept value
    t.CopyFrom(nh.from_array(revived, "W"))
    step2, _ = _prune(step1, ctx, pattern="2:4")
    mask24 = ctx.masks["W"]
    assert not (mask24 & ~mask34).any()
    assert is_nm(nh.to_array(step2.graph.initializer[0]), 0)


def test_progressive_preset():
    """The documented recipe: prune 3:4, fine-tune, prune 2:4, fine-tune, validate — each item parses."""
    from onnxsparse.grammar import _split_top, registry

    items = [item.strip() for item in _split_top(PROGRESSIVE, ",")]
    assert [i.split("{")[0] for i in items] == ["prune", "finetune", "prune", "finetune", "validate"]
    known = registry()
    passes = [parse_pipeline(i)[0] for i in items if i.split("{")[0] in known]
    prunes = [p for p in passes if isinstance(p, PrunePass)]
    assert [p.config.pattern for p in prunes] == ["3:4", "2:4"]


def test_external_data_model(tmp_path):
    """A model with external data (memory-mapped read-only) is pruned; the input files are not modified."""
    src = tmp_path / "in.onnx"
    save_model(Model(onnx.load(fixture_path("transformer_block"))), src, external_data=True)
    data_before = (tmp_path / "in.onnx.data").read_bytes()
    m = load_model(src)
    result = Pipeline([PrunePass()]).run(m, PassContext())
    out = save_model(result.model, tmp_path / "out.onnx", external_data=True)
    assert (tmp_path / "in.onnx.data").read_bytes() == data_before
    reloaded = onnx.load(out)
    for t in reloaded.graph.initializer:
        a = nh.to_array(t)
        if a.ndim == 2:
            assert is_nm(a, 0), t.name


# ------------------------------------------------------------------------------------ Polygraphy oracle


def _polygraphy_check(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """(tensors Polygraphy examines, tensors it finds 2:4). Pure Python: no TensorRT import is needed."""
    import sys

    from polygraphy.tools.sparse import SparsityPruner

    pruner = SparsityPruner(copy_proto(model))
    pruner.check()
    assert "tensorrt" not in sys.modules
    examined = {
        p.name
        for p in pruner.prune_infos.values()
        if model_tensor(model, p.name).data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
        and model_tensor(model, p.name).dims[p.axis] % 4 == 0
    }
    return examined, set(pruner.sparse_tensors)


def model_tensor(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


@POLY_WARNING
@pytest.mark.parametrize("name", ["cnn", "mlp_gemm", "transformer_block"])
def test_polygraphy_oracle_agrees(name):
    """Our pruned models pass Polygraphy's sparsity inspection for every tensor it examines, and for random
    (tie-free) weights Polygraphy's own `surgeon prune` produces byte-identical tensors for those layers."""
    from polygraphy.tools.sparse import SparsityPruner

    model = onnx.load(fixture_path(name))
    ours, result = _prune(model)
    examined, sparse = _polygraphy_check(ours)
    if name == "mlp_gemm":
        # shared.weight feeds fc3 (transB=0, K = axis 0) and fc4 (transB=1, K = axis 1). No tensor can be
        # 2:4 along both, so we skip it; Polygraphy keeps whichever consumer it saw last (fc4, axis 1).
        assert examined - sparse == {"shared.weight"}
        polys = SparsityPruner(copy_proto(model)).prune()
        shared = next(nh.to_array(t) for t in polys.graph.initializer if t.name == "shared.weight")
        assert is_nm(shared, 1) and not is_nm(shared, 0)  # fc3 still sees a dense weight
        examined.discard("shared.weight")
    assert examined and sparse >= examined
    # Polygraphy prunes the same layers the same way (it skips ConvTranspose, which it does not know)
    theirs = SparsityPruner(copy_proto(model)).prune()
    a, b = _inits(ours), {t.name: nh.to_array(t) for t in theirs.graph.initializer}
    changed = {c["name"] for c in result.report.changed}
    assert examined <= changed
    for tensor in examined:
        np.testing.assert_array_equal(a[tensor], b[tensor])
    if name == "cnn":
        assert changed - examined == {"up.weight"}  # ConvTranspose: Polygraphy does not handle it


@POLY_WARNING
def test_polygraphy_rank3_perm_disagreement_is_its_bug():
    """A float weight [kh,kw,Cin,Cout] → Transpose(3,2,0,1) → Conv. The layer reduces over Cin = stored axis
    perm[1] = 2; Polygraphy maps the axis with ``perm.index(1)`` = 3 (Cout), so it calls our (correct) result
    non-sparse. We assert that this is the only tensor where it disagrees, that ORT shows the weight the Conv
    sees is 2:4 along C_in, and that Polygraphy's own result is 2:4 along the wrong axis."""
    from polygraphy.tools.sparse import SparsityPruner

    rng = np.random.default_rng(11)
    w_hwio = rng.standard_normal((3, 3, 8, 16)).astype(np.float32)
    w_fc = rng.standard_normal((16, 8)).astype(np.float32)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[b,8,5,5] x) => (float[b,8] y) {
            W_oihw = Transpose <perm = [3, 2, 0, 1]> (W_hwio)
            [conv] c = Conv <pads = [1, 1, 1, 1]> (x, W_oihw)
            p = GlobalAveragePool (c)
            f = Flatten (p)
            [fc] y = Gemm (f, W_fc)
        }
    """
    model = parse_checked(text, W_hwio=w_hwio, W_fc=w_fc)
    ours, _ = _prune(model)
    examined, sparse = _polygraphy_check(ours)
    assert examined - sparse == {"W_hwio"}  # the one disagreement ...
    pruner = SparsityPruner(copy_proto(ours))
    pruner.check()
    assert pruner.prune_infos["W_hwio"].axis == 3  # ... comes from perm.index(1) = 3 instead of perm[1] = 2
    feeds = {"x": rng.standard_normal((1, 8, 5, 5)).astype(np.float32)}
    assert is_nm(_op_weights(ours, feeds)["conv"], 1)  # the Conv's weight really is 2:4 along C_in
    theirs = SparsityPruner(copy_proto(model)).prune()
    seen = _op_weights(theirs, feeds)["conv"]
    assert not is_nm(seen, 1) and is_nm(nh.to_array(theirs.graph.initializer[0]), 3)


def test_bench_model_is_yolo_sized_and_prunes_fully():
    """tools/bench_prune.py's generated model: 60+ Convs, ~3 M params, channels multiples of 4; every Conv but
    the 3-channel stem is pruned to 2:4 (keeps the benchmark honest about what it measures)."""
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("bench_prune", REPO_ROOT / "tools" / "bench_prune.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = bench.make_yolo_like()
    convs = [t for t in model.graph.initializer if len(t.dims) == 4]
    assert len(convs) >= 60
    assert 2.5e6 < sum(int(np.prod(t.dims)) for t in convs) < 3.5e6
    assert all(t.dims[0] % 4 == 0 and (t.dims[1] % 4 == 0 or t.dims[1] == 3) for t in convs)
    _, result = _prune(model)
    assert len(result.report.changed) == len(convs) - 1
    assert [s["reason"] for s in result.report.skipped] == ["C_in/group=3 is not divisible by 4"]
