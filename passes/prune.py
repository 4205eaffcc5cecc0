"""``prune``: n:m pruning of every eligible weighted layer (default 2:4, TensorRT's pattern).

``method=magnitude`` (default) keeps the n largest |w| of each group. ``method=wanda`` and ``method=sparsegpt``
are calibrated: they need ``--calib`` data and use each layer's input statistics (``onnxsparse.pruning``, which
does all the work: Gram statistics streamed from ONNX Runtime, the SparseGPT column sweep, bias correction and
the least-squares re-fit of the kept weights). SparseGPT runs in topological stages by default (``sequential``),
so each layer sees inputs from the already pruned layers before it. ``plan=PATH`` (written by ``sensitivity``)
prunes exactly the layers it names.

Groups of ``m`` run along each layer's reduction axis mapped onto the *stored* tensor (``find_layers``
follows DequantizeLinear / Transpose / Cast / Reshape / Identity chains). In each group the ``n`` entries of
largest magnitude stay and the rest become exactly zero; an int8 weight behind a DequantizeLinear is ranked
by ``|(q - zero_point) * scale|`` and pruned to its zero point, so the dequantized value is exactly 0.

Progressive sparsity (the seed's recipe) is two runs of this pass: ``prune{pattern=3:4}``, fine-tune,
``prune{pattern=2:4}``. The second run chooses its keep-set among the entries that are still non-zero (and
inside the previous masks, when the same pipeline produced them), so every zero of the first step stays
zero — see ``PROGRESSIVE``.

Masks (True = may be non-zero) go to ``ctx.masks`` for the fine-tune pass and, with
``masks=PATH``, to an .npz keyed by initializer name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.index import model_layers
from onnxsparse.ir.layers import WEIGHTED_OPS, Layer, check_regex, select_reason
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.reasons import Reason, Skip, code_key
from onnxsparse.pass_base import Pass, PassConfig, PassContext, PassContractError, PassReport, PassResult, option
from onnxsparse.presets import PRESETS
from onnxsparse.pruning import METHODS, LayerOutcome
from onnxsparse.pruning.plan import Plan, check_plan, read_plan
from onnxsparse.pruning.runner import Item, RunReport, data_source, prune_calibrated
from onnxsparse.pruning.targets import (
    Target,
    calibration_note,
    foreign_reader,
    group_targets,
    magnitude_nm,
    weight_readers,
    write_masks,
)
from onnxsparse.pruning.targets import load_masks as load_masks  # re-exported: tests and older imports
from onnxsparse.render import grouped_reasons
from onnxsparse.sparsity import (
    StoredWeight,
    check_finite,
    constants_by_name,
    count_violations,
    parse_pattern,
    stored_weight,
)

log = logging.getLogger("onnxsparse.passes.prune")

#: The seed's progressive recipe as pipeline text: zero 25 % (3:4), fine-tune with that mask, then 50 % (2:4)
#: chosen among the survivors, fine-tune again, and gate on the result. The fine-tune pass reads the masks
#: this pass leaves in ``ctx.masks``.
PROGRESSIVE = PRESETS["progressive"]


@dataclass(frozen=True)
class PruneConfig(PassConfig):
    """Options of the ``prune`` pass."""

    pattern: str = option(
        "2:4",
        "n:m: keep at most n non-zeros in every group of m along the reduction axis "
        "(any 1 <= n < m; 3:4 is the first step of progressive sparsity).",
    )
    include: str | None = option(None, "Only prune layers whose node or weight name matches this regex.")
    exclude: str | None = option(None, "Never prune layers whose node or weight name matches this regex.")
    op_types: tuple[str, ...] = option(WEIGHTED_OPS, "Op types to prune (Conv, ConvTranspose, Gemm, MatMul).")
    min_params: int = option(0, "Skip weights with fewer elements than this.")
    min_channels: int = option(
        0,
        "Skip layers with fewer input (per group) or output channels than this "
        "(TensorRT rarely picks sparse kernels for small layers).",
    )
    masks: str | None = option(
        None,
        "Also write the masks to this .npz (keys: initializer names; bool arrays "
        "shaped like the stored tensor; True = kept).",
        output=True,
    )
    method: str | None = option(
        None,
        "magnitude | wanda | sparsegpt (default: the plan's method, else "
        "magnitude). wanda and sparsegpt need calibration data (--calib).",
    )
    block_size: int = option(128, "sparsegpt: columns per lazy update block")
    damp: float = option(0.01, "sparsegpt: damping added to diag(H), as a fraction of its mean")
    sequential: bool | None = option(
        None,
        "take each layer's statistics from the model with the layers before it "
        "already pruned (default: true for sparsegpt, false for wanda)",
    )
    mask_input: str | None = option(
        None, "model input holding the attention mask: padded tokens (mask 0) are left out of the statistics"
    )
    max_k: int = option(8192, "layers with a larger reduction size K use wanda (H would take K^2*8 bytes)")
    bias_correction: bool = option(True, "re-fit each calibrated layer's bias so its mean output stays the same")
    refit: int = option(
        20,
        "sparsegpt: conjugate-gradient steps of the least-squares re-fit of the kept weights "
        "with the mask fixed (0 = off)",
    )
    dense_target: bool = option(
        True,
        "sparsegpt, sequential: fit each layer to the dense model's output (its "
        "statistics pair the pruned and the dense model's inputs; one more ORT run per "
        "batch)",
    )
    target_damp: float = option(
        0.1,
        "dense-target: ridge weight (fraction of mean diag H) pulling the fitted "
        "dense target towards the layer's own weight",
    )
    plan: str | None = option(None, "prune exactly the layers named in this plan JSON (from 'sensitivity')", input=True)
    batch_size: int | None = option(None, "calibration batch size (default: the model's fixed batch, or as stored)")

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        if self.method is not None and self.method not in METHODS:
            raise OnnxSparseError(f"prune: method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.block_size <= 0 or self.max_k <= 0 or self.refit < 0:
            raise OnnxSparseError("prune: block-size and max-k must be > 0, refit >= 0")
        if self.damp < 0.0 or self.target_damp < 0.0:
            raise OnnxSparseError(f"prune: damp and target-damp must be >= 0, got {self.damp}, {self.target_damp}")
        check_regex("prune", "include", self.include)
        check_regex("prune", "exclude", self.exclude)
        unknown = [t for t in self.op_types if t not in WEIGHTED_OPS]
        if unknown:
            raise OnnxSparseError(f"prune: unknown op type(s) {', '.join(unknown)} (known: {', '.join(WEIGHTED_OPS)})")
        if self.min_params < 0 or self.min_channels < 0:
            raise OnnxSparseError("prune: min-params and min-channels must be >= 0")


class PrunePass(Pass[PruneConfig]):
    """n:m pruning along each layer's reduction axis: magnitude, or calibrated wanda / sparsegpt."""

    name = "prune"
    config_cls = PruneConfig
    summary = "n:m pruning (default 2:4) along each layer's reduction axis: magnitude, wanda or sparsegpt"
    in_place = True
    values_only = True  # writes weight (and bias) values in place: the layer index stays valid

    def reads_calibration(self) -> bool | None:
        """wanda/sparsegpt read ``--calib``; magnitude does not. With a plan the method may come from the
        plan file, which is not read here, so the answer is "not declared"."""
        if self.config.method is None and self.config.plan:
            return None
        return (self.config.method or "magnitude") != "magnitude"

    def requires(self, model: Model, ctx: PassContext) -> None:
        """wanda and sparsegpt (asked for, or the plan's method) need calibration data."""
        cfg = self.config
        plan = read_plan(cfg.plan, cfg.pattern) if cfg.plan else None
        method = cfg.method or (plan.method if plan else None) or "magnitude"
        if method != "magnitude" and ctx.calibration is None:
            raise OnnxSparseError(
                f"prune: method={method} needs calibration data: pass --calib DATA "
                "(.npz or a folder of .npy/.npz, as for qdq)"
            )

    def ensures(self, model: Model, ctx: PassContext, result: PassResult) -> None:
        """Every tensor this pass reports as pruned has an n:m mask along the axis it reports.

        Proven on the masks in memory (a bool array per pruned tensor, a fraction of the work of pruning
        it). A streamed tensor's mask is a memory map of a scratch file, which is not read back: the stream
        counted the violating groups of the bytes it wrote as it wrote them (``onnxsparse.ir.stream``).
        """
        n, m = parse_pattern(self.config.pattern)
        for c in result.report.changed:
            mask = ctx.masks.get(c["name"])
            if mask is None or isinstance(mask, np.memmap):
                continue
            if list(mask.shape) != c["shape"] or count_violations(mask, c["axis"], n, m)[0]:
                raise PassContractError(f"prune: the mask of '{c['name']}' is not {n}:{m} along axis {c['axis']}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        n, m = parse_pattern(cfg.pattern)
        plan = read_plan(cfg.plan, cfg.pattern) if cfg.plan else None
        method = cfg.method or (plan.method if plan else None) or "magnitude"
        report = PassReport()
        layers = _find_layers(model, ctx)
        if plan is not None:
            check_plan(plan, {layer.name for layer in layers}, cfg.plan or "")
        consts = constants_by_name(model.proto)
        readers = weight_readers(model.proto)
        prior = ctx.masks
        masks: dict[str, np.ndarray] = {}
        modified = False
        zeroed = total = 0
        already: list[str] = []
        calibrated: list[tuple[Item, StoredWeight, int, int]] = []
        targets = group_targets(layers, report)
        for target in _progress(targets, ctx.progress):
            why = self._skip_reason(target, m, readers, plan)
            if why is None:
                sw = stored_weight(target.layers[0], consts, model)
                if isinstance(sw, str):
                    why = sw
            if why is None and method != "magnitude" and target.layers[0].graph_path != "main":
                why = (
                    f"inside a subgraph ({target.layers[0].graph_path}): {method} needs its input statistics, "
                    "which cannot be collected there; prune it with method=magnitude"
                )
            if why is not None:
                for layer in target.layers:  # a layer's own reason (e.g. shared-axis conflict) says it best
                    own = layer.reason or why
                    report.skip(layer.name, str(own), op=layer.op_type, weight=layer.weight_name, **code_key(own))
                continue
            assert isinstance(sw, StoredWeight)
            old = prior.get(sw.name)
            if old is not None and old.shape != sw.values.shape:
                old = None
            note = calibration_note(target, method) if method != "magnitude" else "magnitude"
            if note is None:
                check_finite(sw)
                nonzero = sw.nonzero()
                bad, groups = count_violations(nonzero, sw.axis, n, m)
                total += sw.values.size
                if bad == 0:
                    masks[sw.name] = np.ascontiguousarray(nonzero)
                    already.append(sw.name)
                    continue
                calibrated.append(
                    (Item(target.layers[0], method, None if old is None else old & nonzero), sw, bad, groups)
                )
                continue
            if note != "magnitude":
                report.details.setdefault("fallbacks", {})[target.layers[0].name] = note
            bad, groups, mask, nz_before, nz_after = magnitude_nm(sw, model, n, m, old)
            total += sw.values.size
            masks[sw.name] = mask
            if bad == 0:
                # Already n:m: the tensor bytes were left alone so `modified` stays honest.
                already.append(sw.name)
                continue
            modified = True
            zeroed += nz_before - nz_after
            self._changed(report, target.layers, sw, bad, groups, nz_before, nz_after, "magnitude")
        if calibrated:
            run = self._calibrated(model, ctx, [c[0] for c in calibrated], method, n, m)
            for (item, sw, bad, groups), outcome in zip(calibrated, _in_order(run, calibrated), strict=True):
                modified = True
                masks[sw.name] = outcome.mask
                zeroed += outcome.nonzero_before - outcome.nonzero_after
                self._changed(
                    report,
                    [item.layer],
                    sw,
                    bad,
                    groups,
                    outcome.nonzero_before,
                    outcome.nonzero_after,
                    outcome.method,
                    error=round(outcome.error, 6),
                    bias_corrected=outcome.bias,
                    notes=outcome.notes,
                )
            report.details["calibration"] = run.to_dict()
        ctx.masks.update(masks)
        report.details.update(
            pattern=f"{n}:{m}",
            method=method,
            pruned=len(report.changed),
            already_sparse=already,
            params_in_pruned_layers=total,
            params_zeroed=zeroed,
        )
        if cfg.masks:
            write_masks(Path(cfg.masks), masks)
            report.details["masks"] = cfg.masks
        log.info(
            "prune %s (%s): %d tensors pruned, %d already sparse, %d skipped",
            cfg.pattern,
            method,
            len(report.changed),
            len(already),
            len(report.skipped),
        )
        return PassResult(model, modified, report)

    def _calibrated(self, model: Model, ctx: PassContext, items: list[Item], method: str, n: int, m: int) -> RunReport:
        cfg = self.config
        sequential = cfg.sequential if cfg.sequential is not None else method == "sparsegpt"
        data = data_source(ctx.calibration, model, ctx.calib_samples, cfg.batch_size)
        return prune_calibrated(
            model,
            items,
            data,
            n,
            m,
            sequential=sequential,
            mask_input=cfg.mask_input,
            max_k=cfg.max_k,
            block_size=cfg.block_size,
            damp=cfg.damp,
            target_damp=cfg.target_damp,
            bias_correction=cfg.bias_correction,
            refit_iters=cfg.refit,
            dense_target=cfg.dense_target and sequential,
            progress=ctx.progress,
        )

    @staticmethod
    def _changed(
        report: PassReport,
        layers: list[Layer],
        sw: StoredWeight,
        bad: int,
        groups: int,
        nz_before: int,
        nz_after: int,
        method: str,
        **extra: object,
    ) -> None:
        report.change(
            sw.name,
            layers=[layer.name for layer in layers],
            op=layers[0].op_type,
            shape=list(sw.values.shape),
            axis=sw.axis,
            dtype=sw.dtype_name,
            method=method,
            groups_changed=bad,
            groups=groups,
            zeroed=nz_before - nz_after,
            zeros=round(1.0 - nz_after / max(sw.values.size, 1), 4),
            **extra,
        )

    def render(self, result: PassResult) -> str | None:
        """One line of totals, then the skipped layers grouped by reason."""
        d = result.report.details
        lines = [
            f"  {d.get('pruned', 0)} tensor(s) pruned to {d.get('pattern')}: {d.get('params_zeroed', 0):,} of "
            f"{d.get('params_in_pruned_layers', 0):,} weights zeroed; "
            f"{len(d.get('already_sparse') or [])} already {d.get('pattern')}"
        ]
        cal = d.get("calibration")
        if cal:
            errors = [c["error"] for c in result.report.changed if c.get("error") is not None]
            mean = f"; mean layer output error {sum(errors) / len(errors):.4f}" if errors else ""
            lines.append(
                f"  {d.get('method')}: {cal['stages']} stage(s), {cal['ort_passes']} ORT pass(es) over "
                f"{cal['rows']:,} rows, statistics {cal['stats_seconds']:.1f}s + solve "
                f"{cal['solve_seconds']:.1f}s, largest statistics {cal['stats_bytes_max'] / 2**20:.1f} MiB" + mean
            )
            for layer, why in (cal.get("mask_not_applied") or {}).items():
                lines.append(f"  {layer}: mask-input not applied ({why}); all its rows count")
            for c in result.report.changed:
                for note in c.get("notes") or ():
                    lines.append(f"  {c['layers'][0]}: {note}")
        for layer, note in (d.get("fallbacks") or {}).items():
            lines.append(f"  {layer}: {note}")
        lines.extend(grouped_reasons(result.report.skipped))
        if d.get("masks"):
            lines.append(f"  masks written to {d['masks']}")
        return "\n".join(lines)

    def _skip_reason(
        self, target: Target, m: int, readers: dict[str, list[onnx.NodeProto]], plan: Plan | None = None
    ) -> Skip | str | None:
        """Why this stored tensor must not be pruned (None: prune it): a coded ``Skip`` or prune's own text."""
        cfg = self.config
        for layer in target.layers:
            if layer.reason:
                return layer.reason
        if plan is not None and not all(layer.name in plan.layers for layer in target.layers):
            return "not in the plan"
        for layer in target.layers:
            skip = layer.check_pattern(m)
            if skip:
                return skip if len(target.layers) == 1 else f"shared with {layer.name}: {skip}"
        for layer in target.layers:
            prefix = "" if len(target.layers) == 1 else f"shared with {layer.name}, which is "
            if layer.op_type not in cfg.op_types:
                return f"{prefix}op type {layer.op_type} not selected (op-types)"
            unselected = select_reason(layer, cfg.include, cfg.exclude)
            if unselected:
                return unselected if not prefix else f"{prefix}{unselected}"
        first = target.layers[0]
        assert first.source is not None and first.weight_shape is not None
        size = int(np.prod(first.source.shape, dtype=np.int64))
        if size < cfg.min_params:
            return f"{size} params < min-params {cfg.min_params}"
        for layer in target.layers:
            assert layer.weight_shape is not None and layer.channel_axis is not None
            c_in, c_out = layer.reduction_size or 0, layer.weight_shape[layer.channel_axis]
            if min(c_in, c_out) < cfg.min_channels:
                return f"channels in/out {c_in}/{c_out} < min-channels {cfg.min_channels}"
        return foreign_reader(target, readers)


def _find_layers(model: Model, ctx: PassContext) -> list[Layer]:
    """The model's layer index; shapes are inferred only when a Reshape in a weight chain needs them (it costs
    time)."""
    layers = model_layers(model)
    if any(layer.reason is not None and layer.reason.code is Reason.RESHAPE_SHAPE_UNKNOWN for layer in layers):
        from onnxsparse.ir.shapes import infer_shapes

        layers = model_layers(model, infer_shapes(model.proto, ctx.shapes))
    return layers


def _in_order(run: RunReport, items: list[tuple[Item, StoredWeight, int, int]]) -> list[LayerOutcome]:
    """The run's outcomes in the order of ``items`` (stages may reorder them)."""
    by_name = {o.layer: o for o in run.outcomes}
    return [by_name[item.layer.name] for item, *_ in items]


def _progress(items: list[Target], enabled: bool) -> Iterable[Target]:
    if not enabled or len(items) < 2:
        return items
    from onnxsparse.progress import progress  # a bar on a TTY, a line every 30 s in a log

    return progress(items, desc="prune", unit="weight")
