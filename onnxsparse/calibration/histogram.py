"""The streaming |x| histogram collector behind the ``qdq`` pass (and ``calibrate``).

Why streaming: ONNX Runtime's ``Percentile`` calibrator keeps every batch's intermediate outputs in memory and
histograms them at the end, so its memory grows with the amount of calibration data (ORT issue #10503). Here
the model runs with only the tensors that will get Q/DQ exposed as outputs, and each batch is folded into a
fixed-size histogram of |x| per tensor and then dropped: memory depends on the model and the batch, not on
how many batches there are.

Histogram: equal-width bins over [0, n·w). The first batch sets w = max|x| / 2048. When a later batch exceeds
the covered range the histogram grows with the same width, and when that would pass 4096 bins, neighbouring
bins are summed in pairs (w doubles). Merging is exact (no counts are split), the histogram always resolves the
observed range in at least 2048 bins, and it never holds more than 4096 counts. The percentile threshold is
taken the way ORT's ``HistogramCollector.compute_percentile`` takes it for symmetric ranges: the left edge of
the first bin at which the cumulative fraction reaches p, capped at max|x|.

Calibration data (readers, checks, batching) lives in ``onnxsparse.calibration.data``; its public names are
re-exported here so ``calibration.open_calibration`` and the older imports keep working.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxsparse.calibration.data import CalibrationData as CalibrationData
from onnxsparse.calibration.data import InputSpec as InputSpec
from onnxsparse.calibration.data import check_batch as check_batch
from onnxsparse.calibration.data import input_specs as input_specs
from onnxsparse.calibration.data import open_calibration as open_calibration
from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.model_io import Model, ort_session
from onnxsparse.progress import Progress

log = logging.getLogger("onnxsparse.calibration.histogram")

NUM_BINS = 2048
METHODS = ("percentile", "max")


# ---------------------------------------------------------------------------------------------- histograms


class AbsHistogram:
    """Streaming histogram of |x| with 2048–4096 equal-width bins starting at 0 (see the module docstring)."""

    __slots__ = ("amax", "counts", "nonfinite", "num_bins", "total", "width", "zeros")

    def __init__(self, num_bins: int = NUM_BINS) -> None:
        self.num_bins = num_bins
        self.counts: np.ndarray | None = None
        self.width = 0.0
        self.amax = 0.0
        self.total = 0
        self.zeros = 0  # values seen while every value so far was 0 (before the bins exist)
        self.nonfinite = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.counts is None else int(self.counts.nbytes)

    def update(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x).reshape(-1), dtype=np.float32)
        if a.size == 0:
            return
        m = float(a.max())
        if not np.isfinite(m):
            finite = np.isfinite(a)
            self.nonfinite += int(a.size - np.count_nonzero(finite))
            a = a[finite]
            if a.size == 0:
                return
            m = float(a.max())
        self.total += int(a.size)
        self.amax = max(self.amax, m)
        if self.counts is None:
            if m == 0.0:
                self.zeros += int(a.size)
                return
            self.width = m / self.num_bins
            self.counts = np.zeros(self.num_bins, dtype=np.int64)
            self.counts[0] += self.zeros
        elif m > len(self.counts) * self.width:
            self._grow(m)
        counts = self.counts
        assert counts is not None
        a *= np.float32(1.0 / self.width)
        idx = a.astype(np.int32)
        np.minimum(idx, len(counts) - 1, out=idx)
        counts += np.bincount(idx, minlength=len(counts))

    def _grow(self, m: float) -> None:
        """Cover [0, m]: same width while it fits in 2·num_bins bins, else merge neighbours in pairs."""
        counts = self.counts
        assert counts is not None
        need = int(np.ceil(m / self.width))
        while need > 2 * self.num_bins:
            if len(counts) % 2:
                counts = np.append(counts, 0)
            counts = counts.reshape(-1, 2).sum(axis=1)
            self.width *= 2.0
            need = int(np.ceil(m / self.width))
        if need > len(counts):
            counts = np.concatenate([counts, np.zeros(need - len(counts), dtype=np.int64)])
        self.counts = counts

    def threshold(self, method: str = "percentile", percentile: float = 99.99) -> float:
        """The amax to quantize with: max|x|, or ORT's symmetric percentile rule on this histogram."""
        if method == "max" or self.counts is None:
            return self.amax
        cdf = np.cumsum(self.counts) / float(self.counts.sum())
        idx = int(np.searchsorted(cdf, percentile / 100.0))
        return float(min(idx * self.width, self.amax))


# ---------------------------------------------------------------------------------------------- collection


@dataclass
class CalibrationResult:
    """amax per tensor plus what the collection cost (for reports and the benchmark)."""

    amax: dict[str, float]
    dtypes: dict[str, np.dtype[Any]]
    bin_width: dict[str, float]
    batches: int
    samples: int
    seconds: float
    method: str
    percentile: float
    histogram_bytes: int
    nonfinite: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "percentile": self.percentile,
            "batches": self.batches,
            "samples": self.samples,
            "seconds": round(self.seconds, 4),
            "histogram_bytes": self.histogram_bytes,
            "tensors": {
                k: {"amax": v, "scale": v / 127.0, "dtype": str(self.dtypes.get(k))} for k, v in self.amax.items()
            },
            "nonfinite": self.nonfinite,
        }


def _session(model: Model, extra_outputs: Sequence[str]) -> Any:
    """An ORT session for ``model`` with ``extra_outputs`` exposed as graph outputs (the model is unchanged).

    The outputs are appended to the proto only while it is serialised; external weights reach ORT through
    ``model_io.ort_session`` (memory maps, no temporary files).
    """
    import onnxruntime as ort

    proto = model.proto
    existing = {o.name for o in proto.graph.output}
    n_out = len(proto.graph.output)
    for name in extra_outputs:
        if name not in existing:
            proto.graph.output.add().name = name  # ORT takes name-only outputs and infers their type
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        # External weights (including a large model's edited, spilled ones) go to ORT as OrtValues over
        # their memory maps: no temporary model file next to the input, no copy of the weights.
        return ort_session(model, opts)
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise OnnxSparseError(f"onnxruntime cannot load the model for calibration: {_first_line(e)}") from e
    finally:
        del proto.graph.output[n_out:]


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def collect(
    model: Model,
    tensors: Sequence[str],
    data: CalibrationData,
    method: str = "percentile",
    percentile: float = 99.99,
    progress: bool = False,
    num_bins: int = NUM_BINS,
) -> CalibrationResult:
    """Run the model on every batch and return each tensor's amax; memory stays flat in the batch count."""
    if method not in METHODS:
        raise OnnxSparseError(f"unknown calibration method '{method}' (choose {' or '.join(METHODS)})")
    if not 0.0 < percentile <= 100.0:
        raise OnnxSparseError(f"percentile must be in (0, 100], got {percentile}")
    start = time.perf_counter()
    inputs = set(data.specs)
    fetch = [t for t in dict.fromkeys(tensors) if t not in inputs]
    from_feed = [t for t in dict.fromkeys(tensors) if t in inputs]
    session = _session(model, fetch) if fetch else None
    hists = {t: AbsHistogram(num_bins) for t in dict.fromkeys(tensors)}
    dtypes: dict[str, np.dtype[Any]] = {}
    batches = 0
    bar = Progress(
        data.batches_hint, desc="calibrate", unit="batch", enabled=progress, postfix=lambda: f"samples={data.seen}"
    )
    try:
        for batch in data:
            outs: list[Any] = []
            if session is not None:
                try:
                    outs = session.run(fetch, batch)
                except Exception as e:  # ORT's own exception types
                    raise OnnxSparseError(
                        f"onnxruntime failed on calibration batch {batches + 1}: {_first_line(e)}"
                    ) from e
            for name, value in [*zip(fetch, outs, strict=True), *((t, batch[t]) for t in from_feed)]:
                arr = np.asarray(value)
                if arr.dtype.kind != "f":
                    raise OnnxSparseError(f"tensor '{name}' is {arr.dtype}, not floating point: it cannot get Q/DQ")
                dtypes.setdefault(name, arr.dtype)
                hists[name].update(arr)
            del outs
            batches += 1
            bar.update(1)
    finally:
        bar.close()
    amax = {t: h.threshold(method, percentile) for t, h in hists.items()}
    nonfinite = {t: h.nonfinite for t, h in hists.items() if h.nonfinite}
    for t, n in nonfinite.items():
        log.warning("tensor '%s': ignored %d non-finite values during calibration", t, n)
    return CalibrationResult(
        amax=amax,
        dtypes=dtypes,
        bin_width={t: h.width for t, h in hists.items()},
        batches=batches,
        samples=data.seen,
        seconds=time.perf_counter() - start,
        method=method,
        percentile=percentile,
        histogram_bytes=sum(h.nbytes for h in hists.values()),
        nonfinite=nonfinite,
    )
