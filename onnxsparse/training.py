"""Fine-tuning a pruned model with its n:m masks held fixed, through ONNX Runtime training.

NVIDIA's recipe is dense → prune 2:4 → retrain with the mask fixed. This module does the retraining on the
ONNX model itself:

1. a *training copy* of the model gets one ``Mul(W, M)`` per pruned weight (M a constant 0/1 tensor), so the
   pruned entries get zero gradient whatever the optimizer does; IR/opset are lowered there (ORT training
   1.19 reads IR ≤ 10, opset ≤ 21) — never on the model that is returned;
2. ``onnxsparse.training_worker`` builds the ORT training artefacts (trainable: the masked weights, optionally
   biases and norm parameters; everything else stays a constant), runs AdamW on a distillation loss (MSE to
   a dense teacher run batch by batch with ORT inference) or on labels (MSE / cross-entropy);
3. the trained values, multiplied by their masks, are written into a copy of the *input* model: same nodes,
   same initializer names, same opset and IR, no Mul left, and exactly the zeros the masks ask for.

Environment: ORT training lives in ``onnxruntime-training-cpu`` (last release 1.19.2), which provides the same
``onnxruntime`` module as the inference package. Rather than replace the user's ``onnxruntime``, it is
installed into an isolated folder (``onnxsparse setup-training``) and the loop runs in a subprocess that puts
that folder first on ``sys.path``. If the current environment's ``onnxruntime`` has training support, the
loop runs in-process instead.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxsparse import training_worker
from onnxsparse.errors import OnnxSparseError
from onnxsparse.graph import iter_graphs, node_reads, toposort
from onnxsparse.layers import attr, find_layers
from onnxsparse.model_io import Model, save_model
from onnxsparse.tensors import external_info, is_spilled, set_array, to_array

log = logging.getLogger("onnxsparse.training")

#: what ORT training 1.19 reads
MAX_IR = 10
MAX_OPSET = 21
MASK_SUFFIX = "__onnxsparse_mask"
MASKED_SUFFIX = "__onnxsparse_masked"
LOSSES = ("distill", "mse", "ce")
NORM_OPS = ("LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
            "SimplifiedLayerNormalization", "RMSNormalization")


# ---------------------------------------------------------------------------------------------- runtime


def cache_dir() -> Path:
    """``$ONNXSPARSE_CACHE``, else ``$XDG_CACHE_HOME/onnxsparse``, else ``~/.cache/onnxsparse``."""
    env = os.environ.get("ONNXSPARSE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "onnxsparse"


def runtime_dir() -> Path:
    """Where the isolated training runtime lives (``$ONNXSPARSE_TRAINING_RUNTIME`` overrides).

    Wheels are per Python version, so the folder name carries the interpreter tag.
    """
    env = os.environ.get("ONNXSPARSE_TRAINING_RUNTIME")
    if env:
        return Path(env).expanduser()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}-{sysconfig.get_platform().replace('-', '_')}"
    return cache_dir() / f"ort-training-{training_worker.RUNTIME_VERSION}-{tag}"


def install_command(target: Path | None = None) -> list[str]:
    """The pip command that installs the training runtime into ``target`` (isolated, no dependencies).

    ``--no-deps``: its dependencies (numpy, onnx, protobuf) are already in the environment and must not be
    shadowed by copies in the target folder; ORT 1.19.2's wheel is built against numpy 2 and runs with 2.x.
    """
    return [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "--target",
            str(target or runtime_dir()),
            f"{training_worker.RUNTIME_PACKAGE}=={training_worker.RUNTIME_VERSION}"]


def _setup_hint() -> str:
    return "run `onnxsparse setup-training` (or `onnxsparse finetune --install-runtime ...`)"


@dataclass(frozen=True)
class Runtime:
    """How training runs: ``inprocess`` (this env's onnxruntime trains) or ``subprocess`` with ``path`` first."""

    mode: str
    path: Path | None
    version: str

    def describe(self) -> str:
        where = "this environment's onnxruntime" if self.mode == "inprocess" else str(self.path)
        return f"onnxruntime-training {self.version} ({where})"


def _has_training(folder: Path) -> bool:
    return (folder / "onnxruntime" / "training" / "api").is_dir() and any(
        (folder / "onnxruntime" / "capi").glob("onnxruntime_pybind11_state*")
    )


def _installed_version(folder: Path) -> str:
    for info in folder.glob("onnxruntime_training*.dist-info"):
        return info.name.removesuffix(".dist-info").split("-")[1]
    return "unknown"


def find_runtime() -> Runtime | None:
    """The training runtime to use, or None where there is none."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is not None and spec.submodule_search_locations:
        pkg = Path(next(iter(spec.submodule_search_locations)))
        if _has_training(pkg.parent) and os.environ.get("ONNXSPARSE_TRAINING_SUBPROCESS") != "1":
            import onnxruntime

            return Runtime("inprocess", None, onnxruntime.__version__)
    folder = runtime_dir()
    if _has_training(folder):
        return Runtime("subprocess", folder, _installed_version(folder))
    return None


def require_runtime() -> Runtime:
    rt = find_runtime()
    if rt is None:
        raise OnnxSparseError(
            f"ONNX Runtime training is not installed: {_setup_hint()} — it installs "
            f"{training_worker.RUNTIME_PACKAGE}=={training_worker.RUNTIME_VERSION} into {runtime_dir()}, "
            "apart from your onnxruntime"
        )
    return rt


def install_runtime(target: Path | None = None, force: bool = False) -> Runtime:
    """Install ``onnxruntime-training-cpu`` into ``target`` (default ``runtime_dir()``) and check it imports.

    The install goes to a temporary sibling folder that is renamed into place only once pip succeeded, so an
    interrupted install never leaves a half-populated runtime that ``find_runtime`` would pick up.
    """
    target = Path(target or runtime_dir())
    target.parent.mkdir(parents=True, exist_ok=True)
    with _install_lock(target):  # two test workers or shells installing at once wait for each other
        if force or not _has_training(target):
            _pip_install(target)
    rt = Runtime("subprocess", target, _installed_version(target))
    _smoke_test(rt)
    return rt


def _pip_install(target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        cmd = install_command(tmp)
        log.info("installing the training runtime: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            last = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            if sys.version_info >= (3, 13) or sysconfig.get_platform().endswith("aarch64"):
                last.append(f"{training_worker.RUNTIME_PACKAGE} {training_worker.RUNTIME_VERSION} has wheels for "
                            "Python 3.8-3.12 on Linux x86_64, macOS and Windows only: fine-tune from such a Python")
            raise OnnxSparseError(
                f"installing {training_worker.RUNTIME_PACKAGE}=={training_worker.RUNTIME_VERSION} failed "
                f"({last[-1].strip() if last else f'pip exit {proc.returncode}'}); command: {' '.join(cmd)}"
            )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _install_lock(target: Path) -> Iterator[None]:
    """An exclusive advisory lock beside ``target`` (POSIX ``flock``; no lock where that does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows: installs are rare and manual there
        yield
        return
    with open(target.parent / f".{target.name}-install.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _smoke_test(rt: Runtime) -> None:
    """Import the training API in a subprocess the way the loop will (catches numpy/ABI mismatches early)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import importlib.util as u; s = u.spec_from_file_location('w', sys.argv[2]); m = u.module_from_spec(s); "
        "s.loader.exec_module(m); ort, a, api = m.import_training_api(); print(ort.__version__)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(rt.path), training_worker.__file__],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise OnnxSparseError(f"the training runtime in {rt.path} does not import: {last[-1] if last else '?'}")


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FinetuneOptions:
    """Hyper-parameters of one fine-tune (the CLI, the pass and the API share these names)."""

    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-3
    batch_size: int = 32
    loss: str = "distill"
    labels: str | None = None
    outputs: tuple[str, ...] = ()
    train_biases: bool = True
    train_norms: bool = False
    weight_decay: float = 0.0
    warmup: int = 0
    lr_schedule: str = "cosine"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise OnnxSparseError(f"unknown loss '{self.loss}' (choose from {', '.join(LOSSES)})")
        if self.loss in ("mse", "ce") and not self.labels:
            raise OnnxSparseError(f"loss '{self.loss}' needs labels: give the data key that holds them (--labels KEY)")
        if self.steps is not None and self.epochs is not None:
            raise OnnxSparseError("give either steps or epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise OnnxSparseError("steps must be at least 1")
        if self.epochs is not None and self.epochs <= 0:
            raise OnnxSparseError("epochs must be positive")
        if self.batch_size < 1:
            raise OnnxSparseError("batch size must be at least 1")
        if not self.lr > 0:
            raise OnnxSparseError("learning rate must be positive")
        if self.lr_schedule not in ("cosine", "constant"):
            raise OnnxSparseError("lr schedule must be 'cosine' or 'constant'")


@dataclass
class FinetuneResult:
    """The fine-tuned model and what happened on the way."""

    model: Model
    steps: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    trained: list[str]
    runtime: str
    changed: list[str] = field(default_factory=list)
    #: parameters the runtime could not train (no gradient kernel on the way), with the reason
    frozen: dict[str, str] = field(default_factory=dict)
    #: largest change training made to any masked-out entry before folding (0: they got no update)
    outside_mask_drift: float = 0.0
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["model"]
        d["losses"] = [round(x, 8) for x in self.losses]
        return d


# ---------------------------------------------------------------------------------------------- inputs


def load_masks(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Masks from an ``.npz``: initializer name → bool array, True = kept (the prune pass writes this)."""
    p = Path(path)
    if not p.is_file():
        raise OnnxSparseError(f"no such masks file: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            masks = {k: np.asarray(z[k]).astype(bool) for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise OnnxSparseError(f"{p} is not a masks .npz ({e})") from e
    if not masks:
        raise OnnxSparseError(f"{p} holds no masks")
    return masks


def npz_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Key → (shape, dtype) of an ``.npz`` without loading the arrays (reads the .npy headers only)."""
    p = Path(path)
    if not p.is_file():
        raise OnnxSparseError(f"no such data file: {p}")
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    try:
        with zipfile.ZipFile(p) as z:
            for name in z.namelist():
                if not name.endswith(".npy"):
                    continue
                with z.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = reader(f)
                out[name[:-4]] = (tuple(shape), dtype)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise OnnxSparseError(f"{p} is not an .npz data file ({e})") from e
    return out


# ---------------------------------------------------------------------------------------------- graph


def _main_initializers(model: Model) -> dict[str, TensorProto]:
    return {t.name: t for t in model.proto.graph.initializer}


def partition_masks(model: Model, masks: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Split masks into those the fine-tune can train (float initializers of the main graph, not quantized)
    and the rest, each with the reason it cannot be trained."""
    inits = _main_initializers(model)
    dequantized = {layer.source.name for layer in find_layers(model.proto)
                   if layer.source is not None and layer.dequantized}
    usable: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for name, mask in masks.items():
        t = inits.get(name)
        mask = np.asarray(mask).astype(bool)
        if t is None:
            skipped[name] = f"mask '{name}' names no initializer of the model's main graph"
        elif tuple(t.dims) != mask.shape:
            skipped[name] = f"mask '{name}' has shape {mask.shape}, the weight has {tuple(t.dims)}"
        elif name in dequantized or t.data_type not in (TensorProto.FLOAT, TensorProto.DOUBLE):
            skipped[name] = (f"weight '{name}' is {TensorProto.DataType.Name(t.data_type)}"
                             f"{' behind DequantizeLinear' if name in dequantized else ''}: fine-tune the float "
                             "model (before qdq / to-fp16), then quantize / convert again")
        else:
            usable[name] = mask
    return usable, skipped


def check_masks(model: Model, masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every mask must name a float initializer of the main graph with the same shape (else one-line error)."""
    usable, skipped = partition_masks(model, masks)
    if skipped:
        raise OnnxSparseError(next(iter(skipped.values())))
    return usable


def trainable_extras(model: Model, masks: Mapping[str, np.ndarray], biases: bool, norms: bool) -> list[str]:
    """Float initializers beside the masked weights that are worth training: layer biases, norm scale/bias."""
    inits = _main_initializers(model)
    graph = model.proto.graph
    masked_outputs: set[str] = set()
    out: list[str] = []

    def take(name: str) -> None:
        t = inits.get(name)
        if t is not None and t.data_type == TensorProto.FLOAT and name not in masks and name not in out:
            out.append(name)

    for layer in find_layers(model.proto):
        if layer.graph is not graph or layer.weight_name not in masks:
            continue
        masked_outputs.add(layer.node.output[0])
        if biases and layer.op_type in ("Conv", "ConvTranspose", "Gemm") and len(layer.node.input) > 2:
            take(layer.node.input[2])
    for node in graph.node:
        if biases and node.op_type == "Add" and any(i in masked_outputs for i in node.input):
            for i in node.input:
                t = inits.get(i)
                if t is not None and len(t.dims) <= 1:
                    take(i)
        if norms and node.op_type in NORM_OPS:
            for i in node.input[1:3]:
                take(i)
    return out


def training_copy(model: Model, masks: Mapping[str, np.ndarray],
                  qweights: Mapping[str, Any] | None = None) -> onnx.ModelProto:
    """The model with ``W ⊙ M`` in front of every masked weight's consumers; IR/opset lowered for ORT 1.19.

    A model with Q/DQ is made quantization-aware (``training_qat.apply_qat``): fake quantization with a
    straight-through gradient replaces Q/DQ, and ``qweights`` become float masters.
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    dtypes = {t.name: t.data_type for t in graph.initializer}
    rename = {name: name + MASKED_SUFFIX for name in masks}
    for sub in iter_graphs(graph):  # subgraphs read outer-scope weights by name: they must see W ⊙ M too
        for node in sub.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
    for out in graph.output:
        if out.name in rename:
            raise OnnxSparseError(f"weight '{out.name}' is also a graph output; cannot fine-tune it")
    muls = []
    for name, mask in masks.items():
        np_dtype = helper.tensor_dtype_to_np_dtype(dtypes[name])
        graph.initializer.append(onnx.numpy_helper.from_array(mask.astype(np_dtype), name + MASK_SUFFIX))
        muls.append(helper.make_node("Mul", [name, name + MASK_SUFFIX], [rename[name]],
                                     name=f"onnxsparse_mask_{name}"))
    for i, node in enumerate(muls):
        graph.node.insert(i, node)
    _batchnorm_as_affine(proto)
    _hard_activations_as_relu(proto)
    # ORT's LayerNormalization gradient reads the forward pass's Mean and InvStdDev outputs (optional in ONNX
    # and usually absent in exported models): without them gradient building fails with "i < OutputDefs().size()".
    for node in graph.node:
        if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx"):
            base = node.name or node.output[0]
            while len(node.output) < 3:
                node.output.append(f"{base}__onnxsparse_ln_stat{len(node.output)}")
            for i in (1, 2):
                if not node.output[i]:
                    node.output[i] = f"{base}__onnxsparse_ln_stat{i}"
    from onnxsparse import training_qat

    if qweights or training_qat.has_qdq(proto):
        training_qat.apply_qat(proto, qweights or {}, model.base_dir)
    toposort(proto.graph)  # a pass's output is sorted only at the end of its pipeline; ORT insists on order
    lower_for_training(proto)
    return proto


CONTROL_FLOW = ("If", "Loop", "Scan")


def control_flow_frozen(proto: onnx.ModelProto, params: list[str]) -> dict[str, str]:
    """Params whose gradient would have to pass an If/Loop/Scan (ORT training does not differentiate them):
    those read inside a subgraph or feeding such a node, directly or through other nodes."""
    graph = proto.graph
    reached = training_worker.upstream_names(graph, [n for n in graph.node if n.op_type in CONTROL_FLOW], node_reads)
    return {p: "its gradient would pass an If/Loop/Scan, which ONNX Runtime training does not differentiate"
            for p in params if p in reached}


def _batchnorm_as_affine(proto: onnx.ModelProto) -> None:
    """Rewrite inference-mode BatchNormalization as ``x * a + b`` (a, b computed in-graph from its params).

    ORT's training graph runs BatchNormalization in training mode (batch statistics), so a model trained
    through it would match the teacher only with batch statistics and drift from it at inference, which uses
    the running ones. As plain arithmetic the running statistics stay in use (and scale / bias stay trainable).
    """
    from onnxsparse.shapes import infer_shapes

    graph = proto.graph
    targets = [n for n in graph.node if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")
               and len([o for o in n.output if o]) == 1 and not attr(n, "training_mode", 0)]
    if not targets:
        return
    shapes = infer_shapes(proto)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        shape = shapes.get(node.input[0]) if node in targets else None
        if shape is None:
            nodes.append(node)
            continue
        x, scale, bias, mean, var = node.input[:5]
        p = f"{node.name or node.output[0]}__onnxsparse_bn"
        eps = float(attr(node, "epsilon", 1e-5))  # type: ignore[arg-type]
        graph.initializer.extend([
            onnx.numpy_helper.from_array(np.array(eps, np.float32), p + "_eps"),
            onnx.numpy_helper.from_array(np.array([-1] + [1] * (len(shape) - 2), np.int64), p + "_shape"),
        ])
        nodes += [
            helper.make_node("Add", [var, p + "_eps"], [p + "_ve"]),
            helper.make_node("Sqrt", [p + "_ve"], [p + "_std"]),
            helper.make_node("Div", [scale, p + "_std"], [p + "_a"]),
            helper.make_node("Mul", [mean, p + "_a"], [p + "_ma"]),
            helper.make_node("Sub", [bias, p + "_ma"], [p + "_b"]),
            helper.make_node("Reshape", [p + "_a", p + "_shape"], [p + "_ar"]),
            helper.make_node("Reshape", [p + "_b", p + "_shape"], [p + "_br"]),
            helper.make_node("Mul", [x, p + "_ar"], [p + "_xa"]),
            helper.make_node("Add", [p + "_xa", p + "_br"], [node.output[0]], name=node.name),
        ]
    del graph.node[:]
    graph.node.extend(nodes)


def _hard_activations_as_relu(proto: onnx.ModelProto) -> None:
    """HardSigmoid / HardSwish (MobileNetV3, EfficientNet-lite) have no gradient builder in ORT training;
    the same functions in differentiable ops: hardsigmoid(x) = relu(z) - relu(z - 1), z = alpha·x + beta."""
    graph = proto.graph
    if not any(n.op_type in ("HardSigmoid", "HardSwish") for n in graph.node):
        return
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type not in ("HardSigmoid", "HardSwish") or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        p = f"{node.name or node.output[0]}__onnxsparse_hs"
        swish = node.op_type == "HardSwish"
        alpha = 1 / 6 if swish else float(attr(node, "alpha", 0.2))  # type: ignore[arg-type]
        beta = 0.5 if swish else float(attr(node, "beta", 0.5))  # type: ignore[arg-type]
        graph.initializer.extend([onnx.numpy_helper.from_array(np.array(v, np.float32), p + suffix)
                                  for v, suffix in ((alpha, "_alpha"), (beta, "_beta"), (1.0, "_one"))])
        x = node.input[0]
        sig = p + "_sig" if swish else node.output[0]
        nodes += [
            helper.make_node("Mul", [x, p + "_alpha"], [p + "_ax"]),
            helper.make_node("Add", [p + "_ax", p + "_beta"], [p + "_z"]),
            helper.make_node("Relu", [p + "_z"], [p + "_r0"]),
            helper.make_node("Sub", [p + "_z", p + "_one"], [p + "_z1"]),
            helper.make_node("Relu", [p + "_z1"], [p + "_r1"]),
            helper.make_node("Sub", [p + "_r0", p + "_r1"], [sig]),
        ]
        if swish:
            nodes.append(helper.make_node("Mul", [x, sig], [node.output[0]]))
    del graph.node[:]
    graph.node.extend(nodes)


def lower_for_training(proto: onnx.ModelProto) -> None:
    """Set IR ≤ 10 and default opset ≤ 21 in place (version-converting the graph when the opset is newer)."""
    opset = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset > MAX_OPSET:
        from onnx import version_converter

        try:
            converted = version_converter.convert_version(proto, MAX_OPSET)
        except Exception as e:  # the converter raises bare RuntimeErrors with C++ text
            raise OnnxSparseError(
                f"ORT training reads opset ≤ {MAX_OPSET}; converting this opset-{opset} model failed: "
                f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
            ) from e
        proto.CopyFrom(converted)
    for o in proto.opset_import:
        if o.domain == "ai.onnx.ml" and o.version > 4:
            o.version = 4
    if proto.ir_version > MAX_IR:
        proto.ir_version = MAX_IR


def _save_for_worker(proto: onnx.ModelProto, base_dir: Path | None, path: Path) -> None:
    """Write a model (a copy) where the worker can read it; external weights are streamed beside it."""
    _detach_spills(proto)
    save_model(Model(proto=proto, base_dir=base_dir), path)


def _detach_spills(proto: onnx.ModelProto, skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Give a proto *copy* its own scratch files for edited (spilled) tensors.

    A copied tensor that was edited by an earlier pass points at the same scratch file as the original; saving
    the copy (which deletes scratch files it wrote out) or editing it would pull the data from under the
    original model. One tensor at a time, so memory stays at one tensor.
    """
    for graph in iter_graphs(proto.graph):
        for t in graph.initializer:
            if t.name in skip or not is_spilled(t):
                continue
            arr = to_array(t)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            set_array(t, arr, spill=True)


def _graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def _fold(model: Model, params: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray],
          inplace: bool = False) -> tuple[Model, list[str]]:
    """The model with the trained values (masked weights multiplied by their masks), a copy unless ``inplace``.

    Returns it and the names whose values changed (so a pass can say honestly whether it modified).
    """
    if inplace:
        proto = model.proto
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        _detach_spills(proto, skip=set(params))
    inits = {t.name: t for t in proto.graph.initializer}
    originals = {t.name: t for t in model.proto.graph.initializer}
    changed: list[str] = []
    for name, value in params.items():
        t = inits[name]
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        arr = np.asarray(value, dtype=dtype).reshape(tuple(t.dims))
        if name in masks:
            arr = np.where(masks[name], arr, np.zeros((), dtype))
            if np.count_nonzero(arr[~masks[name]]):  # cannot happen; a wrong fold must never ship
                raise AssertionError(f"fine-tuned '{name}' has non-zeros outside its mask")
        if not np.array_equal(arr, to_array(originals[name], model.base_dir)):
            changed.append(name)
        external = external_info(t) is not None
        if not inplace and external:  # the copy shares the original's file: point away from it first
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
        set_array(t, arr, spill=external)
    if inplace:
        return model, changed
    return Model(proto=proto, base_dir=model.base_dir, source=model.source), changed


# ---------------------------------------------------------------------------------------------- running


def _events_subprocess(job_path: Path, runtime: Runtime, cwd: Path) -> Iterator[dict[str, Any]]:
    cmd = [sys.executable, "-c", training_worker.BOOTSTRAP, str(runtime.path or ""), training_worker.__file__,
           str(job_path)]
    stderr_path = cwd / "worker.stderr"
    with open(stderr_path, "w") as err, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                                         cwd=cwd) as proc:
        assert proc.stdout is not None
        error = None
        try:
            for line in proc.stdout:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                event = json.loads(line)
                if event.get("event") == "error":
                    error = event.get("message")
                    continue
                yield event
        finally:
            if proc.poll() is None:
                proc.kill()
            rc = proc.wait()
    if rc != 0 or error:
        if not error:
            lines = [ln for ln in stderr_path.read_text(errors="replace").splitlines() if ln.strip()]
            error = lines[-1] if lines else f"exit code {rc}"
        short = error if len(error) <= 400 else error[:200] + " … " + error[-200:]
        raise OnnxSparseError(f"fine-tune failed in ORT training: {short}")


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
) -> FinetuneResult:
    """Fine-tune ``model`` with ``masks`` fixed; returns a new model (the input is not modified unless
    ``inplace``, which the pass uses: a pipeline edits one model in place).

    ``data``: an ``.npz`` with one array per graph input (first axis = samples) and, for ``mse``/``ce``
    losses, the labels under ``options.labels``. ``teacher``: the dense model whose outputs the student
    learns to match (``distill`` loss); it is run batch by batch, never on the whole data at once.
    """
    from onnxsparse import training_qat

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
        raise OnnxSparseError("distillation needs a dense teacher model (--teacher dense.onnx), "
                              "or use --loss mse/ce with --labels KEY")
    runtime = require_runtime()

    inputs = _graph_inputs(model.proto)
    shapes = npz_shapes(data)
    for vi in inputs:
        if vi.name not in shapes:
            raise OnnxSparseError(f"data {data} has no array for model input '{vi.name}' (has: {', '.join(shapes)})")
    if opts.labels and opts.labels not in shapes:
        raise OnnxSparseError(f"data {data} has no labels array '{opts.labels}' (has: {', '.join(shapes)})")
    batch_size = opts.batch_size
    dim0 = inputs[0].type.tensor_type.shape.dim[0] if inputs[0].type.tensor_type.shape.dim else None
    if dim0 is not None and dim0.HasField("dim_value") and dim0.dim_value != batch_size:
        log.warning("input '%s' has a fixed batch of %d: using it as the batch size", inputs[0].name, dim0.dim_value)
        batch_size = int(dim0.dim_value)

    out_types = {o.name: o.type.tensor_type.elem_type for o in model.proto.graph.output}
    if opts.outputs:
        unknown = [o for o in opts.outputs if o not in out_types]
        if unknown:
            raise OnnxSparseError(f"no model output named {', '.join(unknown)} (outputs: {', '.join(out_types)})")
        loss_outputs = list(opts.outputs)
    elif opts.loss == "distill":
        loss_outputs = [n for n, t in out_types.items() if t in (TensorProto.FLOAT, TensorProto.DOUBLE)]
    else:
        loss_outputs = [next(iter(out_types))]
    if opts.loss != "distill" and len(loss_outputs) != 1:
        raise OnnxSparseError(f"loss '{opts.loss}' uses one output; choose it with outputs=NAME")

    with contextlib.ExitStack() as stack:
        if workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onnxsparse-finetune-"))).resolve()
        else:
            work = Path(tempfile.mkdtemp(prefix="finetune-", dir=workdir)).resolve()
            stack.callback(shutil.rmtree, work, True)
        train_path = work / "student.onnx"
        _save_for_worker(training_copy(model, masks, qweights), model.base_dir, train_path)
        teacher_path = None
        if opts.loss == "distill":
            teacher_path = _prepare_teacher(teacher, work, loss_outputs)
        extras = trainable_extras(model, {**masks, **{k: q.mask for k, q in qweights.items()}}, opts.train_biases,
                                  opts.train_norms)
        requires_grad = [*masks, *(q.master_name for q in qweights.values()), *extras]
        student = onnx.load(str(train_path), load_external_data=False)
        frozen: dict[str, str] = control_flow_frozen(student, requires_grad)
        del student
        if all(p in frozen for p in requires_grad):
            raise OnnxSparseError(f"nothing to fine-tune: every weight is kept fixed ({next(iter(frozen.values()))})")
        for name, reason in frozen.items():
            log.warning("fine-tune: kept %s fixed: %s", name, reason)
        label_type = 0
        if opts.labels and opts.loss == "mse":
            label_type = out_types[loss_outputs[0]]
        job = {
            "workdir": str(work),
            "train_model": str(train_path),
            "teacher": str(teacher_path) if teacher_path else None,
            "requires_grad": [p for p in requires_grad if p not in frozen],
            "frozen": [],
            "loss": "ce" if opts.loss == "ce" else "mse",
            "loss_outputs": loss_outputs,
            "data": str(Path(data).resolve()),
            "input_names": [vi.name for vi in inputs],
            "input_types": {vi.name: vi.type.tensor_type.elem_type for vi in inputs},
            "label_key": opts.labels if opts.loss != "distill" else None,
            "label_type": label_type,
            "steps": opts.steps,
            "epochs": opts.epochs if opts.steps is None else None,
            "batch_size": batch_size,
            "lr": opts.lr,
            "weight_decay": opts.weight_decay,
            "warmup": opts.warmup,
            "schedule": opts.lr_schedule,
            "seed": opts.seed,
            "params_out": str(work / "params.npz"),
            "ir_version": MAX_IR,
        }
        if job["steps"] is None and job["epochs"] is None:
            job["epochs"] = 1
        job_path = work / "job.json"
        job_path.write_text(json.dumps(job, indent=1))
        losses: list[float] = []
        summary: dict[str, Any] = {}
        bars: list[Any] = []

        def handle(event: dict[str, Any]) -> None:
            kind = event.get("event")
            if kind == "start":
                from tqdm import tqdm

                bars.append(tqdm(total=event["steps"], desc="fine-tune", unit="step", disable=not progress,
                                 file=sys.stderr, leave=False))
            elif kind == "step":
                losses.append(float(event["loss"]))
                if bars:
                    bars[0].set_postfix(loss=f"{event['loss']:.4g}", refresh=False)
                    bars[0].update(1)
                if on_step is not None:
                    on_step(int(event["step"]), float(event["loss"]))
            elif kind == "frozen":
                frozen.update(event["params"])
                for name, reason in event["params"].items():
                    log.warning("fine-tune: kept %s fixed: %s", name, reason)
            elif kind == "done":
                summary.update(event)

        try:
            if runtime.mode == "inprocess":
                handle({"event": "done", **training_worker.train(job, handle)})
            else:
                for event in _events_subprocess(job_path, runtime, work):
                    handle(event)
        finally:
            for bar in bars:
                bar.close()
        with np.load(work / "params.npz") as z:
            params = {k: np.array(z[k]) for k in z.files}
    # Weights the worker had to keep fixed still get their masks applied (the input may not be pruned yet).
    inits = _main_initializers(model)
    for name in masks:
        params.setdefault(name, np.asarray(to_array(inits[name], model.base_dir)))
    for q in qweights.values():
        params.setdefault(q.master_name, q.master)
    # Drift = the largest change training made to a masked-out entry (0 when the fixed mask works); judged on
    # the float values, before folding / re-quantizing would hide it.
    drift = 0.0
    starts = {name: (np.asarray(to_array(inits[name], model.base_dir)), name, mask) for name, mask in masks.items()}
    starts.update({q.master_name: (q.master, q.master_name, q.mask) for q in qweights.values()})
    for start, key, mask in starts.values():
        if (~mask).any():
            after = np.asarray(params[key], np.float64).reshape(mask.shape)[~mask]
            drift = max(drift, float(np.max(np.abs(after - np.asarray(start, np.float64)[~mask]))))
    values = {k: v for k, v in params.items() if not k.endswith(training_qat.MASTER_SUFFIX)}
    values.update({q.name: q.quantize(params[q.master_name]) for q in qweights.values()})
    result_model, changed = _fold(model, values, masks, inplace=inplace)
    return FinetuneResult(
        model=result_model,
        changed=changed,
        outside_mask_drift=drift,
        steps=int(summary.get("steps", len(losses))),
        first_loss=summary.get("first_loss"),
        last_loss=summary.get("last_loss"),
        seconds=float(summary.get("seconds", 0.0)),
        trained=[name for name in requires_grad if name not in frozen],
        frozen=frozen,
        runtime=runtime.describe(),
        losses=losses,
    )


def _prepare_teacher(teacher: Model | str | os.PathLike[str] | None, work: Path, outputs: list[str]) -> Path:
    """The teacher as a file ORT 1.19 reads (a lowered copy when its IR/opset is newer)."""
    from onnxsparse.model_io import load_model

    t = teacher if isinstance(teacher, Model) else load_model(str(teacher), check=False)
    names = {o.name for o in t.proto.graph.output}
    missing = [o for o in outputs if o not in names]
    if missing:
        raise OnnxSparseError(f"the teacher has no output {', '.join(missing)} (it must share the student's outputs)")
    opset = next((int(o.version) for o in t.proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if t.source is not None and t.proto.ir_version <= MAX_IR and opset <= MAX_OPSET:
        return t.source
    proto = copy.deepcopy(t.proto)
    lower_for_training(proto)
    path = work / "teacher.onnx"
    _save_for_worker(proto, t.base_dir, path)
    return path


def output_error(student: Model, teacher: Model | str | os.PathLike[str], data: str | os.PathLike[str],
                 samples: int = 512, batch_size: int = 64) -> float:
    """Mean squared difference of the float outputs of ``student`` and ``teacher`` on the first samples of
    ``data`` (this environment's onnxruntime; batch by batch). The number the fine-tune drives down."""
    import onnxruntime as ort

    from onnxsparse.model_io import load_model

    t = teacher if isinstance(teacher, Model) else load_model(str(teacher), check=False)

    tmp = Path(tempfile.mkdtemp(prefix="onnxsparse-eval-"))

    def session(m: Model, name: str) -> Any:
        if not m.has_external_data():
            return ort.InferenceSession(m.proto.SerializeToString(), providers=["CPUExecutionProvider"])
        # Edited tensors may live in scratch files the model file on disk does not know: save a copy.
        proto = onnx.ModelProto()
        proto.CopyFrom(m.proto)
        _save_for_worker(proto, m.base_dir, tmp / name)
        return ort.InferenceSession(str(tmp / name), providers=["CPUExecutionProvider"])

    try:
        s_sess, t_sess = session(student, "student.onnx"), session(t, "teacher.onnx")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    names = [o.name for o in student.proto.graph.output
             if o.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE)]
    inputs = {i.name: i.type.tensor_type.elem_type for i in _graph_inputs(student.proto)}
    first = _graph_inputs(student.proto)[0].type.tensor_type.shape.dim
    if first and first[0].HasField("dim_value"):
        batch_size = int(first[0].dim_value)  # a fixed batch dimension
    total, count = 0.0, 0
    with np.load(data, allow_pickle=False) as z:
        arrays = {k: z[k][:samples] for k in inputs}
    n = min(len(a) for a in arrays.values())
    for start in range(0, n - batch_size + 1 if first and first[0].HasField("dim_value") else n, batch_size):
        feeds = {k: arrays[k][start : start + batch_size].astype(helper.tensor_dtype_to_np_dtype(v))
                 for k, v in inputs.items()}
        for a, b in zip(s_sess.run(names, feeds), t_sess.run(names, feeds), strict=True):
            diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
            total += float(np.sum(diff * diff))
            count += diff.size
    return total / max(count, 1)
