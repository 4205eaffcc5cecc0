"""Chunked pruning/checking (``onnxsparse.ir.stream``) must give exactly what the in-memory path gives.

Thresholds are lowered with monkeypatch so small tensors take the streamed path, in many slabs, on two
threads; the in-memory functions of ``onnxsparse.sparsity`` are the oracle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import onnxsparse.ir.stream as stream
from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.model_io import Model, load_model, save_model
from onnxsparse.ir.tensors import is_spilled, to_array
from onnxsparse.pipeline import PassContext, Pipeline
from onnxsparse.sparsity import count_violations, nm_keep


def _external_tensor(tmp: Path, values: np.ndarray, name: str = "w") -> onnx.TensorProto:
    data = tmp / f"{name}.bin"
    data.write_bytes(b"\0" * 100 + np.ascontiguousarray(values).tobytes())  # a non-zero offset
    t = onnx.TensorProto()
    t.name = name
    t.data_type = helper.np_dtype_to_tensor_dtype(values.dtype)
    t.dims.extend(values.shape)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", data.name), ("offset", "100"), ("length", str(values.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


@pytest.fixture
def small_slabs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(stream, "CHUNK_BYTES", 256)  # many slabs, so the thread pool and ordering matter


@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from([(8, 3), (4, 5, 1), (12, 2, 20), (3, 8, 17), (2, 4, 3, 3), (16,)]),
    nm=st.sampled_from([(2, 4), (1, 4), (3, 4), (1, 2), (4, 8)]),
    axis_pick=st.integers(0, 3),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_keep_pairwise_equals_nm_keep(
    shape: tuple[int, ...], nm: tuple[int, int], axis_pick: int, ties: bool, seed: int
) -> None:
    n, m = nm
    axes = [a for a in range(len(shape)) if shape[a] % m == 0]
    if not axes:
        return
    axis = axes[axis_pick % len(axes)]
    rng = np.random.default_rng(seed)
    mag = (rng.integers(0, 3, size=shape) if ties else rng.random(shape)).astype(np.float32)
    pre = int(np.prod(shape[:axis], dtype=np.int64))
    post = int(np.prod(shape[axis + 1 :], dtype=np.int64))
    got = stream.keep_pairwise(mag.reshape(pre * shape[axis] // m, m, post), n).reshape(shape)
    np.testing.assert_array_equal(got, nm_keep(mag, axis, n, m))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(("shape", "axis"), [((64, 48), 0), ((48, 64), 1), ((32, 8, 3, 3), 1), ((6, 16, 40), 1)])
def test_prune_tensor_equals_in_memory(
    tmp_path: Path, small_slabs: None, dtype: type, shape: tuple[int, ...], axis: int
) -> None:
    rng = np.random.default_rng(0)
    w: np.ndarray = rng.standard_normal(shape).astype(dtype)
    w[rng.random(shape) < 0.1] = 0  # some existing zeros
    t = _external_tensor(tmp_path, w)
    prior = rng.random(shape) < 0.8
    home = Model(onnx.ModelProto(), base_dir=tmp_path)
    for prefer in (None, prior):
        tt = onnx.TensorProto()
        tt.CopyFrom(t)
        stats = stream.prune_tensor(tt, home, axis, 2, 4, prefer=prefer)
        nonzero = w != 0
        keep = nm_keep(np.abs(w), axis, 2, 4, prefer=nonzero if prefer is None else nonzero & prefer)
        expect: np.ndarray = np.where(keep, w, 0).astype(dtype)
        assert is_spilled(tt, home)
        got = np.asarray(to_array(tt, home))
        assert got.tobytes() == expect.tobytes()  # bit-identical, +0.0 included
        assert stats.mask is not None
        np.testing.assert_array_equal(stats.mask, keep & nonzero)
        bad, groups = count_violations(nonzero, axis, 2, 4)
        assert (stats.violations, stats.groups) == (bad, groups)
        assert stats.nonzero_before == np.count_nonzero(w)
        assert stats.nonzero_after == np.count_nonzero(expect)


def test_prune_tensor_leaves_compliant_tensor_alone(tmp_path: Path, small_slabs: None) -> None:
    w = np.zeros((64, 32), np.float32)
    w[::4] = 1.0
    w[1::4] = -2.0
    t = _external_tensor(tmp_path, w)
    before = t.SerializeToString()
    home = Model(onnx.ModelProto(), base_dir=tmp_path)
    stats = stream.prune_tensor(t, home, 0, 2, 4)
    assert stats.violations == 0 and t.SerializeToString() == before
    assert not home.store.written  # nothing was written, so nothing recorded
    check = stream.check_tensor(t, home, 0, 2, 4)
    assert (check.violations, check.groups, check.nonzero) == (0, 16 * 32, 32 * 32)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_is_refused_by_name(tmp_path: Path, small_slabs: None, bad: float) -> None:
    w = np.ones((32, 16), np.float32)
    w[17, 3] = bad
    t = _external_tensor(tmp_path, w, name="layer3.weight")
    home = Model(onnx.ModelProto(), base_dir=tmp_path)
    with pytest.raises(OnnxSparseError, match=r"layer3\.weight.*NaN/Inf"):
        stream.prune_tensor(t, home, 0, 2, 4)
    assert not is_spilled(t, home)
    with pytest.raises(OnnxSparseError, match=r"layer3\.weight.*NaN/Inf"):
        stream.check_tensor(t, home, 0, 2, 4)


def test_passes_give_same_model_streamed_or_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prune + validate through the pipeline: streamed (forced) and in-memory results are identical."""
    rng = np.random.default_rng(3)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w0"),
        onnx.numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("Gemm", ["h", "w1"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        inits,
    )
    (tmp_path / "m").mkdir()
    save_model(
        Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])),
        tmp_path / "m" / "m.onnx",
        external_data=True,
    )
    results = []
    for threshold in (2**40, 0):  # in memory, then streamed
        monkeypatch.setattr(stream, "STREAM_MIN_BYTES", threshold)
        monkeypatch.setattr(stream, "CHUNK_BYTES", 512)
        model = load_model(tmp_path / "m" / "m.onnx")
        ctx = PassContext()
        res = Pipeline("prune,validate").run(model, ctx)
        weights = {t.name: np.array(to_array(t, model)) for t in model.proto.graph.initializer}
        masks = {k: np.asarray(v) for k, v in ctx.masks.items()}
        results.append((weights, masks, res.results[0].report.changed, res.results[1].report.details["layers"]))
    (w_a, m_a, c_a, l_a), (w_b, m_b, c_b, l_b) = results
    for name in w_a:
        assert w_a[name].tobytes() == w_b[name].tobytes()
        np.testing.assert_array_equal(m_a[name], m_b[name])
    assert c_a == c_b and l_a == l_b


@pytest.mark.parametrize(("n", "m", "axis"), [(2, 4, 0), (2, 4, 1), (1, 4, 1), (3, 4, 0)])
def test_check_after_prune_equals_reading_it_back(tmp_path: Path, small_slabs: None, n: int, m: int, axis: int) -> None:
    """The check prune records while writing (a ``WrittenCheck`` on the model's store) equals a fresh read of
    the written bytes, for every pattern; another pattern or axis is not answered from it, nor does another
    model's store know it."""
    rng = np.random.default_rng(n * 10 + axis)
    w = rng.standard_normal((48, 32)).astype(np.float32)
    w[rng.random(w.shape) < 0.2] = 0
    t = _external_tensor(tmp_path, w)
    home = Model(onnx.ModelProto(), base_dir=tmp_path)
    stats = stream.prune_tensor(t, home, axis, n, m)
    assert stats.violations > 0 and is_spilled(t, home)
    recorded = stream.check_tensor(t, home, axis, n, m)
    region = stream._region(t, home.store)
    assert region is not None and list(home.store.written) == [region]
    check = home.store.written[region]
    assert isinstance(check, stream.WrittenCheck) and (check.axis, check.n, check.m) == (axis, n, m)
    assert check.stats == recorded
    assert stream._region(t, Model(onnx.ModelProto(), base_dir=tmp_path).store) is None  # not its bytes
    del home.store.written[region]
    fresh = stream.check_tensor(t, home, axis, n, m)
    assert recorded == fresh and fresh.violations == 0 and fresh.nonzero == stats.nonzero_after
    values = np.asarray(to_array(t, home))
    assert fresh.nonzero == np.count_nonzero(values)
    assert count_violations(values != 0, axis, n, m) == (0, fresh.groups)
    stricter = stream.check_tensor(t, home, axis, n - 1, m) if n > 1 else None
    if stricter is not None:  # not the recorded pattern: really read, and 1 fewer allowed does fail groups
        assert stricter.violations == count_violations(values != 0, axis, n - 1, m)[0] > 0
