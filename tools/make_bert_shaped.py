"""Write a BERT-shaped ONNX encoder (random weights) for benchmarking: `python tools/make_bert_shaped.py out.onnx`.

The layer shapes are BERT-base's by default (12 layers, hidden 768, 12 heads, FFN 3072, vocab 30522): per
layer Q/K/V/output projections (MatMul with [768, 768] weights), the FFN pair ([768, 3072], [3072, 768]),
attention products between activations (not weighted: the bench skips them), LayerNorm, GELU (Erf form),
then a pooler Gemm on the first token and a 2-class Gemm head. Inputs ``input_ids`` [batch, seq] are
symbolic: give them with ``--shapes input_ids:32x128`` (M = 4096). Weight values are random; the GPU bench
times shapes, so they only need to be realistic in size. Built here rather than downloaded: nothing can be
fetched on the device machines.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(
    layers: int = 12,
    hidden: int = 768,
    heads: int = 12,
    ffn: int = 3072,
    vocab: int = 30522,
    classes: int = 2,
    seed: int = 0,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, *shape: int) -> str:
        inits.append(
            numpy_helper.from_array(
                (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(np.float32), name
            )
        )
        return name

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(x: str, name: str, k: int, n: int) -> str:
        y = node("MatMul", [x, weight(f"{name}.weight", k, n)], name)
        return node("Add", [y, const(f"{name}.bias", np.zeros(n, np.float32))], f"{name}.add")

    def layer_norm(x: str, name: str) -> str:
        return node(
            "LayerNormalization",
            [
                x,
                const(f"{name}.gamma", np.ones(hidden, np.float32)),
                const(f"{name}.beta", np.zeros(hidden, np.float32)),
            ],
            name,
            axis=-1,
        )

    head_dim = hidden // heads
    split_shape = const("split_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = const("merge_shape", np.array([0, 0, hidden], np.int64))
    scale = const("scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    half, one, sqrt2 = (
        const(n, np.array(v, np.float32)) for n, v in (("half", 0.5), ("one", 1.0), ("sqrt2", np.sqrt(2.0)))
    )

    x = node("Gather", [weight("embeddings.word", vocab, hidden), "input_ids"], "embed")
    x = layer_norm(x, "embed.ln")
    for i in range(layers):
        p = f"layer{i}"
        q, k, v = (linear(x, f"{p}.attn.{t}", hidden, hidden) for t in "qkv")
        q, k, v = (node("Reshape", [t, split_shape], f"{t}.split") for t in (q, k, v))
        q = node("Transpose", [q], f"{p}.q.t", perm=[0, 2, 1, 3])
        k = node("Transpose", [k], f"{p}.k.t", perm=[0, 2, 3, 1])
        v = node("Transpose", [v], f"{p}.v.t", perm=[0, 2, 1, 3])
        s = node("Mul", [node("MatMul", [q, k], f"{p}.attn.scores"), scale], f"{p}.attn.scaled")
        a = node("MatMul", [node("Softmax", [s], f"{p}.attn.softmax", axis=-1), v], f"{p}.attn.context")
        a = node("Reshape", [node("Transpose", [a], f"{p}.ctx.t", perm=[0, 2, 1, 3]), merge_shape], f"{p}.ctx.merge")
        a = linear(a, f"{p}.attn.out", hidden, hidden)
        x = layer_norm(node("Add", [a, x], f"{p}.attn.residual"), f"{p}.attn.ln")
        h = linear(x, f"{p}.ffn1", hidden, ffn)
        erf = node("Erf", [node("Div", [h, sqrt2], f"{p}.gelu.div")], f"{p}.gelu.erf")
        h = node(
            "Mul", [node("Mul", [h, half], f"{p}.gelu.half"), node("Add", [erf, one], f"{p}.gelu.add")], f"{p}.gelu"
        )
        h = linear(h, f"{p}.ffn2", ffn, hidden)
        x = layer_norm(node("Add", [h, x], f"{p}.ffn.residual"), f"{p}.ffn.ln")
    first = node("Gather", [x, const("zero", np.array(0, np.int64))], "cls", axis=1)
    pooled = node(
        "Tanh",
        [
            node(
                "Gemm",
                [first, weight("pooler.weight", hidden, hidden), const("pooler.bias", np.zeros(hidden, np.float32))],
                "pooler",
                transB=1,
            )
        ],
        "pooler.tanh",
    )
    node(
        "Gemm",
        [pooled, weight("classifier.weight", classes, hidden), const("classifier.bias", np.zeros(classes, np.float32))],
        "logits",
        transB=1,
    )
    graph = helper.make_graph(
        nodes,
        "bert_shaped",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxsparse-tools")
    model.ir_version = 8
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=30522)
    args = ap.parse_args()
    model = build(args.layers, args.hidden, args.heads, args.ffn, args.vocab)
    onnx.checker.check_model(model)
    onnx.save(model, args.output)


if __name__ == "__main__":
    main()
