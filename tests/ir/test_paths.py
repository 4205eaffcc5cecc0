"""paths.check_outputs / model_files: every collision the issue lists, named by flag and the user's path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.paths import check_outputs, data_file, model_files, write_text


def _external_model(folder: Path, name: str = "m.onnx", location: str | None = None) -> Path:
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    p = folder / name
    onnx.save(m, str(p), save_as_external_data=True, location=location or f"{name}.data", size_threshold=0)
    return p


def test_model_files_lists_external_data(tmp_path: Path) -> None:
    p = _external_model(tmp_path, location="weights.bin")
    assert model_files(p) == [p, tmp_path / "weights.bin"]
    assert model_files(tmp_path / "missing.onnx") == [tmp_path / "missing.onnx"]
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert model_files(tmp_path / "junk.onnx") == [tmp_path / "junk.onnx"]


@pytest.mark.parametrize(
    ("outputs", "expect"),
    [
        ([("-o", "m.onnx.data")], "-o 'm.onnx.data': is the external-data file of the input model"),
        ([("-o", "m.onnx")], "-o 'm.onnx': is the input model"),
        ([("-o", "o.onnx"), ("--json", "m.onnx")], "--json 'm.onnx': is the input model"),
        ([("-o", "o.onnx"), ("--json", "o.onnx")], "--json 'o.onnx': is also -o o.onnx"),
        ([("-o", "o.onnx"), ("--json", "o.onnx.data")], "--json 'o.onnx.data': is also the external-data file"),
        ([("-o", "o.onnx"), ("prune{masks}", "calib.npz")], "prune{masks} 'calib.npz': is the input calib.npz"),
        (
            [("-o", "o.onnx"), ("--json", "nowhere/r.json")],
            "--json 'nowhere/r.json': its folder nowhere does not exist",
        ),
        ([("-o", "sub")], "-o 'sub': is a folder"),
    ],
)
def test_collisions_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outputs: list[tuple[str, str]], expect: str
) -> None:
    monkeypatch.chdir(tmp_path)
    _external_model(tmp_path)
    (tmp_path / "calib.npz").write_bytes(b"PK")
    (tmp_path / "sub").mkdir()
    with pytest.raises(OnnxSparseError) as e:
        check_outputs(["m.onnx", "calib.npz"], outputs, output_model=outputs[0][1])
    assert str(e.value).startswith(expect), str(e.value)


def test_output_model_data_file_must_not_be_an_input(tmp_path: Path) -> None:
    src = _external_model(tmp_path, location="o.onnx.data")  # the input keeps its weights where o.onnx's would go
    with pytest.raises(OnnxSparseError, match=r"would write o\.onnx\.data, which is the external-data file"):
        check_outputs([src], [("-o", tmp_path / "o.onnx")], output_model=tmp_path / "o.onnx")


def test_links_are_the_same_file(tmp_path: Path) -> None:
    src = _external_model(tmp_path)
    os.link(tmp_path / "m.onnx.data", tmp_path / "hard.bin")
    (tmp_path / "soft.onnx").symlink_to(src)
    for name in ("hard.bin", "soft.onnx"):
        with pytest.raises(OnnxSparseError, match=f"-o '{tmp_path / name}': is the"):
            check_outputs([src], [("-o", tmp_path / name)], output_model=tmp_path / name)
    (tmp_path / "sub").mkdir()
    via_dotdot = tmp_path / "sub" / ".." / "m.onnx"
    with pytest.raises(OnnxSparseError, match="is the input"):
        check_outputs([src], [("--json", via_dotdot)])


def test_distinct_paths_pass_and_none_or_stdout_are_skipped(tmp_path: Path) -> None:
    src = _external_model(tmp_path)
    check_outputs(
        [src, None],
        [("-o", tmp_path / "o.onnx"), ("--json", "-"), ("--json", None), ("masks", tmp_path / "masks.npz")],
        output_model=tmp_path / "o.onnx",
    )
    assert data_file(tmp_path / "o.onnx") == tmp_path / "o.onnx.data"


def test_folder_inputs_bring_their_files(tmp_path: Path) -> None:
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "a.npy").write_bytes(b"x")
    with pytest.raises(OnnxSparseError, match="is the input"):
        check_outputs([calib], [("--json", calib / "a.npy")])
    check_outputs([calib], [("--json", calib / "b.json")])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OnnxSparseError, match="is not writable"):
            check_outputs([], [("--json", ro / "r.json")])
    finally:
        ro.chmod(0o700)


def test_write_text_names_the_user_path_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(OnnxSparseError) as e:
        write_text(tmp_path / "missing" / "r.json", "{}", flag="--json")
    assert str(e.value).startswith(f"--json '{tmp_path / 'missing' / 'r.json'}': cannot write")
    assert ".tmp" not in str(e.value)
    write_text(tmp_path / "s.sh", "echo\n", executable=True)
    assert os.access(tmp_path / "s.sh", os.X_OK) and os.listdir(tmp_path) == ["s.sh"]
