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


def _model(
    nodes: str,
    inits: dict[str, object],
    out: str = "y",
    out_shape: tuple[object, ...] = ("m", N),
    x_shape: tuple[object, ...] = ("m", K),
    opset: int = 17,
) -> onnx.ModelProto:
    """One input x, one output: ``nodes`` in the ONNX text format, which reads like the pattern under test; the
    float32 initializers come from numpy, since the weights are drawn from the seeded RNG."""

    def dims(shape: tuple[object, ...]) -> str:
        return ", ".join(map(str, shape))

    model = onnx.parser.parse_model(
        f'<ir_version: 9, opset_import: ["" : {opset}]>\n'
        f"g (float[{dims(x_shape)}] x) => (float[{dims(out_shape)}] {out}) {{\n{nodes}\n}}"
    )
    model.graph.initializer.extend(_c(name, value) for name, value in inits.items())
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
    return "[fc] h = MatMul (x, w)\n[fc_bias] z = Add (h, b)\n", {"w": W, "b": bias}


def _erf_gelu(variant):
    """transformers' export (Div by √2, then Mul x, then Mul 0.5) and two reorderings."""
    nodes, inits = _matmul_add()
    inits |= {"sqrt2": math.sqrt(2), "inv_sqrt2": 1 / math.sqrt(2), "one": 1.0, "half": 0.5}
    if variant == "div":
        nodes += """
            [div] s = Div (z, sqrt2)
            [erf] e = Erf (s)
            [add1] a = Add (e, one)
            [mul_x] p = Mul (z, a)
            [mul_half] y = Mul (p, half)
        """
    elif variant == "mul_half_first":  # 0.5·x first, scale by 1/√2 with a Mul
        nodes += """
            [scale] s = Mul (z, inv_sqrt2)
            [erf] e = Erf (s)
            [add1] a = Add (one, e)
            [half_x] hx = Mul (half, z)
            [mul] y = Mul (a, hx)
        """
    else:  # (1 + erf)·0.5, then ·x
        nodes += """
            [div] s = Div (z, sqrt2)
            [erf] e = Erf (s)
            [add1] a = Add (e, one)
            [mul_half] ah = Mul (a, half)
            [mul_x] y = Mul (ah, z)
        """
    return _model(nodes, inits)


def _tanh_gelu():
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) as torch's tanh-approximate Gelu exports it (Pow x³)."""
    nodes, inits = _matmul_add()
    inits |= {"three": 3.0, "c": 0.044715, "k": math.sqrt(2 / math.pi), "one": 1.0, "half": 0.5}
    nodes += """
        [pow] z3 = Pow (z, three)
        [mul_c] cz3 = Mul (z3, c)
        [add_inner] inner = Add (z, cz3)
        [mul_k] arg = Mul (inner, k)
        [tanh] t = Tanh (arg)
        [add1] a = Add (t, one)
        [half_x] hz = Mul (z, half)
        [mul] y = Mul (hz, a)
    """
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
    model = _model(nodes + f'[gelu] y = Gelu <approximate = "{approximate}"> (z)', inits, opset=20)
    (y,) = run_ort(model, {"x": X})
    ref = _gelu_erf if approximate == "none" else _gelu_tanh
    np.testing.assert_allclose(y, ref(X @ W + B), rtol=1e-4, atol=1e-4)
    ep = find_epilogues(model)["fc"]
    assert ep.activation == ("gelu" if approximate == "none" else "gelu_tanh") and ep.kind == "bias+gelu"


def test_matmul_add_relu_and_gemm_c():
    nodes, inits = _matmul_add(bias_shape=(1, N))
    model = _model(nodes + "[relu] y = Relu (z)", inits)
    (y,) = run_ort(model, {"x": X})
    np.testing.assert_allclose(y, np.maximum(X @ W + B, 0), rtol=1e-5, atol=1e-5)
    assert find_epilogues(model)["fc"].to_dict() == {
        "bias": "Add",
        "activation": "relu",
        "kind": "bias+relu",
        "nodes": ["fc_bias", "relu"],
    }
    gemm = _model("[g] y = Gemm <transB = 1> (x, wt, b)", {"wt": W.T, "b": B})
    (y,) = run_ort(gemm, {"x": X})
    np.testing.assert_allclose(y, X @ W + B, rtol=1e-5, atol=1e-5)
    assert find_epilogues(gemm)["g"].kind == "bias"


def test_not_an_epilogue():
    # a full [M, N] constant is not a per-channel bias
    nodes, inits = _matmul_add(bias_shape=(5, N))
    assert find_epilogues(_model(nodes, inits, out="z", out_shape=(5, N)))["fc"].kind == ""
    # the pre-activation value is also a graph output: the Relu cannot be fused away
    nodes, inits = _matmul_add()
    model = _model(nodes + "[relu] y = Relu (z)", inits)
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
        "[g] y = Gemm (x, w, c)",
        {"w": W, "c": RNG.standard_normal((5, N))},
        x_shape=(5, K),
        out_shape=(5, N),
    )
    assert find_epilogues(gemm)["g"].kind == ""


def test_conv_bias_batchnorm_relu():
    cin, cout = 8, 16
    w = RNG.standard_normal((cout, cin, 1, 1)).astype(np.float32)
    inits = {
        "w": w,
        "scale": np.ones(cout),
        "bn_b": np.zeros(cout),
        "mean": np.zeros(cout),
        "var": np.ones(cout),
        "cb": RNG.standard_normal((1, cout, 1, 1)),
    }
    nodes = """
        [conv] c = Conv (x, w)
        [bn] n = BatchNormalization (c, scale, bn_b, mean, var)
        [relu] y = Relu (n)
    """
    model = _model(nodes, inits, x_shape=(1, cin, 4, 4), out_shape=(1, cout, 4, 4))
    run_ort(model, {"x": RNG.standard_normal((1, cin, 4, 4)).astype(np.float32)})
    ep = find_epilogues(model)["conv"]
    assert (ep.bias, ep.activation, ep.nodes) == ("BatchNormalization", "relu", ("bn", "relu"))
    nodes = "[conv] c = Conv (x, w)\n[bias] y = Add (c, cb)"
    model = _model(nodes, {"w": w, "cb": inits["cb"]}, x_shape=(1, cin, 4, 4), out_shape=(1, cout, 4, 4))
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
