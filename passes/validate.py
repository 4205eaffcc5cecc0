"""``validate``: per-layer n:m sparsity report and CI gate (also the ``onnxsparse check`` command).

For every weighted layer it says whether the weight *is* n:m along the reduction axis (every group is
checked and violating groups are counted), could be (dense but eligible) or cannot be (and why), what GEMM
it computes (FLOPs from inferred shapes, ``--shapes`` for symbolic dims), and where TensorRT is unlikely to
pick a sparse kernel even for a 2:4 weight. The summary gives layers sparse / eligible / total and the
FLOP-weighted coverage: the share of all weighted-layer FLOPs whose weight is n:m.

Gates: ``min-coverage`` (coverage below it fails) and ``require-all`` (any eligible layer still dense fails).
A failed gate raises ``GateFailure``: the pipeline stops and the CLI exits 2. The pass never changes the model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxsparse.errors import GateFailure, OnnxSparseError
from onnxsparse.ir.index import model_layers
from onnxsparse.ir.layers import GemmShape, Layer
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.shapes import Shape, concrete, fill_symbolic, infer_shapes, symbolic_dims
from onnxsparse.ir.stream import check_tensor, streamable
from onnxsparse.pass_base import Pass, PassConfig, PassContext, PassContractError, PassReport, PassResult, option
from onnxsparse.render import human_count, table
from onnxsparse.sparsity import (
    StoredWeight,
    check_finite,
    constants_by_name,
    count_violations,
    parse_pattern,
    stored_weight,
)

log = logging.getLogger("onnxsparse.passes.validate")

#: TensorRT usually keeps layers with fewer channels than this dense (REFERENCE.md: "often < 256").
SMALL_CHANNELS = 256
#: cuSPARSELt wants the structured operand's dims to be multiples of these (fp16/bf16, int8).
ALIGN_FP16, ALIGN_INT8 = 16, 32

SPARSE, ELIGIBLE, INELIGIBLE = "sparse", "eligible", "ineligible"

#: a stored tensor's statistics by (``Source.key``, "reduction axis/m"): a weight shared by layers is read once
_StatsCache = dict[tuple[tuple[str, str, str], str], dict[str, Any]]


@dataclass(frozen=True)
class ValidateConfig(PassConfig):
    """Options of the ``validate`` pass (and of ``onnxsparse check``)."""

    pattern: str = option("2:4", "n:m pattern to check: at most n non-zeros in every group of m.")
    min_coverage: float | None = option(
        None, "Fail (exit 2) when the FLOP-weighted n:m coverage is below this fraction (0..1)."
    )
    require_all: bool = option(False, "Fail (exit 2) when any eligible layer is not n:m.")

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        if self.min_coverage is not None and not 0.0 <= self.min_coverage <= 1.0:
            raise OnnxSparseError(f"min-coverage must be a fraction between 0 and 1, got {self.min_coverage}")


class ValidatePass(Pass[ValidateConfig]):
    """Report n:m sparsity per layer and fail the pipeline when a gate is not met."""

    name = "validate"
    config_cls = ValidateConfig
    in_place = True
    summary = "per-layer n:m sparsity report, FLOP-weighted coverage, CI gates (min-coverage, require-all)"

    def reads_calibration(self) -> bool:
        return False  # works on the weights alone

    def ensures(self, model: Model, ctx: PassContext, result: PassResult) -> None:
        """What the report claims is n:m is what was counted: a row is "sparse" exactly when none of its
        groups violates the pattern, the summary counts those rows, and a passed gate means what it says.

        Cheap: it reads the rows this pass computed, never the weights again.
        """
        d = result.report.details
        rows, summary, gate = d["layers"], d["summary"], d["gate"]
        for row in rows:
            counted = row["violations"]
            if (row["status"] == SPARSE and counted != 0) or (row["status"] == ELIGIBLE and not counted):
                raise PassContractError(f"validate: '{row['layer']}' is {row['status']} with {counted} violations")
        sparse = sum(r["status"] == SPARSE for r in rows)
        dense = sum(r["status"] == ELIGIBLE for r in rows)
        if (summary["sparse"], summary["dense_eligible"]) != (sparse, dense):
            raise PassContractError(f"validate: the summary counts do not match its {len(rows)} rows")
        if gate["passed"] and self.config.require_all and dense:
            raise PassContractError(f"validate: the require-all gate passed with {dense} layer(s) not {d['pattern']}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        report = self.analyse(model, ctx)
        result = PassResult(model, False, report, name=self.name)
        try:
            self.gate(report)
        except GateFailure as e:
            e.pass_result = result  # type: ignore[attr-defined]  # lets a CLI print the table anyway
            raise
        return result

    def analyse(self, model: Model, ctx: PassContext) -> PassReport:
        """The per-layer rows and the summary (``report.details["layers"]`` / ``["summary"]``)."""
        n, m = parse_pattern(self.config.pattern)
        shapes, basis = _shapes(model, ctx)
        layers = model_layers(model, shapes)
        consts = constants_by_name(model.proto)
        cache: _StatsCache = {}
        rows = [_row(layer, n, m, shapes, consts, model, cache) for layer in _progress(layers, ctx.progress)]
        report = PassReport()
        report.details["pattern"] = f"{n}:{m}"
        report.details["layers"] = rows
        report.details["summary"] = _summary(rows, have_shapes=bool(shapes), basis=basis)
        summary = report.details["summary"]
        if self.config.min_coverage is not None and summary["coverage_basis"] == "params":
            log.warning(
                "the coverage gate weights layers by parameters, not FLOPs: %s", summary["coverage_basis_detail"]
            )
        gate = self._gate_failures(report)
        report.details["gate"] = {
            "min_coverage": self.config.min_coverage,
            "require_all": self.config.require_all,
            "passed": not gate,
            "failures": gate,
        }
        for row in rows:
            if row["status"] == INELIGIBLE:
                report.skip(row["layer"], row["reason"], op=row["op"], weight=row["weight"])
        return report

    def _gate_failures(self, report: PassReport) -> list[str]:
        cfg = self.config
        summary = report.details["summary"]
        failures = []
        pattern = report.details["pattern"]
        if cfg.min_coverage is not None and summary["coverage"] < cfg.min_coverage:
            failures.append(
                f"{pattern} coverage {summary['coverage']:.1%} ({summary['coverage_basis']}-weighted) "
                f"is below min-coverage {cfg.min_coverage:.1%}"
            )
        if cfg.require_all:
            dense = [r["layer"] for r in report.details["layers"] if r["status"] == ELIGIBLE]
            if dense:
                shown = ", ".join(dense[:5]) + (f", ... (+{len(dense) - 5})" if len(dense) > 5 else "")
                failures.append(f"{len(dense)} eligible layer(s) are not {pattern}: {shown}")
        return failures

    def gate(self, report: PassReport) -> None:
        """Raise ``GateFailure`` when a gate of this config is not met by ``report``."""
        failures = report.details["gate"]["failures"]
        if failures:
            raise GateFailure("; ".join(failures))

    def render(self, result: PassResult) -> str | None:
        return render_report(result.report)


def _shapes(model: Model, ctx: PassContext) -> tuple[dict[str, Shape], dict[str, Any]]:
    """Shapes for FLOPs, and how coverage can be weighted with them (``_scaling_dims``).

    Without user shapes a failing inference only costs the FLOP column.
    """
    basis: dict[str, Any] = {"dims": dict(ctx.shapes) or None}
    if not ctx.shapes and symbolic_dims(model.proto):
        probed, basis = _scaling_dims(model)
        if probed:
            return probed, basis
    try:  # the dims that are known still give the table its GEMMs
        return infer_shapes(model.proto, ctx.shapes), basis
    except OnnxSparseError:
        if ctx.shapes:
            raise
        log.warning("shape inference failed; FLOPs unknown (coverage falls back to parameter counts)")
        return {}, {"dims": None, "why_params": "shape inference failed"}


def _layer_flops(model: Model, shapes: dict[str, Shape]) -> list[tuple[str, int | None]]:
    return [
        (layer.name, g.flops if (g := layer.gemm_shape(shapes) or _activation_gemm(layer, shapes)) else None)
        for layer in model_layers(model, shapes)
    ]


#: probe sizes for a symbolic dim: large enough that strided layers' ceil() rounding does not hide growth
_PROBE = 64


def _proportional(a: list[tuple[str, int | None]], b: list[tuple[str, int | None]], dim: str) -> str | None:
    """None when every layer's FLOPs in ``b`` are one common multiple of those in ``a``; else why not."""
    if len(a) != len(b) or not a:
        return f"symbolic dim '{dim}' changes which layers are found"
    (ref, ref_a), ref_b = a[0], b[0][1]
    for (name, fa), (_, fb) in zip(a, b, strict=True):
        if not fa or not fb or not ref_a or not ref_b:
            return f"FLOPs of layer '{name}' stay unknown with '{dim}' filled in"
        if fb * ref_a != ref_b * fa:
            return f"symbolic dim '{dim}' does not scale layer '{name}' like '{ref}'"
    return None


def _scaling_dims(model: Model) -> tuple[dict[str, Shape], dict[str, Any]]:
    """Shapes for FLOP-weighted coverage without ``--shapes``, when every symbolic input dim scales every
    layer's FLOPs alike; else empty shapes and ``why_params``.

    The CI gate must not depend on whether ``--shapes`` was given. A dim that multiplies every weighted
    layer's FLOPs by one factor (the batch; the sequence of a model without attention MatMuls) cancels out of
    the FLOP-weighted coverage, so any value of it gives the same coverage. Each dim is probed at 64 and 128
    (the others as chosen so far): every layer's FLOPs must change by one factor. The dim is then set to 1
    when FLOPs at 1 are in that same proportion (a true batch dim), else to 64 (an image side: strides round
    small sizes). When a layer does not follow (attention's seq², a classifier after global pooling of a
    symbolic image size, a branch of fixed size) or its FLOPs stay unknown, ``why_params`` says which.
    """
    dims = symbolic_dims(model.proto)
    values = dict.fromkeys(dims, 1)

    def probe(vals: dict[str, int]) -> tuple[dict[str, Shape], list[tuple[str, int | None]]]:
        shapes = infer_shapes(model.proto, fill_symbolic(model.proto, vals))
        return shapes, _layer_flops(model, shapes)

    try:
        shapes, current = probe(values)
        if not current:
            return {}, {"dims": None, "why_params": "no weighted layer"}
        for dim in dims:
            shapes_p, at_p = probe({**values, dim: _PROBE})
            odd = _proportional(at_p, probe({**values, dim: 2 * _PROBE})[1], dim)
            if odd is not None:
                return {}, {"dims": None, "why_params": f"{odd}: give --shapes for FLOP weighting"}
            if _proportional(current, at_p, dim) is not None:
                values[dim], shapes, current = _PROBE, shapes_p, at_p
    except OnnxSparseError as e:
        return {}, {"dims": None, "why_params": f"shape inference with the symbolic dims filled failed ({e})"}
    return shapes, {"dims": values, "scaling": sorted(dims)}


def _row(
    layer: Layer,
    n: int,
    m: int,
    shapes: dict[str, Shape],
    consts: dict[str, Any],
    model: Model,
    cache: _StatsCache,
) -> dict[str, Any]:
    src = layer.source
    row: dict[str, Any] = {
        "layer": layer.name,
        "graph": layer.graph_path,
        "op": layer.op_type,
        "weight": layer.weight_name,
        "shape": list(src.shape) if src is not None else None,
        "dtype": None,
        "axis": layer.source_reduction_axis,
        "status": INELIGIBLE,
        "reason": None,
        "zeros": None,
        "violations": None,
        "groups": None,
        "gemm": None,
        "flops": None,
        "params": int(np.prod(src.shape, dtype=np.int64)) if src is not None else 0,
        "hints": [],
    }
    gemm = (layer.gemm_shape(shapes) or _activation_gemm(layer, shapes)) if shapes else None
    if gemm is not None:
        row["gemm"] = {"m": gemm.m, "n": gemm.n, "k": gemm.k, "groups": gemm.groups}
        row["flops"] = gemm.flops
    why = None if (skip := layer.check_pattern(m)) is None else str(skip)  # the rendered Reason
    stats: dict[str, Any] | str | None = None
    if src is not None and layer.source_reduction_axis is not None:
        stats = _stats(layer, n, m if why is None else 0, consts, model, cache)
        if isinstance(stats, str):
            why = why or stats
        else:
            row.update(dtype=stats["dtype"], zeros=stats["zeros"])
    if why is not None:
        row["reason"] = why
        return row
    assert isinstance(stats, dict)
    row.update(violations=stats["violations"], groups=stats["groups"])
    row["status"] = SPARSE if stats["violations"] == 0 else ELIGIBLE
    row["hints"] = _hints(layer, gemm.m if gemm else None)
    return row


def _activation_gemm(layer: Layer, shapes: dict[str, Shape]) -> GemmShape | None:
    """The GEMM of a MatMul of two activations (attention): no weight, but real FLOPs that stay dense."""
    if layer.op_type != "MatMul" or layer.weight_shape is not None:
        return None
    a, b = concrete(shapes.get(layer.node.input[0])), concrete(shapes.get(layer.node.input[1]))
    if not a or not b or len(b) < 2:
        return None
    return GemmShape(m=int(np.prod(a[:-1], dtype=np.int64)), n=b[-1], k=a[-1])


def _stats(
    layer: Layer, n: int, m: int, consts: dict[str, Any], model: Model, cache: _StatsCache
) -> dict[str, Any] | str:
    """Zeros and violating groups of the layer's stored weight (``m`` = 0: zeros only). Cached per tensor."""
    assert layer.source is not None
    key = (layer.source.key, f"{layer.source_reduction_axis}/{m}")
    if key in cache:
        return cache[key]
    sw = stored_weight(layer, consts, model)
    if isinstance(sw, str):
        return sw
    assert isinstance(sw, StoredWeight)
    out: dict[str, Any] = {"dtype": sw.dtype_name, "zeros": None, "violations": None, "groups": None}
    if streamable(sw.tensor, sw.values, sw.scale, sw.zp):
        # A large external weight: counted in slabs (onnxsparse.ir.stream), never resident as a whole.
        st = check_tensor(sw.tensor, model, sw.axis, n, m)
        out["zeros"] = round(1.0 - st.nonzero / max(st.size, 1), 4)
        if m:
            out["violations"], out["groups"] = st.violations, st.groups
    else:
        check_finite(sw)
        nonzero = sw.nonzero()
        out["zeros"] = round(1.0 - float(np.count_nonzero(nonzero)) / max(nonzero.size, 1), 4)
        if m:
            out["violations"], out["groups"] = count_violations(nonzero, sw.axis, n, m)
    cache[key] = out
    return out


def _hints(layer: Layer, gemm_m: int | None) -> list[str]:
    """Why TensorRT may still choose a dense kernel for this (eligible) layer."""
    hints: list[str] = []
    if layer.weight_shape is None or layer.channel_axis is None:
        return hints
    c_in, c_out = layer.reduction_size or 0, layer.weight_shape[layer.channel_axis]
    in_name = (
        "C_in/group" if layer.op_type == "Conv" and layer.group > 1 else ("C_in" if "Conv" in layer.op_type else "K")
    )
    out_name = "C_out" if "Conv" in layer.op_type else "N"
    if c_in < SMALL_CHANNELS or c_out < SMALL_CHANNELS:
        hints.append(f"small: {in_name} {c_in}, {out_name} {c_out} (<{SMALL_CHANNELS})")
    align, prec = (ALIGN_INT8, "int8") if layer.dequantized else (ALIGN_FP16, "fp16")
    odd = [f"{name}={v}" for name, v in ((in_name, c_in), (out_name, c_out)) if v % align]
    if odd:
        hints.append(f"{', '.join(odd)} not %{align} ({prec})")
    if layer.op_type == "Conv" and layer.group > 1:
        hints.append(f"grouped conv (group={layer.group})")
    if gemm_m is not None and gemm_m < 1024:
        hints.append(f"small M={gemm_m}")
    return hints


def _summary(rows: list[dict[str, Any]], have_shapes: bool, basis: dict[str, Any] | None = None) -> dict[str, Any]:
    """Counts and coverage. Coverage is FLOP-weighted when every layer's FLOPs are known, else by params;
    ``coverage_basis_detail`` says which shapes the FLOPs are at, or why parameters were used."""
    basis = basis or {}
    by_flops = have_shapes and bool(rows) and all(r["flops"] is not None for r in rows)
    weight_key = "flops" if by_flops else "params"
    if by_flops and basis.get("scaling"):
        at = ", ".join(f"{d}={basis['dims'][d]}" for d in basis["scaling"])
        names = ", ".join(basis["scaling"])
        verb = "scales" if len(basis["scaling"]) == 1 else "scale"
        detail = f"at {at}: {names} {verb} every layer's FLOPs alike"
    elif by_flops:
        detail = "FLOPs at the given --shapes" if basis.get("dims") else "FLOPs (every dim is fixed)"
    elif basis.get("why_params"):
        detail = str(basis["why_params"])
    else:
        unknown = sum(1 for r in rows if r["flops"] is None)
        detail = f"FLOPs unknown for {unknown} of {len(rows)} layers"

    def total(status: str | None = None) -> int:
        return sum(int(r[weight_key] or 0) for r in rows if status is None or r["status"] == status)

    sparse_w, eligible_w, all_w = total(SPARSE), total(ELIGIBLE), total()
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in (SPARSE, ELIGIBLE, INELIGIBLE)}
    return {
        "layers": len(rows),
        "sparse": counts[SPARSE],
        "eligible": counts[SPARSE] + counts[ELIGIBLE],  # could be n:m (incl. those that are)
        "dense_eligible": counts[ELIGIBLE],
        "ineligible": counts[INELIGIBLE],
        "coverage_basis": weight_key,
        "coverage_basis_detail": detail,
        "flops_at": (basis.get("dims") or None) if by_flops else None,
        "coverage": sparse_w / all_w if all_w else 0.0,
        "eligible_coverage": sparse_w / (sparse_w + eligible_w) if sparse_w + eligible_w else 0.0,
        "total_flops": total() if by_flops else None,
        "sparse_flops": sparse_w if by_flops else None,
    }


def render_report(report: PassReport) -> str:
    """The human table + summary lines (``onnxsparse check`` and ``run``'s per-pass output)."""
    d = report.details
    rows = []
    for r in d["layers"]:
        status = r["status"] if r["status"] != INELIGIBLE else f"ineligible: {r['reason']}"
        shape = "x".join(str(x) for x in r["shape"]) if r["shape"] else "-"
        rows.append(
            (
                r["layer"],
                r["op"],
                r["weight"] or "-",
                shape,
                "-" if r["axis"] is None else r["axis"],
                status,
                "-" if r["zeros"] is None else f"{r['zeros']:.1%}",
                "-" if r["violations"] is None else f"{r['violations']}/{r['groups']}",
                "-" if r["flops"] is None else human_count(r["flops"]),
                "; ".join(r["hints"]),
            )
        )
    headers = ["layer", "op", "weight", "shape", "axis", "status", "zeros", "bad groups", "FLOPs", "TensorRT hints"]
    s = d["summary"]
    pattern = d["pattern"]
    lines = [table(rows, headers, align="lllllllrrl", prose=("status", "TensorRT hints")), ""]
    lines.append(
        f"{s['sparse']}/{s['eligible']} eligible layers are {pattern} ({s['layers']} weighted layers, "
        f"{s['ineligible']} ineligible)"
    )
    basis = "FLOP-weighted" if s["coverage_basis"] == "flops" else "parameter-weighted"
    detail = f" ({s['coverage_basis_detail']})" if s.get("coverage_basis_detail") else ""
    lines.append(f"{pattern} coverage: {s['coverage']:.1%} {basis}{detail}; {s['eligible_coverage']:.1%} of eligible")
    gate = d.get("gate") or {}
    if gate.get("failures"):
        lines.append("gate FAILED: " + "; ".join(gate["failures"]))
    elif gate.get("min_coverage") is not None or gate.get("require_all"):
        lines.append("gate passed")
    return "\n".join(lines)


def _progress(layers: list[Layer], enabled: bool) -> Iterable[Layer]:
    if not enabled or len(layers) < 2:
        return layers
    from onnxsparse.progress import progress  # a bar on a TTY, a line every 30 s in a log

    return progress(layers, desc="validate", unit="layer")
