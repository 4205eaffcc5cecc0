"""``SpillStore``: each model's scratch files are its own, live as long as the model (or the models sharing
its store), and no module holds spill state (``onnxsparse.ir.spill``)."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import external_mlp
from onnx import TensorProto

import onnxsparse
from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir import stream
from onnxsparse.ir.model_io import Model, load_model, save_model
from onnxsparse.ir.spill import SpillStore
from onnxsparse.ir.tensors import external_path, is_spilled, set_array, to_array
from onnxsparse.pipeline import PassContext, Pipeline


def _spill_first(model: Model) -> tuple[TensorProto, np.ndarray]:
    t = model.proto.graph.initializer[0]
    new = np.asarray(to_array(t, model)) * 2
    set_array(t, new, model)
    assert is_spilled(t, model)
    return t, new


def test_two_models_have_independent_stores(tmp_path: Path) -> None:
    """One model's scratch files are not readable through another (the location is refused as any absolute
    path would be), and its edits do not spoil the other's pack link at save."""
    path = external_mlp(tmp_path / "in", layers=2)
    a, b = load_model(path), load_model(path)
    assert a.store is not b.store
    t, new = _spill_first(a)
    assert a.store.folder is not None and b.store.folder is None  # b never spilled: no folder at all
    assert not is_spilled(t, b)
    stranger = onnx.TensorProto()
    stranger.CopyFrom(t)
    with pytest.raises(OnnxSparseError, match="outside the model folder"):
        to_array(stranger, b)
    _spill_first(b)  # b's pack is another file in another folder
    assert b.store.folder is not None and b.store.folder != a.store.folder
    assert external_path(b.proto.graph.initializer[0], b).parent == b.store.folder
    # a's pack holds exactly a's edit (b's went to b's pack), so a's save links it instead of copying.
    pack = external_path(t, a)
    save_model(a, tmp_path / "a.onnx")
    assert not pack.exists() and (tmp_path / "a.onnx.data").stat().st_nlink == 1
    loaded = load_model(tmp_path / "a.onnx")
    np.testing.assert_array_equal(to_array(loaded.proto.graph.initializer[0], loaded), new)


def test_derived_model_shares_the_store(tmp_path: Path) -> None:
    """A model over a copied proto passes the store on and reads the edited tensors; a model made without it
    cannot."""
    model = load_model(external_mlp(tmp_path / "in", layers=2))
    _, new = _spill_first(model)
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    derived = Model(proto, model.base_dir, model.source, store=model.store)
    np.testing.assert_array_equal(to_array(derived.proto.graph.initializer[0], derived), new)
    with pytest.raises(OnnxSparseError, match="outside the model folder"):
        to_array(proto.graph.initializer[0], Model(proto, model.base_dir))


def test_close_removes_the_folder_and_reading_says_why(tmp_path: Path) -> None:
    model = load_model(external_mlp(tmp_path / "in", layers=2))
    t, new = _spill_first(model)
    early = np.asarray(to_array(t, model))  # a memory map read before the close stays valid after it
    folder = model.store.folder
    assert folder is not None and folder.is_dir()
    model.close()
    assert not folder.exists() and model.store.closed
    np.testing.assert_array_equal(early, new)
    with pytest.raises(OnnxSparseError, match="was closed"):
        to_array(t, model)
    with pytest.raises(RuntimeError, match="closed"):
        set_array(model.proto.graph.initializer[1], np.zeros((64, 64), np.float32), model)
    model.close()  # idempotent


def test_context_manager_closes(tmp_path: Path) -> None:
    path = external_mlp(tmp_path / "in", layers=2)
    with load_model(path) as model:
        _spill_first(model)
        folder = model.store.folder
        assert folder is not None and folder.is_dir()
        save_model(model, tmp_path / "out.onnx")  # the pack became the output: it survives the close
    assert not folder.exists()
    out = load_model(tmp_path / "out.onnx")
    assert np.asarray(to_array(out.proto.graph.initializer[0], out)).any()


def test_forgotten_model_removes_its_folder_at_garbage_collection(tmp_path: Path) -> None:
    model = load_model(external_mlp(tmp_path / "in", layers=2))
    ctx = PassContext()
    Pipeline("prune,validate").run(model, ctx)  # the pruned weights go to the store's pack
    folder = model.store.folder
    assert folder is not None and any(folder.iterdir())
    del model, ctx
    gc.collect()
    assert not folder.exists()


def test_settled_pack_drops_its_written_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The n:m check prune recorded for bytes it wrote lives on the model's store, and goes once the pack
    became the saved output (then validate reads the user's file like any other)."""
    monkeypatch.setattr(stream, "STREAM_MIN_BYTES", 0)
    model = load_model(external_mlp(tmp_path / "in", layers=2))
    Pipeline("prune").run(model, PassContext())
    assert len(model.store.written) == 2
    assert all(isinstance(c, stream.WrittenCheck) for c in model.store.written.values())
    save_model(model, tmp_path / "out.onnx")
    assert not model.store.written
    result = Pipeline("validate{require-all=true}").run(model, PassContext())
    assert result.results[0].report.details["summary"]["coverage"] == 1.0


def test_store_deep_copies_to_itself() -> None:
    """A deep copy of a model points at the same scratch files, so it shares the store."""
    import copy

    model = Model(onnx.ModelProto())
    assert copy.deepcopy(model).store is model.store
    assert SpillStore().folder is None  # no folder before the first spill


def test_no_module_holds_spill_state() -> None:
    """No ``global`` statement and no exit hook anywhere in the package: state lives on objects that own it."""
    root = Path(onnxsparse.__file__).parent
    sources = [*root.rglob("*.py"), *(root.parent / "passes").rglob("*.py")]
    assert any(p.name == "spill.py" for p in sources)
    offenders = [
        f"{p}:{i}"
        for p in sources
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.match(r"\s*global\s", line) or re.search(r"\batexit\b", line)
    ]
    assert not offenders, offenders
