"""Large-model paths: edited external tensors spill to scratch files, checker/ORT/save work with them, and the
load → prune → validate → save run keeps memory bounded by the largest tensor (``tools/bench_scale.py``).

The full ≥ 2.2 GB run is ``@pytest.mark.slow``; a 96 MB version of the same measurement always runs.
"""

from __future__ import annotations

from pathlib import Path

import bench_scale
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import external_mlp
from onnx import TensorProto, helper

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.model_io import Model, load_model, ort_session, save_model
from onnxsparse.ir.tensors import external_path, is_spilled, set_array, spill_writer, to_array
from onnxsparse.pipeline import PassContext, Pipeline, check_model


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


def test_edited_external_tensor_spills_and_round_trips(tmp_path: Path) -> None:
    path = external_mlp(tmp_path / "in")
    before = path.read_bytes(), (path.parent / "mlp.onnx.data").read_bytes()
    model = load_model(path)
    t = model.proto.graph.initializer[1]
    new = np.asarray(to_array(t, model)) * 3
    set_array(t, new, model)
    assert is_spilled(t, model)
    assert not t.raw_data and model.proto.ByteSize() < 2048  # the proto did not grow by the tensor
    assert external_path(t, model).parent != path.parent  # scratch lives outside the input folder
    np.testing.assert_array_equal(to_array(t, model), new)
    check_model(model)  # the checker accepts a model whose edited tensors sit in scratch files
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    expect = _run(path, x) * 3
    np.testing.assert_allclose(ort_session(model).run(None, {"x": x})[0], expect, rtol=1e-5, atol=1e-5)
    unused = onnx.TensorProto()
    unused.CopyFrom(t)
    unused.name = "no_reader"  # ORT drops an unread initializer; it must not be handed over as an override
    model.proto.graph.initializer.append(unused)
    np.testing.assert_allclose(ort_session(model).run(None, {"x": x})[0], expect, rtol=1e-5, atol=1e-5)
    model.proto.graph.initializer.pop()
    kept = onnx.TensorProto()
    kept.CopyFrom(t)  # still points at the scratch data after both saves
    copy = Model(onnx.ModelProto(), model.base_dir, store=model.store)
    copy.proto.CopyFrom(model.proto)  # a copy shares the scratch file: saving one must not break the other
    save_model(copy, tmp_path / "copy.onnx")
    out = tmp_path / "out.onnx"
    save_model(model, out)
    np.testing.assert_array_equal(to_array(kept, model), new)  # the scratch data is still readable (maybe moved,
    # see SpillStore.settle_pack: the first save may turn the spill pack into its data file)
    onnx.checker.check_model(str(out), full_check=True)
    np.testing.assert_allclose(_run(out, x), expect, rtol=1e-5, atol=1e-5)
    assert (path.read_bytes(), (path.parent / "mlp.onnx.data").read_bytes()) == before


def test_inline_tensor_stays_inline(tmp_path: Path) -> None:
    w = np.ones((64, 64), np.float32)
    t = onnx.numpy_helper.from_array(w, "w")
    home = Model(onnx.ModelProto())
    set_array(t, w * 2, home)
    assert t.data_location != TensorProto.EXTERNAL and not is_spilled(t, home)
    set_array(t, w * 3, home, spill=True)  # forced
    assert is_spilled(t, home)
    np.testing.assert_array_equal(to_array(t, home), w * 3)
    set_array(t, w * 4, home, spill=False)
    assert not is_spilled(t, home) and t.raw_data
    np.testing.assert_array_equal(to_array(t, home), w * 4)
    set_array(t, w * 5, None)  # an inline tensor needs no model
    with pytest.raises(ValueError, match="needs its model"):
        set_array(t, w * 6, None, spill=True)
    np.testing.assert_array_equal(to_array(t), w * 5)


def test_spill_writer_streams_chunks_and_is_all_or_nothing() -> None:
    t = onnx.numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")
    home = Model(onnx.ModelProto())
    with spill_writer(t, home.store, (8, 4), np.dtype(np.float16)) as write:
        write(np.arange(16).reshape(4, 4))
        write(np.arange(16, 32).reshape(4, 4))
    assert t.data_type == TensorProto.FLOAT16 and list(t.dims) == [8, 4]
    np.testing.assert_array_equal(to_array(t, home), np.arange(32, dtype=np.float16).reshape(8, 4))
    kept = onnx.TensorProto()
    kept.CopyFrom(t)
    f32 = np.dtype(np.float32)
    with pytest.raises(ValueError, match="of 32 elements"), spill_writer(t, home.store, (8, 4), f32) as write:
        write(np.zeros(5))
    assert t == kept  # a failed write leaves the tensor as it was
    with pytest.raises(ValueError, match="more than"), spill_writer(t, home.store, (2,), f32) as write:
        write(np.zeros(3))
    assert t == kept


def test_absolute_location_outside_scratch_is_refused(tmp_path: Path) -> None:
    path = external_mlp(tmp_path / "in")
    proto = onnx.load(str(path), load_external_data=False)
    for e in proto.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = str(path.parent / "mlp.onnx.data")  # absolute, though it exists
    bad = tmp_path / "in" / "abs.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(OnnxSparseError, match=r"outside the model folder|fails the ONNX checker"):
        load_model(bad)
    with pytest.raises(OnnxSparseError, match=r"outside the model folder"):
        to_array(proto.graph.initializer[0], Model(proto, base_dir=bad.parent))


def test_ort_session_handles_subgraph_external_initializers(tmp_path: Path) -> None:
    """Initializers inside an If branch, stored externally, reach ORT inlined (main-graph ones as OrtValues)."""
    rng = np.random.default_rng(0)
    w_then = rng.standard_normal((32, 16)).astype(np.float32)
    w_main = rng.standard_normal((32, 32)).astype(np.float32)
    then = helper.make_graph(
        [helper.make_node("MatMul", ["h", "wt"], ["o1"])],
        "then",
        [],
        [helper.make_tensor_value_info("o1", TensorProto.FLOAT, [2, 16])],
        [onnx.numpy_helper.from_array(w_then, "wt")],
    )
    other = helper.make_graph(
        [helper.make_node("Slice", ["h", "s0", "s1", "s2"], ["o2"])],
        "else",
        [],
        [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [2, 16])],
        [onnx.numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("s0", [0]), ("s1", [16]), ("s2", [1]))],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "wm"], ["h"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        [onnx.numpy_helper.from_array(w_main, "wm")],
    )
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    (tmp_path / "m").mkdir()
    save_model(model, tmp_path / "m" / "if.onnx", external_data=True)
    loaded = load_model(tmp_path / "m" / "if.onnx")
    inner = next(a.g for a in loaded.proto.graph.node[1].attribute if a.name == "then_branch").initializer[0]
    assert inner.data_location == TensorProto.EXTERNAL
    snapshot = loaded.proto.SerializeToString()
    x = rng.standard_normal((2, 32)).astype(np.float32)
    y = ort_session(loaded).run(None, {"x": x, "c": np.array(True)})[0]
    np.testing.assert_allclose(y, x @ w_main @ w_then, rtol=1e-4, atol=1e-4)
    assert loaded.proto.SerializeToString() == snapshot  # inlining was temporary


def test_pipeline_on_external_model_matches_in_memory_result(tmp_path: Path) -> None:
    """prune on an external-data model (spilled edits) gives the same weights as on the inline model."""
    path = external_mlp(tmp_path / "in", k=128, layers=4)
    ext = load_model(path)
    inline = load_model(path)
    for t in inline.proto.graph.initializer:
        set_array(t, np.array(to_array(t, inline)), inline, spill=False)
    r_ext = Pipeline("prune,validate").run(ext, PassContext())
    r_inl = Pipeline("prune,validate").run(inline, PassContext())
    assert all(is_spilled(t, ext) for t in ext.proto.graph.initializer)
    for a, b in zip(ext.proto.graph.initializer, inline.proto.graph.initializer, strict=True):
        np.testing.assert_array_equal(to_array(a, ext), to_array(b, inline))
    assert r_ext.results[1].report.details["summary"]["coverage"] == 1.0
    assert r_inl.results[1].report.details["summary"]["coverage"] == 1.0


def test_qdq_and_fp16_after_prune_on_spilled_weights(tmp_path: Path) -> None:
    """Calibration runs ORT on a model whose pruned weights sit in scratch files (absolute paths ORT refuses
    in a model file); the written result matches the in-memory pipeline run on the same model."""
    path = external_mlp(tmp_path / "in", k=128, layers=3)
    model = load_model(path)
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((4, 128)).astype(np.float32)} for _ in range(3)]
    ctx = PassContext(calibration=calib)
    Pipeline("prune").run(model, ctx)
    assert all(is_spilled(t, model) for t in model.proto.graph.initializer)
    result = Pipeline("validate,qdq,to-fp16").run(model, ctx)  # calibration reads the spilled weights
    assert [r.modified for r in result.results] == [False, True, True]
    out = tmp_path / "q.onnx"
    save_model(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    x = calib[0]["x"]
    np.testing.assert_allclose(_run(out, x), ort_session(model).run(None, {"x": x})[0], rtol=1e-3, atol=1e-3)


def test_external_per_channel_dequantize_scales(tmp_path: Path) -> None:
    """A Q/DQ weight whose per-channel scale (512 floats) was saved as external data: prune and validate read
    the scale through the model folder, not the working directory (they used to crash outside it)."""
    rng = np.random.default_rng(0)
    k, n = 64, 512
    inits = [
        onnx.numpy_helper.from_array(rng.integers(-127, 127, size=(k, n)).astype(np.int8), "Wq"),
        onnx.numpy_helper.from_array((rng.random(n) * 0.01 + 0.001).astype(np.float32), "Ws"),
        onnx.numpy_helper.from_array(np.zeros(n, np.int8), "Wz"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["W"], axis=1),
        helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
        inits,
    )
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "dq.onnx"
    save_model(Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])), path, external_data=True)
    model = load_model(path)
    scale = next(t for t in model.proto.graph.initializer if t.name == "Ws")
    assert scale.data_location == TensorProto.EXTERNAL and Path.cwd() != path.parent
    result = Pipeline("prune,validate").run(model, PassContext())
    assert result.results[1].report.details["summary"]["sparse"] == 1


def test_scale_bench_small_is_memory_bounded(tmp_path: Path) -> None:
    """The bench's own measurement at 0.2 GB (4 × 48 MiB, streamed): output verified 2:4, memory bounded by
    the largest tensor rather than the model. The floor (interpreter + numpy + onnx + onnxruntime) is
    subtracted: at this size it is larger than a tensor; the ≥ 2.2 GB run checks the absolute ratio."""
    info = bench_scale.run(total_gb=0.19, tensor_mb=48, folder=tmp_path)
    assert info["verified_tensors"] == info["tensors"] == 4
    assert info["pruned"] == 4 and info["coverage"] == 1.0
    assert info["peak_reset"], "cannot reset the peak-RSS mark here; the memory bound is not measurable"
    working = info["peak_rss_mb"] - info["baseline_rss_mb"]
    model_mb = info["weights_gb"] * 1e9 / 2**20
    assert working < 1.3 * (info["largest_tensor_mb"] + info["proto_mb"]), info
    assert working < 0.5 * model_mb, info


@pytest.mark.slow
def test_scale_bench_over_2gb(tmp_path: Path) -> None:
    """The issue's goal: a ≥ 2.2 GB model through load → prune → validate → save with peak RSS ≤ 1.3 ×
    (largest tensor + proto). Throughput is reported (bench_scale prints it), not asserted: CI machines vary."""
    info = bench_scale.run(total_gb=2.2, tensor_mb=256, folder=tmp_path)
    assert info["weights_gb"] >= 2.2
    assert info["verified_tensors"] == info["tensors"]
    assert info["rss_ratio"] <= 1.3, info


def test_save_after_prune_links_the_spill_pack_once(tmp_path: Path) -> None:
    """load → prune → save hard-links the spill pack as the output data file (no second copy of the pruned
    weights); a second save of the same model, or one whose pack holds stale data, copies. Every output
    reads back the same values. (Each loaded model has its own store, so earlier tests cannot leave stale
    regions in its pack.)"""
    path = external_mlp(tmp_path / "in", k=64, layers=3)
    model = load_model(path)
    Pipeline("prune").run(model, PassContext())
    assert all(is_spilled(t, model) for t in model.proto.graph.initializer)
    pack = external_path(model.proto.graph.initializer[0], model)
    expect = {t.name: np.array(to_array(t, model)) for t in model.proto.graph.initializer}
    copy = Model(onnx.ModelProto(), model.base_dir, store=model.store)
    copy.proto.CopyFrom(model.proto)
    early = onnx.TensorProto()
    early.CopyFrom(model.proto.graph.initializer[0])  # never saved: keeps pointing at the pack
    first = tmp_path / "first.onnx"
    save_model(model, first)
    data = tmp_path / "first.onnx.data"
    # The pack became the data file (one link left: onnx's checker refuses hard-linked data); the copy made
    # before the save still reads its tensors, now through the output file.
    assert not pack.exists() and data.stat().st_nlink == 1
    assert external_path(early, model).samefile(data)
    assert np.array(to_array(early, model)).tobytes() == expect["w0"].tobytes()
    second = tmp_path / "second.onnx"
    save_model(copy, second)  # the pack is sealed now: this one copies
    assert not (tmp_path / "second.onnx.data").samefile(data)
    for out in (first, second):
        onnx.checker.check_model(str(out), full_check=True)
        loaded = load_model(out)
        for t in loaded.proto.graph.initializer:
            assert np.array(to_array(t, loaded)).tobytes() == expect[t.name].tobytes()
    # A pack with a region no saved tensor references (w0 edited twice) is copied, not linked.
    edited = load_model(path)
    w0 = edited.proto.graph.initializer[0]
    set_array(w0, np.ones((64, 64), np.float32), edited)
    set_array(w0, np.full((64, 64), 2.0, np.float32), edited)
    third = tmp_path / "third.onnx"
    save_model(edited, third)
    loaded = load_model(third)
    np.testing.assert_array_equal(to_array(loaded.proto.graph.initializer[0], loaded), 2.0)
    assert (tmp_path / "third.onnx.data").stat().st_nlink == 1
    # The first output replaced behind the copy's back: its tensors refuse to read another file's bytes.
    data.unlink()
    data.write_bytes(b"\0" * 100)
    with pytest.raises(OnnxSparseError, match="since been removed or replaced"):
        to_array(early, model)
    # Only some tensors edited (the pack holds exactly those): linked, and the others appended after it.
    model = load_model(path)
    originals = {t.name: np.array(to_array(t, model)) for t in model.proto.graph.initializer}
    set_array(model.proto.graph.initializer[1], originals["w1"] * -3, model)
    fourth = tmp_path / "fourth.onnx"
    save_model(model, fourth)
    assert not is_spilled(model.proto.graph.initializer[1], model)
    assert (tmp_path / "fourth.onnx.data").stat().st_nlink == 1
    onnx.checker.check_model(str(fourth), full_check=True)
    loaded = load_model(fourth)
    got = {t.name: np.array(to_array(t, loaded)) for t in loaded.proto.graph.initializer}
    assert got["w1"].tobytes() == (originals["w1"] * -3).tobytes()
    assert got["w0"].tobytes() == originals["w0"].tobytes() and got["w2"].tobytes() == originals["w2"].tobytes()
    offsets = [int(e.value) for t in loaded.proto.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets[1] == 0 and all(o % 4096 == 0 for o in offsets)  # w1 stayed where the pack had it
