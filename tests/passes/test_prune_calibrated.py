"""prune{method=wanda|sparsegpt}: calibrated pruning end to end on small generated models and the fixtures.

Random weights prove structure only (exact n:m, valid models, finite ORT outputs, the right statistics); the
accuracy comparison on correlated inputs checks the solvers' objective through the whole pass. Accuracy on a
trained model is measured by /work/coord's benchmark, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import if_model, parse_checked, rand
from click.testing import CliRunner
from conftest import copy_proto, fixture_path, make_feeds, run_ort
from onnx import numpy_helper as nh

from onnxsparse.cli import main
from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.layers import find_layers
from onnxsparse.ir.model_io import Model, load_model, save_model
from onnxsparse.ir.tensors import to_array
from onnxsparse.pipeline import PassContext, Pipeline
from onnxsparse.pruning import collect_stats, prune_layer
from onnxsparse.pruning.plan import Plan, read_plan, write_plan
from onnxsparse.pruning.runner import stages
from onnxsparse.sparsity import constants_by_name, is_nm, stored_weight


def _mlp(seed: int = 0, k: int = 32, hidden: int = 48, out: int = 16) -> onnx.ModelProto:
    """x[batch, K] -> MatMul+Add -> Relu -> Gemm(transB, C) -> Relu -> MatMul -> y."""
    rng = np.random.default_rng(seed)
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[batch,{k}] x) => (float[batch,{out}] y) {{
            [fc1] m1 = MatMul (x, W1)
            a1 = Add (m1, b1)
            r1 = Relu (a1)
            [fc2] g2 = Gemm <transB = 1> (r1, W2, b2)
            r2 = Relu (g2)
            [fc3] y = MatMul (r2, W3)
        }}
    """
    arrays = {
        "W1": rand(rng, k, hidden) / np.sqrt(k),
        "b1": rand(rng, hidden) * 0.1,
        "W2": rand(rng, hidden, hidden) / np.sqrt(hidden),
        "b2": rand(rng, hidden) * 0.1,
        "W3": rand(rng, hidden, out),
    }
    return parse_checked(text, **{name: v.astype(np.float32) for name, v in arrays.items()})


def _correlated(rows: int, k: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).standard_normal((k, k)) * 0.6  # one distribution for calib and test
    scale = np.random.default_rng(98).uniform(0.05, 3.0, size=k)
    return ((rng.standard_normal((rows, k)) @ mix + 0.3 * rng.standard_normal((rows, k))) * scale).astype(np.float32)


def _prune(proto: onnx.ModelProto, text: str, data: object = None, base_dir: Path | None = None) -> tuple[Model, dict]:
    model = Model(copy_proto(proto), base_dir=base_dir)
    result = Pipeline(text).run(model, PassContext(calibration=data), check=True)
    return result.model, result.results[0].report.to_dict()


def _weights(model: Model) -> dict[str, np.ndarray]:
    return {t.name: np.array(to_array(t, model)) for t in model.proto.graph.initializer}


def _assert_nm(model: Model, n: int = 2, m: int = 4) -> None:
    consts = constants_by_name(model.proto)
    for layer in find_layers(model.proto):
        sw = stored_weight(layer, consts, model)
        if isinstance(sw, str) or layer.check_pattern(m):
            continue
        assert is_nm(sw.values if sw.zp is None else sw.values.astype(np.int32) - sw.zp, sw.axis, n, m), layer.name


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_sparsegpt_beats_wanda_beats_magnitude_on_held_out_correlated_inputs() -> None:
    proto = _mlp()
    calib, test = {"x": _correlated(512)}, {"x": _correlated(256, seed=1)}
    dense = run_ort(proto, test)[0]
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model, rep = _prune(proto, f"prune{{method={method}}},validate{{require-all=true}}", calib)
        out = run_ort(model, test)[0]
        assert np.isfinite(out).all()
        onnx.checker.check_model(model.proto, full_check=True)
        _assert_nm(model)
        errs[method] = _rel(out, dense)
        assert rep["details"]["method"] == method and rep["details"]["pruned"] == 3
        assert {c["method"] for c in rep["changed"]} == {method}
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], errs


def test_sequential_uses_the_pruned_upstream_and_one_pass_the_dense_model() -> None:
    proto = _mlp(seed=3)
    calib = {"x": _correlated(400)}
    seq, rep_seq = _prune(proto, "prune{method=sparsegpt;dense-target=false}", calib)
    one, rep_one = _prune(proto, "prune{method=sparsegpt;sequential=false}", calib)
    assert (rep_seq["details"]["calibration"]["stages"], rep_seq["details"]["calibration"]["ort_passes"]) == (3, 3)
    _, rep_default = _prune(proto, "prune{method=sparsegpt}", calib)
    assert rep_default["details"]["calibration"]["dense_target"]  # on by default
    assert (rep_one["details"]["calibration"]["stages"], rep_one["details"]["calibration"]["ort_passes"]) == (1, 1)
    ws, wo = _weights(seq), _weights(one)
    np.testing.assert_array_equal(ws["W1"], wo["W1"])  # the first layer sees the same inputs either way
    assert not np.array_equal(ws["W2"], wo["W2"])
    # sequential's fc2 is exactly: statistics from the model with only fc1 pruned, then prune_layer
    partial = Model(copy_proto(proto))
    w1 = next(t for t in partial.proto.graph.initializer if t.name == "W1")
    w1.CopyFrom(nh.from_array(ws["W1"], "W1"))
    b1 = next(t for t in partial.proto.graph.initializer if t.name == "b1")
    b1.CopyFrom(nh.from_array(ws["b1"], "b1"))
    fc2 = next(lay for lay in find_layers(partial.proto) if lay.name == "fc2")
    stats = collect_stats(partial, [fc2], calib)
    prune_layer(partial, fc2, stats["fc2"], "sparsegpt", 2, 4, bias_correction=True, refit_iters=20)
    np.testing.assert_array_equal(_weights(partial)["W2"], ws["W2"])


def test_q_k_v_of_the_transformer_block_share_one_stage() -> None:
    model = load_model(fixture_path("transformer_block"))
    layers = [lay for lay in find_layers(model.proto) if lay.source is not None]
    groups = stages(model, layers)
    names = [sorted(lay.name for lay in g) for g in groups]
    assert len(groups) == 4 and len(names[0]) == 3, names
    x = make_feeds(model.proto, {"batch": 8, "seq": 8})
    pruned, rep = _prune(model.proto, "prune{method=sparsegpt},validate{require-all=true}", x, model.base_dir)
    assert rep["details"]["calibration"]["ort_passes"] == 7  # 4 stages; stages 2-4 also run the dense model
    assert np.isfinite(run_ort(pruned, make_feeds(pruned.proto, seed=4))[0]).all()


def test_bias_correction_keeps_the_mean_output_of_a_layer() -> None:
    proto = _mlp(seed=5)
    calib = {"x": _correlated(300)}
    dense = Model(copy_proto(proto))
    fc1 = next(lay for lay in find_layers(dense.proto) if lay.name == "fc1")
    mean_dense = (calib["x"].astype(np.float64) @ _weights(dense)["W1"] + _weights(dense)["b1"]).mean(axis=0)
    stats = collect_stats(dense, [fc1], calib)
    out = prune_layer(dense, fc1, stats["fc1"], "sparsegpt", 2, 4, bias_correction=True)
    assert out.bias == "b1" and 0 < out.error < 1
    w = _weights(dense)
    np.testing.assert_allclose((calib["x"].astype(np.float64) @ w["W1"] + w["b1"]).mean(axis=0), mean_dense, atol=1e-4)
    before = copy_proto(proto).graph.initializer
    out.undo()  # sensitivity's one-layer-at-a-time scans rely on this
    assert [t.SerializeToString() for t in dense.proto.graph.initializer] == [t.SerializeToString() for t in before]


def test_mask_input_leaves_padded_tokens_out_of_the_statistics() -> None:
    rng = np.random.default_rng(0)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[b,s,8] x, float[b,1,1,s] mask) => (float[b,s,4] y, float[b,1,1,s] mask_out) {
            [proj] y = MatMul (x, W)
            mask_out = Identity (mask)
        }
    """
    proto = parse_checked(text, W=rand(rng, 8, 4))
    x = rand(rng, 6, 5, 8)
    valid = rng.random((6, 5)) > 0.4
    model = Model(proto)
    layer = find_layers(proto)[0]
    for mask in (valid.astype(np.float32), np.where(valid, 0.0, -30.0).astype(np.float32)):  # 0/1 and additive
        stats = collect_stats(model, [layer], {"x": x, "mask": mask[:, None, None, :]}, mask_input="mask")["proj"]
        rows = x[valid].astype(np.float64)
        np.testing.assert_allclose(stats.gram(), rows.T @ rows, rtol=1e-10)
        assert stats.samples == valid.sum()
    with pytest.raises(OnnxSparseError, match="not a model input"):
        collect_stats(model, [layer], {"x": x, "mask": valid[:, None, None, :].astype(np.float32)}, mask_input="m")
    with pytest.raises(OnnxSparseError, match="0/1"):
        collect_stats(model, [layer], {"x": x, "mask": np.full((6, 1, 1, 5), 2.0, np.float32)}, mask_input="mask")


def test_progressive_3_4_then_2_4_keeps_every_earlier_zero() -> None:
    proto = _mlp(seed=2)
    calib = {"x": _correlated(300)}
    model = Model(copy_proto(proto))
    ctx = PassContext(calibration=calib)
    Pipeline("prune{pattern=3:4;method=sparsegpt}").run(model, ctx, check=False)
    w34 = _weights(model)
    Pipeline("prune{pattern=2:4;method=sparsegpt}").run(model, ctx, check=False)
    w24 = _weights(model)
    for name in ("W1", "W2", "W3"):
        assert np.all(w24[name][w34[name] == 0] == 0), name
    _assert_nm(model)
    assert np.isfinite(run_ort(model, {"x": _correlated(16, seed=3)})[0]).all()


def test_qdq_model_keeps_int8_weights_with_zero_points_and_scales() -> None:
    path = fixture_path("qdq_model")
    model = load_model(path)
    feeds = make_feeds(model.proto, {"batch": 16})
    before = {t.name: nh.to_array(t) for t in model.proto.graph.initializer}
    pruned, rep = _prune(model.proto, "prune{method=sparsegpt},validate{require-all=true}", feeds, model.base_dir)
    after = _weights(pruned)
    assert rep["changed"]
    changed = {c["name"] for c in rep["changed"]}
    assert {after[name].dtype for name in changed} >= {np.dtype(np.int8)}
    for name in changed:
        assert after[name].dtype == before[name].dtype
    biases = {c["bias_corrected"] for c in rep["changed"]} - {None}
    assert biases
    for name, value in before.items():
        if name not in changed | biases and value.dtype.kind == "f":  # scales stay as they were
            np.testing.assert_array_equal(after[name], value)
    _assert_nm(pruned)
    assert np.isfinite(run_ort(pruned, make_feeds(pruned.proto, {"batch": 2}, seed=1))[0]).all()


def test_conv_fixture_with_sparsegpt_is_valid_and_runs(tmp_path: Path) -> None:
    model = load_model(fixture_path("cnn"))
    feeds = make_feeds(model.proto, {"batch": 4})
    pruned, rep = _prune(model.proto, "prune{method=sparsegpt;refit=5},validate", feeds, model.base_dir)
    assert rep["changed"] and all(c["method"] == "sparsegpt" for c in rep["changed"])
    _assert_nm(pruned)
    out = save_model(pruned, tmp_path / "cnn_sparse.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    assert all(np.isfinite(o).all() for o in run_ort(out, make_feeds(pruned.proto, {"batch": 2}, seed=2)))


def test_external_data_weights_are_read_and_spilled(tmp_path: Path) -> None:
    proto = _mlp(seed=4, k=64, hidden=256)
    src = save_model(Model(copy_proto(proto)), tmp_path / "ext.onnx", external_data=True)
    model = load_model(src)
    data_before = (tmp_path / "ext.onnx.data").read_bytes()
    calib = {"x": _correlated(200, k=64)}
    pruned, _ = _prune(model.proto, "prune{method=sparsegpt}", calib, model.base_dir)
    out = save_model(pruned, tmp_path / "out.onnx")
    assert (tmp_path / "ext.onnx.data").read_bytes() == data_before
    reloaded = load_model(out)
    _assert_nm(reloaded)
    inline, _ = _prune(proto, "prune{method=sparsegpt}", calib)
    for name, value in _weights(inline).items():
        np.testing.assert_array_equal(_weights(reloaded)[name], value)


def test_if_body_layers_are_skipped_with_a_reason() -> None:
    proto = if_model()
    feeds = {"x": rand(np.random.default_rng(0), 16, 8), "cond": np.array(True)}
    _, rep = _prune(proto, "prune{method=wanda}", feeds)
    reasons = {s["name"]: s["reason"] for s in rep["skipped"]}
    assert "then_mm" in reasons and "subgraph" in reasons["then_mm"]
    # magnitude still prunes them
    _, mag = _prune(proto, "prune", None)
    assert {c["name"] for c in mag["changed"]} == {"W_then", "W_outer"}


def test_plan_prunes_exactly_its_layers_and_rejects_unknown_ones(tmp_path: Path) -> None:
    proto = _mlp()
    calib = {"x": _correlated(200)}
    plan = write_plan(tmp_path / "plan.json", ["fc2"], "sparsegpt", "2:4", estimate={"fc2": 0.01})
    assert read_plan(plan) == Plan(frozenset({"fc2"}), "sparsegpt", "2:4")
    _, rep = _prune(proto, f"prune{{plan={plan}}}", calib)
    assert [c["layers"] for c in rep["changed"]] == [["fc2"]] and rep["changed"][0]["method"] == "sparsegpt"
    assert {s["name"]: s["reason"] for s in rep["skipped"]}["fc1"] == "not in the plan"
    plan.write_text(json.dumps({"version": 1, "method": "sparsegpt", "pattern": "2:4", "layers": ["fc2", "nope"]}))
    with pytest.raises(OnnxSparseError, match=r"unknown layer.*nope"):
        _prune(proto, f"prune{{plan={plan}}}", calib)
    plan.write_text(json.dumps({"version": 1, "pattern": "1:4", "layers": ["fc2"]}))
    with pytest.raises(OnnxSparseError, match="pattern 1:4"):
        _prune(proto, f"prune{{plan={plan}}}", calib)
    plan.write_text(json.dumps({"version": 1, "method": "obs", "layers": ["fc2"]}))
    with pytest.raises(OnnxSparseError, match="unknown method 'obs'"):
        _prune(proto, f"prune{{plan={plan}}}", calib)


def test_max_k_falls_back_to_wanda_with_a_reason() -> None:
    proto = _mlp()
    _, rep = _prune(proto, "prune{method=sparsegpt;max-k=40}", {"x": _correlated(200)})
    by_layer = {c["layers"][0]: c for c in rep["changed"]}
    assert by_layer["fc1"]["method"] == "sparsegpt"  # K = 32
    assert by_layer["fc2"]["method"] == "wanda" and "max-k 40" in by_layer["fc2"]["notes"][0]  # K = 48


def test_calibrated_methods_need_data_and_valid_options() -> None:
    with pytest.raises(OnnxSparseError, match="needs calibration data"):
        _prune(_mlp(), "prune{method=sparsegpt}", None)
    for bad in ("method=obs", "block-size=0", "damp=-1"):
        with pytest.raises(OnnxSparseError):
            Pipeline(f"prune{{{bad}}}")


def _cli(tmp_path: Path, *args: str) -> tuple[int, str, Path]:
    src = tmp_path / "m.onnx"
    if not src.exists():
        onnx.save(_mlp(), src)
    out = tmp_path / "out.onnx"
    res = CliRunner().invoke(main, ["run", str(src), "-o", str(out), *args])
    return res.exit_code, res.output, out


def test_cli_end_to_end_and_bad_data_is_one_line_exit_1(tmp_path: Path) -> None:
    good = tmp_path / "calib.npz"
    np.savez(good, x=_correlated(64))
    code, text, out = _cli(tmp_path, "-p", "prune{method=sparsegpt},validate{require-all=true}", "--calib", str(good))
    assert code == 0, text
    assert out.exists()
    onnx.checker.check_model(str(out), full_check=True)
    out.unlink()
    src_bytes = (tmp_path / "m.onnx").read_bytes()
    wrong_name = tmp_path / "wrong.npz"
    np.savez(wrong_name, y=_correlated(8))
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, x=_correlated(8, k=16))
    nan = tmp_path / "nan.npz"
    bad = _correlated(8)
    bad[3, 5] = np.nan
    np.savez(nan, x=bad)
    few = tmp_path / "few.npz"
    np.savez(few, x=_correlated(6))  # 6 rows for K = 32: H has rank 6
    cases = [
        ([], "needs calibration data"),
        (["--calib", str(wrong_name)], "not a model input"),
        (["--calib", str(wrong_shape)], "dim 1 must be 32"),
        (["--calib", str(nan)], "NaN/Inf"),
        (["--calib", str(few)], "singular"),
    ]
    for extra, message in cases:
        pipeline = "prune{method=sparsegpt;damp=0}" if message == "singular" else "prune{method=sparsegpt}"
        code, text, out = _cli(tmp_path, "-p", pipeline, *extra)
        assert code == 1, text
        assert message in text and len(text.strip().splitlines()) == 1, text
        assert not out.exists()
        assert (tmp_path / "m.onnx").read_bytes() == src_bytes


def test_dense_target_fits_later_layers_to_the_dense_output() -> None:
    proto = _mlp(seed=6)
    calib = {"x": _correlated(600)}
    x = calib["x"].astype(np.float64)

    def fc2_gap(model: Model) -> float:
        """‖fc2's dense output − fc2's output in ``model``‖ on the calibration inputs (fc2 = the second layer)."""
        dense, w = _weights(Model(copy_proto(proto))), _weights(model)
        r1_dense = np.maximum(x @ dense["W1"] + dense["b1"], 0)
        r1 = np.maximum(x @ w["W1"] + w["b1"], 0)
        return float(np.linalg.norm(r1_dense @ dense["W2"].T + dense["b2"] - (r1 @ w["W2"].T + w["b2"])))

    plain, _ = _prune(proto, "prune{method=sparsegpt;refit=50;dense-target=false}", calib)
    fitted, rep = _prune(proto, "prune{method=sparsegpt;refit=50;dense-target=true}", calib)
    cal = rep["details"]["calibration"]
    assert cal["dense_target"] and (cal["stages"], cal["ort_passes"]) == (3, 5)  # stages 2 and 3 run both models
    np.testing.assert_array_equal(_weights(plain)["W1"], _weights(fitted)["W1"])
    assert fc2_gap(fitted) < fc2_gap(plain)
    _assert_nm(fitted)
    _, one = _prune(proto, "prune{method=sparsegpt;sequential=false;dense-target=true}", calib)
    assert not one["details"]["calibration"]["dense_target"]  # one pass: the inputs are the dense ones anyway


def test_stage_session_computes_the_fetched_tensors_like_the_whole_model() -> None:
    from onnxsparse.pruning.collect import stage_session

    model = load_model(fixture_path("transformer_block"))
    names = [lay.node.input[0] for lay in find_layers(model.proto) if lay.source is not None]
    feeds = make_feeds(model.proto, {"batch": 3, "seq": 5})
    full = copy_proto(model.proto)
    for name in names:
        full.graph.output.add().name = name
    want = run_ort(full, feeds)[len(model.proto.graph.output) :]
    for name, value in zip(names, want, strict=True):
        (got,) = stage_session(model, [name]).run([name], feeds)
        np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-5)  # ORT's fusions differ by rounding
    assert len(model.proto.graph.output) == 1  # the model itself is unchanged


def test_grouped_conv_and_conv_transpose_are_pruned_along_their_reduction_axes() -> None:
    rng = np.random.default_rng(7)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[n,16,6,6] x) => (float[n,4,12,12] y) {
            [grouped] c1 = Conv <group = 2, pads = [1, 1, 1, 1]> (x, Wg, bg)
            r1 = Relu (c1)
            [up] y = ConvTranspose <strides = [2, 2]> (r1, Wt)
        }
    """
    proto = parse_checked(
        text, Wg=rand(rng, 16, 8, 3, 3) * 0.2, bg=rand(rng, 16) * 0.1, Wt=rand(rng, 16, 4, 2, 2) * 0.2
    )
    calib = {"x": rand(rng, 8, 16, 6, 6)}
    pruned, rep = _prune(proto, "prune{method=sparsegpt},validate{require-all=true}", calib)
    by_name = {c["name"]: c for c in rep["changed"]}
    assert by_name["Wg"]["axis"] == 1 and by_name["Wt"]["axis"] == 0
    assert by_name["Wg"]["bias_corrected"] == "bg"
    assert any("ConvTranspose" in note for note in by_name["Wt"]["notes"])
    w = _weights(pruned)
    assert is_nm(w["Wg"], 1) and is_nm(w["Wt"], 0)
    dense = run_ort(proto, {"x": calib["x"][:2]})[0]
    out = run_ort(pruned, {"x": calib["x"][:2]})[0]
    assert np.isfinite(out).all() and _rel(out, dense) < 1.0
    onnx.checker.check_model(pruned.proto, full_check=True)


def test_mask_input_is_reported_where_rows_are_not_tokens() -> None:
    rng = np.random.default_rng(3)
    text = """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[b,s,8] x, float[b,s] mask) => (float[b,4] y, float[b,s] mask_out) {
            [tok] h = MatMul (x, W1)
            pooled = ReduceMean <axes = [1], keepdims = 0> (h)
            [pool] y = MatMul (pooled, W2)
            mask_out = Identity (mask)
        }
    """
    proto = parse_checked(text, W1=rand(rng, 8, 8), W2=rand(rng, 8, 4))
    calib = {"x": rand(rng, 16, 6, 8), "mask": (rng.random((16, 6)) > 0.3).astype(np.float32)}
    _, rep = _prune(proto, "prune{method=sparsegpt;mask-input=mask}", calib)
    cal = rep["details"]["calibration"]
    assert set(cal["mask_not_applied"]) == {"pool"} and "16 rows" in cal["mask_not_applied"]["pool"]
