"""The pass manager: ``Pipeline`` runs passes in order on one model, then cleans, sorts and checks it.

``Pipeline`` takes pass objects or pipeline text (``Pipeline("prune{pattern=2:4},validate")``, the same text as
the CLI's ``-p``, read by ``onnxsparse.grammar``); named pipelines are in ``onnxsparse.presets``. The pass
contract itself (``Pass``, ``PassConfig``, ``PassResult``, ``PassReport``, ``PassContext``) is in
``onnxsparse.pass_base`` and re-exported here, so the Python API has one module to import from.
"""

from __future__ import annotations

import logging
import time
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from onnxsparse.errors import GateFailure, OnnxSparseError
from onnxsparse.grammar import parse_pipeline
from onnxsparse.ir import interop
from onnxsparse.ir.graph import cleanup, op_counts, toposort
from onnxsparse.ir.interop import ModelLike
from onnxsparse.ir.model_io import Model, record_provenance
from onnxsparse.pass_base import (
    Pass,
    PassConfig,
    PassContext,
    PassContractError,
    PassReport,
    PassResult,
    option,
    pass_paths,
)

__all__ = [
    "Pass",
    "PassConfig",
    "PassContext",
    "PassContractError",
    "PassReport",
    "PassResult",
    "Pipeline",
    "PipelineResult",
    "check_model",
    "option",
    "pass_paths",
    "run_passes",
]

log = logging.getLogger("onnxsparse")


# ---------------------------------------------------------------------------------------------- running


@dataclass
class PipelineResult:
    """The transformed model, each pass's result, and whole-model before/after op counts.

    ``model`` is of the kind ``Pipeline.run`` was given (``onnxsparse.ir.interop``): a ``Model`` for a ``Model``
    or a path, else an ``onnx.ModelProto``, ``onnx_ir.Model`` or ``onnx_graphsurgeon.Graph``.
    """

    model: Any
    results: list[PassResult]
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    seconds: float

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {
            "modified": self.modified,
            "seconds": round(self.seconds, 4),
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "passes": [r.to_dict() for r in self.results],
        }


class Pipeline:
    """An ordered list of passes; itself usable wherever a sequence of passes is expected."""

    def __init__(self, passes: Iterable[Pass[Any]] | str) -> None:
        self.passes: list[Pass[Any]] = parse_pipeline(passes) if isinstance(passes, str) else list(passes)

    def text(self) -> str:
        return ",".join(p.text() for p in self.passes)

    def __iter__(self) -> typing.Iterator[Pass[Any]]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def run(
        self,
        model: ModelLike,
        ctx: PassContext | None = None,
        check: bool = True,
        on_pass: Callable[[Pass[Any], PassResult], None] | None = None,
    ) -> PipelineResult:
        """Run every pass in order (``Pass.apply``: its contract checked around it), then one cleanup +
        toposort, then the full ONNX checker.

        A pass's ``requires`` is checked just before that pass runs, so a later pass's missing input (e.g.
        qdq's calibration data) shows after the earlier passes ran; callers write nothing until the end.
        """
        model, back = interop.to_model(model)  # a path, ModelProto, onnx_ir.Model or gs.Graph -> Model
        ctx = ctx or PassContext()
        start = time.perf_counter()
        before = op_counts(model.proto.graph)
        results: list[PassResult] = []
        gate: GateFailure | None = None
        for p in self.passes:
            t0 = time.perf_counter()
            try:
                result = p.apply(model, ctx)
            except GateFailure as e:
                gate = e
                break
            result.seconds = time.perf_counter() - t0
            result.name = p.name
            model = result.model
            results.append(result)
            log.info("%s: modified=%s in %.3fs", p.name, result.modified, result.seconds)
            if on_pass is not None:
                on_pass(p, result)
        if any(r.modified for r in results):
            cleanup(model.proto.graph)
            toposort(model.proto.graph)
            model.layer_cache.invalidate()  # both copy nodes and initializers the layers pointed at
            record_provenance(model, self.text())
        if check:
            check_model(model)
        ops_after = op_counts(model.proto.graph)
        out = PipelineResult(back(model), results, before, ops_after, time.perf_counter() - start)
        if gate is not None:
            gate.result = out  # type: ignore[attr-defined]
            raise gate
        return out


def check_model(model: Model) -> None:
    """``onnx.checker`` with full_check (strict shape inference) on the in-memory model (``ir.checker``)."""
    from onnxsparse.ir.checker import check_proto

    try:
        check_proto(model.proto, model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise OnnxSparseError(f"the result fails the ONNX checker: {str(e).splitlines()[0][:300]}") from e


def run_passes(model: Model, passes: Sequence[Pass[Any]], ctx: PassContext | None = None) -> PipelineResult:
    """Shorthand for ``Pipeline(passes).run(model, ctx)``."""
    return Pipeline(passes).run(model, ctx)
