"""GEMM extraction (CPU): M, N, K per layer from inferred shapes, cross-checked against shapes ORT really produces."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxsparse.bench.gemms import extract_gemms, round_up, unique_gemms
from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.shapes import parse_shapes


def _model(body: str, *inits: onnx.TensorProto) -> onnx.ModelProto:
    """A graph in the ONNX text format, with the seeded random weights of ``_w`` attached from numpy."""
    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : 17]>\n{body}')
    model.graph.initializer.extend(inits)
    onnx.checker.check_model(model, full_check=True)
    return model


def _w(name, *shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _mlp():
    """x[batch, seq, 64] → MatMul 64→128 → Relu → Gemm-free MatMul 128→48 (N=48: fp16 ok, int8 not)."""
    body = """
        g (float[batch, seq, 64] x) => (float[batch, seq, 48] y) {
            [fc1] h = MatMul (x, w1)
            [relu] r = Relu (h)
            [fc2] y = MatMul (r, w2)
        }
    """
    return _model(body, _w("w1", 64, 128), _w("w2", 128, 48, seed=1))


def test_matmul_m_is_batch_times_positions_and_matches_ort():
    model = _mlp()
    layers = extract_gemms(model, parse_shapes("x:3x5x64"))
    assert [(lg.name, lg.m, lg.n, lg.k, lg.reason) for lg in layers] == [
        ("fc1", 15, 128, 64, None),
        ("fc2", 15, 48, 128, None),
    ]
    (y,) = _run(model, {"x": np.random.default_rng(2).standard_normal((3, 5, 64)).astype(np.float32)})
    # the real output: M rows of N values for the last layer
    assert int(np.prod(y.shape[:-1])) == layers[1].m and y.shape[-1] == layers[1].n
    assert layers[0].flops == 2 * 15 * 128 * 64


def test_m_is_padded_to_the_dtype_multiple_and_int8_needs_32():
    model = _mlp()
    fp16 = extract_gemms(model, parse_shapes("x:4x25x64"), dtype="fp16")
    assert fp16[0].m == 100 and fp16[0].m_padded == 112 and fp16[0].key == (112, 128, 64, "", 100)
    int8 = extract_gemms(model, parse_shapes("x:4x25x64"), dtype="int8")
    assert int8[0].m_padded == 128
    # fc2 has N=48: a multiple of 16, not of 32
    assert fp16[1].reason is None
    assert int8[1].reason is not None and "N=48" in int8[1].reason and "32" in int8[1].reason
    assert int8[1].key is None
    assert round_up(96, 32) == 96 and round_up(97, 32) == 128


def test_unknown_shape_asks_for_shapes():
    layers = extract_gemms(_mlp(), None)
    assert all(lg.key is None for lg in layers)
    assert "--shapes" in (layers[0].reason or "")
    assert unique_gemms(layers) == []


def test_bad_dtype_is_a_user_error():
    with pytest.raises(OnnxSparseError, match="dtype"):
        extract_gemms(_mlp(), parse_shapes("x:1x2x64"), dtype="fp8")


def test_conv_is_an_implicit_gemm_and_matches_ort():
    body = """
        g (float[2, 32, 16, 16] x) => (float[2, 64, 8, 8] z) {
            [conv] y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (x, w, b)
            [depthwise] z = Conv <group = 64, kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (y, wd)
        }
    """
    model = _model(body, _w("w", 64, 32, 3, 3), _w("b", 64), _w("wd", 64, 1, 3, 3))
    conv, dw = extract_gemms(model)
    (z,) = _run(model, {"x": np.random.default_rng(0).standard_normal((2, 32, 16, 16)).astype(np.float32)})
    # M = N_batch · H_out · W_out of the real output, N = output channels, K = C_in · kh · kw
    assert (conv.m, conv.n, conv.k) == (z.shape[0] * z.shape[2] * z.shape[3], z.shape[1], 32 * 3 * 3)
    assert conv.reason is None
    assert dw.key is None and dw.reason is not None


def test_gemm_trans_b_and_non_multiple_n():
    body = """
        g (float[n, 256] x) => (float[n, 10] y) {
            [proj] h = Gemm <transB = 1> (x, w, b)
            [head] y = Gemm (h, wc)
        }
    """
    model = _model(body, _w("w", 128, 256), _w("b", 128), _w("wc", 128, 10))
    proj, head = extract_gemms(model, parse_shapes("x:64x256"))
    assert (proj.m, proj.n, proj.k, proj.reason) == (64, 128, 256, None)
    (y,) = _run(model, {"x": np.ones((64, 256), np.float32)})
    assert (head.m, head.n, head.k) == (y.shape[0], y.shape[1], 128)
    assert head.key is None and "N=10" in (head.reason or "")


def test_runtime_weight_and_pattern_reasons_are_kept():
    body = """
        g (float[8, 16] x, float[16, 6] x2) => (float[8, 32] z) {
            [act_act] y = MatMul (x, x2)
            [k6] z = MatMul (y, w)
        }
    """
    model = _model(body, _w("w", 6, 32))
    act, k6 = extract_gemms(model)
    assert act.key is None and "graph input" in (act.reason or "")
    assert k6.key is None and "K=6" in (k6.reason or "")


def test_identical_shapes_are_deduplicated_with_counts():
    nodes, inits, prev = [], [], "x"
    for i in range(4):
        n = 64 if i % 2 == 0 else 32
        k = 32 if i % 2 == 0 else 64
        inits.append(_w(f"w{i}", k, n, seed=i))
        nodes.append(f"[fc{i}] h{i} = MatMul ({prev}, w{i})")
        prev = f"h{i}"
    model = _model(f"g (float[b, 32] x) => (float[b, 32] {prev}) {{ {' '.join(nodes)} }}", *inits)
    layers = extract_gemms(model, parse_shapes("x:128x32"))
    unique = unique_gemms(layers)
    assert [(u.key, u.count, u.layers) for u in unique] == [
        ((128, 64, 32, "", 128), 2, ["fc0", "fc2"]),
        ((128, 32, 64, "", 128), 2, ["fc1", "fc3"]),
    ]
    assert unique[0].to_dict()["count"] == 2


def _load_tool(name):
    path = Path(__file__).resolve().parents[2] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bert_shaped_model_layers_and_ort_run():
    """The bench's demo model (tools/make_bert_shaped.py), shrunk: what is timed, what is skipped and why."""
    model = _load_tool("make_bert_shaped").build(layers=2, hidden=64, heads=4, ffn=256, vocab=50, classes=2)
    onnx.checker.check_model(model, full_check=True)
    ids = np.random.default_rng(0).integers(0, 50, (3, 7)).astype(np.int64)
    (logits,) = _run(model, {"input_ids": ids})
    assert logits.shape == (3, 2) and np.isfinite(logits).all()
    layers = extract_gemms(model, parse_shapes("input_ids:3x7"))
    by_name = {lg.name: lg for lg in layers}
    assert (by_name["layer0.attn.q"].m, by_name["layer0.attn.q"].n, by_name["layer0.attn.q"].k) == (21, 64, 64)
    assert (by_name["layer1.ffn2"].n, by_name["layer1.ffn2"].k) == (64, 256)
    assert by_name["layer0.attn.scores"].key is None  # activation × activation
    assert by_name["pooler"].m == 3  # first token only: M = batch
    assert by_name["logits"].key is None  # N=2
    unique = unique_gemms(layers)
    assert sorted(u.count for u in unique) == [1, 2, 2, 8]


def test_a_model_is_walked_once_for_its_gemms_and_epilogues(layer_walks):
    """Given an onnxsparse ``Model``, the GEMMs (and their epilogues) come from its cached layer index: asking
    again with the same shapes, or through ``model_layers``, walks nothing more; a bare proto gets one walk and
    the same answer."""
    from onnxsparse.ir.index import model_layers
    from onnxsparse.ir.model_io import Model
    from onnxsparse.ir.shapes import infer_shapes

    proto = _mlp()
    model = Model(proto)
    first = extract_gemms(model, parse_shapes("x:3x5x64"), epilogues=True)
    assert [(lg.name, lg.m, lg.n, lg.k) for lg in first] == [("fc1", 15, 128, 64), ("fc2", 15, 48, 128)]
    assert first[0].epilogue == "relu" and len(layer_walks) == 1
    assert extract_gemms(model, parse_shapes("x:3x5x64"), epilogues=True) == first
    assert [lay.name for lay in model_layers(model, infer_shapes(proto, parse_shapes("x:3x5x64")))] == ["fc1", "fc2"]
    assert len(layer_walks) == 1 and model.layer_cache.builds == 1
    assert extract_gemms(proto, parse_shapes("x:3x5x64"), epilogues=True) == first
    assert len(layer_walks) == 2
