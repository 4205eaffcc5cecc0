"""What the graph does right after each weighted layer's GEMM: a bias, then an activation (CPU only).

Why it matters for ``bench``: dense cuBLASLt and TensorRT fuse a per-channel bias and a Relu/Gelu into the
GEMM's epilogue, so a sparse GEMM timed without them, or followed by a separate bias kernel, is compared
with the wrong dense figure (measured on the H200, BERT-base 32×128 end to end: sparse with a separate bias
kernel 0.89×, with the bias fused 1.05×). ``find_epilogues`` tells the timer which epilogue to fuse on both
sides.

Recognised, in this order after the layer's output:

- bias: Gemm's ``C`` when it is a constant of N values (shape [N] or [1, N]); Conv's ``B``; an ``Add`` of a
  constant that broadcasts along the output channels only ([N], [1, N], … for MatMul/Gemm; [N, 1, 1] or
  [1, N, 1, 1] for Conv); or, for a Conv, an inference ``BatchNormalization`` with constant parameters (an
  engine folds it into the weight and a bias);
- activation: ``Relu``; ``Gelu`` (opset 20, ``approximate`` none or tanh); and Gelu spelled out, in its erf
  form x·0.5·(1 + erf(x/√2)) (what transformers' exporters write, with Div by √2 or Mul by 1/√2, and the
  0.5 and x multiplied in any order) and its tanh form 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).

A step is taken only when every intermediate value is read by the pattern alone (a pre-activation value read
elsewhere cannot be fused away). The graph is matched on ``onnx`` protos with the producer/consumer maps of
``onnxsparse.ir.graph`` rather than onnxscript's rewriter: the answer is a description, nothing is rewritten.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import NodeProto, numpy_helper

from onnxsparse.ir.graph import GraphIndex
from onnxsparse.ir.layers import Layer, attr
from onnxsparse.ir.tensors import external_info

#: activation names; "gelu" is the exact (erf) form, "gelu_tanh" the tanh approximation
ACTIVATIONS = ("relu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class Epilogue:
    """The bias and activation fused after one layer's GEMM; ``nodes`` are the ONNX nodes they cover."""

    bias: str | None = None  # where the bias comes from: "Gemm C" | "Conv B" | "Add" | "BatchNormalization"
    activation: str | None = None  # one of ACTIVATIONS
    nodes: tuple[str, ...] = ()
    #: the value the epilogue ends in (the layer's output when there is no epilogue)
    output: str = ""

    @property
    def kind(self) -> str:
        """What is timed: "" (plain GEMM), "bias", "bias+relu", "bias+gelu", "relu", ... (gelu_tanh → gelu:
        the GEMM kernels have one Gelu epilogue)."""
        act = "gelu" if self.activation == "gelu_tanh" else self.activation
        return "+".join(p for p in (("bias" if self.bias else None), act) if p)

    def to_dict(self) -> dict[str, Any]:
        return {"bias": self.bias, "activation": self.activation, "kind": self.kind, "nodes": list(self.nodes)}


def find_epilogues(model: onnx.ModelProto, layers: Sequence[Layer] | None = None) -> dict[str, Epilogue]:
    """Layer name → its epilogue, for every weighted layer (layer index order; ``layers``: the index's layers
    of ``model`` when the caller has them, else an index is built for ``model``)."""
    if layers is None:
        from onnxsparse.ir.index import model_layers
        from onnxsparse.ir.model_io import Model

        layers = model_layers(Model(model))
    maps: list[tuple[GraphIndex, set[str]]] = []  # one per graph (few: the main graph and its bodies)
    out: dict[str, Epilogue] = {}
    for layer in layers:
        found = next((m for m in maps if m[0].graph is layer.graph), None)
        if found is None:
            found = (GraphIndex(layer.graph), {o.name for o in layer.graph.output})
            maps.append(found)
        out[layer.name] = _Matcher(layer, *found).epilogue()
    return out


def _scalar(layer: Layer, name: str) -> float | None:
    """``name``'s value when it is a constant holding one number (inline data only)."""
    src = layer.constant(name)
    if src is None or int(np.prod(src.shape, dtype=np.int64)) != 1 or external_info(src.tensor) is not None:
        return None
    return float(numpy_helper.to_array(src.tensor).reshape(-1)[0])


def _close(value: float | None, target: float, rel: float = 1e-3) -> bool:
    return value is not None and abs(value - target) <= rel * abs(target)


class _Matcher:
    """Walks forward from one layer's output through single-use values."""

    def __init__(self, layer: Layer, index: GraphIndex, graph_outputs: set[str]) -> None:
        self.layer, self.index, self.graph_outputs = layer, index, graph_outputs
        self.n = _out_channels(layer)

    def epilogue(self) -> Epilogue:
        node = self.layer.node
        value, nodes, bias = node.output[0], [], None
        if (
            node.op_type == "Gemm"
            and len(node.input) > 2
            and node.input[2]
            and self._is_channel_vector(node.input[2], conv=False)
            and float(attr(node, "beta", 1.0)) != 0.0
        ):
            bias = "Gemm C"
        elif node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 2 and node.input[2]:
            bias = f"{node.op_type} B"
        if bias is None:
            step = self._bias_step(value)
            if step is not None:
                bias, nxt = step
                nodes.append(nxt.name)
                value = nxt.output[0]
        act = self._activation(value)
        if act is not None:
            name, covered, value = act
            nodes.extend(covered)
            return Epilogue(bias=bias, activation=name, nodes=tuple(nodes), output=value)
        return Epilogue(bias=bias, nodes=tuple(nodes), output=value)

    # -- helpers --------------------------------------------------------------------------------------------
    def _only_user(self, value: str) -> NodeProto | None:
        """The one node reading ``value`` (None when several read it or it is a graph output)."""
        readers = self.index.consumers(value)
        if len(readers) != 1 or value in self.graph_outputs:
            return None
        return readers[0]

    def _other(self, node: NodeProto, value: str) -> str | None:
        """The other input of a binary node that reads ``value`` once."""
        ins = list(node.input)
        if len(ins) != 2 or ins.count(value) != 1:
            return None
        return ins[1] if ins[0] == value else ins[0]

    def _is_channel_vector(self, name: str, conv: bool) -> bool:
        """``name`` is a constant of N values that broadcasts along the output channels only."""
        src = self.layer.constant(name)
        if src is None or self.n is None:
            return False
        dims = list(src.shape)
        if int(np.prod(dims, dtype=np.int64)) != self.n or self.n == 1:
            return False
        if conv:  # [N, 1, 1] or [1, N, 1, 1] against an NCHW output: the channel is 3rd from the end or more
            spatial = len(self.layer.weight_shape or ()) - 2
            return len(dims) >= spatial + 1 and dims[len(dims) - spatial - 1] == self.n
        return dims[-1] == self.n

    def _bias_step(self, value: str) -> tuple[str, NodeProto] | None:
        nxt = self._only_user(value)
        if nxt is None:
            return None
        conv = self.layer.op_type in ("Conv", "ConvTranspose")
        if nxt.op_type == "Add":
            other = self._other(nxt, value)
            if other is not None and self._is_channel_vector(other, conv):
                return "Add", nxt
        if (
            conv
            and nxt.op_type == "BatchNormalization"
            and nxt.input[0] == value
            and len(nxt.output) >= 1
            and not any(nxt.output[1:])
            and not attr(nxt, "training_mode", 0)
            and all(self.layer.constant(i) is not None for i in nxt.input[1:5])
        ):
            return "BatchNormalization", nxt
        return None

    def _activation(self, x: str) -> tuple[str, list[str], str] | None:
        nxt = self._only_user(x)
        if nxt is not None and nxt.op_type == "Relu":
            return "relu", [nxt.name], nxt.output[0]
        if nxt is not None and nxt.op_type == "Gelu" and nxt.domain in ("", "ai.onnx"):
            approx = attr(nxt, "approximate", b"none")
            approx = approx.decode() if isinstance(approx, bytes) else str(approx)
            return ("gelu_tanh" if approx == "tanh" else "gelu"), [nxt.name], nxt.output[0]
        return self._gelu_spelled_out(x)

    def _gelu_spelled_out(self, x: str) -> tuple[str, list[str], str] | None:
        """x·0.5·(1 + erf(x/√2)) or 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))), every value used once inside."""
        readers = self.index.consumers(x)
        if x in self.graph_outputs or not 2 <= len(readers) <= 4:
            return None
        for start in readers:
            inner = self._inner(x, start)
            if inner is None:
                continue
            name, inner_nodes, fn_node = inner  # fn_node: the Erf or Tanh
            one_add = self._only_user(fn_node.output[0])
            if (
                one_add is None
                or one_add.op_type != "Add"
                or not _close(_scalar(self.layer, self._other(one_add, fn_node.output[0]) or ""), 1.0)
            ):
                continue
            tail = self._product_tail(x, one_add.output[0])
            if tail is None:
                continue
            tail_nodes, out = tail
            covered = [*inner_nodes, fn_node, one_add, *tail_nodes]
            # every reader of x must be inside the pattern
            if not all(any(r is c for c in covered) for r in readers):
                continue
            return name, [n.name for n in covered], out
        return None

    def _inner(self, x: str, start: NodeProto) -> tuple[str, list[NodeProto], NodeProto] | None:
        """From a reader of x to the Erf (x/√2) or Tanh (√(2/π)·(x + 0.044715x³)) it feeds."""
        if start.op_type in ("Div", "Mul"):
            other = self._other(start, x)
            c = _scalar(self.layer, other or "")
            scale_ok = (start.op_type == "Div" and list(start.input).index(x) == 0 and _close(c, math.sqrt(2.0))) or (
                start.op_type == "Mul" and _close(c, 1 / math.sqrt(2.0))
            )
            nxt = self._only_user(start.output[0])
            if scale_ok and nxt is not None and nxt.op_type == "Erf":
                return "gelu", [start], nxt
        return self._tanh_inner(x, start)

    def _tanh_inner(self, x: str, start: NodeProto) -> tuple[str, list[NodeProto], NodeProto] | None:
        """Follow single-use Mul/Add/Pow/Div nodes from ``start`` to a Tanh; check the constants and that
        the Tanh's argument depends on x and constants alone."""
        seen: list[NodeProto] = []
        node: NodeProto | None = start
        while node is not None and node.op_type in ("Mul", "Add", "Pow", "Div") and len(seen) < 8:
            seen.append(node)
            node = self._only_user(node.output[0])
        if node is None or node.op_type != "Tanh" or not seen:
            return None
        # the sub-expression feeding the Tanh: walk back from its input through the nodes seen and any
        # other single-use arithmetic whose inputs are x, constants or such nodes
        index = self.index
        inside: list[NodeProto] = []
        consts: list[float] = []
        pows = [0]

        def walk(v: str) -> bool:
            if v == x:
                return True
            c = _scalar(self.layer, v)
            if c is not None:
                consts.append(c)
                return True
            p = index.producer(v)
            if p is None or p.op_type not in ("Mul", "Add", "Pow", "Div") or self._only_user(v) is None:
                return False
            if any(p is q for q in inside):
                return True
            inside.append(p)
            if p.op_type == "Pow":
                pows[0] += 1
            return all(walk(i) for i in p.input)

        if not walk(node.input[0]):
            return None
        k = math.sqrt(2 / math.pi)
        has_k = any(_close(c, k) for c in consts)
        has_cubic = any(_close(c, 0.044715) or _close(c, 0.044715 * k) for c in consts)
        cubed = pows[0] > 0 or sum(1 for n in inside if n.op_type == "Mul" and x in n.input) >= 2
        if not (has_k and has_cubic and cubed):
            return None
        return "gelu_tanh", inside, node

    def _product_tail(self, x: str, a: str) -> tuple[list[NodeProto], str] | None:
        """One or two single-use Mul nodes after (1 + erf/tanh) = ``a`` whose product is exactly x · a · 0.5;
        the half may be multiplied into x first (Mul(x, 0.5), then Mul(that, a))."""
        tail: list[NodeProto] = []
        have = {"x": 0, "half": 0}
        value = a
        for _ in range(2):
            nxt = self._only_user(value)
            other = None if nxt is None or nxt.op_type != "Mul" else self._other(nxt, value)
            if nxt is None or other is None:
                return None
            if other == x:
                have["x"] += 1
            elif _close(_scalar(self.layer, other), 0.5):
                have["half"] += 1
            else:  # x * 0.5 computed first
                p = self.index.producer(other)
                if (
                    p is None
                    or p.op_type != "Mul"
                    or x not in p.input
                    or self._only_user(other) is not nxt
                    or not _close(_scalar(self.layer, self._other(p, x) or ""), 0.5)
                ):
                    return None
                tail.append(p)
                have["x"] += 1
                have["half"] += 1
            tail.append(nxt)
            value = nxt.output[0]
            if have == {"x": 1, "half": 1}:
                return tail, value
            if max(have.values()) > 1:
                return None
        return None


def _out_channels(layer: Layer) -> int | None:
    """N: the number of output channels (the bias length)."""
    w = layer.weight_shape
    if w is None:
        return None
    if layer.op_type == "ConvTranspose":
        return int(w[1]) * layer.group
    if layer.op_type == "Conv":
        return int(w[0])
    if layer.channel_axis is None:
        return None
    return int(w[layer.channel_axis])
