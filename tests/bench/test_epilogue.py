"""Epilogue detection (CPU) on generated graphs: each graph is first run in ONNX Runtime and checked to compute
the bias/activation it claims (so the detector is tested on real Gelu/Relu graphs), then detected."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from conftest import run_ort
from onnx import TensorProto, helper, numpy_helper

from onnxsparse.bench.epilogue import find_epilogues

RNG = np.random.default_rng(0)
K, N = 16, 32


def _c(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _model(nodes, inits, out="y", out_shape=("m", N), x_shape=("m", K), opset=17):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(out_shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


W = RNG.standard_normal((K, N)).astype(np.float32)
B = RNG.standard_normal(N).astype(np.float32)
X = RNG.standard_normal((5, K)).astype(np.float32)


def _gelu_erf(v):
    return v * 0.5 * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))


def _gelu_tanh(v):
    return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))


def _matmul_add(bias_shape=(N,)):
    bias = B.reshape(bias_shape) if int(np.prod(bias_shape)) == N else RNG.standard_normal(bias_shape)
    return (
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
            helper.make_node("Add", ["h", "b"], ["z"], name="fc_bias"),
        ],
        [_c("w", W), _c("b", bias)],
    )


def _erf_gelu(variant):
    """transformers' export (Div by √2, then Mul x, then Mul 0.5) and two reorderings."""
    nodes, inits = _matmul_add()
    inits += [_c("sqrt2", math.sqrt(2)), _c("inv_sqrt2", 1 / math.sqrt(2)), _c("one", 1.0), _c("half", 0.5)]
    if variant == "div":
        nodes += [
            helper.make_node("Div", ["z", "sqrt2"], ["s"], name="div"),
            helper.make_node("Erf", ["s"], ["e"], name="erf"),
            helper.make_node("Add", ["e", "one"], ["a"], name="add1"),
            helper.make_node("Mul", ["z", "a"], ["p"], name="mul_x"),
            helper.make_node("Mul", ["p", "half"], ["y"], name="mul_half"),
        ]
    elif variant == "mul_half_first":  # 0.5·x first, scale by 1/√2 with a Mul
        nodes += [
            helper.make_node("Mul", ["z", "inv_sqrt2"], ["s"], name="scale"),
            helper.make_node("Erf", ["s"], ["e"], name="erf"),
            helper.make_node("Add", ["one", "e"], ["a"], name="add1"),
            helper.make_node("Mul", ["half", "z"], ["hx"], name="half_x"),
            helper.make_node("Mul", ["a", "hx"], ["y"], name="mul"),
        ]
    else:  # (1 + erf)·0.5, then ·x
        nodes += [
            helper.make_node("Div", ["z", "sqrt2"], ["s"], name="div"),
            helper.make_node("Erf", ["s"], ["e"], name="erf"),
            helper.make_node("Add", ["e", "one"], ["a"], name="add1"),
            helper.make_node("Mul", ["a", "half"], ["ah"], name="mul_half"),
            helper.make_node("Mul", ["ah", "z"], ["y"], name="mul_x"),
        ]
    return _model(nodes, inits)


def _tanh_gelu():
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) as torch's tanh-approximate Gelu exports it (Pow x³)."""
    nodes, inits = _matmul_add()
    inits += [_c("three", 3.0), _c("c", 0.044715), _c("k", math.sqrt(2 / math.pi)), _c("one", 1.0), _c("half", 0.5)]
    nodes += [
        helper.make_node("Pow", ["z", "three"], ["z3"], name="pow"),
        helper.make_node("Mul", ["z3", "c"], ["cz3"], name="mul_c"),
        helper.make_node("Add", ["z", "cz3"], ["inner"], name="add_inner"),
        helper.make_node("Mul", ["inner", "k"], ["arg"], name="mul_k"),
        helper.make_node("Tanh", ["arg"], ["t"], name="tanh"),
        helper.make_node("Add", ["t", "one"], ["a"], name="add1"),
        helper.make_node("Mul", ["z", "half"], ["hz"], name="half_x"),
        helper.make_node("Mul", ["hz", "a"], ["y"], name="mul"),
    ]
    return _model(nodes, inits)


@pytest.mark.parametrize("variant", ["div", "mul_half_first", "half_then_x"])
def test_erf_gelu_forms(variant):
    model = _erf_gelu(variant)
    (y,) = run_ort(model, {"x": X})
    np.testing.assert_allclose(y, _gelu_erf(X @ W + B), rtol=1e-5, atol=1e-5)  # the graph is Gelu
    ep = find_epilogues(model)["fc"]
    assert (ep.bias, ep.activation, ep.kind, ep.output) == ("Add", "gelu", "bias+gelu", "y")
    assert len(ep.nodes) == 6  # the bias Add and the five Gelu nodes


def test_tanh_gelu_form():
    model = _tanh_gelu()
    (y,) = run_ort(model, {"x": X})
    np.testing.assert_allclose(y, _gelu_tanh(X @ W + B), rtol=1e-5, atol=1e-5)
    ep = find_epilogues(model)["fc"]
    assert (ep.bias, ep.activation, ep.kind, ep.output) == ("Add", "gelu_tanh", "bias+gelu", "y")
    assert len(ep.nodes) == 9


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_op(approximate):
    nodes, inits = _matmul_add()
    nodes.append(helper.make_node("Gelu", ["z"], ["y"], name="gelu", approximate=approximate))
    model = _model(nodes, inits, opset=20)
    (y,) = run_ort(model, {"x": X})
    ref = _gelu_erf if approximate == "none" else _gelu_tanh
    np.testing.assert_allclose(y, ref(X @ W + B), rtol=1e-4, atol=1e-4)
    ep = find_epilogues(model)["fc"]
    assert ep.activation == ("gelu" if approximate == "none" else "gelu_tanh") and ep.kind == "bias+gelu"


def test_matmul_add_relu_and_gemm_c():
    nodes, inits = _matmul_add(bias_shape=(1, N))
    nodes.append(helper.make_node("Relu", ["z"], ["y"], name="relu"))
    model = _model(nodes, inits)
    (y,) = run_ort(model, {"x": X})
    np.testing.assert_allclose(y, np.maximum(X @ W + B, 0), rtol=1e-5, atol=1e-5)
    assert find_epilogues(model)["fc"].to_dict() == {
        "bias": "Add",
        "activation": "relu",
        "kind": "bias+relu",
        "nodes": ["fc_bias", "relu"],
    }
    gemm = _model([helper.make_node("Gemm", ["x", "wt", "b"], ["y"], name="g", transB=1)], [_c("wt", W.T), _c("b", B)])
    (y,) = run_ort(gemm, {"x": X})
    np.testing.assert_allclose(y, X @ W + B, rtol=1e-5, atol=1e-5)
    assert find_epilogues(gemm)["g"].kind == "bias"


def test_not_an_epilogue():
    # a full [M, N] constant is not a per-channel bias
    nodes, inits = _matmul_add(bias_shape=(5, N))
    assert find_epilogues(_model(nodes, inits, out="z", out_shape=(5, N)))["fc"].kind == ""
    # the pre-activation value is also a graph output: the Relu cannot be fused away
    nodes, inits = _matmul_add()
    nodes.append(helper.make_node("Relu", ["z"], ["y"], name="relu"))
    model = _model(nodes, inits)
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["m", N]))
    ep = find_epilogues(model)["fc"]
    assert ep.bias == "Add" and ep.activation is None
    # erf of x/2 is not Gelu
    model = _erf_gelu("div")
    for t in model.graph.initializer:
        if t.name == "sqrt2":
            t.CopyFrom(_c("sqrt2", 2.0))
    assert find_epilogues(model)["fc"].kind == "bias"
    # a Gemm whose C is a full matrix has no bias epilogue
    gemm = _model(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g")],
        [_c("w", W), _c("c", RNG.standard_normal((5, N)))],
        x_shape=(5, K),
        out_shape=(5, N),
    )
    assert find_epilogues(gemm)["g"].kind == ""


def test_conv_bias_batchnorm_relu():
    cin, cout = 8, 16
    w = RNG.standard_normal((cout, cin, 1, 1)).astype(np.float32)
    inits = [
        _c("w", w),
        _c("scale", np.ones(cout)),
        _c("bn_b", np.zeros(cout)),
        _c("mean", np.zeros(cout)),
        _c("var", np.ones(cout)),
        _c("cb", RNG.standard_normal((1, cout, 1, 1))),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "scale", "bn_b", "mean", "var"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["y"], name="relu"),
    ]
    model = _model(nodes, inits, x_shape=(1, cin, 4, 4), out_shape=(1, cout, 4, 4))
    run_ort(model, {"x": RNG.standard_normal((1, cin, 4, 4)).astype(np.float32)})
    ep = find_epilogues(model)["conv"]
    assert (ep.bias, ep.activation, ep.nodes) == ("BatchNormalization", "relu", ("bn", "relu"))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Add", ["c", "cb"], ["y"], name="bias"),
    ]
    model = _model(nodes, inits[:1] + inits[-1:], x_shape=(1, cin, 4, 4), out_shape=(1, cout, 4, 4))
    assert find_epilogues(model)["conv"].kind == "bias"


def test_exported_bert_and_resnet():
    """Real exports (the corpus graphs, weights not needed): transformers BERT-base, torchvision ResNet-18."""
    from corpus import CORPUS_DIR

    bert = onnx.load(CORPUS_DIR / "bert_base.onnx", load_external_data=False)
    eps = find_epilogues(bert)
    ffn_up = [e for name, e in eps.items() if "intermediate/dense" in name]
    assert len(ffn_up) == 12 and all(e.kind == "bias+gelu" and e.activation == "gelu" for e in ffn_up)
    qkv = [e for name, e in eps.items() if "attention/self/query" in name or "output/dense" in name]
    assert len(qkv) == 36 and all(e.kind == "bias" for e in qkv)
    resnet = onnx.load(CORPUS_DIR / "resnet18.onnx", load_external_data=False)
    kinds = {name: e.kind for name, e in find_epilogues(resnet).items()}
    assert kinds["/conv1/Conv"] == "bias+relu" and kinds["/layer1/layer1.0/conv2/Conv"] == "bias"
