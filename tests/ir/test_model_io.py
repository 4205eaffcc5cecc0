"""Model IO: external data (load lazily, save streaming), atomic writes, preservation, refusing bad paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import matmul_ranks

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.model_io import load_model, save_model
from onnxsparse.ir.tensors import to_array


def _big_model(tmp_path: Path) -> Path:
    model = matmul_ranks()
    model.metadata_props.add(key="author", value="me")
    model.graph.value_info.add().CopyFrom(onnx.helper.make_tensor_value_info("q", onnx.TensorProto.FLOAT, None))
    fn = onnx.helper.make_function(
        "custom",
        "Twice",
        ["a"],
        ["b"],
        [onnx.helper.make_node("Add", ["a", "a"], ["b"])],
        [onnx.helper.make_opsetid("", 17)],
    )
    model.functions.append(fn)
    model.opset_import.append(onnx.helper.make_opsetid("custom", 1))
    path = tmp_path / "in" / "m.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    return path


def test_external_data_is_memory_mapped_and_round_trips(tmp_path: Path) -> None:
    src = _big_model(tmp_path)
    model = load_model(src)
    assert model.has_external_data()
    w = next(t for t in model.proto.graph.initializer if t.name == "W_q")
    arr = to_array(w, model)
    assert isinstance(arr, np.memmap)
    out = tmp_path / "out.onnx"
    save_model(model, out)
    assert (tmp_path / "out.onnx.data").exists()  # the input used external data → so does the output
    back = onnx.load(str(out))
    ref = onnx.load(str(src))
    for a, b in zip(ref.graph.initializer, back.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    assert {p.key: p.value for p in back.metadata_props}["author"] == "me"
    assert [f.name for f in back.functions] == ["Twice"]
    assert {i.domain: i.version for i in back.opset_import} == {"": 17, "custom": 1}
    assert back.ir_version == ref.ir_version and len(back.graph.value_info) == 1
    onnx.checker.check_model(str(out), full_check=True)


def test_inline_save_when_asked(tmp_path: Path) -> None:
    model = load_model(_big_model(tmp_path))
    out = tmp_path / "inline.onnx"
    save_model(model, out, external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_refuses_to_overwrite_input_and_its_data(tmp_path: Path) -> None:
    src = _big_model(tmp_path)
    before = src.read_bytes()
    model = load_model(src)
    with pytest.raises(OnnxSparseError, match="is the input model"):
        save_model(model, src)
    assert src.read_bytes() == before


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(_big_model(tmp_path))
    out = tmp_path / "o.onnx"

    def boom(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("onnxsparse.ir.model_io._write_external", boom)
    with pytest.raises(OnnxSparseError) as e:  # one line naming the user's path, not the temporary folder
        save_model(model, out, external_data=True)
    assert str(e.value) == f"cannot write {out}: disk full"
    assert sorted(os.listdir(tmp_path)) == ["in"]


@pytest.mark.parametrize("content, message", [(b"garbage\x00\xff", "not an ONNX model"), (b"", "not an ONNX model")])
def test_not_onnx(tmp_path: Path, content: bytes, message: str) -> None:
    p = tmp_path / "x.onnx"
    p.write_bytes(content)
    with pytest.raises(OnnxSparseError, match=message):
        load_model(p)


def test_missing_external_data(tmp_path: Path) -> None:
    src = _big_model(tmp_path)
    (src.parent / "weights.bin").unlink()
    with pytest.raises(OnnxSparseError, match=r"missing external data file 'weights\.bin'"):
        load_model(src)


def test_truncated_external_data(tmp_path: Path) -> None:
    src = _big_model(tmp_path)
    data = src.parent / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(OnnxSparseError, match="truncated"):
        load_model(src)
