"""Lazy loading and streamed saving at the protobuf wire level (``onnxsparse.ir.wire``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxsparse.ir import wire
from onnxsparse.ir.model_io import load_model, ort_session, save_model
from onnxsparse.ir.tensors import inline_origin, to_array
from onnxsparse.passes.prune import PrunePass
from onnxsparse.pipeline import Pipeline

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.mark.parametrize("name", ["cnn.onnx", "transformer_block.onnx", "if_model.onnx"])
def test_read_model_leaves_weights_in_the_file_with_the_same_values(name: str) -> None:
    path = FIXTURES / name
    ref = onnx.load(str(path))
    proto, cut = wire.read_model(path, min_bytes=1024)
    assert cut, "the fixture has weights of 1 KiB or more"
    assert proto.ByteSize() < ref.ByteSize() / 2
    model = load_model(path, lazy=True)
    by_name = {t.name: t for t in ref.graph.initializer}
    for t in model.proto.graph.initializer:
        np.testing.assert_array_equal(to_array(t, model), numpy_helper.to_array(by_name[t.name]))
    assert {t.name for t in model.proto.graph.initializer if inline_origin(t)} == {c.name for c in cut}
    assert not model.has_external_data()  # external in memory only


def test_lazy_model_runs_and_saves_inline_identically(tmp_path: Path) -> None:
    path = FIXTURES / "cnn.onnx"
    eager, lazy = load_model(path), load_model(path, lazy=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    name = eager.proto.graph.input[0].name
    np.testing.assert_array_equal(ort_session(lazy).run(None, {name: x})[0], ort_session(eager).run(None, {name: x})[0])
    out_e, out_l = tmp_path / "e.onnx", tmp_path / "l.onnx"
    Pipeline([PrunePass()]).run(eager)
    Pipeline([PrunePass()]).run(lazy)
    save_model(eager, out_e)
    save_model(lazy, out_l)
    assert not (tmp_path / "l.onnx.data").exists(), "an inline model stays inline"
    onnx.checker.check_model(str(out_l), full_check=True)
    a, b = onnx.load(str(out_e)), onnx.load(str(out_l))
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    for ta, tb in zip(a.graph.initializer, b.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(ta), numpy_helper.to_array(tb))
    # after the save the in-memory model reads its weights from the file just written
    assert all(inline_origin(t) for t in lazy.proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    np.testing.assert_array_equal(
        ort_session(lazy).run(None, {name: x})[0], ort_session(load_model(out_e)).run(None, {name: x})[0]
    )


def test_malformed_bytes_are_a_wire_error(tmp_path: Path) -> None:
    data = (FIXTURES / "cnn.onnx").read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(wire.WireError):
        wire.read_model(bad)
    from onnxsparse.errors import OnnxSparseError

    with pytest.raises(OnnxSparseError, match="is not an ONNX model"):
        load_model(bad, lazy=True)


def test_varint_round_trip() -> None:
    for v in (0, 1, 127, 128, 300, 2**31, 2**63 - 1):
        enc = wire.encode_varint(v)
        assert wire._varint(enc, 0, len(enc)) == (v, len(enc))
