"""The training copy of a model and the way back: masks as ``W ⊙ M``, trainable sets, ORT-training rewrites, folding.

1. ``training_copy``: one ``Mul(W, M)`` per pruned weight (M a constant 0/1 tensor), so the pruned entries get
   zero gradient whatever the optimizer does; rewrites for ops ORT training cannot differentiate as they are
   (inference-mode BatchNormalization, HardSigmoid/HardSwish, LayerNormalization without its statistics
   outputs); IR/opset lowered (ORT training 1.19 reads IR ≤ 10, opset ≤ 21) — never on the returned model;
2. ``trainable_sets``: which initializers train (``train=weights,biases,norms,embeddings``);
3. ``fold``: the trained values, multiplied by their masks, written into a copy of the *input* model: same
   nodes, same initializer names, same opset and IR, no Mul left, exactly the zeros the masks ask for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxsparse.errors import OnnxSparseError
from onnxsparse.finetune import worker as training_worker
from onnxsparse.ir.graph import iter_graphs, node_reads, toposort
from onnxsparse.ir.index import model_layers
from onnxsparse.ir.layers import attr
from onnxsparse.ir.model_io import Model, save_model
from onnxsparse.ir.tensors import external_info, is_spilled, set_array, to_array

#: what ORT training 1.19 reads
MAX_IR = 10
MAX_OPSET = 21
MASK_SUFFIX = "__onnxsparse_mask"
MASKED_SUFFIX = "__onnxsparse_masked"
NORM_OPS = (
    "LayerNormalization",
    "BatchNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "SimplifiedLayerNormalization",
    "RMSNormalization",
)


def _main_initializers(model: Model) -> dict[str, TensorProto]:
    return {t.name: t for t in model.proto.graph.initializer}


def partition_masks(model: Model, masks: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Split masks into those the fine-tune can train (float initializers of the main graph, not quantized)
    and the rest, each with the reason it cannot be trained."""
    inits = _main_initializers(model)
    dequantized = {layer.source.name for layer in model_layers(model) if layer.source is not None and layer.dequantized}
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
            skipped[name] = (
                f"weight '{name}' is {TensorProto.DataType.Name(t.data_type)}"
                f"{' behind DequantizeLinear' if name in dequantized else ''}: fine-tune the float "
                "model (before qdq / to-fp16), then quantize / convert again"
            )
        else:
            usable[name] = mask
    return usable, skipped


def check_masks(model: Model, masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every mask must name a float initializer of the main graph with the same shape (else one-line error)."""
    usable, skipped = partition_masks(model, masks)
    if skipped:
        raise OnnxSparseError(next(iter(skipped.values())))
    return usable


def trainable_sets(model: Model, masks: Mapping[str, np.ndarray], sets: Sequence[str]) -> dict[str, list[str]]:
    """Set name → the float initializers of the main graph in it, for each set in ``sets``.

    - ``weights``: the masked weights themselves;
    - ``biases``: the biases of the masked layers (Conv/ConvTranspose/Gemm bias inputs, and the constant
      vector an ``Add`` puts on a masked layer's output, as exported MatMul + Add layers have);
    - ``norms``: the scale and shift of normalisation ops (LayerNorm, BatchNorm, ...);
    - ``embeddings``: tables read by ``Gather`` as its data (word / position / token-type embeddings).

    A name is in one set only (the first that claims it, in this order).
    """
    inits = _main_initializers(model)
    graph = model.proto.graph
    taken: set[str] = set(masks)
    out: dict[str, list[str]] = {s: [] for s in sets}

    def take(kind: str, name: str) -> None:
        t = inits.get(name)
        if kind in out and t is not None and t.data_type == TensorProto.FLOAT and name not in taken:
            taken.add(name)
            out[kind].append(name)

    if "weights" in out:
        out["weights"] = list(masks)
    masked_outputs: set[str] = set()
    for layer in model_layers(model):
        if layer.graph is not graph or layer.weight_name not in masks:
            continue
        masked_outputs.add(layer.node.output[0])
        if layer.op_type in ("Conv", "ConvTranspose", "Gemm") and len(layer.node.input) > 2:
            take("biases", layer.node.input[2])
    for node in graph.node:
        if node.op_type == "Add" and any(i in masked_outputs for i in node.input):
            for i in node.input:
                t = inits.get(i)
                if t is not None and len(t.dims) <= 1:
                    take("biases", i)
    for node in graph.node:
        if node.op_type in NORM_OPS:
            for i in node.input[1:3]:
                take("norms", i)
        elif node.op_type == "Gather" and node.domain in ("", "ai.onnx"):
            take("embeddings", node.input[0])
    return out


def training_copy(
    model: Model, masks: Mapping[str, np.ndarray], qweights: Mapping[str, Any] | None = None
) -> onnx.ModelProto:
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
        muls.append(helper.make_node("Mul", [name, name + MASK_SUFFIX], [rename[name]], name=f"onnxsparse_mask_{name}"))
    for i, node in enumerate(muls):
        graph.node.insert(i, node)
    _batchnorm_as_affine(proto)
    _hard_activations_as_relu(proto)
    _cubes_as_products(proto)
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
    from onnxsparse.finetune import qat as training_qat

    if qweights or training_qat.has_qdq(proto):
        training_qat.apply_qat(proto, qweights or {}, model)
    toposort(proto.graph)  # a pass's output is sorted only at the end of its pipeline; ORT insists on order
    lower_for_training(proto)
    return proto


CONTROL_FLOW = ("If", "Loop", "Scan")


def control_flow_frozen(proto: onnx.ModelProto, params: list[str]) -> dict[str, str]:
    """Params whose gradient would have to pass an If/Loop/Scan (ORT training does not differentiate them):
    those read inside a subgraph or feeding such a node, directly or through other nodes."""
    graph = proto.graph
    reached = training_worker.upstream_names(graph, [n for n in graph.node if n.op_type in CONTROL_FLOW], node_reads)
    return {
        p: "its gradient would pass an If/Loop/Scan, which ONNX Runtime training does not differentiate"
        for p in params
        if p in reached
    }


def _batchnorm_as_affine(proto: onnx.ModelProto) -> None:
    """Rewrite inference-mode BatchNormalization as ``x * a + b`` (a, b computed in-graph from its params).

    ORT's training graph runs BatchNormalization in training mode (batch statistics), so a model trained
    through it would match the teacher only with batch statistics and drift from it at inference, which uses
    the running ones. As plain arithmetic the running statistics stay in use (and scale / bias stay trainable).
    """
    from onnxsparse.ir.shapes import infer_shapes

    graph = proto.graph
    targets = [
        n
        for n in graph.node
        if n.op_type == "BatchNormalization"
        and n.domain in ("", "ai.onnx")
        and len([o for o in n.output if o]) == 1
        and not attr(n, "training_mode", 0)
    ]
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
        graph.initializer.extend(
            [
                onnx.numpy_helper.from_array(np.array(eps, np.float32), p + "_eps"),
                onnx.numpy_helper.from_array(np.array([-1] + [1] * (len(shape) - 2), np.int64), p + "_shape"),
            ]
        )
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
        graph.initializer.extend(
            [
                onnx.numpy_helper.from_array(np.array(v, np.float32), p + suffix)
                for v, suffix in ((alpha, "_alpha"), (beta, "_beta"), (1.0, "_one"))
            ]
        )
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


def _cubes_as_products(proto: onnx.ModelProto) -> None:
    """``Pow(x, 3)`` as ``x·x·x``, so that ORT's training graph does not fuse tanh-GELU into FastGelu.

    The exported tanh-GELU (``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``) is matched by ORT's pre-training
    GELU fusion through its ``Pow``; the CPU ``FastGeluGrad`` kernel that comes with it took 16% of a MiniLM-L3
    training step (87 ms of 548 ms, ORT profile). Spelled with ``Mul`` the pattern does not match and the
    gradient runs as plain element-wise kernels: the same function, 5-6% less time per step (A/B in one run,
    1 thread, batch 16). Only the training copy is rewritten; the exported model keeps its ``Pow``.
    """
    graph = proto.graph
    consts = {t.name: t for t in graph.initializer}
    consts.update(
        {
            n.output[0]: n.attribute[0].t
            for n in graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        }
    )
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        e = consts.get(node.input[1]) if node.op_type == "Pow" and len(node.input) == 2 else None
        if (
            e is None
            or e.data_location == TensorProto.EXTERNAL
            or int(np.prod(e.dims)) != 1
            or float(onnx.numpy_helper.to_array(e).reshape(())) != 3.0
        ):
            nodes.append(node)
            continue
        x, sq = node.input[0], f"{node.name or node.output[0]}__onnxsparse_sq"
        nodes += [
            helper.make_node("Mul", [x, x], [sq]),
            helper.make_node("Mul", [sq, x], [node.output[0]], name=node.name),
        ]
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


def save_for_worker(proto: onnx.ModelProto, home: Model, path: Path) -> None:
    """Write a model (a copy) where the worker can read it; external weights are streamed beside it."""
    detach_spills(proto, home)
    save_model(Model(proto=proto, base_dir=home.base_dir, store=home.store), path)


def detach_spills(proto: onnx.ModelProto, home: Model, skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Give a proto *copy* its own scratch files for edited (spilled) tensors.

    A copied tensor that was edited by an earlier pass points at the same scratch file as the original; saving
    the copy (which deletes scratch files it wrote out) or editing it would pull the data from under the
    original model. One tensor at a time, so memory stays at one tensor.
    """
    for graph in iter_graphs(proto.graph):
        for t in graph.initializer:
            if t.name in skip or not is_spilled(t, home):
                continue
            arr = to_array(t, home)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            set_array(t, arr, home, spill=True)


def graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def fold(
    model: Model, params: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], inplace: bool = False
) -> tuple[Model, list[str]]:
    """The model with the trained values (masked weights multiplied by their masks), a copy unless ``inplace``.

    Returns it and the names whose values changed (so a pass can say honestly whether it modified).
    """
    if inplace:
        proto = model.proto
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        detach_spills(proto, model, skip=set(params))
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
        if not np.array_equal(arr, to_array(originals[name], model)):
            changed.append(name)
        external = external_info(t) is not None
        if not inplace and external:  # the copy shares the original's file: point away from it first
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
        set_array(t, arr, model, spill=external)
    if inplace:
        return model, changed
    return Model(proto=proto, base_dir=model.base_dir, source=model.source, store=model.store), changed
