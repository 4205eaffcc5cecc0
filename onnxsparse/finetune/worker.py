"""The training loop itself, run against ONNX Runtime's training build (``onnxruntime-training-cpu``).

Why a separate module with almost no imports: the training build ships its own ``onnxruntime`` package, which
conflicts with the inference ``onnxruntime`` the rest of onnxsparse uses. ``onnxsparse.finetune.run`` therefore
runs this file in a subprocess whose ``sys.path`` puts an isolated install of the training build first (see
``onnxsparse.finetune.run.runtime_dir``), and talks to it through a JSON job file and JSON lines on stdout. Where
the current environment's ``onnxruntime`` already has training support, the same ``train`` function runs
in-process. This module may import only the standard library, numpy, onnx and ``onnxruntime`` — never the
onnxsparse package, whose modules would bind to whichever ``onnxruntime`` was imported first. Its helpers
(``training_batches``, ``training_loss``, ``training_eval``) are loaded by path from this file's folder
(``_sibling``) and obey the same rule.

Protocol (subprocess): ``python -c '<bootstrap>' JOB.json``; stdout gets one JSON object per line:
``{"event": "start", "steps": N}``, ``{"event": "step", "step": i, "loss": x, "lr": .., "samples": ..,
"tokens": .., "seconds": ..}``, ``{"event": "eval", "step": i, "loss": x, "cosine": c}``,
``{"event": "frozen", "params": {...}}``, ``{"event": "done", ...}`` (summary: curve, batching, timing).
Any failure exits non-zero with ``{"event": "error", "message": ...}`` as the last line.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: the last release of ORT training; the version this module is tested against
RUNTIME_VERSION = "1.19.2"
RUNTIME_PACKAGE = "onnxruntime-training-cpu"


def import_training_api() -> tuple[Any, Any, Any]:
    """``(onnxruntime, onnxruntime.training.artifacts, onnxruntime.training.api)`` without importing torch.

    ``onnxruntime/training/__init__.py`` imports its ``amp``/``optim`` subpackages, which import torch; the
    on-device pieces (artifacts, api) do not need it. Registering a bare package module for
    ``onnxruntime.training`` (with the real ``__path__``) lets those two import on their own.
    """
    import onnxruntime as ort

    name = "onnxruntime.training"
    if name not in sys.modules:
        pkg_dir = os.path.join(os.path.dirname(ort.__file__), "training")
        if not os.path.isdir(os.path.join(pkg_dir, "api")):
            where = os.path.dirname(ort.__file__)
            raise ImportError(f"onnxruntime {ort.__version__} at {where} has no training support")
        pkg = types.ModuleType(name)
        pkg.__path__ = [pkg_dir]
        pkg.__file__ = os.path.join(pkg_dir, "__init__.py")
        pkg.__package__ = name
        sys.modules[name] = pkg
    from onnxruntime.training import api, artifacts

    return ort, artifacts, api


def _sibling(name: str) -> Any:
    """A numpy-only onnxsparse module loaded from this file's folder (see the module docstring: the worker
    must not import the package, whose other modules bind to the inference ``onnxruntime``)."""
    import importlib.util

    key = f"onnxsparse_worker_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _cast(arr: np.ndarray, elem_type: int) -> np.ndarray:
    from onnx import helper

    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    return arr if arr.dtype == dtype else arr.astype(dtype)


# ---------------------------------------------------------------------------------------------- loop


def _batches(job: dict[str, Any], path: str, shuffle: bool) -> Any:
    """The job's batches over the arrays of ``path`` (trimmed / bucketed as the job says)."""
    tb = _sibling("batches")
    raw = np.load(path, allow_pickle=False)
    keys = list(job["input_names"]) + ([job["label_key"]] if job.get("label_key") else [])
    data = {k: raw[k] for k in keys}
    mask = job.get("mask") or None
    lengths = tb.row_lengths(data[mask["name"]], int(mask["seq_axis"])) if mask else None
    return tb.Batches(
        data,
        int(job["batch_size"]),
        int(job.get("seed", 0)),
        drop_last=bool(job.get("drop_last")),
        lengths=lengths,
        trim_axes=(mask or {}).get("trim") or None,
        bucket=bool(job.get("bucket")) and shuffle,
        shuffle=shuffle,
    )


def train(job: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run the fine-tune described by ``job``; ``emit`` receives progress events. Returns the summary."""
    ort, artifacts_mod, api = import_training_api()
    work = Path(job["workdir"])
    art = work / "artifacts"
    t0 = time.perf_counter()
    threads = int(job.get("threads", 0))
    train_options = _session_options(ort, threads)
    if job.get("profile"):  # ORT's per-node profile of the training session, written when the session ends
        train_options.enable_profiling = True
        train_options.profile_file_prefix = str(job["profile"])
    state, module, optimizer, frozen = _session(job, artifacts_mod, api, art, train_options)
    if frozen:
        emit({"event": "frozen", "params": frozen})
    module.train()

    batches = _batches(job, job["data"], shuffle=True)
    steps = int(job["steps"]) if job.get("steps") else max(1, round(float(job["epochs"]) * batches.per_epoch))
    teacher = None
    if job.get("teacher"):
        teacher = ort.InferenceSession(
            job["teacher"], _session_options(ort, threads), providers=["CPUExecutionProvider"]
        )
    input_types = {k: int(v) for k, v in job["input_types"].items()}
    label_type = int(job.get("label_type", 0))
    teacher_inputs = [i.name for i in teacher.get_inputs()] if teacher is not None else []

    def feeds_of(batch: dict[str, np.ndarray]) -> list[Any]:
        return [_cast(batch[k], input_types[k]) for k in job["input_names"]]

    def targets_of(batch: dict[str, np.ndarray], feeds: list[Any]) -> list[np.ndarray]:
        if job["loss"] == "ce":
            return [batch[job["label_key"]].astype(np.int64)]
        if teacher is not None:
            named = dict(zip(job["input_names"], feeds, strict=True))
            outs = teacher.run(job["loss_outputs"], {k: named[k] for k in teacher_inputs})
            return [np.asarray(o) for o in outs]
        return [_cast(batch[job["label_key"]], label_type)]

    evaluate = None
    if job.get("eval_data"):
        eval_batches = _batches(job, job["eval_data"], shuffle=False)
        evaluate = _sibling("evaluate").Evaluator(job, eval_batches, teacher, feeds_of, targets_of)
    every = int(job.get("eval_every", 0))
    curve: list[dict[str, float]] = []

    def eval_point(step: int) -> None:
        if evaluate is not None:
            point = {"step": step, **evaluate(module)}
            curve.append(point)
            emit({"event": "eval", **point})

    lr0 = float(job["lr"])
    warmup = int(job.get("warmup", 0))
    emit(
        {
            "event": "start",
            "steps": steps,
            "per_epoch": batches.per_epoch,
            "batch_size": batches.batch_size,
            "setup_seconds": round(time.perf_counter() - t0, 3),
        }
    )
    eval_point(0)
    losses: list[float] = []
    it = iter(batches)
    clock = time.perf_counter
    spent = {"batches": 0.0, "teacher": 0.0, "forward_backward": 0.0, "optimizer": 0.0, "eval": 0.0}
    loop_start, cpu_start = clock(), time.process_time()
    for step in range(steps):
        t_start = clock()
        lr = _lr_at(step, steps, lr0, warmup, job.get("schedule", "cosine"))
        optimizer.set_learning_rate(lr)
        batch = next(it)
        feeds = feeds_of(batch)
        t_batch = clock()
        targets = targets_of(batch, feeds)
        t_teacher = clock()
        loss = float(np.asarray(module(*feeds, *targets)))
        t_fb = clock()
        optimizer.step()
        module.lazy_reset_grad()
        t_opt = clock()
        spent["batches"] += t_batch - t_start
        spent["teacher"] += t_teacher - t_batch
        spent["forward_backward"] += t_fb - t_teacher
        spent["optimizer"] += t_opt - t_fb
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower the learning rate")
        losses.append(loss)
        shape = feeds[0].shape if feeds else ()
        emit(
            {
                "event": "step",
                "step": step + 1,
                "loss": loss,
                "lr": lr,
                "samples": int(shape[0]) if shape else 1,
                "tokens": int(np.prod(shape[:2])) if job.get("mask") and len(shape) >= 2 else None,
                "seconds": round(t_opt - t_start, 6),
            }
        )
        if every and (step + 1) % every == 0 and step + 1 < steps:
            t_eval = clock()
            eval_point(step + 1)
            spent["eval"] += clock() - t_eval
    timing = {"loop": clock() - loop_start, "loop_cpu": time.process_time() - cpu_start, **spent}
    if not curve or curve[-1]["step"] != steps:
        eval_point(steps)

    params = {name: np.asarray(state.parameters[name].data) for name in job["requires_grad"] if name not in frozen}
    np.savez(job["params_out"], **params)  # type: ignore[arg-type]
    optimizer = module = None  # ends the sessions (and writes the profile, when one was asked for)
    summary = {
        "steps": steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": float(np.mean(losses[-max(1, min(10, len(losses) // 10)) :])) if losses else None,
        "seconds": round(time.perf_counter() - t0, 3),
        "timing": {k: round(v, 4) for k, v in timing.items()},
        "curve": curve,
        "batching": batches.stats(),
        "runtime": f"onnxruntime {ort.__version__} ({os.path.dirname(ort.__file__)})",
    }
    return summary


def _session_options(ort: Any, threads: int) -> Any:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def clean_error(text: str) -> str:
    """One readable line from an exception text; ORT's C++ errors lose their source path and signature."""
    text = " ".join(text.split())
    match = re.search(r"\[ONNXRuntimeError\] : \d+ : (.*)", text)
    if match:
        return match.group(1)
    match = re.match(r"/onnxruntime_src/\S+:\d+ (.*)", text)
    if match:  # "<file>:<line> <C++ signature> <message>": the signature ends at the ")" closing its first "("
        rest = match.group(1)
        start, depth = rest.find("("), 0
        for i in range(max(start, 0), len(rest)):
            depth += {"(": 1, ")": -1}.get(rest[i], 0)
            if start >= 0 and depth == 0:
                tail = rest[i + 1 :].strip()
                return tail[len("const ") :] if tail.startswith("const ") else tail
        return rest
    return text


_MISSING_GRAD = re.compile(r"Could not find an implementation for (\w+?)Grad\(")
_NO_BUILDER = re.compile(r"gradient builder has not been registered: (\w+)")


def _session(
    job: dict[str, Any], artifacts_mod: Any, api: Any, art: Path, options: Any
) -> tuple[Any, Any, Any, dict[str, str]]:
    """Artefacts + training session; where ORT's CPU build lacks an op's gradient kernel (ConvTranspose has
    none), the weights upstream of that op are frozen and the artefacts built again, so the rest still trains.

    Returns (state, module, optimizer, frozen parameter → reason).
    """
    frozen: dict[str, str] = {}
    blocked: set[str] = set()
    while True:
        requires = [p for p in job["requires_grad"] if p not in frozen]
        if not requires:
            raise RuntimeError("nothing left to train: " + "; ".join(sorted(set(frozen.values()))))
        try:
            _sibling("loss").build_artifacts(job, artifacts_mod, art, requires)
            state = api.CheckpointState.load_checkpoint(str(art / "checkpoint"))
            module = api.Module(
                str(art / "training_model.onnx"), state, str(art / "eval_model.onnx"), session_options=options
            )
            optimizer = api.Optimizer(str(art / "optimizer_model.onnx"), module)
            return state, module, optimizer, frozen
        except RuntimeError as e:
            match = _MISSING_GRAD.search(str(e)) or _NO_BUILDER.search(str(e))
            if match is None or match.group(1) in blocked:
                raise
            op = match.group(1)
            blocked.add(op)
            reason = f"ONNX Runtime training (CPU) has no gradient for {op}, which this weight feeds"
            for name in _upstream_params(job["train_model"], op, requires):
                frozen[name] = reason


def _upstream_params(model_path: str, op_type: str, params: list[str]) -> list[str]:
    """The params that reach any ``op_type`` node (its own inputs included): their gradient passes through it."""
    import onnx

    graph = onnx.load(model_path, load_external_data=False).graph
    reached = upstream_names(graph, [n for n in graph.node if n.op_type == op_type], lambda n: list(n.input))
    return [p for p in params if p in reached]


def upstream_names(graph: Any, starts: list[Any], reads: Callable[[Any], list[str]]) -> set[str]:
    """Every name the ``starts`` nodes read, directly or through the nodes producing those names.

    ``reads(node)`` says what a node reads (its inputs; ``onnxsparse.ir.graph.node_reads`` adds subgraph
    captures). Shared with ``onnxsparse.finetune.run``, which may import this module but not the other way round.
    """
    # Not onnxsparse.ir.graph.GraphIndex: this module runs in the training runtime's subprocess, loaded by file
    # path, and cannot import onnxsparse. ``id(node)`` is safe here: one proto, read only, within this call.
    producer = {o: n for n in graph.node for o in n.output}
    todo = list(starts)
    seen: set[int] = set()
    reached: set[str] = set()
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for name in reads(node):
            reached.add(name)
            if name in producer:
                todo.append(producer[name])
    return reached


def _lr_at(step: int, steps: int, lr0: float, warmup: int, schedule: str) -> float:
    """Linear warm-up then constant or cosine decay to 10% (a short fine-tune settles better with decay)."""
    if warmup and step < warmup:
        return lr0 * (step + 1) / warmup
    if schedule == "constant" or steps <= 1:
        return lr0
    t = (step - warmup) / max(1, steps - warmup - 1)
    return lr0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry: run the job file named on the command line, events as JSON lines on stdout."""
    args = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(args[0]).read_text())

    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    try:
        summary = train(job, emit)
    except Exception as e:  # the parent turns this into one readable line
        import traceback

        traceback.print_exc(file=sys.stderr)
        emit({"event": "error", "message": f"{type(e).__name__}: {clean_error(str(e))}"})
        return 1
    emit({"event": "done", **summary})
    return 0


#: run by ``python -c`` in the subprocess: put the isolated runtime first, then run ``main``.
BOOTSTRAP = (
    "import sys; rt = sys.argv[1]; sys.argv = sys.argv[1:]; "
    "sys.path.insert(0, rt) if rt else None; "
    "import importlib.util as u; spec = u.spec_from_file_location('onnxsparse_training_worker', sys.argv[1]); "
    "m = u.module_from_spec(spec); spec.loader.exec_module(m); sys.exit(m.main(sys.argv[2:]))"
)
