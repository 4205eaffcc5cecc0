"""``finetune``: retrain a pruned model with its n:m masks held fixed (ONNX Runtime training).

The pass form of ``onnxsparse.finetune.run.finetune``, so that prune → fine-tune → prune → fine-tune is one
pipeline (``prune{pattern=3:4},finetune,prune{pattern=2:4},finetune``; preset ``progressive``). Inside a
pipeline every input has a sensible default:

- masks: ``ctx.masks``, which the prune pass leaves (or ``masks=PATH`` to an .npz);
- data: ``data=PATH``, else the run's ``--calib`` .npz (one array per model input, first axis = samples);
- teacher (distillation): ``teacher=PATH``, else ``ctx.teacher`` (a path or an in-memory ``Model``, set by a
  Python caller), else the file the pipeline started from — the dense model, when the masks came from a
  prune earlier in the same pipeline. A model fine-tuned against itself would learn nothing, so with masks
  from a file and no teacher the pass asks for one.

``requires`` checks all three before anything is loaded or trained.

The model that comes out has the input's nodes, initializer names, opset and IR version; only the trained
initializers (masked weights, and by default the biases of the masked layers) have new values, and every
entry a mask zeroes is exactly zero.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from onnxsparse.errors import OnnxSparseError
from onnxsparse.finetune.options import DEFAULT_TRAIN
from onnxsparse.ir.model_io import Model
from onnxsparse.pass_base import Pass, PassConfig, PassContext, PassReport, PassResult, option

log = logging.getLogger("onnxsparse.passes.finetune")


@dataclass(frozen=True)
class FinetuneConfig(PassConfig):
    """Options of the ``finetune`` pass (the same names as ``onnxsparse finetune``'s flags)."""

    data: str | None = option(
        None,
        "Training inputs: .npz with one array per model input (first axis = samples) "
        "and the labels for loss=mse/ce. Default: the run's --calib data.",
        input=True,
    )
    masks: str | None = option(
        None,
        "Masks .npz (initializer name → bool, True = kept). Default: the masks the prune pass left in this pipeline.",
        input=True,
    )
    teacher: str | None = option(
        None,
        "Dense teacher model for loss=distill. Default: the pipeline's input file "
        "when the masks come from a prune in this pipeline.",
        input=True,
    )
    steps: int | None = option(None, "Optimizer steps (default: one epoch over the data).")
    epochs: float | None = option(None, "Passes over the data (instead of steps).")
    lr: float = option(1e-3, "Peak AdamW learning rate.")
    batch_size: int = option(32, "Samples per step (a model with a fixed batch dimension uses that).")
    loss: str = option("distill", "distill (MSE to the teacher's outputs), mse or ce (against labels=KEY).")
    labels: str | None = option(None, "Data key of the labels for loss=mse/ce.")
    outputs: tuple[str, ...] = option(
        (), "Model outputs the loss uses (default: every float output for distill, the first output otherwise)."
    )
    train: tuple[str, ...] = option(
        DEFAULT_TRAIN,
        "What trains: any of weights (the masked weights), biases (of "
        "the masked layers), norms (normalisation scales/shifts), embeddings (Gather "
        "tables).",
    )
    mask_input: str | None = option(
        None,
        "Input whose non-zero entries mark real positions (attention mask): "
        "losses average over them only; batches are trimmed to their longest row "
        "where the sequence dim is dynamic.",
    )
    bucket_by_length: bool = option(False, "Batches of similar lengths (needs mask-input); seeded order.")
    eval_data: str | None = option(
        None,
        "Eval .npz (same layout as data): eval loss and cosine to the teacher "
        "at the start, every eval-every steps and at the end.",
        input=True,
    )
    eval_every: int = option(0, "Evaluate every this many steps (0: start and end only).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    warmup: int = option(0, "Linear learning-rate warm-up steps.")
    lr_schedule: str = option("cosine", "cosine (decay to 10% of lr) or constant.")
    seed: int = option(0, "Seed of the batch order.")
    threads: int = option(0, "Intra-op threads for training and the teacher (0: one per core).")

    def options(self) -> Any:
        """The hyper-parameters as ``training.FinetuneOptions`` (validated there)."""
        from onnxsparse.finetune.options import FinetuneOptions

        names = {f.name for f in fields(FinetuneOptions)}
        return FinetuneOptions(**{k: getattr(self, k) for k in names})

    def __post_init__(self) -> None:
        self.options()


class FinetunePass(Pass[FinetuneConfig]):
    """Fine-tune the masked weights with the masks fixed; distillation to the dense model by default."""

    name = "finetune"
    config_cls = FinetuneConfig
    summary = "retrain pruned weights with fixed n:m masks through ONNX Runtime training (distillation or labels)"
    in_place = True

    def reads_calibration(self) -> bool:
        return self.config.data is None  # trains on the run's --calib data unless data= is given

    def requires(self, model: Model, ctx: PassContext) -> None:
        """Masks (``masks=PATH`` or a prune earlier in the pipeline), training data, and for distillation a
        teacher."""
        cfg = self.config
        if cfg.masks is None and not ctx.masks:
            raise OnnxSparseError("finetune: no masks — run prune earlier in the pipeline or give masks=PATH")
        if cfg.masks is not None and not Path(cfg.masks).is_file():
            raise OnnxSparseError(f"no such masks file: {cfg.masks}")
        if self._data(ctx) is None:
            raise OnnxSparseError("finetune: no training data — give data=PATH.npz (or --calib PATH.npz to run)")
        if cfg.loss == "distill" and self._teacher(model, ctx) is None:
            raise OnnxSparseError("finetune: distillation needs teacher=DENSE.onnx (the model before pruning)")

    def _data(self, ctx: PassContext) -> str | Path | None:
        return self.config.data or (ctx.calibration if isinstance(ctx.calibration, (str, Path)) else None)

    def _teacher(self, model: Model, ctx: PassContext) -> Any:
        """``teacher=``, else ``ctx.teacher``, else the pipeline's input file when the masks come from a prune
        in this pipeline (the model before it is the dense one); None when there is none."""
        cfg = self.config
        if cfg.teacher or ctx.teacher is not None:
            return cfg.teacher or ctx.teacher
        return model.source if cfg.masks is None else None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        from onnxsparse.finetune import qat as training_qat
        from onnxsparse.finetune.run import finetune, load_masks, partition_masks

        cfg = self.config
        report = PassReport()
        masks = load_masks(cfg.masks) if cfg.masks else dict(ctx.masks)
        usable, skipped = partition_masks(model, masks)
        qweights: dict[str, Any] = {}
        if training_qat.has_qdq(model.proto):
            # Quantization-aware: the Q/DQ model's int8 weights train through fake quantization; masks come
            # from the prune pass by name or, for weights renamed by qdq, from their zeros.
            qweights, qskipped = training_qat.quantized_weights(model, masks)
            skipped = {k: v for k, v in skipped.items() if k not in qweights}
            skipped.update({k: v for k, v in qskipped.items() if k in masks})
            usable.update({k: q.mask for k, q in qweights.items()})
        for name, reason in skipped.items():
            report.skip(name, reason)
        if not usable:
            report.details.update(trained=[], reason="no mask names a trainable float initializer")
            return PassResult(model, False, report)
        data = self._data(ctx)
        assert data is not None, "checked by requires (Pass.apply)"
        teacher = self._teacher(model, ctx) if cfg.loss == "distill" else None
        if teacher is not None and not cfg.teacher and ctx.teacher is None:
            log.info("finetune: distilling to the pipeline's input %s", teacher)
        result = finetune(
            model,
            usable,
            data,
            cfg.options(),
            teacher=teacher,
            workdir=ctx.workdir,
            progress=ctx.progress,
            inplace=True,
            eval_data=cfg.eval_data,
        )
        for name in result.changed:
            report.change(name, masked=name in usable)
        for name, reason in result.frozen.items():
            report.skip(name, reason)
        report.details.update(
            steps=result.steps,
            first_loss=result.first_loss,
            last_loss=result.last_loss,
            seconds=result.seconds,
            runtime=result.runtime,
            teacher=_describe(teacher),
            qat=sorted(qweights),
            train_sets={k: len(v) for k, v in result.train_sets.items()},
            curve=result.curve,
            batching=result.batching,
            timing=result.timing,
            kept=round(
                float(sum(int(np.count_nonzero(m)) for m in usable.values()))
                / max(1, sum(m.size for m in usable.values())),
                4,
            ),
        )
        return PassResult(result.model, bool(result.changed), report)

    def render(self, result: PassResult) -> str | None:
        d = result.report.details
        if "steps" not in d:
            return None
        first = "?" if d["first_loss"] is None else f"{d['first_loss']:.4g}"
        last = "?" if d["last_loss"] is None else f"{d['last_loss']:.4g}"
        sets = ", ".join(f"{k} {v}" for k, v in d.get("train_sets", {}).items())
        text = (
            f"  {d['steps']} steps, loss {first} -> {last}, {len(result.report.changed)} tensors trained "
            f"[{sets}] ({d['seconds']:.1f}s, {d['runtime']})"
        )
        curve = d.get("curve") or []
        if curve:
            text += "\n  eval: " + "; ".join(
                f"step {p['step']} loss {p['loss']:.4g}" + (f" cos {p['cosine']:.4f}" if "cosine" in p else "")
                for p in curve
            )
        return text


def _describe(teacher: Model | str | os.PathLike[str] | None) -> str | None:
    """The teacher for the report: its path (an in-memory ``Model`` from ``ctx.teacher`` by its file, if any)."""
    if isinstance(teacher, Model):
        return str(teacher.source) if teacher.source is not None else "in-memory model (ctx.teacher)"
    return None if teacher is None else str(teacher)
