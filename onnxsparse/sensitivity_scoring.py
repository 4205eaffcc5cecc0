"""Scoring layers one at a time for ``onnxsparse sensitivity``: a worker holds one model copy, prunes a layer
(``pruning.prune_layer``), runs the held-out batches against the dense outputs and puts the weight back
(``LayerOutcome.undo``); ``score_layers`` runs such workers in parallel processes.

Kept apart from ``sensitivity.py`` (data split, candidates, plan measurement, report) because this is the part
that crosses a process boundary: everything a worker needs travels in one picklable ``ScoringSetup``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxsparse.compare import Comparison, OutputMetrics, combined_rel_l2, run_session, session, worst_cosine
from onnxsparse.ir.index import model_layers
from onnxsparse.ir.layers import Layer
from onnxsparse.ir.model_io import Model
from onnxsparse.progress import Progress

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class ScoringSetup:
    """Everything a scoring worker needs, sent once per process."""

    proto: bytes
    base_dir: str | None
    method: str
    n: int
    m: int
    eval_batches: list[Batch]
    dense: list[list[np.ndarray]]
    batched: frozenset[str]
    threads: int
    #: inferred shapes (Reshape-chained weights need them to be found, as ``candidates`` found them)
    shapes: dict[str, Any]
    #: ``prune_layer`` keywords: the ``prune`` pass's own defaults, so a layer is scored as the pass prunes it
    prune_kwargs: dict[str, Any] = field(default_factory=dict)


class Scorer:
    """One model copy; ``score`` prunes one layer, runs the held-out batches, and restores the weight."""

    def __init__(self, setup: ScoringSetup) -> None:
        proto = onnx.ModelProto()
        proto.ParseFromString(setup.proto)
        self.setup = setup
        self.model = Model(proto, Path(setup.base_dir) if setup.base_dir else None)
        self._layers: dict[str, Layer] | None = None
        self.names = [o.name for o in proto.graph.output]

    @property
    def layers(self) -> dict[str, Layer]:
        """The copy's layers by name, from its index (built on first use: a scorer that only measures a plan,
        ``outputs`` of another model, never walks its own graph). Pruning and ``undo`` write weight values
        only, so the index stays valid for every layer scored."""
        if self._layers is None:
            self._layers = {layer.name: layer for layer in model_layers(self.model, self.setup.shapes)}
        return self._layers

    def outputs(self, what: str) -> list[OutputMetrics]:
        """The current model's held-out outputs against the dense ones."""
        s = self.setup
        sess = session(self.model, what, threads=s.threads)
        comparison = Comparison(self.names)
        for i, (batch, ref) in enumerate(zip(s.eval_batches, s.dense, strict=True), 1):
            rows = next((int(batch[n].shape[0]) for n in s.batched if n in batch and batch[n].ndim), None)
            comparison.add(ref, run_session(sess, batch, what, i), rows)
        return comparison.metrics()

    def score(self, name: str, stats: Any) -> dict[str, Any]:
        from onnxsparse.pruning import prune_layer

        start = time.perf_counter()
        s = self.setup
        outcome = prune_layer(self.model, self.layers[name], stats, s.method, s.n, s.m, **s.prune_kwargs)
        try:
            metrics = self.outputs(f"pruned-{name}")
        finally:
            outcome.undo()
        return {
            "layer": name,
            "rel_l2": combined_rel_l2(metrics),
            "cosine": worst_cosine(metrics),
            "layer_error": float(np.sqrt(outcome.error)) if s.method != "magnitude" else None,
            "method": outcome.method,
            "notes": list(outcome.notes),
            "seconds": time.perf_counter() - start,
        }


_WORKER: dict[str, Scorer] = {}  # per worker process only: the pool's initializer fills it, tasks read it


def _init_worker(setup: ScoringSetup) -> None:
    _WORKER["scorer"] = Scorer(setup)


def _score_in_worker(name: str, stats: Any) -> dict[str, Any]:
    return _WORKER["scorer"].score(name, stats)


def score_layers(
    setup: ScoringSetup, tasks: Sequence[tuple[str, Any]], jobs: int, progress: bool
) -> Iterator[dict[str, Any]]:
    """Layer scores in completion order, from ``jobs`` processes (or this one)."""
    last = {"layer": ""}
    with Progress(
        len(tasks), desc="sensitivity", unit="layer", enabled=progress, postfix=lambda: {"last": last["layer"]}
    ) as bar:
        if jobs == 1 or len(tasks) < 2:
            scorer = Scorer(setup)
            for name, stats in tasks:
                result = scorer.score(name, stats)
                last["layer"] = name
                bar.update()
                yield result
            return
        import multiprocessing

        # spawn, not fork: the parent already runs ORT thread pools, which a forked child would inherit half-dead
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=min(jobs, len(tasks)), mp_context=ctx, initializer=_init_worker, initargs=(setup,)
        ) as pool:
            futures = [pool.submit(_score_in_worker, name, stats) for name, stats in tasks]
            try:
                for future in as_completed(futures):
                    result = future.result()
                    last["layer"] = result["layer"]
                    bar.update()
                    yield result
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
