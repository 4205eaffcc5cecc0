"""Layer sensitivity to n:m pruning, and a pruning plan within an accuracy budget (``onnxsparse sensitivity``).

For each eligible layer, that layer *alone* is pruned (``pruning.prune_layer``, statistics collected once on
the dense model) and the model's outputs on held-out samples are compared with the dense outputs
(``compare.Comparison``: relative L2 over all float outputs, and the worst output's mean cosine). Layers are
independent, so they are scored in parallel worker processes; each worker keeps one copy of the model, prunes
a layer, runs the held-out samples, and puts the weight back (``LayerOutcome.undo``).

Held-out samples are the first ``eval_samples`` samples of the calibration data (or ``eval_data``); the
statistics come from the rest, so a layer is never judged on the rows it was fitted to. Both parts are kept in
memory as batches (calibration sets are small: 128 sentences of 64 token ids are 64 KB), and so are the dense
model's held-out outputs (they are the reference every layer is compared with); a layer's own outputs are folded
into running sums and dropped.

With a budget, ``plan.choose_plan`` picks the layers (see ``onnxsparse/plan.py``); the plan is then applied the
way ``prune{plan=...}`` applies it (on a copy, statistics from the non-held-out samples) and measured on the same
held-out samples; while the measured error is over the budget, the layer with the least gain per error is dropped
and the plan measured again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxsparse.calibration.histogram import CalibrationData, open_calibration
from onnxsparse.compare import combined_rel_l2, run_session, session, worst_cosine
from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.index import model_layers
from onnxsparse.ir.layers import check_regex, select_reason
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.reasons import Skip, code_key
from onnxsparse.plan import PLAN_VERSION, PlanResult, bench_gains, choose_plan, error_of, flop_gains
from onnxsparse.progress import Progress
from onnxsparse.sensitivity_scoring import Batch, Scorer, ScoringSetup, score_layers
from onnxsparse.sparsity import parse_pattern

log = logging.getLogger("onnxsparse.sensitivity")


@dataclass(frozen=True)
class SensitivityOptions:
    """What to prune each layer with and how to score it."""

    method: str = "magnitude"
    pattern: str = "2:4"
    #: held-out samples taken from the front of the calibration data (or from ``eval_data``)
    eval_samples: int = 32
    #: worker processes (1: score in this process). They are spawned, so a script that calls this with jobs > 1
    #: needs the usual ``if __name__ == "__main__":`` guard (and cannot be read from stdin)
    jobs: int = 1
    mask_input: str | None = None
    include: str | None = None
    exclude: str | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        from onnxsparse.pruning import METHODS

        if self.method not in METHODS:
            raise OnnxSparseError(f"unknown pruning method '{self.method}' (choose {', '.join(METHODS)})")
        parse_pattern(self.pattern)
        if self.eval_samples <= 0:
            raise OnnxSparseError(f"--eval-samples must be positive, got {self.eval_samples}")
        if self.jobs <= 0:
            raise OnnxSparseError(f"--jobs must be positive, got {self.jobs}")
        check_regex("sensitivity", "include", self.include)
        check_regex("sensitivity", "exclude", self.exclude)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class HeldOut:
    """Held-out batches, the statistics batches, and which inputs carry samples."""

    eval_batches: list[Batch]
    stats_batches: list[Batch]
    batched: frozenset[str]
    description: str

    def rows(self, batch: Mapping[str, np.ndarray]) -> int | None:
        for name in self.batched:
            if name in batch and batch[name].ndim:
                return int(batch[name].shape[0])
        return None

    @property
    def eval_count(self) -> int:
        return sum(self.rows(b) or 1 for b in self.eval_batches)

    @property
    def stats_count(self) -> int:
        return sum(self.rows(b) or 1 for b in self.stats_batches)


def _take(stream: CalibrationData, count: int | None) -> tuple[list[Batch], list[Batch]]:
    """(the first ``count`` samples, the rest) of a validated stream; a batch straddling the cut is split."""
    head: list[Batch] = []
    rest: list[Batch] = []
    left = count
    for batch in stream:
        if left is None or left <= 0:
            rest.append(batch)
            continue
        rows = next((int(batch[n].shape[0]) for n in stream.batched if n in batch and batch[n].ndim), 1)
        if rows <= left or not stream.batched:
            head.append(batch)
            left -= rows
            continue
        head.append({k: (v[:left] if k in stream.batched else v) for k, v in batch.items()})
        rest.append({k: (v[left:] if k in stream.batched else v) for k, v in batch.items()})
        left = 0
    return head, rest


def split_data(model: Model, calib: Any, eval_data: Any, eval_samples: int, batch_size: int | None) -> HeldOut:
    """Held-out and statistics batches, validated against the model's inputs (see the module docstring)."""
    stream = open_calibration(calib, model, batch_size=batch_size)
    if eval_data is None:
        held, stats = _take(stream, eval_samples)
        where = f"first {eval_samples} samples of {stream.description} held out, the rest for statistics"
    else:
        stats, _ = _take(stream, None)
        other = open_calibration(eval_data, model, batch_size=batch_size)
        held, _ = _take(other, eval_samples)
        held = held or []
        where = f"up to {eval_samples} samples of {other.description} held out; {stream.description} for statistics"
    return HeldOut(held, stats, stream.batched, where)


# ---------------------------------------------------------------------------------------------- layers


@dataclass
class Candidate:
    """An eligible layer: its name, op, GEMM and FLOP (or parameter) count."""

    name: str
    op: str
    weight: str
    gemm: str
    flops: int
    params: int


def candidates(
    model: Model, options: SensitivityOptions, shapes: Mapping[str, Any]
) -> tuple[list[Candidate], list[dict[str, str]]]:
    """Eligible layers for the pattern and the include/exclude filters, and the others with why."""
    from onnxsparse.pruning.layout import problems

    _, m = parse_pattern(options.pattern)
    layers = model_layers(model, shapes)
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    out: list[Candidate] = []
    skipped: list[dict[str, str]] = []
    for layer in layers:
        why: Skip | str | None = layer.check_pattern(m) or select_reason(layer, options.include, options.exclude)
        if why is None and layer.source is None:
            why = "no constant weight"
        if why is None and layer.shared_with:
            why = f"weight '{layer.weight_name}' is shared with {', '.join(layer.shared_with)}"
        if why is None and counts[layer.name] > 1:
            why = f"{counts[layer.name]} layers are named '{layer.name}': a plan could not tell them apart"
        if why is None and options.method != "magnitude" and layer.graph_path != "main":
            why = f"inside a subgraph ({layer.graph_path}): {options.method} statistics cover the main graph only"
        if why is None:
            p = problems(layer)
            why = p if isinstance(p, str) else None
        if why is not None:
            skipped.append({"name": layer.name, "reason": str(why), **code_key(why)})
            continue
        g = layer.gemm_shape(dict(shapes))
        assert layer.source is not None
        params = int(np.prod(layer.source.shape, dtype=np.int64))
        out.append(
            Candidate(
                layer.name,
                layer.op_type,
                layer.weight_name or "",
                "" if g is None else f"{g.m}x{g.n}x{g.k}",
                0 if g is None else g.flops,
                params,
            )
        )
    return out, skipped


# ---------------------------------------------------------------------------------------------- the report


@dataclass
class SensitivityReport:
    model: str
    method: str
    pattern: str
    data: str
    eval_samples: int
    stats_samples: int
    gains_basis: str
    layers: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    seconds: dict[str, float]
    plan: PlanResult | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "plan"}
        d["plan"] = None if self.plan is None else self.plan.to_dict()
        return d


def _measure_plan(
    model: Model, layers: list[str], options: SensitivityOptions, data: HeldOut, scorer: Scorer, progress: bool
) -> dict[str, Any]:
    """Apply the plan as ``prune{plan=...}`` does (on a copy) and compare on the held-out samples."""
    from onnxsparse.passes.prune import PrunePass
    from onnxsparse.pipeline import PassContext

    with tempfile.TemporaryDirectory(prefix="onnxsparse-plan-") as tmp:
        path = Path(tmp) / "plan.json"
        path.write_text(
            json.dumps(
                {"version": PLAN_VERSION, "method": options.method, "pattern": options.pattern, "layers": layers}
            )
        )
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        copy = Model(proto, model.base_dir, model.source, model.store)
        calibrated = options.method != "magnitude"
        prune = PrunePass(
            pattern=options.pattern,
            method=options.method,
            plan=str(path),
            **({"mask_input": options.mask_input} if calibrated and options.mask_input else {}),
        )
        ctx = PassContext(calibration=data.stats_batches if calibrated else None, workdir=Path(tmp), progress=progress)
        prune.run(copy, ctx)
        saved = scorer.model
        scorer.model = copy
        try:
            metrics = scorer.outputs("planned")
        finally:
            scorer.model = saved
    return {"rel_l2": combined_rel_l2(metrics), "cosine": worst_cosine(metrics)}


def run_sensitivity(
    model: Model,
    calib: Any,
    options: SensitivityOptions,
    eval_data: Any = None,
    bench: str | None = None,
    max_error: float | None = None,
    min_cosine: float | None = None,
    progress: bool = False,
) -> SensitivityReport:
    """Score every eligible layer; with a budget, choose, apply and measure a plan (see the module docstring)."""
    from onnxsparse.ir.shapes import infer_shapes
    from onnxsparse.passes.prune import PruneConfig
    from onnxsparse.pruning.collect import collect
    from onnxsparse.pruning.layout import stats_shape

    if max_error is not None and min_cosine is not None:
        raise OnnxSparseError("give --max-error or --min-cosine, not both")
    if max_error is not None and not max_error >= 0:
        raise OnnxSparseError(f"--max-error must be >= 0, got {max_error}")
    if min_cosine is not None and not -1.0 <= min_cosine <= 1.0:
        raise OnnxSparseError(f"--min-cosine must be in [-1, 1], got {min_cosine}")
    n, m = parse_pattern(options.pattern)
    t0 = time.perf_counter()
    data = split_data(model, calib, eval_data, options.eval_samples, options.batch_size)
    if not data.eval_batches:
        raise OnnxSparseError("no held-out samples: the evaluation data is empty")
    if options.method != "magnitude" and not data.stats_batches:
        raise OnnxSparseError(
            f"method {options.method} needs statistics, but all {data.eval_count} calibration "
            f"samples are held out: lower --eval-samples or pass --eval-data"
        )
    first = data.eval_batches[0]
    shapes = infer_shapes(model.proto, {k: tuple(v.shape) for k, v in first.items()})
    cands, skipped = candidates(model, options, shapes)
    if not cands:
        raise OnnxSparseError(
            f"no layer of {model.source or 'the model'} can be pruned to {options.pattern}"
            + (f" ({skipped[0]['name']}: {skipped[0]['reason']})" if skipped else "")
        )
    gains = (
        bench_gains(bench, [c.name for c in cands])
        if bench
        else flop_gains({c.name: c.flops for c in cands}, {c.name: c.params for c in cands})
    )

    t_dense = time.perf_counter()
    dense_sess = session(model, "dense")
    dense = [run_session(dense_sess, b, "dense", i) for i, b in enumerate(data.eval_batches, 1)]
    del dense_sess
    stats: dict[str, Any] = {}
    t_stats = time.perf_counter()
    defaults = PruneConfig()
    if options.method != "magnitude":
        by_name = {layer.name: layer for layer in model_layers(model, shapes)}
        chosen_layers = [by_name[c.name] for c in cands]
        # as the prune pass does: above max-k only the diagonal (Wanda's statistic), not a K x K matrix
        thin = [ly.name for ly in chosen_layers if options.method == "wanda" or stats_shape(ly)[0] > defaults.max_k]
        stats = collect(
            model, chosen_layers, data.stats_batches, mask_input=options.mask_input, diag_only=thin, progress=progress
        ).stats
    t_score = time.perf_counter()
    cores = os.cpu_count() or 1
    jobs = min(options.jobs, len(cands))
    setup = ScoringSetup(
        model.proto.SerializeToString(),
        None if model.base_dir is None else str(model.base_dir),
        options.method,
        n,
        m,
        data.eval_batches,
        dense,
        data.batched,
        max(1, cores // jobs),
        dict(shapes),
        {
            "block_size": defaults.block_size,
            "damp": defaults.damp,
            "bias_correction": defaults.bias_correction and options.method != "magnitude",
            "refit_iters": defaults.refit if options.method == "sparsegpt" else 0,
        },
    )
    results = {r["layer"]: r for r in score_layers(setup, [(c.name, stats.get(c.name)) for c in cands], jobs, progress)}
    t_plan = time.perf_counter()
    rows = []
    for c in cands:
        r = results[c.name]
        rows.append(
            {
                "layer": c.name,
                "op": c.op,
                "weight": c.weight,
                "gemm": c.gemm,
                "flops": c.flops,
                "params": c.params,
                "gain": gains.by_layer.get(c.name, 0.0),
                "gain_note": gains.notes.get(c.name),
                **{k: r[k] for k in ("rel_l2", "cosine", "layer_error", "method", "notes", "seconds")},
            }
        )
    rows.sort(key=lambda r: (-(r["rel_l2"] if np.isfinite(r["rel_l2"]) else np.inf), r["layer"]))
    report = SensitivityReport(
        model=str(model.source or "<in memory>"),
        method=options.method,
        pattern=options.pattern,
        data=data.description,
        eval_samples=data.eval_count,
        stats_samples=data.stats_count,
        gains_basis=gains.basis,
        layers=rows,
        skipped=skipped,
        seconds={},
    )
    if max_error is not None or min_cosine is not None:
        use_cos = min_cosine is not None
        budget = (1.0 - min_cosine) if min_cosine is not None else float(max_error)  # type: ignore[arg-type]
        errors = {r["layer"]: error_of(r, use_cos) for r in rows}
        chosen = choose_plan(errors, gains.by_layer, budget)
        scorer = Scorer(setup)
        dropped: list[str] = []
        count = 0
        measured: dict[str, Any] = {"rel_l2": 0.0, "cosine": 1.0}
        with Progress(None, desc="plan measurement", unit="plan", enabled=progress) as bar:
            while chosen:
                measured = _measure_plan(model, chosen, options, data, scorer, progress)
                count += 1
                bar.update()
                got = error_of(measured, use_cos)
                if got <= budget:
                    break
                # errors did not add up as assumed: scale the estimate by what was measured, then drop the
                # layers with the least gain per error until the scaled estimate fits (at least one)
                est = sum(errors[nm] for nm in chosen)
                target = budget * est / got if got > 0 and np.isfinite(got) else 0.0
                while True:
                    worst = min(chosen, key=lambda nm: (gains.by_layer.get(nm, 0.0) / max(errors[nm], 1e-300), nm))
                    chosen.remove(worst)
                    dropped.append(worst)
                    if not chosen or sum(errors[nm] for nm in chosen) <= target:
                        break
            if not chosen:
                measured = {"rel_l2": 0.0, "cosine": 1.0}
        kind = "cosine" if use_cos else "rel_l2"
        est_err = sum(errors[nm] for nm in chosen)
        estimated: dict[str, Any] = {"error_sum": est_err, "basis": gains.basis, "layers": len(chosen)}
        if use_cos:
            estimated["cosine"] = 1.0 - est_err
        else:
            estimated["rel_l2"] = est_err
        if gains.basis == "bench":
            estimated["speedup"] = gains.speedup(chosen)
        else:
            estimated[f"{gains.basis}_share"] = gains.share(chosen)
        budget_doc: dict[str, Any] = {"min_cosine": min_cosine} if use_cos else {"max_error": max_error}
        report.plan = PlanResult(
            chosen,
            {**budget_doc, "kind": kind},
            estimated,
            measured,
            dropped,
            count,
        )
    t_end = time.perf_counter()
    report.seconds = {
        "data": round(t_dense - t0, 3),
        "dense": round(t_stats - t_dense, 3),
        "statistics": round(t_score - t_stats, 3),
        "layers": round(t_plan - t_score, 3),
        "plan": round(t_end - t_plan, 3),
        "total": round(t_end - t0, 3),
    }
    log.info("sensitivity: %d layers scored with %s in %.1f s", len(rows), options.method, t_end - t0)
    return report
