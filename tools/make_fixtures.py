#!/usr/bin/env python3
"""Build the small, seeded fixture models in ``fixtures/`` (no torch: onnx.helper + numpy only).

Each model is made to exercise one family of cases the passes must handle (Gemm attributes, rank-3 MatMuls
with dynamic batch/seq, Conv variants, weights inside If/Loop bodies, weights behind Q/DQ chains). The output
is byte-for-byte deterministic — fixed seeds, fixed names, fixed IR version and producer — so
``tests/test_fixtures.py`` can regenerate the files and compare them with the committed ones.

Usage: ``python tools/make_fixtures.py [--out fixtures/] [--check]``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PRODUCER = "onnxsparse-fixtures"
PRODUCER_VERSION = "1"
#: IR version per opset, pinned so that the bytes do not depend on the installed onnx's defaults
#: (and kept ≤ 10, which ORT-training 1.19 accepts).
IR_FOR_OPSET = {17: 8, 19: 9, 21: 10}

Dims = Sequence[int | str]


class GraphBuilder:
    """Collects nodes and initializers for one (sub)graph; weights come from one seeded generator."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))
        return outputs[0]

    def const(self, name: str, value: np.ndarray) -> str:
        # (np.ascontiguousarray would turn a 0-d scalar into shape [1])
        self.inits.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def weight(self, name: str, shape: Sequence[int], fan_in: int | None = None) -> str:
        """A He-scaled fp32 weight, so activations stay O(1) through the stack."""
        fan = fan_in if fan_in is not None else int(np.prod(shape[1:])) or 1
        w = self.rng.standard_normal(tuple(shape)) * np.sqrt(2.0 / fan)
        return self.const(name, w.astype(np.float32))

    def bias(self, name: str, shape: Sequence[int]) -> str:
        return self.const(name, (0.1 * self.rng.standard_normal(tuple(shape))).astype(np.float32))

    def graph(
        self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
    ) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits)


def tensor(name: str, dims: Dims | None, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, None if dims is None else list(dims))


def make_model(graph: onnx.GraphProto, opset: int, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name=PRODUCER,
        producer_version=PRODUCER_VERSION,
        doc_string=doc,
    )
    model.ir_version = IR_FOR_OPSET[opset]
    return model


# --------------------------------------------------------------------------------------------------- mlp_gemm


def mlp_gemm() -> onnx.ModelProto:
    """Gemms covering every attribute case gemm-to-conv and prune must rewrite or skip."""
    b = GraphBuilder(np.random.default_rng(1001))
    # main path: x [batch, 32] -> y [batch, 16]
    h = b.node(
        "Gemm", ["x", b.weight("fc0.weight", [64, 32]), b.bias("fc0.bias", [64])], ["fc0.out"], "fc0", transB=1
    )  # transB=1, bias [N]
    h = b.node("Relu", [h], ["fc0.relu"], "fc0.act")
    h = b.node(
        "Gemm",
        [h, b.weight("fc1.weight", [64, 36], fan_in=64), b.bias("fc1.bias", [1, 36])],
        ["fc1.out"],
        "fc1",
        alpha=0.5,
        beta=2.0,
    )  # transB=0, bias [1, N], alpha/beta != 1, N % 16 != 0
    h = b.node("Relu", [h], ["fc1.relu"], "fc1.act")
    h = b.node("Gemm", [h, b.weight("fc2.weight", [36, 64], fan_in=36)], ["fc2.out"], "fc2")  # no bias, K=36
    shared = b.weight("shared.weight", [64, 64])
    h = b.node("Gemm", [h, shared, b.bias("fc3.bias", [64])], ["fc3.out"], "fc3")  # shared weight (1 of 2)
    h = b.node("Relu", [h], ["fc3.relu"], "fc3.act")
    h = b.node("Gemm", [h, shared], ["fc4.out"], "fc4", transB=1)  # shared weight (2 of 2), no bias
    h = b.node("Relu", [h], ["fc4.relu"], "fc4.act")
    # B computed at run time: a constant scaled by a statistic of the aux input
    b.node("ReduceMean", ["aux"], ["aux.mean"], "dyn.mean", keepdims=1)
    b.node("Sigmoid", ["aux.mean"], ["dyn.gate"], "dyn.gate")
    b.node("Mul", [b.weight("dyn.base", [64, 16], fan_in=64), "dyn.gate"], ["dyn.weight"], "dyn.weight")
    b.node("Gemm", [h, "dyn.weight", b.bias("head.bias", [16])], ["y"], "head")  # B is not constant
    # aux path (static M): aux [8, 16] -> aux_out [32, 16]
    b.node(
        "Gemm",
        ["aux", b.weight("aux0.weight", [16, 32], fan_in=16), b.bias("aux0.bias", [8, 32])],
        ["aux0.out"],
        "aux0",
        beta=0.5,
    )  # C is [M, N]: not a per-channel bias
    b.node(
        "Gemm", ["aux0.out", b.weight("aux1.weight", [8, 16], fan_in=8)], ["aux_out"], "aux1", transA=1
    )  # transA=1: [32, 8] @ [8, 16]
    g = b.graph(
        "mlp_gemm",
        [tensor("x", ["batch", 32]), tensor("aux", [8, 16])],
        [tensor("y", ["batch", 16]), tensor("aux_out", [32, 16])],
    )
    return make_model(
        g,
        17,
        "MLP of Gemms: transA/transB, alpha/beta, bias [N]/[1,N]/[M,N]/none, shared and "
        "run-time weights; dynamic batch.",
    )


# ------------------------------------------------------------------------------------------- transformer_block


def transformer_block(hidden: int = 64, ffn: int = 256, heads: int = 4) -> onnx.ModelProto:
    """One post-norm encoder block with rank-3 MatMuls and dynamic batch and sequence dims."""
    b = GraphBuilder(np.random.default_rng(2002))
    hd = hidden // heads

    def linear(name: str, x: str, k: int, n: int) -> str:
        mm = b.node("MatMul", [x, b.weight(f"{name}.weight", [k, n], fan_in=k)], [f"{name}.mm"], f"{name}.matmul")
        return b.node("Add", [mm, b.bias(f"{name}.bias", [n])], [f"{name}.out"], f"{name}.add")

    split_shape = b.const("attn.split_shape", np.array([0, 0, heads, hd], dtype=np.int64))
    merge_shape = b.const("attn.merge_shape", np.array([0, 0, hidden], dtype=np.int64))
    heads_out: dict[str, str] = {}
    for proj, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        t = linear(f"attn.{proj}_proj", "x", hidden, hidden)
        t = b.node("Reshape", [t, split_shape], [f"attn.{proj}.split"], f"attn.{proj}.split")
        heads_out[proj] = b.node("Transpose", [t], [f"attn.{proj}.heads"], f"attn.{proj}.heads", perm=perm)
    scores = b.node("MatMul", [heads_out["q"], heads_out["k"]], ["attn.scores"], "attn.qk")  # two activations
    scale = b.const("attn.scale", np.array(1.0 / np.sqrt(hd), dtype=np.float32))
    scores = b.node("Mul", [scores, scale], ["attn.scaled"], "attn.scale")
    probs = b.node("Softmax", [scores], ["attn.probs"], "attn.softmax", axis=-1)
    ctx = b.node("MatMul", [probs, heads_out["v"]], ["attn.ctx"], "attn.pv")
    ctx = b.node("Transpose", [ctx], ["attn.ctx.t"], "attn.ctx.t", perm=[0, 2, 1, 3])
    ctx = b.node("Reshape", [ctx, merge_shape], ["attn.ctx.merged"], "attn.merge")
    attn = linear("attn.out_proj", ctx, hidden, hidden)
    h = b.node("Add", ["x", attn], ["attn.residual"], "attn.residual")
    h = b.node(
        "LayerNormalization",
        [h, b.const("ln1.weight", np.ones(hidden, np.float32)), b.bias("ln1.bias", [hidden])],
        ["ln1.out"],
        "ln1",
        axis=-1,
        epsilon=1e-5,
    )
    f = linear("ffn.fc1", h, hidden, ffn)
    # GELU (erf form; the Gelu op needs opset 20)
    inv_sqrt2 = b.const("ffn.inv_sqrt2", np.array(1.0 / np.sqrt(2.0), dtype=np.float32))
    one = b.const("ffn.one", np.array(1.0, dtype=np.float32))
    half = b.const("ffn.half", np.array(0.5, dtype=np.float32))
    e = b.node("Mul", [f, inv_sqrt2], ["ffn.gelu.scaled"], "ffn.gelu.scale")
    e = b.node("Erf", [e], ["ffn.gelu.erf"], "ffn.gelu.erf")
    e = b.node("Add", [e, one], ["ffn.gelu.erf1"], "ffn.gelu.add")
    e = b.node("Mul", [f, e], ["ffn.gelu.mul"], "ffn.gelu.mul")
    g = b.node("Mul", [e, half], ["ffn.gelu.out"], "ffn.gelu.half")
    f = linear("ffn.fc2", g, ffn, hidden)
    h = b.node("Add", [h, f], ["ffn.residual"], "ffn.residual")
    b.node(
        "LayerNormalization",
        [h, b.const("ln2.weight", np.ones(hidden, np.float32)), b.bias("ln2.bias", [hidden])],
        ["y"],
        "ln2",
        axis=-1,
        epsilon=1e-5,
    )
    graph = b.graph(
        "transformer_block",
        [tensor("x", ["batch", "seq", hidden])],
        [tensor("y", ["batch", "seq", hidden])],
    )
    return make_model(
        graph, 17, f"Post-norm encoder block: hidden={hidden}, heads={heads}, ffn={ffn}; dynamic batch and seq."
    )


# ------------------------------------------------------------------------------------------------------- cnn


def cnn() -> onnx.ModelProto:
    """A small CNN with every Conv flavour the passes distinguish."""
    b = GraphBuilder(np.random.default_rng(3003))

    def conv(
        name: str, x: str, c_in: int, c_out: int, k: int, group: int = 1, stride: int = 1, relu: bool = True
    ) -> str:
        pad = k // 2
        w = b.weight(f"{name}.weight", [c_out, c_in // group, k, k])
        y = b.node(
            "Conv",
            [x, w, b.bias(f"{name}.bias", [c_out])],
            [f"{name}.out"],
            name,
            kernel_shape=[k, k],
            pads=[pad] * 4,
            strides=[stride, stride],
            group=group,
        )
        return b.node("Relu", [y], [f"{name}.relu"], f"{name}.act") if relu else y

    # stem: C_in=3 (not divisible by 4 -> ineligible for 2:4), no bias, then BatchNorm
    stem = b.node(
        "Conv",
        ["x", b.weight("stem.weight", [16, 3, 3, 3])],
        ["stem.out"],
        "stem",
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
    )
    bn = [
        b.const("stem.bn.scale", (1.0 + 0.1 * b.rng.standard_normal(16)).astype(np.float32)),
        b.bias("stem.bn.bias", [16]),
        b.bias("stem.bn.mean", [16]),
        b.const("stem.bn.var", (1.0 + 0.1 * np.abs(b.rng.standard_normal(16))).astype(np.float32)),
    ]
    h = b.node("BatchNormalization", [stem, *bn], ["stem.bn.out"], "stem.bn", epsilon=1e-5)
    h = b.node("Relu", [h], ["stem.relu"], "stem.act")  # [N, 16, 32, 32]
    # residual block
    r = conv("block1.conv1", h, 16, 16, 3)
    r = conv("block1.conv2", r, 16, 16, 3, relu=False)
    h = b.node("Add", [h, r], ["block1.residual"], "block1.residual")
    h = b.node("Relu", [h], ["block1.relu"], "block1.act")
    h = conv("dw", h, 16, 16, 3, group=16, stride=2)  # depthwise: C_in/group = 1 -> ineligible; [N, 16, 16, 16]
    h = conv("pw", h, 16, 32, 1)  # pointwise 1x1
    h = conv("grouped", h, 32, 32, 3, group=4)  # C_in/group = 8
    # ConvTranspose: weight [C_in, C_out/group, kH, kW]; upsample 16 -> 32
    up_w = b.weight("up.weight", [32, 16, 2, 2], fan_in=32)
    h = b.node(
        "ConvTranspose", [h, up_w, b.bias("up.bias", [16])], ["up.out"], "up", kernel_shape=[2, 2], strides=[2, 2]
    )
    h = b.node("Relu", [h], ["up.relu"], "up.act")  # [N, 16, 32, 32]
    h = conv("down", h, 16, 32, 3, stride=2)  # [N, 32, 16, 16]
    h = b.node("GlobalAveragePool", [h], ["pool.out"], "pool")
    h = b.node("Flatten", [h], ["pool.flat"], "flatten", axis=1)
    b.node("Gemm", [h, b.weight("head.weight", [12, 32]), b.bias("head.bias", [12])], ["logits"], "head", transB=1)
    graph = b.graph("cnn", [tensor("x", ["batch", 3, 32, 32])], [tensor("logits", ["batch", 12])])
    return make_model(
        graph,
        17,
        "Small CNN: stem Conv (C_in=3) + BatchNorm, residual block, depthwise, pointwise, "
        "grouped Conv, ConvTranspose, GlobalAveragePool + Gemm head; dynamic batch.",
    )


# ---------------------------------------------------------------------------------------------- If and Loop


def if_model() -> onnx.ModelProto:
    """MatMuls with constant weights inside If branches (branch initializers and an outer-scope one)."""
    rng = np.random.default_rng(4004)
    outer = GraphBuilder(rng)
    then_b = GraphBuilder(rng)
    else_b = GraphBuilder(rng)
    outer_w = outer.weight("then.fc1.weight", [32, 64], fan_in=32)  # outer scope, used only in then_branch
    # then: relu(x0 @ outer_w) @ W + b
    t = then_b.node("MatMul", ["x0", outer_w], ["then.fc1.out"], "then.fc1")
    t = then_b.node("Relu", [t], ["then.fc1.relu"], "then.act")
    t = then_b.node("MatMul", [t, then_b.weight("then.fc2.weight", [64, 16], fan_in=64)], ["then.fc2.out"], "then.fc2")
    then_b.node("Add", [t, then_b.bias("then.fc2.bias", [16])], ["then_y"], "then.fc2.add")
    # else: tanh(x0 @ W1) @ W2 (both branch initializers)
    e = else_b.node(
        "MatMul", ["x0", else_b.weight("else.fc1.weight", [32, 32], fan_in=32)], ["else.fc1.out"], "else.fc1"
    )
    e = else_b.node("Tanh", [e], ["else.fc1.tanh"], "else.act")
    else_b.node("MatMul", [e, else_b.weight("else.fc2.weight", [32, 16], fan_in=32)], ["else_y"], "else.fc2")
    then_g = then_b.graph("then_branch", [], [tensor("then_y", ["batch", 16])])
    else_g = else_b.graph("else_branch", [], [tensor("else_y", ["batch", 16])])
    # main: x -> x0 = x @ W_in + b -> If(cond)
    x0 = outer.node("MatMul", ["x", outer.weight("in.weight", [32, 32], fan_in=32)], ["in.mm"], "in.matmul")
    outer.node("Add", [x0, outer.bias("in.bias", [32])], ["x0"], "in.add")
    outer.node("If", ["cond"], ["y"], "branch", then_branch=then_g, else_branch=else_g)
    graph = outer.graph(
        "if_model",
        [tensor("x", ["batch", 32]), tensor("cond", [], TensorProto.BOOL)],
        [tensor("y", ["batch", 16])],
    )
    return make_model(
        graph,
        17,
        "If with MatMuls in both branches: branch initializers and one outer-scope "
        "initializer used inside then_branch; dynamic batch.",
    )


def loop_model(trips: int = 3) -> onnx.ModelProto:
    """A Loop whose body applies a MatMul with a constant weight (body initializer) ``trips`` times."""
    rng = np.random.default_rng(5005)
    outer = GraphBuilder(rng)
    body = GraphBuilder(rng)
    outer_bias = outer.bias("body.bias", [32])  # outer scope, read inside the body
    body.node("Identity", ["cond_in"], ["cond_out"], "body.cond")
    h = body.node("MatMul", ["h_in", body.weight("body.weight", [32, 32], fan_in=32)], ["body.mm"], "body.matmul")
    h = body.node("Add", [h, outer_bias], ["body.add"], "body.add")
    body.node("Tanh", [h], ["h_out"], "body.act")
    body_g = body.graph(
        "loop_body",
        [tensor("iter", [], TensorProto.INT64), tensor("cond_in", [], TensorProto.BOOL), tensor("h_in", None)],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("h_out", None)],
    )
    trip = outer.const("loop.trips", np.array(trips, dtype=np.int64))
    cond = outer.const("loop.cond", np.array(True))
    outer.node("Loop", [trip, cond, "x"], ["loop.out"], "loop", body=body_g)
    outer.node("MatMul", ["loop.out", outer.weight("head.weight", [32, 8], fan_in=32)], ["y"], "head")
    graph = outer.graph("loop_model", [tensor("x", ["batch", 32])], [tensor("y", ["batch", 8])])
    return make_model(
        graph,
        17,
        f"Loop ({trips} trips) whose body holds a MatMul with a body-initializer weight "
        "and reads an outer-scope bias; MatMul head after it; dynamic batch.",
    )


# ------------------------------------------------------------------------------------------------------ Q/DQ


def _quant_int8(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantisation (per-channel along ``axis``, or per-tensor): (q, scale)."""
    if axis is None:
        amax = np.asarray(np.abs(w).max())
    else:
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=reduce)
    scale = (np.maximum(amax, 1e-8) / 127.0).astype(np.float32)
    shaped = scale if axis is None else scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    q = np.clip(np.rint(w / shaped), -127, 127).astype(np.int8)
    return q, scale


def qdq_model() -> onnx.ModelProto:
    """Explicitly quantised (TensorRT-style Q/DQ) model with weights behind every kind of chain."""
    b = GraphBuilder(np.random.default_rng(6006))
    act_zp = b.const("act.zp", np.array(0, dtype=np.int8))

    def qdq_act(name: str, x: str, amax: float) -> str:
        s = b.const(f"{name}.scale", np.array(amax / 127.0, dtype=np.float32))
        q = b.node("QuantizeLinear", [x, s, act_zp], [f"{name}.q"], f"{name}.quant")
        return b.node("DequantizeLinear", [q, s, act_zp], [f"{name}.dq"], f"{name}.dequant")

    def dq_weight(name: str, w: np.ndarray, axis: int | None) -> str:
        q, scale = _quant_int8(w, axis)
        zp = np.zeros(scale.shape, dtype=np.int8)
        ins = [b.const(f"{name}.q", q), b.const(f"{name}.scale", scale), b.const(f"{name}.zp", zp)]
        kw = {} if axis is None else {"axis": axis}
        return b.node("DequantizeLinear", ins, [f"{name}.dq"], f"{name}.dequant", **kw)

    def he(shape: Sequence[int], fan_in: int) -> np.ndarray:
        return (b.rng.standard_normal(tuple(shape)) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    # conv1: int8 weight [Cout, Cin, kh, kw], per-channel axis 0
    x = qdq_act("conv1.in", "x", 4.0)
    w = dq_weight("conv1.weight", he([32, 16, 3, 3], 16 * 9), axis=0)
    h = b.node(
        "Conv", [x, w, b.bias("conv1.bias", [32])], ["conv1.out"], "conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
    )
    h = b.node("Relu", [h], ["conv1.relu"], "conv1.act")
    # conv2: int8 weight stored [kh, kw, Cin, Cout] (per-channel axis 3) -> Transpose(3, 2, 0, 1) -> [Cout, Cin, kh, kw]
    x = qdq_act("conv2.in", h, 6.0)
    w = dq_weight("conv2.weight_hwio", he([3, 3, 32, 32], 32 * 9), axis=3)
    w = b.node("Transpose", [w], ["conv2.weight"], "conv2.weight.t", perm=[3, 2, 0, 1])
    h = b.node(
        "Conv",
        [x, w, b.bias("conv2.bias", [32])],
        ["conv2.out"],
        "conv2",
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        strides=[2, 2],
    )
    h = b.node("Relu", [h], ["conv2.relu"], "conv2.act")
    h = b.node("GlobalAveragePool", [h], ["pool.out"], "pool")
    h = b.node("Flatten", [h], ["pool.flat"], "flatten", axis=1)  # [N, 32]
    # fc1: int8 weight [K, N], per-channel axis 1
    x = qdq_act("fc1.in", h, 6.0)
    h = b.node("MatMul", [x, dq_weight("fc1.weight", he([32, 64], 32), axis=1)], ["fc1.out"], "fc1")
    h = b.node("Relu", [h], ["fc1.relu"], "fc1.act")
    # fc2: int8 weight stored [N, K] (per-channel axis 0) -> Transpose -> [K, N]
    x = qdq_act("fc2.in", h, 6.0)
    w = dq_weight("fc2.weight_t", he([48, 64], 64), axis=0)
    w = b.node("Transpose", [w], ["fc2.weight"], "fc2.weight.t", perm=[1, 0])
    h = b.node("MatMul", [x, w], ["fc2.out"], "fc2")
    h = b.node("Relu", [h], ["fc2.relu"], "fc2.act")
    # fc3: fp16 stored weight -> Cast(fp32)
    x = qdq_act("fc3.in", h, 6.0)
    w16 = b.const("fc3.weight_fp16", he([48, 32], 48).astype(np.float16))
    w = b.node("Cast", [w16], ["fc3.weight"], "fc3.weight.cast", to=TensorProto.FLOAT)
    h = b.node("MatMul", [x, w], ["fc3.out"], "fc3")
    h = b.node("Relu", [h], ["fc3.relu"], "fc3.act")
    # fc4: int8 weight stored [K, 4, 4], per-tensor DequantizeLinear -> Reshape [K, N] (the K axis survives)
    x = qdq_act("fc4.in", h, 6.0)
    w = dq_weight("fc4.weight_k44", he([32, 4, 4], 32), axis=None)
    w = b.node(
        "Reshape", [w, b.const("fc4.shape", np.array([32, 16], dtype=np.int64))], ["fc4.weight"], "fc4.weight.reshape"
    )
    h = b.node("MatMul", [x, w], ["fc4.out"], "fc4")
    h = b.node("Relu", [h], ["fc4.relu"], "fc4.act")
    # fc5: int8 weight stored flat [K*N] -> Reshape [K, N]: K groups are not contiguous in storage (ineligible)
    x = qdq_act("fc5.in", h, 6.0)
    w = dq_weight("fc5.weight_flat", he([16 * 16], 16), axis=None)
    w = b.node(
        "Reshape", [w, b.const("fc5.shape", np.array([16, 16], dtype=np.int64))], ["fc5.weight"], "fc5.weight.reshape"
    )
    b.node("MatMul", [x, w], ["y"], "fc5")
    graph = b.graph("qdq_model", [tensor("x", ["batch", 16, 8, 8])], [tensor("y", ["batch", 16])])
    return make_model(
        graph,
        19,
        "Q/DQ model (int8, symmetric, zero point 0): per-channel DequantizeLinear weights "
        "feeding Conv and MatMul, reached directly and through Transpose (rank 2 and "
        "rank 4 perm 3,2,0,1), Cast (fp16) and Reshape (axis kept / lost); dynamic batch.",
    )


#: file name -> builder; the order is the README's.
FIXTURES: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp_gemm.onnx": mlp_gemm,
    "transformer_block.onnx": transformer_block,
    "cnn.onnx": cnn,
    "if_model.onnx": if_model,
    "loop_model.onnx": loop_model,
    "qdq_model.onnx": qdq_model,
}


def build_all(out: Path) -> list[Path]:
    """Write every fixture into ``out`` (created if missing); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in FIXTURES.items():
        model = build()
        onnx.checker.check_model(model, full_check=True)
        path = out / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_bytes(model.SerializeToString())
        tmp.replace(path)
        written.append(path)
    return written


def _run_check(paths: list[Path]) -> None:
    """Run each written model in ONNX Runtime at two batch sizes (and two sequence lengths)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    for path in paths:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for flag, dims in ((True, {"batch": 1, "seq": 5}), (False, {"batch": 3, "seq": 17})):
            feeds: dict[str, np.ndarray] = {}
            for i in sess.get_inputs():
                shape = [dims[d] if isinstance(d, str) else d for d in i.shape]
                if i.type == "tensor(bool)":
                    feeds[i.name] = np.array(flag)
                else:
                    feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
            outs = sess.run(None, feeds)
            if not all(np.isfinite(o).all() for o in outs):
                raise SystemExit(f"error: {path.name} produced non-finite outputs for {dims}")
        print(f"ok {path} ({path.stat().st_size} bytes)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "fixtures",
        help="output folder (default: the repository's fixtures/)",
    )
    parser.add_argument("--check", action="store_true", help="also run each model in ONNX Runtime")
    args = parser.parse_args(argv)
    try:
        paths = build_all(args.out)
    except (OSError, onnx.checker.ValidationError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    if args.check:
        _run_check(paths)
    else:
        for p in paths:
            print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
