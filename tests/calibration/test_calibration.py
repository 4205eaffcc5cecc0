"""Calibration: readers and their validation, the streaming |x| histogram, and agreement with ORT's Percentile."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from onnxsparse.calibration.histogram import AbsHistogram, collect, open_calibration
from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.model_io import Model

F = TensorProto.FLOAT


def _mlp(batch: int | str = "N", seed: int = 0) -> onnx.ModelProto:
    """x[batch,16] (+ ids[batch,4] int64, unused by the math but checked) → MatMul → Relu → Gemm → y."""
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[{batch}, 16] x, int64[{batch}, 4] ids) => (float[{batch}, 8] y) {{
            [fc1] h = MatMul (x, w1)
            [relu] r = Relu (h)
            [fc2] g = Gemm <transB = 1> (r, w2)
            idsf = Cast <to = 1> (ids)
            s = ReduceSum <keepdims = 1> (idsf, axes)
            y = Add (g, s)
        }}
    """)
    inits = {
        "w1": rng.standard_normal((16, 32)).astype(np.float32),
        "w2": rng.standard_normal((8, 32)).astype(np.float32) * 0.2,
        "axes": np.array([1], dtype=np.int64),
    }
    model.graph.initializer.extend(nh.from_array(value, name) for name, value in inits.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def _samples(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, 16)).astype(np.float32),
        "ids": rng.integers(0, 5, size=(n, 4)).astype(np.int64),
    }


def _read_all(
    obj: object, model: onnx.ModelProto, samples: int | None = None, batch_size: int | None = None
) -> list[dict[str, np.ndarray]]:
    return list(open_calibration(obj, model, samples, batch_size))


# ---------------------------------------------------------------------------------------------- readers


def test_npz_is_cut_into_batches_in_order(tmp_path: Path) -> None:
    data = _samples(70)
    np.savez(tmp_path / "c.npz", **data)
    batches = _read_all(tmp_path / "c.npz", _mlp(), batch_size=32)
    assert [b["x"].shape[0] for b in batches] == [32, 32, 6]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), data["x"])
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in batches]), data["ids"])


def test_calib_samples_caps_and_batches_regroup_across_files(tmp_path: Path) -> None:
    data = _samples(30)
    for i, start in enumerate(range(0, 30, 7)):  # files of 7 samples (last one 2)
        np.savez(tmp_path / f"part{i:02d}.npz", **{k: v[start : start + 7] for k, v in data.items()})
    batches = _read_all(tmp_path, _mlp(), samples=25, batch_size=10)
    assert [b["x"].shape[0] for b in batches] == [10, 10, 5]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), data["x"][:25])


def test_folder_of_npy_for_a_single_input_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((3, 16)).astype(np.float32) for _ in range(3)]
    for i, a in enumerate(arrays):
        np.save(tmp_path / f"{i}.npy", a)
    model = _mlp()
    # a single-input variant: drop ids and what reads it
    del model.graph.node[3:]
    model.graph.node.append(helper.make_node("Identity", ["g"], ["y"]))
    del model.graph.input[1]
    batches = _read_all(tmp_path, model)
    assert len(batches) == 3
    np.testing.assert_array_equal(batches[2]["x"], arrays[2])


def test_npy_folder_for_multi_input_model_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "0.npy", np.zeros((2, 16), np.float32))
    with pytest.raises(OnnxSparseError, match=r"\.npy but the model has 2 inputs"):
        _read_all(tmp_path, _mlp())


def test_iterable_and_ort_reader_are_taken_as_given() -> None:
    from onnxruntime.quantization import CalibrationDataReader

    items = [_samples(3, seed=i) for i in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(items)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    for source in (items, iter(items), Reader()):
        batches = _read_all(source, _mlp())
        assert len(batches) == 4
        np.testing.assert_array_equal(batches[3]["x"], items[3]["x"])


def test_fixed_batch_model_gets_exact_batches() -> None:
    model = _mlp(batch=4)
    batches = _read_all([_samples(10)], model)
    assert [b["x"].shape[0] for b in batches] == [4, 4]  # the 2 left over cannot be fed
    with pytest.raises(OnnxSparseError, match="conflicts with the model's fixed batch size 4"):
        open_calibration([_samples(10)], model, batch_size=3)


def test_data_is_read_once() -> None:
    data = open_calibration([_samples(2)], _mlp())
    list(data)
    with pytest.raises(OnnxSparseError, match="only once"):
        list(data)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"x": np.zeros((2, 16), np.float32)}, "lacks model input 'ids'"),
        ({**_samples(2), "z": np.zeros(2, np.float32)}, "has 'z', which is not a model input"),
        (
            {"x": np.zeros((2, 16), np.float64), "ids": np.zeros((2, 4), np.int64)},
            r"input 'x' is float64, the model takes float32 \(convert with .astype\(np.float32\)\)",
        ),
        ({"x": np.zeros((2, 16, 1), np.float32), "ids": np.zeros((2, 4), np.int64)}, "rank 3"),
        ({"x": np.zeros((2, 15), np.float32), "ids": np.zeros((2, 4), np.int64)}, "dim 1 must be 16"),
        ({"x": np.zeros((2, 16), np.float32), "ids": np.zeros((3, 4), np.int64)}, "disagree on the number"),
        ([np.zeros((2, 16), np.float32)], "is a list, expected a dict"),
    ],
)
def test_bad_batches_give_one_line_errors(batch: object, message: str) -> None:
    with pytest.raises(OnnxSparseError, match=message) as err:
        _read_all([batch], _mlp(), batch_size=2)
    assert "\n" not in str(err.value)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(OnnxSparseError, match="does not exist"):
        open_calibration(tmp_path / "nope.npz", _mlp())
    (tmp_path / "d").mkdir()
    with pytest.raises(OnnxSparseError, match=r"holds no \.npy or \.npz"):
        _read_all(tmp_path / "d", _mlp())
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(OnnxSparseError, match="cannot read calibration file"):
        _read_all(tmp_path / "bad.npz", _mlp())
    with pytest.raises(OnnxSparseError, match="unsupported calibration data int"):
        open_calibration(3, _mlp())
    with pytest.raises(OnnxSparseError, match="yielded no samples"):
        _read_all([], _mlp())
    with pytest.raises(OnnxSparseError, match="--calib-samples must be positive"):
        open_calibration([], _mlp(), samples=0)


# ---------------------------------------------------------------------------------------------- histogram


def test_histogram_grows_exactly_and_stays_bounded() -> None:
    rng = np.random.default_rng(0)
    h = AbsHistogram()
    chunks = [rng.standard_normal(5000).astype(np.float32) * (1.5**i) for i in range(30)]
    for c in chunks:
        h.update(c)
        assert h.counts is not None and 2048 <= len(h.counts) <= 4096
        assert len(h.counts) * h.width >= h.amax  # the observed range is covered
    everything = np.abs(np.concatenate(chunks))
    assert h.total == everything.size == int(h.counts.sum())
    assert h.amax == pytest.approx(float(everything.max()))
    assert h.width <= h.amax / 2048 * (1 + 1e-6)  # never coarser than 2048 bins over the range
    for p in (90.0, 99.0, 99.99):
        exact = float(np.percentile(everything, p))
        assert abs(h.threshold("percentile", p) - exact) <= h.width + 1e-6
    assert h.threshold("max") == h.amax


@settings(max_examples=40, deadline=None)
@given(
    scales=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=12),
    sizes=st.integers(1, 3000),
    p=st.sampled_from([50.0, 99.0, 99.9, 99.99]),
    seed=st.integers(0, 2**16),
)
def test_histogram_threshold_is_the_left_edge_of_the_quantile_bin(
    scales: list[float], sizes: int, p: float, seed: int
) -> None:
    """Whatever the order and growth of the chunks: q - width < threshold <= q for the exact quantile q."""
    rng = np.random.default_rng(seed)
    chunks = [(rng.standard_t(3, size=sizes) * s).astype(np.float32) for s in scales]
    h = AbsHistogram()
    for c in chunks:
        h.update(c)
    values = np.abs(np.concatenate(chunks)).astype(np.float64)
    q = float(np.percentile(values, p, method="inverted_cdf"))
    t = h.threshold("percentile", p)
    slack = 1e-5 * h.amax  # float32 rounding at bin boundaries
    assert q - h.width - slack <= t <= q + slack


def test_histogram_zeros_and_nonfinite() -> None:
    h = AbsHistogram()
    h.update(np.zeros(10, np.float32))  # before any non-zero: no bins yet
    h.update(np.array([1.0, -2.0, np.nan, np.inf], np.float32))
    assert h.total == 12 and h.nonfinite == 2 and h.amax == 2.0
    assert h.counts is not None and h.counts[0] == 10
    empty = AbsHistogram()
    empty.update(np.zeros(4, np.float16))
    assert empty.threshold() == 0.0


def _ort_percentile(
    model: onnx.ModelProto, tensors: list[str], batches: list[dict[str, np.ndarray]], tmp_path: Path, percentile: float
) -> tuple[dict[str, float], dict[str, float]]:
    """ORT's own PercentileCalibrater (symmetric, as quantize_static builds it) on the same batches."""
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    path = tmp_path / "ort_in.onnx"
    onnx.save(model, str(path))
    cal = create_calibrator(
        path,
        ["MatMul", "Gemm"],
        augmented_model_path=str(tmp_path / "aug.onnx"),
        calibrate_method=CalibrationMethod.Percentile,
        extra_options={"percentile": percentile, "symmetric": True},
    )
    cal.collect_data(Reader())
    ranges = cal.compute_data()
    widths = {t: float(np.diff(cal.collector.histogram_dict[t][1][:2])[0]) for t in tensors}
    return {t: float(ranges[t].range_value[1]) for t in tensors}, widths


@pytest.mark.parametrize("percentile", [99.99, 99.9, 99.0])
def test_percentile_matches_ort_within_one_bin(tmp_path: Path, percentile: float) -> None:
    model = _mlp()
    rng = np.random.default_rng(3)
    # later batches are larger so the streaming histogram has to grow (and merge) on the way
    batches = [
        {
            "x": (rng.standard_normal((16, 16)) * (1 + 0.5 * i)).astype(np.float32),
            "ids": rng.integers(0, 5, (16, 4)).astype(np.int64),
        }
        for i in range(12)
    ]
    tensors = ["x", "r"]
    ours = collect(Model(model), tensors, open_calibration(batches, model), "percentile", percentile)
    theirs, ort_width = _ort_percentile(model, tensors, batches, tmp_path, percentile)
    for t in tensors:
        tol = max(ours.bin_width[t], ort_width[t])
        assert abs(ours.amax[t] - theirs[t]) <= tol, (t, ours.amax[t], theirs[t], tol)
    # and max is max
    again = collect(Model(model), tensors, open_calibration(batches, model), "max")
    assert again.amax["x"] == pytest.approx(max(float(np.abs(b["x"]).max()) for b in batches))


def test_collect_memory_is_flat_in_the_number_of_batches() -> None:
    model = Model(_mlp())
    rng = np.random.default_rng(0)
    batch = _samples(64)

    def peak(n: int) -> int:
        def gen() -> object:
            for _ in range(n):  # fresh arrays each time, like a real reader
                yield {"x": rng.standard_normal(batch["x"].shape).astype(np.float32), "ids": batch["ids"]}

        tracemalloc.start()
        try:
            collect(model, ["x", "h", "r"], open_calibration(gen(), model.proto))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(8), peak(96)
    assert large <= small * 1.10 + 64 * 1024, (small, large)


def test_collect_reports_bad_tensors_and_options() -> None:
    model = Model(_mlp())
    with pytest.raises(OnnxSparseError, match="'ids' is int64, not floating point"):
        collect(model, ["ids"], open_calibration([_samples(2)], model.proto))
    with pytest.raises(OnnxSparseError, match="unknown calibration method"):
        collect(model, ["x"], open_calibration([_samples(2)], model.proto), method="entropy")
    with pytest.raises(OnnxSparseError, match="percentile must be in"):
        collect(model, ["x"], open_calibration([_samples(2)], model.proto), percentile=0)


def test_dict_of_arrays_and_single_npy_default_to_batches_of_32(tmp_path: Path) -> None:
    data = _samples(40)
    batches = _read_all(data, _mlp())
    assert [b["x"].shape[0] for b in batches] == [32, 8]
    single = _mlp()
    del single.graph.node[3:]
    single.graph.node.append(helper.make_node("Identity", ["g"], ["y"]))
    del single.graph.input[1]
    np.save(tmp_path / "x.npy", data["x"])
    batches = _read_all(tmp_path / "x.npy", single, samples=35)
    assert [b["x"].shape[0] for b in batches] == [32, 3]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), data["x"][:35])


# ---------------------------------------------------------------------------------------------- progress


@pytest.mark.parametrize(
    ("layout", "samples", "batch_size"),
    [
        ("npz", None, None),
        ("npz", None, 16),
        ("npz", 50, 16),
        ("folder", None, None),
        ("folder", 25, 10),
        ("folder", None, 4),
        ("compressed", None, 8),
    ],
)
def test_batch_count_is_known_up_front(
    tmp_path: Path, layout: str, samples: int | None, batch_size: int | None
) -> None:
    """The progress total: the batches a file or folder will give, from array headers, equals the real count."""
    data = _samples(70)
    if layout == "folder":
        for i, start in enumerate(range(0, 70, 7)):
            np.savez(tmp_path / f"part{i:02d}.npz", **{k: v[start : start + 7] for k, v in data.items()})
        src: Path = tmp_path
    else:
        src = tmp_path / "c.npz"
        (np.savez_compressed if layout == "compressed" else np.savez)(src, **data)
    opened = open_calibration(src, _mlp(), samples, batch_size)
    assert opened.batches_hint == sum(1 for _ in opened)


def test_calibration_progress_line_has_total_and_eta(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a TTY, collect() reports 'calibrate step/total (pct) rate ETA' on stderr (first line at once here)."""
    monkeypatch.setattr("onnxsparse.progress.FIRST_LINE_S", 0.0)
    np.savez(tmp_path / "c.npz", **_samples(40))
    data = open_calibration(tmp_path / "c.npz", _mlp(), batch_size=10)
    collect(Model(_mlp()), ["h"], data, progress=True)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("calibrate 1/4 (25%) ") and " batch/s ETA " in err[0] and err[0].endswith("samples=10")
    assert err[-1].startswith("calibrate 4/4 (100%) ") and " done in " in err[-1]
    collect(Model(_mlp()), ["h"], open_calibration(tmp_path / "c.npz", _mlp(), batch_size=10), progress=False)
    assert capsys.readouterr().err == ""
