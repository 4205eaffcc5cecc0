"""The training loop itself, run against ONNX Runtime's training build (``onnxruntime-training-cpu``).

Why a separate module with almost no imports: the training build ships its own ``onnxruntime`` package, which
conflicts with the inference ``onnxruntime`` the rest of onnxsparse uses. ``onnxsparse.training`` therefore
runs this file in a subprocess whose ``sys.path`` puts an isolated install of the training build first (see
``onnxsparse.training.runtime_dir``), and talks to it through a JSON job file and JSON lines on stdout. Where
the current environment's ``onnxruntime`` already has training support, the same ``train`` function runs
in-process. This module may import only the standard library, numpy, onnx and ``onnxruntime`` — never the
rest of onnxsparse, whose modules would bind to whichever ``onnxruntime`` was imported first.

Protocol (subprocess): ``python -c '<bootstrap>' JOB.json``; stdout gets one JSON object per line:
``{"event": "start", "steps": N}``, ``{"event": "step", "step": i, "loss": x}``, ``{"event": "done", ...}``.
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
from collections.abc import Callable, Iterator
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


# ---------------------------------------------------------------------------------------------- data


class Batches:
    """Shuffled mini-batches over the arrays of an ``.npz`` (or a dict), one epoch after another.

    Arrays are read per key once (``np.load`` of an ``.npz`` is lazy per key); batches are fancy-indexed
    copies, so memory beyond the data itself is one batch.
    """

    def __init__(self, data: dict[str, np.ndarray], batch_size: int, seed: int, drop_last: bool) -> None:
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"data arrays differ in their first dimension: {lengths}")
        self.data = data
        self.n = next(iter(lengths.values()))
        self.batch_size = min(batch_size, self.n)
        self.drop_last = drop_last
        self.rng = np.random.default_rng(seed)

    @property
    def per_epoch(self) -> int:
        if self.drop_last:
            return max(1, self.n // self.batch_size)
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            order = self.rng.permutation(self.n)
            for b in range(self.per_epoch):
                idx = np.sort(order[b * self.batch_size : (b + 1) * self.batch_size])
                yield {k: np.ascontiguousarray(v[idx]) for k, v in self.data.items()}


def _cast(arr: np.ndarray, elem_type: int) -> np.ndarray:
    from onnx import helper

    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    return arr if arr.dtype == dtype else arr.astype(dtype)


# ---------------------------------------------------------------------------------------------- artefacts


def _loss_block(onnxblock: Any, kind: str, outputs: list[str], label_name: str) -> Any:
    """Sum of per-output MSE losses (distillation / regression), or cross-entropy on one output."""

    class _Loss(onnxblock.Block):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            if kind == "ce":
                self._parts = [onnxblock.loss.CrossEntropyLoss()]
            else:
                self._parts = [onnxblock.loss.MSELoss() for _ in outputs]
            self._add = [onnxblock.blocks.Add() for _ in outputs[1:]]

        def build(self, *graph_outputs: str) -> str:
            if kind == "ce":
                return self._parts[0](outputs[0], label_name)
            total = self._parts[0](outputs[0], target_name(0))
            for i in range(1, len(outputs)):
                total = self._add[i - 1](total, self._parts[i](outputs[i], target_name(i)))
            return total

    return _Loss()


def target_name(i: int) -> str:
    return f"onnxsparse_target_{i}"


def build_artifacts(job: dict[str, Any], artifacts_mod: Any, out_dir: Path, requires_grad: list[str]) -> None:
    """Training / eval / optimizer models and the checkpoint for the job's graph."""
    import onnx
    from onnxruntime.training import onnxblock

    out_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(job["train_model"])
    loss = _loss_block(onnxblock, job["loss"], job["loss_outputs"], "onnxsparse_labels")
    optimizer = onnxblock.optim.AdamW(weight_decay=float(job.get("weight_decay", 0.0)))
    artifacts_mod.generate_artifacts(
        model,
        requires_grad=requires_grad,
        frozen_params=job["frozen"],
        loss=loss,
        optimizer=optimizer,
        artifact_directory=str(out_dir),
    )
    # onnx >= 1.17 stamps a newer IR version than ORT 1.19 reads.
    ir = int(job.get("ir_version", 10))
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        path = out_dir / name
        m = onnx.load(str(path))
        if m.ir_version > ir:
            m.ir_version = ir
            onnx.save(m, str(path))


# ---------------------------------------------------------------------------------------------- loop


def train(job: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run the fine-tune described by ``job``; ``emit`` receives progress events. Returns the summary."""
    ort, artifacts_mod, api = import_training_api()
    work = Path(job["workdir"])
    art = work / "artifacts"
    t0 = time.perf_counter()
    state, module, optimizer, frozen = _session(job, artifacts_mod, api, art)
    if frozen:
        emit({"event": "frozen", "params": frozen})
    module.train()

    raw = np.load(job["data"], allow_pickle=False)
    keys = list(job["input_names"]) + ([job["label_key"]] if job.get("label_key") else [])
    data = {k: raw[k] for k in keys}
    batches = Batches(data, int(job["batch_size"]), int(job.get("seed", 0)), drop_last=bool(job.get("drop_last")))
    steps = int(job["steps"]) if job.get("steps") else max(1, round(float(job["epochs"]) * batches.per_epoch))

    teacher = None
    if job.get("teacher"):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(job.get("threads", 0))
        teacher = ort.InferenceSession(job["teacher"], opts, providers=["CPUExecutionProvider"])
    input_types = {k: int(v) for k, v in job["input_types"].items()}
    label_type = int(job.get("label_type", 0))

    lr0 = float(job["lr"])
    warmup = int(job.get("warmup", 0))
    emit({"event": "start", "steps": steps, "per_epoch": batches.per_epoch, "batch_size": batches.batch_size,
          "setup_seconds": round(time.perf_counter() - t0, 3)})
    losses: list[float] = []
    it = iter(batches)
    for step in range(steps):
        lr = _lr_at(step, steps, lr0, warmup, job.get("schedule", "cosine"))
        optimizer.set_learning_rate(lr)
        batch = next(it)
        feeds = [_cast(batch[k], input_types[k]) for k in job["input_names"]]
        if job["loss"] == "ce":
            targets = [batch[job["label_key"]].astype(np.int64)]
        elif teacher is not None:
            outs = teacher.run(job["loss_outputs"], dict(zip(job["input_names"], feeds, strict=True)))
            targets = [np.asarray(o) for o in outs]
        else:
            targets = [_cast(batch[job["label_key"]], label_type)]
        loss = float(np.asarray(module(*feeds, *targets)))
        optimizer.step()
        module.lazy_reset_grad()
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower the learning rate")
        losses.append(loss)
        emit({"event": "step", "step": step + 1, "loss": loss, "lr": lr})

    params = {name: np.asarray(state.parameters[name].data) for name in job["requires_grad"] if name not in frozen}
    np.savez(job["params_out"], **params)  # type: ignore[arg-type]
    summary = {
        "steps": steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": float(np.mean(losses[-max(1, min(10, len(losses) // 10)):])) if losses else None,
        "seconds": round(time.perf_counter() - t0, 3),
        "runtime": f"onnxruntime {ort.__version__} ({os.path.dirname(ort.__file__)})",
    }
    return summary


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
                return tail[len("const "):] if tail.startswith("const ") else tail
        return rest
    return text


_MISSING_GRAD = re.compile(r"Could not find an implementation for (\w+?)Grad\(")
_NO_BUILDER = re.compile(r"gradient builder has not been registered: (\w+)")


def _session(job: dict[str, Any], artifacts_mod: Any, api: Any, art: Path) -> tuple[Any, Any, Any, dict[str, str]]:
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
            build_artifacts(job, artifacts_mod, art, requires)
            state = api.CheckpointState.load_checkpoint(str(art / "checkpoint"))
            module = api.Module(str(art / "training_model.onnx"), state, str(art / "eval_model.onnx"))
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

    ``reads(node)`` says what a node reads (its inputs; ``onnxsparse.graph.node_reads`` adds subgraph
    captures). Shared with ``onnxsparse.training``, which may import this module but not the other way round.
    """
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
