"""The kinds of model the Python API accepts, converted to onnxsparse's ``Model`` at the edge and back.

``Pipeline.run`` takes a path, an ``onnx.ModelProto``, an onnxsparse ``Model``, an ``onnx_ir.Model`` or an
``onnx_graphsurgeon.Graph`` and its result holds the same kind it was given (``to_model`` returns the model to
run the passes on and the function that turns the result back). Passes only ever see a ``Model``.

What each kind gets back, and why:

* ``Model`` — a ``Model``: the same object when every pass is in place (``Pass.in_place``).
* a path (``str`` / ``os.PathLike``) — a ``Model`` loaded by ``load_model`` (external data memory-mapped, not
  read). Not a path: returning one would mean writing a file the caller did not name; save the result with
  ``model_io.save_model``.
* ``onnx.ModelProto`` — a ``ModelProto``. The given proto is wrapped, not copied, so passes edit it in place
  where they can; use the one in the result (a pass may replace it, e.g. an opset conversion). Tensors that a
  pass moved to onnxsparse's scratch files (edited external tensors, see ``tensors``) are brought inline, so
  the proto never points at a file that disappears when the process exits. A proto's own external tensors
  cannot be read (a proto has no folder): load such a model by path instead.
* ``onnx_ir.Model`` — a new ``onnx_ir.Model`` (``serde.deserialize_model`` of the result). Inline tensors
  are wrapped (``TensorProtoTensor``), not copied; external tensors stay ``ExternalTensor``\\ s pointing at
  their files, including onnxsparse's scratch files for edited ones (memory-mapped on use). The scratch files
  belong to the ``Model``'s ``SpillStore``, which the returned model keeps in its ``meta`` (so they live as long
  as it does, and a later ``Pipeline.run`` on it may read them again); ``onnx_ir.save`` it to keep the result.
  Going in, ``serde.serialize_model``
  copies inline tensors' bytes once into the proto (``TensorProtoTensor.raw`` by ``CopyFrom``, others by
  ``tobytes``) and writes an ``ExternalTensor``'s location, offset and length without reading its bytes.
  Measured (tests/ir/test_interop.py, onnx-ir 1.1.0): a model with one 256 MiB external tensor, loaded with
  ``onnx_ir.load``, converted in and out — peak RSS grows by 0.0 MB (the 256 MiB stay on disk). Floor: the
  API used here works from onnx-ir 0.1.0, but ``onnx_ir.save`` of a model one of whose external
  tensors has been read raises ``BufferError`` before 0.1.11, hence the dependency's ``onnx-ir>=0.1.11``.
* ``onnx_graphsurgeon.Graph`` (extra ``gs``) — a new ``gs.Graph`` (``gs.import_onnx`` of the result; spilled
  tensors inline as for a proto). Going in, ``gs.export_onnx`` copies initializers into the proto once.
  graphsurgeon's graph has no model metadata, so ``metadata_props`` (onnxsparse's provenance stamp) are not
  carried into the returned graph.

onnx-graphsurgeon is optional, and onnx-ir (a dependency) costs ~0.3 s to import: neither is imported here
unless the caller already has (an object of theirs can only exist once its module is loaded, so
``sys.modules`` tells us without importing) or asks for one (``to_onnx_ir``, ``to_graphsurgeon``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import onnx

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.graph import iter_graphs
from onnxsparse.ir.model_io import Model, load_model
from onnxsparse.ir.spill import SpillStore
from onnxsparse.ir.tensors import external_info, external_path, is_spilled, to_array

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs
    import onnx_ir as ir

#: everything ``Pipeline.run`` accepts
ModelLike = Union[Model, onnx.ModelProto, str, os.PathLike, "ir.Model", "gs.Graph"]
#: turns the pipeline's resulting ``Model`` back into the kind the caller gave
Back = Callable[[Model], Any]
#: ``onnx_ir.Model.meta`` key of the ``SpillStore`` whose scratch files its external tensors may point at
_STORE_KEY = "onnxsparse.spill_store"
#: an external tensor as both sides of a conversion name it: (tensor name, location, offset)
_Key = tuple[str, str, int]


def _identity(model: Model) -> Model:
    return model


def to_model(model: ModelLike) -> tuple[Model, Back]:
    """The ``Model`` to run passes on, and the function that turns the result into the caller's kind."""
    if isinstance(model, Model):
        return model, _identity
    if isinstance(model, onnx.ModelProto):
        return Model(proto=model), to_proto
    if isinstance(model, (str, os.PathLike)):
        return load_model(model), _identity
    ir_mod = sys.modules.get("onnx_ir")
    if ir_mod is not None and isinstance(model, ir_mod.Model):
        return from_onnx_ir(model), to_onnx_ir
    gs_mod = sys.modules.get("onnx_graphsurgeon")
    if gs_mod is not None and isinstance(model, gs_mod.Graph):
        return from_graphsurgeon(model), to_graphsurgeon
    raise OnnxSparseError(
        f"cannot run passes on a {type(model).__module__}.{type(model).__qualname__}: give a path, an "
        "onnx.ModelProto, an onnxsparse Model, an onnx_ir.Model or an onnx_graphsurgeon Graph"
    )


def to_proto(model: Model) -> onnx.ModelProto:
    """The model's proto, self-contained: tensors living in onnxsparse's scratch files are brought inline."""
    for graph in iter_graphs(model.proto.graph):
        for t in graph.initializer:
            if is_spilled(t, model):
                t.CopyFrom(onnx.numpy_helper.from_array(np.array(to_array(t, model)), t.name))
    return model.proto


# ------------------------------------------------------------------------------------------------ onnx-ir


def from_onnx_ir(ir_model: ir.Model) -> Model:
    """An onnxsparse ``Model`` of an ``onnx_ir.Model``; external tensors are referenced, not read.

    A ``Model`` reads external tensors relative to one folder (``base_dir``), while each ``ExternalTensor``
    carries its own; they must agree (as they do for a model from ``onnx_ir.load``), except for tensors in
    onnxsparse's own scratch files, which are kept at their absolute paths.
    """
    import onnx_ir as ir_mod

    relocate: dict[_Key, str] = {}  # tensor -> the location it gets in the proto
    bases: set[Path] = set()
    store = ir_model.meta.get(_STORE_KEY)  # the scratch files of the Model it came from (``to_onnx_ir``)
    store = store if isinstance(store, SpillStore) else SpillStore()
    for _, t, key in _ir_externals(ir_mod, ir_model):
        location = key[1]
        path = Path(os.path.abspath(t.path))
        if store.resolve(str(path)) is not None:
            relocate[key] = str(path)
        elif os.path.isabs(location) or ".." in Path(location).parts:
            relocate[key] = path.name
            bases.add(path.parent)
        else:
            bases.add(Path(os.path.abspath(t.base_dir or ".")))
    if len(bases) > 1:
        folders = ", ".join(sorted(str(b) for b in bases))
        raise OnnxSparseError(f"the onnx_ir.Model's external tensors are read from several folders ({folders})")
    proto = ir_mod.serde.serialize_model(ir_model)
    for tensor, key in _proto_externals(proto):
        if key in relocate:
            _set_location(tensor, relocate[key])
    return Model(proto=proto, base_dir=next(iter(bases), None), store=store)


def _set_location(t: onnx.TensorProto, location: str) -> None:
    for entry in t.external_data:
        if entry.key == "location":
            entry.value = location


def to_onnx_ir(model: Model) -> ir.Model:
    """An ``onnx_ir.Model`` of ``model``: inline tensors wrapped, external ones memory-mapped from their files."""
    import onnx_ir as ir_mod

    where = {key: external_path(tensor, model) for tensor, key in _proto_externals(model.proto)}
    ir_model = ir_mod.serde.deserialize_model(model.proto)
    ir_model.meta[_STORE_KEY] = model.store  # keeps the scratch files its ExternalTensors may point at
    for value, t, key in _ir_externals(ir_mod, ir_model):
        location, path = key[1], where[key]
        if model.base_dir is not None and not os.path.isabs(location) and (model.base_dir / location).resolve() == path:
            t.base_dir = str(model.base_dir)  # as onnx_ir.load would: the location stays relative
            continue
        value.const_value = ir_mod.ExternalTensor(
            path.name,
            offset=t.offset,
            length=t.length,
            dtype=t.dtype,
            shape=t.shape,
            name=t.name,
            base_dir=str(path.parent),
            doc_string=t.doc_string,
            metadata_props=dict(t.metadata_props) or None,
        )
    return ir_model


def _proto_externals(proto: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, _Key]]:
    """Every external initializer of every graph of ``proto``, with its key."""
    for graph in iter_graphs(proto.graph):
        for t in graph.initializer:
            info = external_info(t)
            if info is not None:
                yield t, (t.name, info.get("location", ""), int(info.get("offset", 0)))


def _ir_externals(ir_mod: Any, ir_model: ir.Model) -> Iterator[tuple[ir.Value, ir.ExternalTensor, _Key]]:
    """Every initializer of every graph of ``ir_model`` held as an ``ExternalTensor``, with its key (the same
    key ``_proto_externals`` gives the tensor in the serialized proto)."""
    for graph in ir_model.graphs():
        for value in graph.initializers.values():
            t = value.const_value
            if isinstance(t, ir_mod.ExternalTensor):
                yield value, t, (value.name or "", os.fspath(t.location), int(t.offset or 0))


# --------------------------------------------------------------------------------------- onnx-graphsurgeon


def _import_graphsurgeon() -> Any:
    try:
        import onnx_graphsurgeon
    except ImportError as e:
        raise OnnxSparseError(
            "onnx_graphsurgeon.Graph output needs onnx-graphsurgeon: pip install 'onnxsparse[gs]'"
        ) from e
    return onnx_graphsurgeon


def from_graphsurgeon(graph: gs.Graph) -> Model:
    """An onnxsparse ``Model`` of a graphsurgeon graph (``gs.export_onnx``; initializers copied once)."""
    return Model(proto=_import_graphsurgeon().export_onnx(graph))


def to_graphsurgeon(model: Model) -> gs.Graph:
    """A graphsurgeon graph of ``model`` (``gs.import_onnx``; scratch-file tensors inline as in ``to_proto``)."""
    return _import_graphsurgeon().import_onnx(to_proto(model))
