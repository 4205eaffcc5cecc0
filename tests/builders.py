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


def parse_checked(text: str, *tensors: onnx.TensorProto, **arrays: np.ndarray) -> onnx.ModelProto:
    """``parse``, then the full checker: a slip in a test's graph fails where it is built, not inside a pass."""
    model = parse(text, *tensors, **arrays)
    onnx.checker.check_model(model, full_check=True)
    return model


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
    onnx.checker.check_model(model, full_check=True)
    return model


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
        nh.from_array(rand(rng, 24, 24), "W_t"),  # transA=1 → skipped
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W_a"], ["h1"], name="fc_a"),
        helper.make_node("Gemm", ["h1", "W_b", "C_b"], ["h2"], name="fc_b", transB=1),
        helper.make_node("Gemm", ["h2", "W_c", "C_c"], ["h3"], name="fc_c", alpha=0.5, beta=2.0),
        helper.make_node("Gemm", ["h3", "W_shared"], ["y1"], name="fc_s1"),
        helper.make_node("Gemm", ["h3", "W_shared"], ["y2"], name="fc_s2"),
        helper.make_node("Gemm", ["h3", "h3"], ["sq"], name="fc_dyn", transB=1),  # runtime weight
    ]
    outs = [helper.make_tensor_value_info(n, F, None) for n in ("y1", "y2", "sq")]
    inputs = [helper.make_tensor_value_info("x", F, ["batch", 16])]
    graph = helper.make_graph(nodes, "g", inputs, outs, inits[:-1])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def matmul_ranks(seed: int = 0) -> onnx.ModelProto:
    """MatMuls with rank-2 and rank-3 activations (dynamic batch and sequence), constant and Constant-node B."""
    rng = np.random.default_rng(seed)
    w_const = helper.make_node("Constant", [], ["W_k"], value=nh.from_array(rand(rng, 32, 16), "W_kv"))
    nodes = [
        helper.make_node("MatMul", ["x", "W_q"], ["q"], name="proj_q"),
        w_const,
        helper.make_node("MatMul", ["q", "W_k"], ["k"], name="proj_k"),
        helper.make_node("Relu", ["k"], ["y"]),
    ]
    inits = [nh.from_array(rand(rng, 8, 32), "W_q")]
    inputs = [helper.make_tensor_value_info("x", F, ["batch", "seq", 8])]
    outputs = [helper.make_tensor_value_info("y", F, ["batch", "seq", 16])]
    return make_model(nodes, inputs, outputs, inits)


def if_model(seed: int = 0) -> onnx.ModelProto:
    """An If whose branches hold MatMuls: one weight is a branch initializer, one an outer-scope initializer."""
    rng = np.random.default_rng(seed)
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W_then"], ["t_out"], name="then_mm")],
        "then_g",
        [],
        [helper.make_tensor_value_info("t_out", F, ["batch", 12])],
        [nh.from_array(rand(rng, 8, 12), "W_then")],
    )
    else_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W_outer"], ["e_out"], name="else_mm")],
        "else_g",
        [],
        [helper.make_tensor_value_info("e_out", F, ["batch", 12])],
        [],
    )
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    inputs = [
        helper.make_tensor_value_info("x", F, ["batch", 8]),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
    ]
    outputs = [helper.make_tensor_value_info("y", F, ["batch", 12])]
    return make_model(nodes, inputs, outputs, [nh.from_array(rand(rng, 8, 12), "W_outer")])


def scan_model(seed: int = 0) -> onnx.ModelProto:
    """A Scan over the sequence axis whose body applies a MatMul with a body-local constant weight."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "W_scan"], ["mm"], name="scan_mm"),
            helper.make_node("Add", ["mm", "acc_in"], ["acc_out"]),
            helper.make_node("Identity", ["acc_out"], ["y_t"]),
        ],
        "scan_body",
        [helper.make_tensor_value_info("acc_in", F, [2, 12]), helper.make_tensor_value_info("x_t", F, [2, 8])],
        [helper.make_tensor_value_info("acc_out", F, [2, 12]), helper.make_tensor_value_info("y_t", F, [2, 12])],
        [nh.from_array(rand(rng, 8, 12), "W_scan")],
    )
    nodes = [
        helper.make_node(
            "Scan",
            ["acc0", "x"],
            ["acc", "ys"],
            name="scan",
            body=body,
            num_scan_inputs=1,
            scan_input_axes=[1],
            scan_output_axes=[1],
        )
    ]
    inputs = [helper.make_tensor_value_info("x", F, [2, "seq", 8])]
    outputs = [helper.make_tensor_value_info("acc", F, [2, 12]), helper.make_tensor_value_info("ys", F, [2, "seq", 12])]
    return make_model(nodes, inputs, outputs, [nh.from_array(np.zeros((2, 12), np.float32), "acc0")])


def loop_model(seed: int = 0) -> onnx.ModelProto:
    """A Loop whose body multiplies the carried state by a constant weight (outer-scope initializer)."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["h_in", "W_loop"], ["mm"], name="body_mm"),
            helper.make_node("Tanh", ["mm"], ["h_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", F, ["batch", 16]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", F, ["batch", 16]),
        ],
    )
    nodes = [helper.make_node("Loop", ["trip", "", "x"], ["y"], name="loop", body=body)]
    inputs = [helper.make_tensor_value_info("x", F, ["batch", 16])]
    outputs = [helper.make_tensor_value_info("y", F, ["batch", 16])]
    inits = [nh.from_array(np.array(3, np.int64), "trip"), nh.from_array(rand(rng, 16, 16) * 0.3, "W_loop")]
    return make_model(nodes, inputs, outputs, inits)


def external_mlp(folder: Path, k: int = 64, layers: int = 3) -> Path:
    """``folder/mlp.onnx``: a chain of ``layers`` MatMuls (input ``x`` [b, k] → ``y``), weights ``w0``… seeded
    N(0, 1/k), saved with external data (every weight ≥ 1 KB in ``mlp.onnx.data``) — the large-model tests'
    model (spill store, checker, streamed save, onnx-ir interop)."""
    rng = np.random.default_rng(0)
    inits = [
        nh.from_array((rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32), f"w{i}") for i in range(layers)
    ]
    nodes = [
        helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], ["y" if i == layers - 1 else f"h{i}"])
        for i in range(layers)
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", F, ["b", k])],
        [helper.make_tensor_value_info("y", F, ["b", k])],
        inits,
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mlp.onnx"
    save_model(Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])), path, external_data=True)
    return path
