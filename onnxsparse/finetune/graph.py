"""The training copy of a model and the way back: masks as ``W ⊙ M``, trainable sets, ORT-training rewrites, folding.

1. ``training_copy``: one ``Mul(W, M)`` per pruned weight (M a constant 0/1 tensor), so the pruned entries get
   zero gradient whatever the optimizer does; rewrites for ops ORT training cannot differentiate as they are
   (inference-mode BatchNormalization, HardSigmoid/HardSwish, LayerNormalization without its statistics
   outputs); IR/opset lowered (ORT training 1.19 reads IR ≤ 10, opset ≤ 21) — never on the returned model;
2. ``trainable_sets``: which initializers train (``train=weights,biases,norms,embeddings``);
3. ``fold``: the trained values, multiplied by their masks, written into a copy of the *input* model: same
   nodes, same initializer names, same opset and IR, no Mul left, exactly the zeros the masks ask for.

The graph rewrites of 1. (and QAT's, ``finetune.qat``) run on an onnx-ir view of the copy (``ir.onnxir``:
``Value.uses()`` reaches readers inside If/Loop/Scan bodies, nodes are replaced where they stood, so no
reader maps or renaming loops; one stable ``Graph.sort``, a no-op for an input in order); ``lower_for_training``,
``partition_masks``, ``trainable_sets``, ``control_flow_frozen`` and ``fold`` stay on the proto: onnx-ir has no
version converter; the next two only look up layers and initializers (the layer index is protobuf,
``ir.layers``) and scan one node list once, where a view would cost its deserialisation (5-16 ms on
MiniLM-L3 / common_det) to replace a sub-millisecond scan; ``control_flow_frozen`` reads the saved training
file with the worker's own ``upstream_names``, so that both sides of the subprocess agree on what is upstream
of an If/Loop/Scan (the worker cannot import onnxsparse or onnx-ir); ``fold`` writes weight values into the
same nodes and names, no graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from onnxsparse.errors import OnnxSparseError
from onnxsparse.finetune import qat as training_qat
from onnxsparse.finetune import worker as training_worker
from onnxsparse.finetune.qat import MASK_SUFFIX
from onnxsparse.ir.graph import iter_graphs, node_reads
from onnxsparse.ir.index import model_layers
from onnxsparse.ir.model_io import Model, save_model
from onnxsparse.ir.onnxir import IrView, ModelTensor, add_initializer, insert_after_definition
from onnxsparse.ir.tensors import external_info, is_spilled, set_array, to_array

#: what ORT training 1.19 reads
MAX_IR = 10
MAX_OPSET = 21
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
    straight-through gradient replaces Q/DQ, and ``qweights`` become float masters. The rewrites run on an
    onnx-ir view of a copy (``IrView``); the input model is not touched.

    The mask tensors (and QAT's float masters) are appended to the copy's proto *before* the view is built, as
    data only: the view wraps them like every other weight and ``commit`` keeps them where they are. Made as
    ``ir.Tensor`` in the view instead, every float mask was alive at once, then serialised and copied again by
    ``commit``: on MiniLM-L3 with external weights the traced peak went from 4.7 to 24 MB (the masks' size; on
    a large model the weights' size).

    Cost (``tools/bench_training_copy.py``, prune-pass masks, best of 5, shared 2-core machine): MiniLM-L3
    (120 nodes, 18 masks, 68 MB inline) 78-81 ms before the port (protobuf, final toposort), 80-82 ms now (the
    proto copy is most of both); common_det (279 nodes, 83 masks, 20 MB) 24 -> 55-94 ms, the IR round trip
    (``IrView.of`` ~16 ms, ``commit`` ~17 ms) and more GC pauses over onnx-ir's objects (medians vary most).

    Every new node is inserted where what it reads is defined (mask products first, replacements where the
    node they replace stood), so an input in order gives a copy in order. ``Graph.sort`` (stable, 1-2 ms on
    MiniLM-L3 and common_det) still runs once at the end, for inputs whose node list is out of order (a file
    as given: the pipeline sorts only after its last pass, and ORT training wants order).
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    dtypes = {t.name: t.data_type for t in proto.graph.initializer}
    outputs = {o.name for o in proto.graph.output}
    for name, mask in masks.items():  # one float mask alive at a time (see above)
        if name in outputs:
            raise OnnxSparseError(f"weight '{name}' is also a graph output; cannot fine-tune it")
        np_dtype = helper.tensor_dtype_to_np_dtype(dtypes[name])
        proto.graph.initializer.append(onnx.numpy_helper.from_array(mask.astype(np_dtype), name + MASK_SUFFIX))
    qat = bool(qweights) or training_qat.has_qdq(proto)
    if qat:
        training_qat.add_weight_tensors(proto, qweights or {})
    copy = Model(proto=proto, base_dir=model.base_dir, source=model.source, store=model.store)
    view = IrView.of(copy)
    graph = view.ir.graph
    muls: list[ir.Node] = []
    for name in masks:
        w = graph.initializers[name]
        masked = ir.Value(name=name + MASKED_SUFFIX, type=w.type, shape=w.shape)
        # every reader, those inside If/Loop/Scan bodies included (captures are references to ``w``)
        ir.convenience.replace_all_uses_with(w, masked)
        m = graph.initializers[name + MASK_SUFFIX]
        muls.append(ir.node("Mul", [w, m], outputs=[masked], name=f"onnxsparse_mask_{name}"))
    if muls:
        insert_after_definition(graph, graph.initializers[next(iter(masks))], muls)
    _batchnorm_as_affine(graph, proto)
    _hard_activations_as_relu(graph)
    _cubes_as_products(graph)
    _layernorm_statistics(graph)
    if qat:
        training_qat.apply_qat(view, qweights or {})
    graph.sort()
    view.commit()
    lower_for_training(proto)
    return proto


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer of ``graph``, its values held in the proto as before (no spill: a masked weight's
    mask is read by the worker as part of the training model)."""
    return add_initializer(graph, ir.Tensor(np.ascontiguousarray(array), name=name))


def _replace(
    graph: ir.Graph,
    old: ir.Node,
    new: Sequence[ir.Node],
    old_values: Sequence[ir.Value],
    new_values: Sequence[ir.Value],
) -> None:
    """``new`` where ``old`` stood; ``new_values`` take over ``old_values``' names, types and uses."""
    ir.convenience.replace_nodes_and_values(graph, old, [old], new, old_values, new_values)


def _main_nodes(graph: ir.Graph, ops: tuple[str, ...]) -> list[ir.Node]:
    return [n for n in graph if n.op_type in ops and n.domain in ("", "ai.onnx")]


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


def _batchnorm_as_affine(graph: ir.Graph, proto: onnx.ModelProto) -> None:
    """Rewrite inference-mode BatchNormalization as ``x * a + b`` (a, b computed in-graph from its params).

    ORT's training graph runs BatchNormalization in training mode (batch statistics), so a model trained
    through it would match the teacher only with batch statistics and drift from it at inference, which uses
    the running ones. As plain arithmetic the running statistics stay in use (and scale / bias stay trainable).
    ``proto`` (not yet committed, so its names are the view's) gives the rank of ``x`` through onnx's shape
    inference, which onnx-ir does not have.
    """
    from onnxsparse.ir.shapes import infer_shapes

    targets = [
        n
        for n in _main_nodes(graph, ("BatchNormalization",))
        if len([o for o in n.outputs if o.name]) == 1
        and not n.attributes.get_int("training_mode", 0)
        and n.inputs[0] is not None
    ]
    if not targets:
        return
    shapes = infer_shapes(proto)
    for node in targets:
        x, scale, bias, mean, var = node.inputs[:5]
        shape = shapes.get(x.name or "") if x is not None else None
        if shape is None:
            continue
        p = f"{node.name or node.outputs[0].name}__onnxsparse_bn"
        eps = _const(graph, p + "_eps", np.array(node.attributes.get_float("epsilon", 1e-5), np.float32))
        rank = _const(graph, p + "_shape", np.array([-1] + [1] * (len(shape) - 2), np.int64))
        nodes = _chain(
            p,
            [
                ("Add", [var, eps], "_ve"),
                ("Sqrt", ["_ve"], "_std"),
                ("Div", [scale, "_std"], "_a"),
                ("Mul", [mean, "_a"], "_ma"),
                ("Sub", [bias, "_ma"], "_b"),
                ("Reshape", ["_a", rank], "_ar"),
                ("Reshape", ["_b", rank], "_br"),
                ("Mul", [x, "_ar"], "_xa"),
                ("Add", ["_xa", "_br"], "_y"),
            ],
        )
        nodes[-1].name = node.name
        _replace(graph, node, nodes, [node.outputs[0]], nodes[-1].outputs)


def _chain(prefix: str, steps: Sequence[tuple[str, Sequence[ir.Value | str | None], str]]) -> list[ir.Node]:
    """Nodes in order, each writing ``prefix + suffix``; a ``str`` input names an earlier step's suffix."""
    made: dict[str, ir.Value] = {}
    nodes: list[ir.Node] = []
    for op, inputs, suffix in steps:
        ins = [made[i] if isinstance(i, str) else i for i in inputs]
        node = ir.node(op, ins, outputs=[ir.Value(name=prefix + suffix)])
        made[suffix] = node.outputs[0]
        nodes.append(node)
    return nodes


def _hard_activations_as_relu(graph: ir.Graph) -> None:
    """HardSigmoid / HardSwish (MobileNetV3, EfficientNet-lite) have no gradient builder in ORT training;
    the same functions in differentiable ops: hardsigmoid(x) = relu(z) - relu(z - 1), z = alpha·x + beta."""
    for node in _main_nodes(graph, ("HardSigmoid", "HardSwish")):
        p = f"{node.name or node.outputs[0].name}__onnxsparse_hs"
        swish = node.op_type == "HardSwish"
        alpha = 1 / 6 if swish else node.attributes.get_float("alpha", 0.2)
        beta = 0.5 if swish else node.attributes.get_float("beta", 0.5)
        a, b, one = (
            _const(graph, p + s, np.array(v, np.float32))
            for v, s in ((alpha, "_alpha"), (beta, "_beta"), (1.0, "_one"))
        )
        x = node.inputs[0]
        steps: list[tuple[str, Sequence[ir.Value | str | None], str]] = [
            ("Mul", [x, a], "_ax"),
            ("Add", ["_ax", b], "_z"),
            ("Relu", ["_z"], "_r0"),
            ("Sub", ["_z", one], "_z1"),
            ("Relu", ["_z1"], "_r1"),
            ("Sub", ["_r0", "_r1"], "_sig"),
        ]
        if swish:
            steps.append(("Mul", [x, "_sig"], "_y"))
        nodes = _chain(p, steps)
        _replace(graph, node, nodes, [node.outputs[0]], nodes[-1].outputs)


def _cubes_as_products(graph: ir.Graph) -> None:
    """``Pow(x, 3)`` as ``x·x·x``, so that ORT's training graph does not fuse tanh-GELU into FastGelu.

    The exported tanh-GELU (``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``) is matched by ORT's pre-training
    GELU fusion through its ``Pow``; the CPU ``FastGeluGrad`` kernel that comes with it took 16% of a MiniLM-L3
    training step (87 ms of 548 ms, ORT profile). Spelled with ``Mul`` the pattern does not match and the
    gradient runs as plain element-wise kernels: the same function, 5-6% less time per step (A/B in one run,
    1 thread, batch 16). Only the training copy is rewritten; the exported model keeps its ``Pow``.
    """
    for node in [n for n in graph if n.op_type == "Pow" and len(n.inputs) == 2]:
        x, e = node.inputs
        if x is None or e is None or _scalar(e) != 3.0:
            continue
        p = f"{node.name or node.outputs[0].name}__onnxsparse_sq"
        nodes = _chain(p, [("Mul", [x, x], ""), ("Mul", ["", x], "_y")])
        nodes[-1].name = node.name
        _replace(graph, node, nodes, [node.outputs[0]], nodes[-1].outputs)


def _scalar(value: ir.Value) -> float | None:
    """The value of a one-element constant held in the proto (initializer or Constant node), else None."""
    tensor: Any = value.const_value
    producer = value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant":
        a = producer.attributes.get("value")
        tensor = a.value if a is not None and a.type == ir.AttributeType.TENSOR else None
    if tensor is None or int(np.prod(tensor.shape.numpy())) != 1:
        return None
    if isinstance(tensor, ModelTensor) and external_info(tensor.proto) is not None:
        return None  # as before: an external exponent is not read for this
    return float(np.asarray(tensor.numpy()).reshape(()))


def _layernorm_statistics(graph: ir.Graph) -> None:
    """Give LayerNormalization its Mean and InvStdDev outputs.

    ORT's LayerNormalization gradient reads the forward pass's Mean and InvStdDev outputs (optional in ONNX
    and usually absent in exported models): without them gradient building fails with
    "i < OutputDefs().size()". An onnx-ir node's outputs are fixed, so the node is replaced by one with three.
    """
    for node in _main_nodes(graph, ("LayerNormalization",)):
        if len(node.outputs) == 3 and all(o.name for o in node.outputs):
            continue
        base = node.name or node.outputs[0].name
        outs = [ir.Value(name=f"{base}__onnxsparse_ln_stat{i}") for i in range(3)]
        new = ir.Node(
            node.domain,
            node.op_type,
            node.inputs,
            node.attributes.values(),
            outputs=outs,
            name=node.name,
            doc_string=node.doc_string,
        )
        named = [i for i, o in enumerate(node.outputs) if o.name]
        _replace(graph, node, [new], [node.outputs[i] for i in named], [outs[i] for i in named])


def lower_for_training(proto: onnx.ModelProto) -> None:
    """Set IR ≤ 10 and default opset ≤ 21 in place (version-converting the graph when the opset is newer).

    On the proto, after ``commit``: onnx-ir has no version converter (onnx's works on ``ModelProto``).
    """
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

    On protobuf, not onnx-ir: it changes no node, name or edge, only the values of named initializers, and a
    view would cost a round trip (and a copy of every kept tensor it resolves) to write the same bytes.
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
