"""Shape inference: onnx's, with ONNX Runtime's symbolic inference filling dims onnx loses."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper as nh

from onnxsparse.ir.layers import find_layers
from onnxsparse.ir.shapes import concrete, infer_shapes

SEQ = 32


def _position_ids_model(extra_op: str | None = None) -> onnx.ModelProto:
    """BERT's embeddings in small: position ids are a Slice of a [1, 64] buffer up to ``Shape(input_ids)[1]``,
    the embeddings' sum feeds a MatMul. onnx's inference loses the sequence length at the Slice. ``extra_op``:
    an op of an unknown domain on the MatMul's output (no inference knows it)."""
    rng = np.random.default_rng(0)
    out, domains, extra = ("y", "", "")
    if extra_op is not None:
        out, domains, extra = "h", ', "example.unknown": 1', f"y = example.unknown.{extra_op} (h)"
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["": 17{domains}]>
        embeddings (int64[batch, sequence] input_ids) => (float y) {{
            one = Constant <value = int64 {{1}}> ()
            zeros1 = Constant <value = int64[1] {{0}}> ()
            ones1 = Constant <value = int64[1] {{1}}> ()
            shape = Shape (input_ids)
            seq = Gather <axis = 0> (shape, one)
            seq1 = Unsqueeze (seq, zeros1)
            position_ids = Slice (buffer, zeros1, seq1, ones1, ones1)
            words = Gather (word, input_ids)
            positions = Gather (position, position_ids)
            embedded = Add (words, positions)
            [dense] {out} = MatMul (embedded, w)
            {extra}
        }}
    """)
    model.graph.output[0].type.tensor_type.ClearField("shape")  # the text format has no "rank unknown"
    inits = {
        "buffer": np.arange(64, dtype=np.int64).reshape(1, 64),
        "word": rng.standard_normal((100, 8)).astype(np.float32),
        "position": rng.standard_normal((64, 8)).astype(np.float32),
        "w": rng.standard_normal((8, 12)).astype(np.float32),
    }
    model.graph.initializer.extend(nh.from_array(value, name) for name, value in inits.items())
    return model


def test_onnx_alone_loses_the_sequence_length_at_the_position_id_slice() -> None:
    """The premise of the fallback: without it the MatMul's dims stay unknown (if onnx ever learns this, the
    fallback is dead code and this test says so)."""
    model = _position_ids_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = SEQ
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    known = {vi.name: vi for vi in inferred.graph.value_info}
    dims = known["embedded"].type.tensor_type.shape.dim
    assert not all(d.HasField("dim_value") for d in dims)


def test_symbolic_inference_fills_the_layer_dims_onnx_loses() -> None:
    model = _position_ids_model()
    shapes = infer_shapes(model, {"input_ids": (1, SEQ)})
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"input_ids": np.ones((1, SEQ), np.int64)})
    assert shapes["position_ids"] == (1, SEQ)
    assert shapes["embedded"] == (1, SEQ, 8)
    assert shapes["y"] == y.shape == (1, SEQ, 12)
    (layer,) = find_layers(model, shapes)
    gemm = layer.gemm_shape(shapes)
    assert gemm is not None and (gemm.m, gemm.n, gemm.k) == (SEQ, 12, 8) and gemm.flops == 2 * SEQ * 12 * 8


def test_without_concrete_inputs_the_fallback_is_not_run_and_dims_stay_symbolic() -> None:
    shapes = infer_shapes(_position_ids_model())
    assert shapes["input_ids"] == ("batch", "sequence")
    assert concrete(shapes.get("embedded")) is None


def test_a_failing_symbolic_inference_keeps_onnx_shapes_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An op no inference knows stops ORT's symbolic inference (its own ``infer_shapes`` would then save a
    temporary model into the working directory and raise): the dims it found before the op are kept,
    nothing is written, nothing raises."""
    monkeypatch.chdir(tmp_path)
    shapes = infer_shapes(_position_ids_model("Mystery"), {"input_ids": (1, SEQ)})
    assert os.listdir(tmp_path) == []
    assert shapes["embedded"] == (1, SEQ, 8) and shapes["h"] == (1, SEQ, 12)
    assert concrete(shapes.get("y")) is None


def test_a_crashing_symbolic_inference_keeps_onnx_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxruntime.tools import symbolic_shape_infer

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("symbolic inference broke")

    monkeypatch.setattr(symbolic_shape_infer.SymbolicShapeInference, "_infer_impl", boom)
    shapes = infer_shapes(_position_ids_model(), {"input_ids": (1, SEQ)})
    assert shapes["input_ids"] == (1, SEQ) and concrete(shapes.get("embedded")) is None
