"""Tiny seeded models for unit tests of the core and of gemm-to-conv, and ``parse``: a model from the ONNX text
format with its weights attached from numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from onnxsparse.ir.model_io import Model, save_model

F = TensorProto.FLOAT


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def parse(text: str, *tensors: onnx.TensorProto, **arrays: np.ndarray) -> onnx.ModelProto:
    """The model ``text`` describes (ONNX text format), with initializers appended: ``tensors`` as given, then
    ``arrays`` named by their keyword (``**{"conv.w": w}`` for a name that is not one).

    Weights come from numpy because the text format holds tensors only as literals, and seeded random weights
    must stay the draws they were. Without an ``ir_version`` in the text the parser leaves 0; the model then
    gets the version ``helper.make_model`` gives by default. That is ``onnx.IR_VERSION`` unless the installed
    onnxruntime loads only older ones (conftest clamps the default then: the floors' ORT 1.23 stops at IR 11
    while onnx writes 13), so it is asked, not hard-coded.
    """
    model = onnx.parser.parse_model(text)
    if not model.ir_version:
        model.ir_version = helper.make_model(helper.make_graph([], "probe", [], [])).ir_version
    model.graph.initializer.extend(tensors)
    model.graph.initializer.extend(nh.from_array(a, name) for name, a in arrays.items())
    return model


def checked(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` after the full checker: a slip in a test's graph fails where it is built, not inside a pass."""
    onnx.checker.check_model(model, full_check=True)
    return model


def parse_checked(text: str, *tensors: onnx.TensorProto, **arrays: np.ndarray) -> onnx.ModelProto:
    """``parse``, then ``checked``."""
    return checked(parse(text, *tensors, **arrays))


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto],
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return checked(model)


def _unranked(model: onnx.ModelProto, *names: str) -> onnx.ModelProto:
    """Drop the shape of the graph outputs ``names``: the text format has no unranked tensor (``float y``
    parses as a scalar), and these outputs are left for shape inference to fill in."""
    for out in model.graph.output:
        if out.name in names:
            out.type.tensor_type.ClearField("shape")
    return model


def _subgraph(model: onnx.ModelProto, node: str, attr: str) -> onnx.GraphProto:
    """The body ``attr`` of main-graph node ``node``: body-local weights are attached there after parsing."""
    owner = next(n for n in model.graph.node if n.name == node)
    return next(a.g for a in owner.attribute if a.name == attr)


def gemm_cases(seed: int = 0) -> onnx.ModelProto:
    """Gemms with transB 0/1, alpha/beta, bias [N] and [1,N], no bias, plus skip cases."""
    rng = np.random.default_rng(seed)
    inits = [
        nh.from_array(rand(rng, 16, 32), "W_a"),  # transB=0
        nh.from_array(rand(rng, 32, 32), "W_b"),  # transB=1, bias [N]
        nh.from_array(rand(rng, 32), "C_b"),
        nh.from_array(rand(rng, 32, 24), "W_c"),  # alpha/beta, bias [1,N]
        nh.from_array(rand(rng, 1, 24), "C_c"),
        nh.from_array(rand(rng, 24, 8), "W_shared"),  # shared by two Gemms → skipped
        nh.from_array(rand(rng, 24, 24), "W_t"),  # transA=1 → skipped (drawn, not stored: keeps the draws)
    ]
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[batch, 16] x) => (float y1, float y2, float sq) {
            [fc_a] h1 = Gemm (x, W_a)
            [fc_b] h2 = Gemm <transB = 1> (h1, W_b, C_b)
            [fc_c] h3 = Gemm <alpha = 0.5, beta = 2.0> (h2, W_c, C_c)
            [fc_s1] y1 = Gemm (h3, W_shared)
            [fc_s2] y2 = Gemm (h3, W_shared)
            [fc_dyn] sq = Gemm <transB = 1> (h3, h3)
        }
    """  # fc_dyn: a runtime weight
    model = _unranked(parse(text, *inits[:-1]), "y1", "y2", "sq")
    return onnx.shape_inference.infer_shapes(model)


def matmul_ranks(seed: int = 0) -> onnx.ModelProto:
    """MatMuls with rank-2 and rank-3 activations (dynamic batch and sequence), constant and Constant-node B."""
    rng = np.random.default_rng(seed)
    w_k = nh.from_array(rand(rng, 32, 16), "W_kv")  # the Constant's value, drawn first
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[batch, seq, 8] x) => (float[batch, seq, 16] y) {
            [proj_q] q = MatMul (x, W_q)
            W_k = Constant <value = float[1] {0.0}> ()
            [proj_k] k = MatMul (q, W_k)
            y = Relu (k)
        }
    """
    model = parse(text, nh.from_array(rand(rng, 8, 32), "W_q"))
    model.graph.node[1].attribute[0].t.CopyFrom(w_k)  # a literal would repeat the draws digit by digit
    return checked(model)


def if_model(seed: int = 0) -> onnx.ModelProto:
    """An If whose branches hold MatMuls: one weight is a branch initializer, one an outer-scope initializer."""
    rng = np.random.default_rng(seed)
    w_then = nh.from_array(rand(rng, 8, 12), "W_then")
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[batch, 8] x, bool cond) => (float[batch, 12] y) {
            [branch] y = If (cond) <
                else_branch = else_g () => (float[batch, 12] e_out) { [else_mm] e_out = MatMul (x, W_outer) },
                then_branch = then_g () => (float[batch, 12] t_out) { [then_mm] t_out = MatMul (x, W_then) }
            >
        }
    """
    model = parse(text, nh.from_array(rand(rng, 8, 12), "W_outer"))
    _subgraph(model, "branch", "then_branch").initializer.append(w_then)
    return checked(model)


def scan_model(seed: int = 0) -> onnx.ModelProto:
    """A Scan over the sequence axis whose body applies a MatMul with a body-local constant weight."""
    rng = np.random.default_rng(seed)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, seq, 8] x) => (float[2, 12] acc, float[2, seq, 12] ys) {
            [scan] acc, ys = Scan (acc0, x) <
                body = scan_body (float[2, 12] acc_in, float[2, 8] x_t) => (float[2, 12] acc_out, float[2, 12] y_t) {
                    [scan_mm] mm = MatMul (x_t, W_scan)
                    acc_out = Add (mm, acc_in)
                    y_t = Identity (acc_out)
                },
                num_scan_inputs = 1, scan_input_axes = [1], scan_output_axes = [1]
            >
        }
    """
    model = parse(text, acc0=np.zeros((2, 12), np.float32))
    _subgraph(model, "scan", "body").initializer.append(nh.from_array(rand(rng, 8, 12), "W_scan"))
    return checked(model)


def loop_model(seed: int = 0) -> onnx.ModelProto:
    """A Loop whose body multiplies the carried state by a constant weight (outer-scope initializer)."""
    rng = np.random.default_rng(seed)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[batch, 16] x) => (float[batch, 16] y) {
            [loop] y = Loop (trip, , x) <
                body = body (int64 iter, bool cond_in, float[batch, 16] h_in)
                    => (bool cond_out, float[batch, 16] h_out) {
                    cond_out = Identity (cond_in)
                    [body_mm] mm = MatMul (h_in, W_loop)
                    h_out = Tanh (mm)
                }
            >
        }
    """
    return parse_checked(text, trip=np.array(3, np.int64), W_loop=rand(rng, 16, 16) * 0.3)


def external_mlp(folder: Path, k: int = 64, layers: int = 3) -> Path:
    """``folder/mlp.onnx``: a chain of ``layers`` MatMuls (input ``x`` [b, k] → ``y``), weights ``w0``… seeded
    N(0, 1/k), saved with external data (every weight ≥ 1 KB in ``mlp.onnx.data``) — the large-model tests'
    model (spill store, checker, streamed save, onnx-ir interop)."""
    rng = np.random.default_rng(0)
    inits = [
        nh.from_array((rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32), f"w{i}") for i in range(layers)
    ]
    names = ["x", *(f"h{i}" for i in range(layers - 1)), "y"]
    chain = "\n".join(f"{names[i + 1]} = MatMul ({names[i]}, w{i})" for i in range(layers))
    model = parse(f'<opset_import: ["" : 17]>\nmlp (float[b, {k}] x) => (float[b, {k}] y) {{\n{chain}\n}}', *inits)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mlp.onnx"
    save_model(Model(model), path, external_data=True)
    return path
