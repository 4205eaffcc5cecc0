"""Hypothesis fuzz: random small Gemm / MatMul / Conv / ConvTranspose graphs (a third of them inside both
branches of an If, each branch reading its own copy of the weights from the outer scope) through gemm-to-conv,
prune and validate. No input may crash a pass: each run either succeeds (the result passes the full checker inside the
pipeline, runs in ORT, gemm-to-conv keeps the outputs, prune leaves every eligible layer 2:4) or raises a
one-line ``OnnxSparseError``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.model_io import Model
from onnxsparse.pipeline import PassContext, Pipeline

PIPELINES = ("gemm-to-conv", "prune", "validate", "gemm-to-conv,prune,validate")


def _init(name: str, shape: list[int], rng: np.random.Generator) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _weight(
    draw: Any,
    name: str,
    shape: list[int],
    rng: np.random.Generator,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    inputs: list[onnx.ValueInfoProto],
) -> str:
    """The weight as an initializer, behind a Transpose or Cast, or as a graph input (non-constant)."""
    how = draw(st.sampled_from(["init", "init", "transpose", "cast", "input"]))
    if how == "input":
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return name
    if how == "transpose" and len(shape) >= 2:
        perm = list(range(len(shape)))[::-1]
        inits.append(_init(name + "_t", [shape[p] for p in perm], rng))
        nodes.append(helper.make_node("Transpose", [name + "_t"], [name], perm=perm))
        return name
    if how == "cast":
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float16), name + "_h"))
        nodes.append(helper.make_node("Cast", [name + "_h"], [name], to=TensorProto.FLOAT))
        return name
    inits.append(_init(name, shape, rng))
    return name


@st.composite
def models(draw: Any) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    op = draw(st.sampled_from(["Gemm", "MatMul", "Conv", "ConvTranspose"]))
    dim = st.integers(1, 12)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    feeds: dict[str, np.ndarray] = {}
    symbolic = draw(st.booleans())
    if op == "Gemm":
        m, k, n = draw(dim), draw(st.sampled_from([1, 3, 4, 8, 12])), draw(dim)
        ta, tb = draw(st.integers(0, 1)), draw(st.integers(0, 1))
        a_shape = [k, m] if ta else [m, k]
        inputs.append(
            helper.make_tensor_value_info(
                "x", TensorProto.FLOAT, ["batch", a_shape[1]] if symbolic and not ta else a_shape
            )
        )
        feeds["x"] = rng.standard_normal(a_shape).astype(np.float32)
        w = _weight(draw, "W", [n, k] if tb else [k, n], rng, nodes, inits, inputs)
        ins = ["x", w]
        bias = draw(st.sampled_from([None, [n], [1, n], [m, n], [m, 1], []]))
        if bias is not None:
            inits.append(_init("C", bias, rng))
            ins.append("C")
        gemm_attrs: dict[str, Any] = {
            "transA": ta,
            "transB": tb,
            "alpha": draw(st.sampled_from([1.0, 0.5, 2.0])),
            "beta": draw(st.sampled_from([1.0, 0.25])),
        }
        nodes.append(helper.make_node("Gemm", ins, ["y"], name="layer", **gemm_attrs))
    elif op == "MatMul":
        k, n = draw(st.sampled_from([1, 2, 4, 8, 12])), draw(dim)
        lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
        a_shape = [*lead, draw(dim), k] if draw(st.booleans()) else [k]
        b_rank = draw(st.sampled_from([1, 2, 2, 3]))
        b_shape = [k] if b_rank == 1 else ([k, n] if b_rank == 2 else [draw(st.sampled_from([1, *lead[-1:]])), k, n])
        declared: list[Any] = list(a_shape)
        if symbolic and len(a_shape) >= 2:
            declared[0] = "batch"
        inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, declared))
        feeds["x"] = rng.standard_normal(a_shape).astype(np.float32)
        w = _weight(draw, "W", b_shape, rng, nodes, inits, inputs)
        nodes.append(helper.make_node("MatMul", ["x", w], ["y"], name="layer"))
    else:
        spatial = draw(st.integers(1, 2))
        group = draw(st.sampled_from([1, 1, 2, 4]))
        c_in = group * draw(st.sampled_from([1, 2, 3, 4, 8]))
        c_out = group * draw(st.integers(1, 4))
        kernel = [draw(st.integers(1, 3)) for _ in range(spatial)]
        size = [draw(st.integers(3, 9)) for _ in range(spatial)]
        attrs: dict[str, Any] = {
            "kernel_shape": kernel,
            "group": group,
            "strides": [draw(st.integers(1, 2)) for _ in range(spatial)],
            "pads": [draw(st.integers(0, 1)) for _ in range(2 * spatial)],
        }
        if op == "Conv":
            attrs["dilations"] = [draw(st.integers(1, 2)) for _ in range(spatial)]
            assume(
                all(
                    s + attrs["pads"][i] + attrs["pads"][i + spatial] >= attrs["dilations"][i] * (kk - 1) + 1
                    for i, (s, kk) in enumerate(zip(size, kernel, strict=True))
                )
            )
            w_shape = [c_out, c_in // group, *kernel]
        else:
            w_shape = [c_in, c_out // group, *kernel]
        x_shape = [draw(st.integers(1, 2)), c_in, *size]
        inputs.append(
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *x_shape[1:]] if symbolic else x_shape)
        )
        feeds["x"] = rng.standard_normal(x_shape).astype(np.float32)
        w = _weight(draw, "W", w_shape, rng, nodes, inits, inputs)
        ins = ["x", w]
        if draw(st.booleans()):
            inits.append(_init("B", [c_out], rng))
            ins.append("B")
        nodes.append(helper.make_node(op, ins, ["y"], name="layer", **attrs))
    for vi in inputs:
        if vi.name != "x":
            shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    opset = draw(st.sampled_from([13, 17, 21]))
    in_if = draw(st.sampled_from([False, False, True]))  # the layer inside both branches of an If

    def build(out_shape: list[Any] | None, wrap: bool) -> onnx.ModelProto:
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
        graph_nodes, graph_inputs, graph_inits = nodes, inputs, inits
        if wrap:  # weights stay initializers of the main graph: the branches read them from the outer scope
            branches = {}
            graph_inits = []
            produced = {o for n in nodes for o in n.output}
            for tag in ("then", "else"):
                for t in inits:
                    c_init = onnx.TensorProto()
                    c_init.CopyFrom(t)
                    c_init.name = f"{t.name}_{tag}"
                    graph_inits.append(c_init)
                copies = []
                for node in nodes:
                    c = onnx.NodeProto()
                    c.CopyFrom(node)
                    c.name = f"{node.name or node.op_type}_{tag}"
                    c.output[:] = [f"{o}_{tag}" for o in node.output]
                    c.input[:] = [
                        f"{i}_{tag}" if i in produced or i in {t.name for t in inits} else i for i in node.input
                    ]
                    copies.append(c)
                out = helper.make_tensor_value_info(f"y_{tag}", TensorProto.FLOAT, out_shape)
                branches[f"{tag}_branch"] = helper.make_graph(copies, tag, [], [out])
            graph_nodes = [helper.make_node("If", ["cond"], ["y"], name="if", **branches)]
            graph_inputs = [*inputs, helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
        model = helper.make_model(
            helper.make_graph(graph_nodes, "fuzz", graph_inputs, [y], graph_inits),
            opset_imports=[helper.make_opsetid("", opset)],
        )
        model.ir_version = 8
        return model

    if in_if:
        feeds["cond"] = np.array(draw(st.booleans()))
    try:
        ref = _ort(build(None, False), {k: v for k, v in feeds.items() if k != "cond"})
        model = build([f"y{i}" for i in range(ref.ndim)], in_if)  # the output's rank, every dim symbolic
        onnx.checker.check_model(model, full_check=True)
        ref = _ort(model, feeds)
    except Exception:  # the generator made something ONNX itself rejects: not an input we owe an answer
        assume(False)
    return model, {"__ref__": ref, **feeds}


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, feeds)[0])


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(case=models())
def test_passes_never_crash(case: tuple[onnx.ModelProto, dict[str, np.ndarray]]) -> None:
    model, feeds = case
    ref = feeds.pop("__ref__")
    for text in PIPELINES:
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        try:
            result = Pipeline(text).run(Model(proto), PassContext())  # includes the full ONNX checker
        except OnnxSparseError as e:
            assert str(e) and "\n" not in str(e)
            event(f"{text}: refused ({str(e)[:50]})")
            continue
        event(f"{text}: ok, {len(result.results[0].report.changed)} changed")
        out = _ort(result.model.proto, feeds)
        assert out.shape == ref.shape
        if text == "gemm-to-conv":
            np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
        if text.endswith("validate"):
            rows = result.results[-1].report.details["layers"]
            if "prune" in text:
                assert all(r["status"] != "eligible" for r in rows), rows
