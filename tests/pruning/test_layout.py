"""pruning.layout: the solver view of stored weights and the input rows, checked two ways — against an explicit
unfold written with plain loops, and by recomputing the layer's output in ONNX Runtime from rows @ W_viewᵀ
(Conv with stride/pads/dilation/group/auto_pad, ConvTranspose through col2im, Gemm transA/transB, MatMul
through Transpose, Reshape and DequantizeLinear chains)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnx
import pytest
from builders import make_model, rand
from conftest import run_ort
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from onnxsparse.ir.layers import Layer, find_layers
from onnxsparse.pruning import GramStats
from onnxsparse.pruning.layout import activation_rows, problems, stats_shape
from onnxsparse.sparsity import constants_by_name, stored_weight

F = TensorProto.FLOAT


def _conv(
    c_in: int, c_out: int, kernel: tuple[int, int], seed: int = 0, op: str = "Conv", **attrs: Any
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    g = int(attrs.get("group", 1))
    shape = (c_out, c_in // g, *kernel) if op == "Conv" else (c_in, c_out // g, *kernel)
    node = helper.make_node(op, ["x", "W"], ["y"], name="layer", **attrs)
    x = helper.make_tensor_value_info("x", F, ["n", c_in, "h", "w"])
    y = helper.make_tensor_value_info("y", F, ["n", "c", "ho", "wo"])
    return make_model([node], [x], [y], [nh.from_array(rand(rng, *shape), "W")])


def _weight_view(model: onnx.ModelProto) -> tuple[Layer, list[tuple[int, np.ndarray, np.ndarray | None]]]:
    """(layer, [(group, W_view [N, K] from the stored tensor, channels)])."""
    layer = find_layers(model)[0]
    sw = stored_weight(layer, constants_by_name(model))
    assert not isinstance(sw, str)
    deq = np.asarray(sw.values, dtype=np.float64)
    if sw.scale is not None:
        deq = (deq - (0 if sw.zp is None else sw.zp)) * sw.scale
    probs = problems(layer)
    assert not isinstance(probs, str)
    return layer, [(p.group, deq.reshape(-1)[p.index], p.channels) for p in probs]


def _unfold(
    x: np.ndarray, kernel: tuple[int, ...], strides: list[int], pads: list[tuple[int, int]], dil: list[int], group: int
) -> list[np.ndarray]:
    """Explicit im2col with loops: per group [N*H_out*W_out, kh*kw*C_g], K ordered (kh, kw, c)."""
    n, c, h, w = x.shape
    xp = np.pad(x, [(0, 0), (0, 0), pads[0], pads[1]])
    ho = (h + sum(pads[0]) - dil[0] * (kernel[0] - 1) - 1) // strides[0] + 1
    wo = (w + sum(pads[1]) - dil[1] * (kernel[1] - 1) - 1) // strides[1] + 1
    cg = c // group
    out = []
    for g in range(group):
        rows = []
        for b, i, j in itertools.product(range(n), range(ho), range(wo)):
            row = [
                xp[b, g * cg + ch, i * strides[0] + ki * dil[0], j * strides[1] + kj * dil[1]]
                for ki in range(kernel[0])
                for kj in range(kernel[1])
                for ch in range(cg)
            ]
            rows.append(row)
        out.append(np.array(rows))
    return out


CONV_CASES = [
    dict(kernel=(3, 3), attrs={}),
    dict(kernel=(3, 3), attrs={"strides": [2, 2], "pads": [1, 0, 2, 1]}),
    dict(kernel=(2, 3), attrs={"dilations": [2, 1], "pads": [1, 1, 1, 1]}),
    dict(kernel=(3, 3), attrs={"group": 2, "strides": [1, 2], "pads": [1, 1, 1, 1]}),
    dict(kernel=(3, 3), attrs={"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    dict(kernel=(2, 2), attrs={"auto_pad": "SAME_LOWER"}),
    dict(kernel=(3, 1), attrs={"auto_pad": "VALID", "group": 4}),
]


def _pads_for(case: dict, h: int, w: int) -> list[tuple[int, int]]:
    a = case["attrs"]
    k, s, d = case["kernel"], a.get("strides", [1, 1]), a.get("dilations", [1, 1])
    auto = a.get("auto_pad")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for size, kk, ss, dd in zip((h, w), k, s, d, strict=True):
            total = max((-(-size // ss) - 1) * ss + (kk - 1) * dd + 1 - size, 0)
            lo, hi = total // 2, total - total // 2
            out.append((lo, hi) if auto == "SAME_UPPER" else (hi, lo))
        return out
    p = a.get("pads", [0, 0, 0, 0])
    return [(p[0], p[2]), (p[1], p[3])]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: str(c["attrs"]) or "plain")
def test_conv_im2col_equals_an_explicit_unfold_and_reproduces_the_ort_output(case: dict) -> None:
    c_in, c_out = 8, 8
    model = _conv(c_in, c_out, case["kernel"], **case["attrs"])
    x = np.random.default_rng(1).standard_normal((2, c_in, 7, 6)).astype(np.float32)
    layer, views = _weight_view(model)
    got = list(activation_rows(layer, x))
    a = case["attrs"]
    ref = _unfold(
        x,
        case["kernel"],
        a.get("strides", [1, 1]),
        _pads_for(case, 7, 6),
        a.get("dilations", [1, 1]),
        a.get("group", 1),
    )
    assert [g for g, _, _ in got] == list(range(len(ref)))
    for (_, rows, _), want in zip(got, ref, strict=True):
        np.testing.assert_array_equal(rows, want)
    # Gram statistics of the patches are the explicit unfold's XᵀX
    k, groups = stats_shape(layer)
    st = GramStats(k, groups)
    for g, rows, _ in got:
        st.update(rows, g)
    for g, want in enumerate(ref):
        w64 = want.astype(np.float64)
        np.testing.assert_allclose(st.gram(g), w64.T @ w64, rtol=1e-10)
    # and rows @ W_viewᵀ is ORT's convolution
    y = run_ort(model, {"x": x})[0]
    y_rows = np.moveaxis(y, 1, -1).reshape(-1, c_out)
    for (_, rows, _), (_, wv, ch) in zip(got, views, strict=True):
        np.testing.assert_allclose(rows @ wv.T, y_rows[:, ch], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attrs", [{}, {"strides": [2, 2]}, {"group": 2}, {"group": 2, "strides": [2, 1]}])
def test_conv_transpose_rows_and_columns_reproduce_the_ort_output(attrs: dict) -> None:
    c_in, c_out, kernel = 8, 4, (3, 2)
    model = _conv(c_in, c_out, kernel, op="ConvTranspose", **attrs)
    x = np.random.default_rng(2).standard_normal((2, c_in, 4, 5)).astype(np.float32)
    layer, views = _weight_view(model)
    g = attrs.get("group", 1)
    assert stats_shape(layer) == (c_in // g, g)
    s = attrs.get("strides", [1, 1])
    y = run_ort(model, {"x": x})[0]
    rebuilt = np.zeros_like(y, dtype=np.float64)
    per = c_out // g
    for (grp, rows, _), (_, wv, _) in zip(activation_rows(layer, x), views, strict=True):
        np.testing.assert_array_equal(
            rows, np.moveaxis(x, 1, -1)[..., grp * (c_in // g) : (grp + 1) * (c_in // g)].reshape(-1, c_in // g)
        )
        cols = (rows @ wv.T).reshape(2, 4, 5, per, *kernel)  # col2im by hand
        for kh, kw in itertools.product(range(kernel[0]), range(kernel[1])):
            block = np.moveaxis(cols[..., kh, kw], -1, 1)
            rebuilt[:, grp * per : (grp + 1) * per, kh : kh + 4 * s[0] : s[0], kw : kw + 5 * s[1] : s[1]] += block
    np.testing.assert_allclose(rebuilt, y, rtol=1e-4, atol=1e-4)


def _model(body: str, inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A graph in the ONNX text format, with initializers attached from numpy (the weights are seeded draws)."""
    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : 17]>\n{body}')
    model.graph.initializer.extend(nh.from_array(v, k) for k, v in inits.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def _gemm_model(chain: str, seed: int = 0) -> onnx.ModelProto:
    """y = x @ W for W reached through a weight chain; K = 16 inputs, N = 12 outputs."""
    rng = np.random.default_rng(seed)
    w = rand(rng, 16, 12)
    x = "float[b, 16] x"
    if chain == "gemm_transB":
        nodes, inits = "[layer] y = Gemm <transB = 1> (x, Wt)", {"Wt": np.ascontiguousarray(w.T)}
    elif chain == "gemm_transA":
        x = "float[16, b] x"
        nodes, inits = "[layer] y = Gemm <transA = 1> (x, W)", {"W": w}
    elif chain == "transpose":
        nodes = """
            Wc = Transpose <perm = [1, 0]> (Wt)
            [layer] y = MatMul (x, Wc)
        """
        inits = {"Wt": np.ascontiguousarray(w.T)}
    elif chain == "reshape":
        nodes = """
            Wc = Reshape (W3, shape)
            [layer] y = MatMul (x, Wc)
        """
        inits = {"W3": w.reshape(16, 3, 4), "shape": np.array([16, 12], np.int64)}
    else:  # dq: int8 per output channel, then Cast
        scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        nodes = """
            Wd = DequantizeLinear <axis = 1> (Wq, s)
            Wc = Cast <to = 1> (Wd)
            [layer] y = MatMul (x, Wc)
        """
        inits = {"Wq": q, "s": scale}
    return _model(f"g ({x}) => (float[b, 12] y) {{ {nodes} }}", inits)


@pytest.mark.parametrize("chain", ["gemm_transB", "gemm_transA", "transpose", "reshape", "dq"])
def test_gemm_and_matmul_views_reproduce_the_ort_output(chain: str) -> None:
    model = _gemm_model(chain)
    layer, views = _weight_view(model)
    shape = (16, 5) if chain == "gemm_transA" else (5, 16)
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    ((_, rows, where),) = list(activation_rows(layer, x))
    assert rows.shape == (5, 16) and where == slice(0, 5)
    ((_, wv, ch),) = views
    assert wv.shape == (12, 16)
    np.testing.assert_allclose(rows @ wv.T, run_ort(model, {"x": x})[0][:, ch], rtol=1e-5, atol=1e-5)


def test_batched_matmul_weights_are_refused_with_a_reason() -> None:
    rng = np.random.default_rng(0)
    model = _model("g (float[2, 3, 8] x) => (float[2, 3, 4] y) { [bmm] y = MatMul (x, W) }", {"W": rand(rng, 2, 8, 4)})
    why = problems(find_layers(model)[0])
    assert isinstance(why, str) and "rank 3" in why
