"""Fine-tuning a pruned model with its n:m masks held fixed, through ONNX Runtime training.

NVIDIA's recipe is dense → prune 2:4 → retrain with the mask fixed. ``finetune`` does the retraining on the
ONNX model itself; the pieces live in modules of one job each:

- ``training_runtime``: where ORT training comes from (an isolated install, or this environment's own);
- ``training_options``: ``FinetuneOptions`` (hyper-parameters, validated) and ``FinetuneResult``;
- ``training_data``: masks, training / eval data, the teacher and the mask input, checked up front;
- ``training_graph``: the training copy (``W ⊙ M``), trainable sets, folding the trained values back;
- ``training_batches``: seeded batches, trimmed to each batch's longest row, optionally bucketed by length;
- ``training_worker``: the loop itself (artefacts, masked loss, AdamW, eval curve), run in a subprocess
  against the training build where this environment's ``onnxruntime`` cannot train.

This module runs one fine-tune end to end: check everything, write the training copy and the teacher for the
worker, run it, report progress, fold the result into a copy of the input model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxsparse.errors import OnnxSparseError
from onnxsparse.finetune import worker as training_worker
from onnxsparse.finetune.data import (
    MaskLayout,
    check_data,
    check_teacher,
    mask_layout,
    npz_shapes,
    sample_specs,
)
from onnxsparse.finetune.events import Events, events_subprocess
from onnxsparse.finetune.graph import (
    MASK_SUFFIX,
    MASKED_SUFFIX,
    MAX_IR,
    MAX_OPSET,
    check_masks,
    control_flow_frozen,
    fold,
    graph_inputs,
    lower_for_training,
    partition_masks,
    save_for_worker,
    trainable_sets,
    training_copy,
)
from onnxsparse.finetune.options import LOSSES, TRAIN_SETS, FinetuneOptions, FinetuneResult, parse_train
from onnxsparse.finetune.runtime import (
    Runtime,
    cache_dir,
    find_runtime,
    install_command,
    install_runtime,
    require_runtime,
    runtime_dir,
)
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.tensors import to_array
from onnxsparse.pruning.targets import load_masks  # the one masks reader (prune writes them)

log = logging.getLogger("onnxsparse.finetune.run")

__all__ = [
    "LOSSES",
    "MASKED_SUFFIX",
    "MASK_SUFFIX",
    "MAX_IR",
    "MAX_OPSET",
    "TRAIN_SETS",
    "FinetuneOptions",
    "FinetuneResult",
    "MaskLayout",
    "Runtime",
    "cache_dir",
    "check_data",
    "check_masks",
    "control_flow_frozen",
    "find_runtime",
    "finetune",
    "install_command",
    "install_runtime",
    "load_masks",
    "lower_for_training",
    "npz_shapes",
    "output_error",
    "parse_train",
    "partition_masks",
    "require_runtime",
    "runtime_dir",
    "trainable_sets",
    "training_copy",
    "training_worker",
]


def _loss_outputs(model: Model, opts: FinetuneOptions) -> list[str]:
    out_types = {o.name: o.type.tensor_type.elem_type for o in model.proto.graph.output}
    if opts.outputs:
        unknown = [o for o in opts.outputs if o not in out_types]
        if unknown:
            raise OnnxSparseError(f"no model output named {', '.join(unknown)} (outputs: {', '.join(out_types)})")
        outputs = list(opts.outputs)
    elif opts.loss == "distill":
        outputs = [n for n, t in out_types.items() if t in (TensorProto.FLOAT, TensorProto.DOUBLE)]
    else:
        outputs = [next(iter(out_types))]
    if opts.loss != "distill" and len(outputs) != 1:
        raise OnnxSparseError(f"loss '{opts.loss}' uses one output; choose it with outputs=NAME")
    return outputs


def _load_teacher(teacher: Model | str | os.PathLike[str]) -> Model:
    from onnxsparse.ir.model_io import load_model

    return teacher if isinstance(teacher, Model) else load_model(str(teacher), check=False)


def _mask_job(layout: MaskLayout | None, teacher: Model | None, opts: FinetuneOptions) -> dict[str, Any] | None:
    """The worker's view of the mask input; trimming is dropped (with a warning) where an axis is fixed."""
    if layout is None:
        return None
    trim = dict(layout.trim)
    reason = layout.static_reason
    if teacher is not None and trim:
        t_specs = sample_specs(teacher.proto)
        for name, axis in trim.items():
            shape = t_specs[name].shape if name in t_specs else None
            if shape is not None and isinstance(shape[axis], int):
                reason = f"the teacher's input {t_specs[name].describe()} has a fixed sequence dim: batches stay padded"
                trim = {}
                break
    if reason:
        log.warning("fine-tune: %s", reason)
    if layout.unmasked_outputs:
        log.warning(
            "fine-tune: outputs %s do not carry the mask's positions; their loss is the plain MSE",
            ", ".join(layout.unmasked_outputs),
        )
    if opts.bucket_by_length and not trim:
        log.warning("fine-tune: bucket-by-length without trimming changes only the batch order")
    return {
        "name": layout.name,
        "rank": layout.rank,
        "seq_axis": layout.seq_axis,
        "trim": trim,
        "masked_outputs": layout.masked_outputs,
        "untrimmed_reason": reason,
    }


def check_inputs(
    model: Model,
    data: str | os.PathLike[str],
    options: FinetuneOptions,
    teacher: Model | str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
) -> tuple[list[str], Model | None, MaskLayout | None]:
    """Everything a fine-tune reads, checked before any work (one-line ``OnnxSparseError`` otherwise): the data
    and eval data against the model's inputs, the teacher against the data and the student's outputs, the
    mask input. Returns (loss outputs, the loaded teacher, the mask layout). ``finetune`` calls it first; the
    CLI calls it before measuring the starting error, which would otherwise meet bad data first."""
    opts = options
    specs = sample_specs(model.proto)
    headers = check_data(data, specs, "data", labels=opts.labels if opts.loss != "distill" else None)
    eval_headers = None
    if eval_data is not None:
        eval_headers = check_data(eval_data, specs, "eval data", labels=opts.labels if opts.loss != "distill" else None)
    loss_outputs = _loss_outputs(model, opts)
    teacher_model = _load_teacher(teacher) if opts.loss == "distill" and teacher is not None else None
    if teacher_model is not None:
        where = str(teacher_model.source or teacher)
        check_teacher(teacher_model.proto, model.proto, headers, loss_outputs, where)
        if eval_headers is not None:
            check_teacher(teacher_model.proto, model.proto, eval_headers, loss_outputs, where)
    layout = None
    if opts.mask_input:
        layout = mask_layout(model.proto, opts.mask_input, loss_outputs, headers, data)
        if eval_data is not None and eval_headers is not None:
            mask_layout(model.proto, opts.mask_input, loss_outputs, eval_headers, eval_data)
    return loss_outputs, teacher_model, layout


def finetune(
    model: Model,
    masks: Mapping[str, np.ndarray],
    data: str | os.PathLike[str],
    options: FinetuneOptions | None = None,
    teacher: Model | str | os.PathLike[str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    inplace: bool = False,
    eval_data: str | os.PathLike[str] | None = None,
    profile: str | os.PathLike[str] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` with ``masks`` fixed; returns a new model (the input is not modified unless
    ``inplace``, which the pass uses: a pipeline edits one model in place).

    ``data``: an ``.npz`` with one array per graph input (first axis = samples) and, for ``mse``/``ce``
    losses, the labels under ``options.labels``. ``teacher``: the dense model whose outputs the student
    learns to match (``distill`` loss); it is run batch by batch, never on the whole data at once.
    ``eval_data``: the same layout; evaluated at the start, every ``options.eval_every`` steps and at the end
    (``FinetuneResult.curve``). Everything is checked before training starts (one-line errors).
    ``profile``: a path prefix; ORT writes its per-node profile of the training session there (JSON).
    """
    from onnxsparse.finetune import qat as training_qat

    opts = options or FinetuneOptions()
    masks = {k: np.asarray(v).astype(bool) for k, v in masks.items()}
    qweights: dict[str, training_qat.QWeight] = {}
    if training_qat.has_qdq(model.proto):
        qweights, qskipped = training_qat.quantized_weights(model, masks)
        for name in set(qskipped) & set(masks):
            raise OnnxSparseError(qskipped[name])
    masks = {k: v for k, v in masks.items() if k not in qweights}
    if not masks and not qweights:
        raise OnnxSparseError("no masks: nothing to fine-tune")
    check_masks(model, masks)
    if opts.loss == "distill" and teacher is None:
        raise OnnxSparseError(
            "distillation needs a dense teacher model (--teacher dense.onnx), or use --loss mse/ce with --labels KEY"
        )

    loss_outputs, teacher_model, layout = check_inputs(model, data, opts, teacher, eval_data)
    mask_job = _mask_job(layout, teacher_model, opts)
    runtime = require_runtime()

    inputs = graph_inputs(model.proto)
    batch_size = opts.batch_size
    dim0 = inputs[0].type.tensor_type.shape.dim[0] if inputs and inputs[0].type.tensor_type.shape.dim else None
    if dim0 is not None and dim0.HasField("dim_value") and dim0.dim_value != batch_size:
        log.warning("input '%s' has a fixed batch of %d: using it as the batch size", inputs[0].name, dim0.dim_value)
        batch_size = int(dim0.dim_value)
    out_types = {o.name: o.type.tensor_type.elem_type for o in model.proto.graph.output}

    all_masks = {**masks, **{k: q.mask for k, q in qweights.items()}}
    sets = trainable_sets(model, all_masks, opts.train)
    if "weights" in sets:
        sets["weights"] = [*masks, *(q.master_name for q in qweights.values())]
    requires_grad = [name for names in sets.values() for name in names]
    log.info("fine-tune trains %s", ", ".join(f"{k} ({len(v)})" for k, v in sets.items()))
    if not requires_grad:
        raise OnnxSparseError(f"nothing to fine-tune: the sets {', '.join(opts.train)} hold no float initializer")

    with contextlib.ExitStack() as stack:
        if workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onnxsparse-finetune-"))).resolve()
        else:
            work = Path(tempfile.mkdtemp(prefix="finetune-", dir=workdir)).resolve()
            stack.callback(shutil.rmtree, work, True)
        train_path = work / "student.onnx"
        save_for_worker(training_copy(model, masks, qweights), model, train_path)
        teacher_path = _teacher_file(teacher_model, work) if teacher_model is not None else None
        student = onnx.load(str(train_path), load_external_data=False)
        frozen: dict[str, str] = control_flow_frozen(student, requires_grad)
        del student
        if all(p in frozen for p in requires_grad):
            raise OnnxSparseError(f"nothing to fine-tune: every weight is kept fixed ({next(iter(frozen.values()))})")
        for name, reason in frozen.items():
            log.warning("fine-tune: kept %s fixed: %s", name, reason)
        job = {
            "workdir": str(work),
            "train_model": str(train_path),
            "teacher": str(teacher_path) if teacher_path else None,
            "requires_grad": [p for p in requires_grad if p not in frozen],
            "frozen": [],
            "loss": "ce" if opts.loss == "ce" else "mse",
            "loss_outputs": loss_outputs,
            "data": str(Path(data).resolve()),
            "eval_data": str(Path(eval_data).resolve()) if eval_data is not None else None,
            "eval_every": opts.eval_every,
            "input_names": [vi.name for vi in inputs],
            "input_types": {vi.name: vi.type.tensor_type.elem_type for vi in inputs},
            "label_key": opts.labels if opts.loss != "distill" else None,
            "label_type": out_types[loss_outputs[0]] if opts.labels and opts.loss == "mse" else 0,
            "mask": mask_job,
            "bucket": opts.bucket_by_length,
            "steps": opts.steps,
            "epochs": opts.epochs if opts.steps is None else None,
            "batch_size": batch_size,
            "lr": opts.lr,
            "weight_decay": opts.weight_decay,
            "warmup": opts.warmup,
            "schedule": opts.lr_schedule,
            "seed": opts.seed,
            "threads": opts.threads,
            "params_out": str(work / "params.npz"),
            "ir_version": MAX_IR,
            "profile": str(Path(profile).resolve()) if profile is not None else None,
        }
        if job["steps"] is None and job["epochs"] is None:
            job["epochs"] = 1
        job_path = work / "job.json"
        job_path.write_text(json.dumps(job, indent=1))
        events = Events(progress, on_step, frozen)
        try:
            if runtime.mode == "inprocess":
                events({"event": "done", **training_worker.train(job, events)})
            else:
                for event in events_subprocess(job_path, runtime, work):
                    events(event)
        finally:
            events.close()
        with np.load(work / "params.npz") as z:
            params = {k: np.array(z[k]) for k in z.files}
    summary = events.summary
    # Weights the worker had to keep fixed still get their masks applied (the input may not be pruned yet).
    inits = {t.name: t for t in model.proto.graph.initializer}
    for name in masks:
        params.setdefault(name, np.asarray(to_array(inits[name], model)))
    for q in qweights.values():
        params.setdefault(q.master_name, q.master)
    # Drift = the largest change training made to a masked-out entry (0 when the fixed mask works); judged on
    # the float values, before folding / re-quantizing would hide it.
    drift = 0.0
    starts = {name: (np.asarray(to_array(inits[name], model)), name, mask) for name, mask in masks.items()}
    starts.update({q.master_name: (q.master, q.master_name, q.mask) for q in qweights.values()})
    for start, key, mask in starts.values():
        if (~mask).any():
            after = np.asarray(params[key], np.float64).reshape(mask.shape)[~mask]
            drift = max(drift, float(np.max(np.abs(after - np.asarray(start, np.float64)[~mask]))))
    values = {k: v for k, v in params.items() if not k.endswith(training_qat.MASTER_SUFFIX)}
    values.update({q.name: q.quantize(params[q.master_name]) for q in qweights.values()})
    result_model, changed = fold(model, values, masks, inplace=inplace)
    batching: dict[str, Any] = {"bucketed": opts.bucket_by_length, **summary.get("batching", {})}
    if mask_job is not None:
        batching.update(
            mask_input=mask_job["name"],
            trimmed=sorted(mask_job["trim"]),
            untrimmed_reason=mask_job["untrimmed_reason"],
            masked_outputs=mask_job["masked_outputs"],
        )
    return FinetuneResult(
        model=result_model,
        changed=changed,
        outside_mask_drift=drift,
        steps=int(summary.get("steps", len(events.losses))),
        first_loss=summary.get("first_loss"),
        last_loss=summary.get("last_loss"),
        seconds=float(summary.get("seconds", 0.0)),
        trained=[name for name in requires_grad if name not in frozen],
        frozen=frozen,
        runtime=runtime.describe(),
        losses=events.losses,
        train_sets=sets,
        curve=list(summary.get("curve", events.curve)),
        batching=batching,
        timing=dict(summary.get("timing", {})),
    )


def _teacher_file(t: Model, work: Path) -> Path:
    """The teacher as a file ORT 1.19 reads (a lowered copy when its IR/opset is newer)."""
    opset = next((int(o.version) for o in t.proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if t.source is not None and t.proto.ir_version <= MAX_IR and opset <= MAX_OPSET:
        return Path(t.source)
    proto = copy.deepcopy(t.proto)
    lower_for_training(proto)
    path = work / "teacher.onnx"
    save_for_worker(proto, t, path)
    return path


def output_error(
    student: Model,
    teacher: Model | str | os.PathLike[str],
    data: str | os.PathLike[str],
    samples: int = 512,
    batch_size: int = 64,
    mask_input: str | None = None,
) -> float:
    """Mean squared difference of the float outputs of ``student`` and ``teacher`` on the first samples of
    ``data`` (this environment's onnxruntime; batch by batch). The number the fine-tune drives down.

    ``mask_input``: count only the positions where that input is non-zero (outputs whose leading dims are the
    mask's), as the masked fine-tune loss does; padded positions would otherwise dominate the number.
    """
    from onnxsparse.ir.model_io import load_model, ort_session

    t = teacher if isinstance(teacher, Model) else load_model(str(teacher), check=False)

    # ort_session hands external, spilled and lazily read weights to ORT as memory maps (no file written)
    s_sess, t_sess = ort_session(student), ort_session(t)
    names = [
        o.name
        for o in student.proto.graph.output
        if o.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE)
    ]
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph_inputs(student.proto)}
    first = graph_inputs(student.proto)[0].type.tensor_type.shape.dim
    if first and first[0].HasField("dim_value"):
        batch_size = int(first[0].dim_value)  # a fixed batch dimension
    total, count = 0.0, 0
    with np.load(data, allow_pickle=False) as z:
        arrays = {k: z[k][:samples] for k in inputs}
    n = min(len(a) for a in arrays.values())
    for start in range(0, n - batch_size + 1 if first and first[0].HasField("dim_value") else n, batch_size):
        feeds = {
            k: arrays[k][start : start + batch_size].astype(helper.tensor_dtype_to_np_dtype(v))
            for k, v in inputs.items()
        }
        t_names = [i.name for i in t_sess.get_inputs()]
        t_feeds = {k: feeds[k] for k in t_names if k in feeds}
        for a, b in zip(s_sess.run(names, feeds), t_sess.run(names, t_feeds), strict=True):
            diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
            sq = diff * diff
            if (
                mask_input is not None
                and feeds[mask_input].ndim <= sq.ndim
                and sq.shape[: feeds[mask_input].ndim] == feeds[mask_input].shape
            ):
                m = (feeds[mask_input] != 0).reshape(
                    feeds[mask_input].shape + (1,) * (sq.ndim - feeds[mask_input].ndim)
                )
                total += float(np.sum(sq * m))
                count += int(m.sum()) * (sq.size // m.size)
            else:
                total += float(np.sum(sq))
                count += diff.size
    return total / max(count, 1)
