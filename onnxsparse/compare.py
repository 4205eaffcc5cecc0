"""Output-level accuracy of a candidate model against its reference (``onnxsparse compare``).

Both models run in ONNX Runtime on the same validated data, batch by batch. Each output keeps running sums in
float64 (Σr², Σc², Σ(c−r)², Σ|c−r|, max |c−r|, top-1 matches) and one cosine per sample, so memory follows one
batch and the sample count, never the stored outputs. Per output it reports:

* ``cosine`` — the mean over samples of cos(reference sample, candidate sample), each sample's output flattened
  (``cosine_min`` and ``cosine_p5`` beside it), for floating-point outputs;
* ``rel_l2`` — ‖c − r‖₂ / ‖r‖₂ over every element of every sample;
* ``max_abs`` / ``mean_abs`` — of c − r;
* ``top1`` — where asked: the share of positions whose argmax over the last axis agrees (logits);
* ``equal`` — the share of elements that are exactly equal (the one useful figure for integer outputs, such as
  a decoder's token indices).

An output's first axis is taken as the sample axis when the data has one and the output's first dim equals the
batch's sample count; otherwise a whole batch's output counts as one sample.

Why not Polygraphy's comparator: its ``run --onnxrt`` comparison is the model for the report (one block per
output, PASSED/FAILED, a summary line), but it compares element-wise against tolerances and keeps every
iteration's outputs in memory; a pruned model is judged by how close its outputs stay in direction and size
(cosine, relative L2, top-1), over as many samples as the user has.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxsparse.calibration.data import (
    CalibrationData,
    InputSpec,
    check_batch,
    input_specs,
    open_calibration,
    value_dtype,
)
from onnxsparse.errors import GateFailure, OnnxSparseError
from onnxsparse.ir.model_io import Model, ort_session
from onnxsparse.progress import Progress

log = logging.getLogger("onnxsparse.compare")


# ---------------------------------------------------------------------------------------------- interfaces


@dataclass(frozen=True)
class OutputSpec:
    """A graph output as two models must agree on it."""

    name: str
    dtype: np.dtype[Any] | None
    rank: int | None


def output_specs(proto: onnx.ModelProto) -> dict[str, OutputSpec]:
    specs: dict[str, OutputSpec] = {}
    for vi in proto.graph.output:
        tt = vi.type.tensor_type
        rank = len(tt.shape.dim) if tt.HasField("shape") else None
        specs[vi.name] = OutputSpec(vi.name, value_dtype(vi), rank)
    return specs


def _describe(dtype: np.dtype[Any] | None, rank: int | None) -> str:
    return f"{dtype if dtype is not None else '?'} rank {'?' if rank is None else rank}"


def check_same_interface(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    """OnnxSparseError (one line) when the two models differ in input or output names, dtypes or ranks."""
    for kind, ref, cand in (
        ("input", _input_sig(reference), _input_sig(candidate)),
        ("output", _output_sig(reference), _output_sig(candidate)),
    ):
        if list(ref) != list(cand):
            only_r = [n for n in ref if n not in cand]
            only_c = [n for n in cand if n not in ref]
            if only_r or only_c:
                parts = ([f"reference only: {', '.join(only_r)}"] if only_r else []) + (
                    [f"candidate only: {', '.join(only_c)}"] if only_c else []
                )
                raise OnnxSparseError(f"the models have different {kind}s ({'; '.join(parts)})")
            if kind == "output":
                raise OnnxSparseError(
                    f"the models list their outputs in a different order "
                    f"(reference: {', '.join(ref)}; candidate: {', '.join(cand)})"
                )
        for name, (rd, rr) in ref.items():
            cd, cr = cand[name]
            if (rd is not None and cd is not None and rd != cd) or (rr is not None and cr is not None and rr != cr):
                raise OnnxSparseError(
                    f"{kind} '{name}' differs: reference {_describe(rd, rr)}, candidate {_describe(cd, cr)}"
                )


def _input_sig(proto: onnx.ModelProto) -> dict[str, tuple[np.dtype[Any] | None, int | None]]:
    return {
        s.name: (s.dtype, None if s.shape is None else len(s.shape))
        for s in input_specs(proto).values()
        if not s.optional
    }


def _output_sig(proto: onnx.ModelProto) -> dict[str, tuple[np.dtype[Any] | None, int | None]]:
    return {s.name: (s.dtype, s.rank) for s in output_specs(proto).values()}


# ---------------------------------------------------------------------------------------------- metrics


class OutputAccumulator:
    """Running sums for one output; ``update`` with each batch's reference and candidate arrays."""

    def __init__(self, name: str, top1: bool = False) -> None:
        self.name = name
        self.top1_wanted = top1
        self.dtype: np.dtype[Any] | None = None
        self.shape: tuple[int, ...] | None = None
        self.elements = 0
        self.ref_sq = 0.0
        self.cand_sq = 0.0
        self.diff_sq = 0.0
        self.abs_sum = 0.0
        self.max_abs = 0.0
        self.equal = 0
        self.nonfinite = 0
        self.top1_hits = 0
        self.top1_total = 0
        self.cosines: list[float] = []  # one float per sample: the p5 needs them, and they are small

    @property
    def is_float(self) -> bool:
        return self.dtype is not None and self.dtype.kind == "f"

    def update(self, ref: np.ndarray, cand: np.ndarray, rows: int | None) -> None:
        """Fold one batch in; ``rows``: the batch's sample count when the output's first axis holds samples."""
        ref, cand = np.asarray(ref), np.asarray(cand)
        if ref.shape != cand.shape:
            raise OnnxSparseError(
                f"output '{self.name}': the reference gives shape {list(ref.shape)}, the "
                f"candidate {list(cand.shape)} for the same inputs"
            )
        if self.dtype is None:
            self.dtype, self.shape = ref.dtype, tuple(ref.shape)
        r = ref.astype(np.float64, copy=False).reshape(-1)
        c = cand.astype(np.float64, copy=False).reshape(-1)
        self.nonfinite += int(c.size - np.count_nonzero(np.isfinite(c)))
        d = c - r
        self.elements += int(r.size)
        self.ref_sq += float(r @ r)
        self.cand_sq += float(c @ c)
        self.diff_sq += float(d @ d)
        a = np.abs(d)
        self.abs_sum += float(a.sum())
        if a.size:
            self.max_abs = max(self.max_abs, float(a.max()))
        self.equal += int(np.count_nonzero(ref.reshape(-1) == cand.reshape(-1)))
        if ref.dtype.kind == "f":
            per = rows if rows is not None and ref.ndim >= 1 and ref.shape[0] == rows else 1
            self.cosines.extend(_row_cosines(r.reshape(per, -1), c.reshape(per, -1)))
            if self.top1_wanted and ref.ndim >= 1 and ref.shape[-1] > 1:
                hits = np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)
                self.top1_hits += int(np.count_nonzero(hits))
                self.top1_total += int(hits.size)

    def metrics(self) -> OutputMetrics:
        ref_norm = np.sqrt(self.ref_sq)
        rel = float(np.sqrt(self.diff_sq) / ref_norm) if ref_norm > 0 else (0.0 if self.diff_sq == 0 else np.inf)
        cos = np.asarray(self.cosines, dtype=np.float64)
        return OutputMetrics(
            name=self.name,
            dtype=str(self.dtype),
            shape=list(self.shape or ()),
            samples=len(self.cosines) if self.is_float else None,
            elements=self.elements,
            cosine=float(cos.mean()) if cos.size else None,
            cosine_min=float(cos.min()) if cos.size else None,
            cosine_p5=float(np.percentile(cos, 5)) if cos.size else None,
            rel_l2=rel,
            max_abs=self.max_abs,
            mean_abs=self.abs_sum / self.elements if self.elements else 0.0,
            top1=self.top1_hits / self.top1_total if self.top1_total else None,
            equal=self.equal / self.elements if self.elements else 1.0,
            nonfinite=self.nonfinite,
            ref_sq=self.ref_sq,
            diff_sq=self.diff_sq,
        )


def _row_cosines(r: np.ndarray, c: np.ndarray) -> list[float]:
    """cos per row; two zero rows are identical (1), one zero row against a non-zero one is 0."""
    dot = np.einsum("ij,ij->i", r, c)
    nr = np.sqrt(np.einsum("ij,ij->i", r, r))
    nc = np.sqrt(np.einsum("ij,ij->i", c, c))
    denom = nr * nc
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), np.where((nr == 0) & (nc == 0), 1.0, 0.0))
    return [float(v) for v in np.clip(cos, -1.0, 1.0)]


@dataclass
class OutputMetrics:
    """One output's comparison; ``cosine*`` and ``top1`` are None where they do not apply."""

    name: str
    dtype: str
    shape: list[int]
    samples: int | None
    elements: int
    cosine: float | None
    cosine_min: float | None
    cosine_p5: float | None
    rel_l2: float
    max_abs: float
    mean_abs: float
    top1: float | None
    equal: float
    nonfinite: int
    #: Σr² and Σ(c−r)², so several outputs' errors combine exactly (``combined_rel_l2``)
    ref_sq: float = field(default=0.0, repr=False)
    diff_sq: float = field(default=0.0, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("ref_sq", "diff_sq")}


def combined_rel_l2(outputs: Sequence[OutputMetrics]) -> float:
    """‖c − r‖ / ‖r‖ over the floating-point outputs taken together (all outputs when none is float)."""
    chosen = [o for o in outputs if o.cosine is not None] or list(outputs)
    ref = sum(o.ref_sq for o in chosen)
    diff = sum(o.diff_sq for o in chosen)
    return float(np.sqrt(diff / ref)) if ref > 0 else (0.0 if diff == 0 else float("inf"))


def worst_cosine(outputs: Sequence[OutputMetrics]) -> float | None:
    """The lowest mean cosine among the floating-point outputs (None when there is none)."""
    values = [o.cosine for o in outputs if o.cosine is not None]
    return min(values) if values else None


class Comparison:
    """Accumulators for every output of one model pair: ``add`` a batch's outputs, then ``metrics``."""

    def __init__(self, names: Sequence[str], top1: bool = False) -> None:
        self.names = list(names)
        self.acc = {n: OutputAccumulator(n, top1) for n in self.names}

    def add(self, ref: Sequence[np.ndarray], cand: Sequence[np.ndarray], rows: int | None) -> None:
        for name, r, c in zip(self.names, ref, cand, strict=True):
            self.acc[name].update(r, c, rows)

    def metrics(self) -> list[OutputMetrics]:
        return [self.acc[n].metrics() for n in self.names]


def batch_rows(batch: Mapping[str, np.ndarray], data: CalibrationData) -> int | None:
    """The number of samples in ``batch`` (None when the inputs have no common sample axis)."""
    for name in data.batched:
        if name in batch and batch[name].ndim:
            return int(batch[name].shape[0])
    return None


# ---------------------------------------------------------------------------------------------- the command's work


@dataclass
class CompareReport:
    reference: str
    candidate: str
    data: str
    batches: int
    samples: int
    seconds: float
    outputs: list[OutputMetrics]
    min_cosine: float | None = None

    @property
    def failed(self) -> list[str]:
        """Outputs below ``min_cosine`` (a NaN cosine fails too)."""
        if self.min_cosine is None:
            return []
        return [o.name for o in self.outputs if o.cosine is not None and not o.cosine >= self.min_cosine]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "reference": self.reference,
            "candidate": self.candidate,
            "data": self.data,
            "batches": self.batches,
            "samples": self.samples,
            "seconds": round(self.seconds, 4),
            "rel_l2": combined_rel_l2(self.outputs),
            "cosine": worst_cosine(self.outputs),
            "outputs": [o.to_dict() for o in self.outputs],
        }
        if self.min_cosine is not None:
            d["gate"] = {"min_cosine": self.min_cosine, "passed": not self.failed, "failed": self.failed}
        return d

    def gate(self) -> None:
        """GateFailure (exit 2) naming the outputs whose mean cosine is below ``min_cosine``."""
        if self.min_cosine is None:
            return
        if all(o.cosine is None for o in self.outputs):
            raise OnnxSparseError("--min-cosine: no output is floating point, so none has a cosine to gate on")
        bad = self.failed
        if bad:
            worst = {o.name: o.cosine for o in self.outputs}
            raise GateFailure(
                ", ".join(f"output '{n}' cosine {worst[n]:.4f}" for n in bad) + f" < --min-cosine {self.min_cosine}"
            )


def session(model: Model, what: str, threads: int | None = None) -> Any:
    """An ORT CPU session, graph optimisations on; ORT's own errors become one line naming ``what``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort_session(model, opts)
    except Exception as e:  # ORT raises its own exception types
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise OnnxSparseError(f"onnxruntime cannot load the {what} model: {first[:300]}") from e


def run_session(sess: Any, batch: Mapping[str, np.ndarray], what: str, index: int) -> list[np.ndarray]:
    try:
        return list(sess.run(None, dict(batch)))
    except Exception as e:  # ORT's own exception types
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise OnnxSparseError(f"onnxruntime failed on batch {index} of the {what} model: {first[:300]}") from e


def compare_models(
    reference: Model,
    candidate: Model,
    data: Any,
    samples: int | None = None,
    batch_size: int | None = None,
    top1: bool = False,
    min_cosine: float | None = None,
    progress: bool = False,
) -> CompareReport:
    """Run both models on ``data`` (any form ``open_calibration`` takes) and compare their outputs."""
    check_same_interface(reference.proto, candidate.proto)
    if min_cosine is not None and not -1.0 <= min_cosine <= 1.0:
        raise OnnxSparseError(f"--min-cosine must be in [-1, 1], got {min_cosine}")
    stream = open_calibration(data, reference, samples=samples, batch_size=batch_size)
    cand_specs: dict[str, InputSpec] = input_specs(candidate.proto)
    start = time.perf_counter()
    ref_sess = session(reference, "reference")
    cand_sess = session(candidate, "candidate")
    names = [o.name for o in ref_sess.get_outputs()]
    comparison = Comparison(names, top1)
    batches = 0
    with Progress(stream.batches_hint, desc="compare", unit="batch", enabled=progress) as bar:
        for batch in stream:
            batches += 1
            check_batch(batch, cand_specs, f"batch {batches} (candidate model)")
            ref_out = run_session(ref_sess, batch, "reference", batches)
            cand_out = run_session(cand_sess, batch, "candidate", batches)
            comparison.add(ref_out, cand_out, batch_rows(batch, stream))
            del ref_out, cand_out
            bar.update()
    return CompareReport(
        reference=str(reference.source or "<in memory>"),
        candidate=str(candidate.source or "<in memory>"),
        data=stream.description,
        batches=batches,
        samples=stream.seen,
        seconds=time.perf_counter() - start,
        outputs=comparison.metrics(),
        min_cosine=min_cosine,
    )
