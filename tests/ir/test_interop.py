"""``Pipeline.run`` on every model kind of the Python API: a path, ``onnx.ModelProto``, onnxsparse ``Model``,
``onnx_ir.Model`` and ``onnx_graphsurgeon.Graph`` (``onnxsparse.ir.interop``). Each gives back its own kind, with
the same weights and ORT outputs as the run on a ``Model``, passing the full checker; external tensors stay
memory-mapped through onnx-ir."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
import pytest
from builders import external_mlp
from conftest import fixture_path, make_feeds, run_ort

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir import interop
from onnxsparse.ir.model_io import Model, load_model, ort_session
from onnxsparse.ir.tensors import external_info
from onnxsparse.pipeline import PassContext, Pipeline

PIPELINE = "prune,validate"


def _as_proto(result: Any) -> onnx.ModelProto:
    """The result of any kind as a ModelProto (for ORT and the checker)."""
    if isinstance(result, Model):
        return result.proto
    if isinstance(result, ir.Model):
        return ir.serde.serialize_model(result)
    if isinstance(result, gs.Graph):
        return gs.export_onnx(result)
    assert isinstance(result, onnx.ModelProto)
    return result


def _weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


#: input kind -> (make the input from the fixture's path, the kind the result must be)
KINDS: dict[str, tuple[Callable[[Path], Any], type]] = {
    "str": (lambda p: str(p), Model),
    "pathlike": (lambda p: p, Model),
    "modelproto": (lambda p: onnx.load(str(p)), onnx.ModelProto),
    "model": (load_model, Model),
    "onnx_ir": (lambda p: ir.load(str(p)), ir.Model),
    "graphsurgeon": (lambda p: gs.import_onnx(onnx.load(str(p))), gs.Graph),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_runs_and_comes_back_as_itself(kind: str, tmp_path: Path) -> None:
    path = fixture_path("cnn")
    make, out_type = KINDS[kind]
    reference = Pipeline(PIPELINE).run(load_model(path), PassContext())
    result = Pipeline(PIPELINE).run(make(path), PassContext())

    assert type(result.model) is out_type
    assert [r.name for r in result.results] == ["prune", "validate"]
    assert len(result.results[0].report.changed) == len(reference.results[0].report.changed) > 0
    assert result.results[1].report.details["summary"] == reference.results[1].report.details["summary"]
    proto = _as_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    ours, ref = _weights(proto), _weights(reference.model.proto)
    assert ours.keys() == ref.keys()
    for name, values in ref.items():
        np.testing.assert_array_equal(ours[name], values, err_msg=name)
    for seed in range(3):
        feeds = make_feeds(path, seed=seed)
        for a, b in zip(run_ort(proto, feeds), run_ort(reference.model, feeds), strict=True):
            np.testing.assert_array_equal(a, b)
    dense = run_ort(path, make_feeds(path))[0]
    assert not np.array_equal(run_ort(proto, make_feeds(path))[0], dense)  # it was pruned


def test_model_in_is_the_same_model_out() -> None:
    model = load_model(fixture_path("cnn"))
    assert Pipeline(PIPELINE).run(model, PassContext()).model is model


def test_unknown_kind_is_one_line_error() -> None:
    with pytest.raises(OnnxSparseError, match=r"cannot run passes on a builtins\.bytes") as e:
        Pipeline(PIPELINE).run(b"not a model", PassContext())  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def test_missing_path_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(OnnxSparseError, match="no such file"):
        Pipeline(PIPELINE).run(tmp_path / "nope.onnx", PassContext())


def test_external_data_through_onnx_ir_stays_memory_mapped(tmp_path: Path) -> None:
    path = external_mlp(tmp_path / "in")
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    reference = Pipeline(PIPELINE).run(load_model(path), PassContext())
    expected = run_ort(reference.model, {"x": x})[0]

    given = ir.load(str(path))
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in given.graph.initializers.values())
    result = Pipeline(PIPELINE).run(given, PassContext())
    out = result.model
    assert isinstance(out, ir.Model) and out is not given
    tensors = [v.const_value for v in out.graph.initializers.values()]
    assert len(tensors) == 3 and all(isinstance(t, ir.ExternalTensor) for t in tensors)
    for t in tensors:
        assert isinstance(t, ir.ExternalTensor)
        assert Path(t.path).is_file()
        values = t.numpy()
        assert isinstance(t.raw, mmap.mmap)  # read through a memory map of its file, not loaded
        assert (np.count_nonzero(values.reshape(-1, 4, values.shape[-1]), axis=1) <= 2).all()  # 2:4 along K
    # onnx-ir saves it (reading each tensor from its file) and ORT gives what the Model run gave
    saved = tmp_path / "out" / "pruned.onnx"
    saved.parent.mkdir()
    ir.save(out, str(saved), external_data="pruned.onnx.data")
    onnx.checker.check_model(str(saved), full_check=True)
    np.testing.assert_array_equal(run_ort(saved, {"x": x})[0], expected)
    # and back in: edited tensors (in onnxsparse's scratch files) are read where they are
    again = Pipeline("validate{require-all=true}").run(out, PassContext())
    assert again.results[0].report.details["summary"]["sparse"] == 3


def test_proto_out_is_self_contained(tmp_path: Path) -> None:
    """Tensors a pass spilled to scratch files come back inline in a ModelProto (they vanish at exit)."""
    path = external_mlp(tmp_path / "in")
    model = load_model(path)
    result = Pipeline(PIPELINE).run(model, PassContext())
    assert any(external_info(t) is not None for t in result.model.proto.graph.initializer)
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    # (not conftest.run_ort: its save would turn the scratch pack into a temporary file, gone afterwards)
    expected = ort_session(result.model).run(None, {"x": x})[0]
    proto = interop.to_proto(result.model)
    assert all(external_info(t) is None for t in proto.graph.initializer)
    onnx.checker.check_model(proto, full_check=True)
    np.testing.assert_array_equal(run_ort(proto, {"x": x})[0], expected)


def test_onnx_ir_tensors_from_several_folders_are_refused(tmp_path: Path) -> None:
    a, b = ir.load(str(external_mlp(tmp_path / "a"))), ir.load(str(external_mlp(tmp_path / "b")))
    value = a.graph.initializers["w1"]
    value.const_value = b.graph.initializers["w1"].const_value
    with pytest.raises(OnnxSparseError, match="several folders"):
        Pipeline(PIPELINE).run(a, PassContext())


def test_onnx_ir_in_memory_tensors_run(tmp_path: Path) -> None:
    """An onnx_ir.Model built in memory (numpy-backed ``ir.Tensor``\\ s, no file) runs too."""
    given = ir.serde.deserialize_model(onnx.load(str(fixture_path("cnn"))))
    for value in given.graph.initializers.values():
        assert value.const_value is not None
        value.const_value = ir.Tensor(np.array(value.const_value.numpy()), name=value.name)
    result = Pipeline(PIPELINE).run(given, PassContext())
    assert isinstance(result.model, ir.Model)
    reference = Pipeline(PIPELINE).run(load_model(fixture_path("cnn")), PassContext())
    feeds = make_feeds(fixture_path("cnn"))
    np.testing.assert_array_equal(run_ort(_as_proto(result.model), feeds)[0], run_ort(reference.model, feeds)[0])


_RSS_PROBE = r"""
import os, sys
from pathlib import Path
import numpy as np, onnx, onnx_ir as ir
from onnx import TensorProto, helper
from onnxsparse.ir import interop

def rss_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

folder = Path(sys.argv[1])
k = 8192  # 8192 x 8192 fp32 = 256 MiB
with open(folder / "big.onnx.data", "wb") as f:
    row = np.zeros((64, k), np.float32)
    for i in range(k // 64):
        row[:] = i
        f.write(row.tobytes())
t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[k, k], data_location=TensorProto.EXTERNAL)
for key, value in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(k * k * 4))):
    e = t.external_data.add(); e.key, e.value = key, value
graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k])], [t])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "big.onnx"))
given = ir.load(str(folder / "big.onnx"))
before = rss_mb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
model, back = interop.to_model(given)
out = back(model)
assert isinstance(out.graph.initializers["w"].const_value, ir.ExternalTensor)
print(rss_mb("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_onnx_ir_conversion_does_not_read_a_256_mib_external_tensor(tmp_path: Path) -> None:
    """The number in interop's docstring: onnx_ir.Model -> Model -> onnx_ir.Model with one 256 MiB external
    tensor grows peak RSS by (nearly) nothing — serialize/deserialize keep external tensors as references."""
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    grew_mb = float(proc.stdout.strip().splitlines()[-1])
    assert grew_mb < 16, f"converting grew peak RSS by {grew_mb:.1f} MB (a 256 MiB tensor was read?)"
