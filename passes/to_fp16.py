"""to-fp16: weights and activations to float16, for TensorRT 11's strongly typed builds.

TensorRT 11 removed the FP16 builder flag: a network runs in the precision its ONNX file says. This pass
writes that precision into the model. The conversion, driven by the ONNX op schemas rather than by a list
of ops, is ``onnxsparse.fp16`` (the rules are in its docstring), on types decided by ``onnxsparse.fp16_types``.
It rewrites the model's onnx-ir view (``onnxsparse.ir.onnxir.IrView``) and commits it into the same
``ModelProto``; tensors it does not convert are kept, not copied.

Weights keep their zeros (fp16 0 is 0): a 2:4 mask survives. Values beyond ±``max-finite`` are clamped
instead of becoming inf, and non-zero values below ``min-positive`` are kept at ±``min-positive`` rather
than flushed to 0 (both are counted in the report).

Why not onnxconverter-common's ``convert_float_to_float16``, or ONNX Runtime's modified copy of it
(``onnxruntime.transformers.float16``)? Both decide by op type (a fixed block list; ORT's copy adds a
hand-written table of float32-only inputs for Resize and GroupNorm), not by the schema at the model's opset.
``tools/fp16_peers.py`` runs them with float32 I/O on five of this pass's test models (onnx 1.23.2):
onnxconverter-common 1.16.0 gives three models ONNX Runtime rejects (DequantizeLinear's scale made float16
at opset 13, where the schema allows only float32; a type clash at an Exp; two Casts of the same name in
an If's branches); ORT 1.32.0's copy gives five that ``onnx.checker`` rejects (the Casts it adds are not in
topological order), two of which ORT rejects too (the DequantizeLinear scale; a float16/float32 clash at a
Mul in a subgraph), and a Cast feeding a Cast. to-fp16 passes the full checker and runs in ORT on all five.
onnx-ir's ``ConvertFloatToFloat16Pass`` is not in onnx-ir 1.1.0 (the newest pip offered here); the repository
version (``passes/common/float16_conversion.py``, read, not run) changes value types, initializers and tensor
attributes but adds no Cast node, so a blocked node or a float32-only input would read float16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from onnxsparse.fp16 import convert, fp16_array
from onnxsparse.ir.model_io import Model
from onnxsparse.pass_base import Pass, PassConfig, PassContext, PassReport, PassResult, option
from onnxsparse.render import grouped_reasons

#: Kept float32 by default. Exp and Pow overflow fp16's 65504 for modest inputs (exp(x) for x > 11.1, x² for
#: |x| > 256, e.g. the variance step of a decomposed LayerNorm); sums, products and log-sum-exp reductions
#: accumulate past it; CumSum and Range carry indices and positions that lose integer precision above 2048.
#: Softmax and LayerNormalization are not blocked: runtimes compute them stably (max-subtracted, fp32 stash).
DEFAULT_BLOCK_OPS: tuple[str, ...] = (
    "Exp",
    "Pow",
    "CumSum",
    "Range",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceProd",
)
FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL = 5.96e-08


@dataclass(frozen=True)
class ToFp16Config(PassConfig):
    """Options of ``to-fp16``."""

    keep_io_types: bool = option(True, "keep the model's inputs and outputs float32 (Casts at the edges)")
    block_ops: tuple[str, ...] = option(
        DEFAULT_BLOCK_OPS, "op types kept float32, with Casts around them (replaces the default list)"
    )
    block_nodes: str = option("", "regex on node names kept float32 (e.g. 'head.*|.*norm.*')")
    max_finite: float = option(FP16_MAX, "float32 constants beyond ±this are clamped to it instead of becoming inf")
    min_positive: float = option(
        FP16_MIN_SUBNORMAL, "non-zero constants smaller than this become ±this instead of 0 (zeros stay 0)"
    )

    def __post_init__(self) -> None:
        if not 0 < self.max_finite <= FP16_MAX:
            raise ValueError(f"max-finite must be in (0, {FP16_MAX}]")
        if not 0 <= self.min_positive < self.max_finite:
            raise ValueError("min-positive must be >= 0 and below max-finite")
        try:
            re.compile(self.block_nodes)
        except re.error as e:
            raise ValueError(f"block-nodes is not a valid regex: {e}") from e


class ToFp16Pass(Pass[ToFp16Config]):
    """Convert float32 weights and activations to float16 (TensorRT 11 strong typing; smaller models)."""

    name = "to-fp16"
    config_cls = ToFp16Config
    in_place = True
    summary = "float32 weights and activations to float16; I/O kept float32 by Casts; overflow-prone ops blocked"

    def reads_calibration(self) -> bool:
        return False  # works on the weights alone

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        report = PassReport()
        modified = convert(model, self.config, report)
        return PassResult(model, modified, report)

    def render(self, result: PassResult) -> str | None:
        """One summary line, clamping if any, then what stayed float32 grouped by reason."""
        d = result.report.details
        if not d:
            return None
        lines = [
            f"  {d.get('nodes_converted', 0)} node(s) compute in float16, {d.get('nodes_kept_float32', 0)} kept "
            f"float32; {d.get('initializers_converted', 0)} initializer(s) and {d.get('constants_converted', 0)} "
            f"constant(s) converted; {d.get('casts_inserted', 0)} Cast(s) inserted"
            + ("; model inputs/outputs stay float32" if d.get("keep_io_types") else "")
        ]
        if d.get("clamped_high"):
            lines.append(f"  {d['clamped_high']} weight value(s) beyond ±{self.config.max_finite:g} clamped")
        lines.extend(grouped_reasons(result.report.skipped, verb="float32"))
        return "\n".join(lines)


def convert_to_fp16(model: Model, **options: Any) -> PassReport:
    """Library shorthand: convert ``model`` in place and return the report."""
    result = ToFp16Pass(**options).apply(model, PassContext())
    return result.report


__all__ = ["DEFAULT_BLOCK_OPS", "ToFp16Config", "ToFp16Pass", "convert_to_fp16", "fp16_array"]
