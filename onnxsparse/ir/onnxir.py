"""A pass's view of a ``Model`` as an ``onnx_ir.Model``, written back into the same ``ModelProto``.

Graph-rewriting passes (``to-fp16``, ``gemm-to-conv``) work on onnx-ir: ``Value.producer()`` /
``Value.uses()`` instead of hand-built producer and reader maps, nodes and values that stay the same objects
while the pass rewrites around them, subgraph captures as real references. The weights stay where they are:

* ``IrView.of(model)`` deserialises the proto (``onnx_ir.serde.deserialize_model``: nodes and values are
  built, inline tensors are wrapped, not copied) and then swaps every initializer — in every graph — and every
  external attribute tensor for a ``ModelTensor``: dtype and shape from the proto, values read on first use
  through the model's own store (``tensors.to_array``: memory-mapped for external, lazily loaded and spilled
  tensors). onnx-ir's own ``ExternalTensor`` cannot stand in for these: it drops the keys onnxsparse keeps in
  ``external_data`` (``onnxsparse.inline`` for weights that are still in the model file, the spill store's
  locations), so a round trip through it would point tensors at the wrong bytes.
* ``IrView.commit()`` serialises the rewritten graph (``serialize_model``: a ``ModelTensor`` is an
  ``ExternalTensor`` to it, so only a placeholder location is written, never its bytes) and writes it back
  into ``model.proto`` in place. Main-graph initializers the pass kept are the very ``TensorProto`` objects
  they were (not copied: with an eagerly loaded model they hold the weights' bytes), renamed if the pass
  renamed them; tensors the pass made are appended. ``new_tensor`` makes one the same way (stored, spilled
  when large), so a pass that writes weights does not copy them either.

Why not run every pass on onnx-ir: the ``>2 GB`` load → prune → validate → save path needs ≥ 0.5 GB/s and
peak RSS ≤ 1.3 × (largest tensor + proto); onnx-ir measured 0.12–0.15 GB/s and 1.6–12 × that RSS on the
2.4 GB bench model (``tools/bench_onnx_ir.py``, ``tools/results/bench_onnx_ir.json``), so ``prune`` and
``validate`` stay on the protobuf fast path (``ir.stream``, ``ir.spill``) below the IR.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, numpy_helper

from onnxsparse.ir.graph import copy_fields, iter_graphs
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.tensors import external_info, inline_origin, mark_inline_origin, set_array, to_array

#: placeholder location a ``ModelTensor`` is serialised with; the index after it names the kept tensor
_KEPT = "onnxsparse-kept:"


class ModelTensor(ir.ExternalTensor):
    """An onnx-ir tensor over a ``TensorProto`` of a ``Model``: values read through the model's store.

    It subclasses ``ExternalTensor`` only so that ``serialize_model`` writes its metadata and never its bytes;
    its values come from ``tensors.to_array`` (the model's folder, inline-origin and spilled tensors), not
    from a file path of onnx-ir's.
    """

    __slots__ = ("_home", "_index", "_proto")

    def __init__(self, proto: TensorProto, home: Model, index: int) -> None:
        super().__init__(
            f"{_KEPT}{index}",
            offset=None,
            length=None,
            dtype=ir.DataType(proto.data_type),
            shape=ir.Shape(list(proto.dims)),
            name=proto.name,
        )
        self._proto = proto
        self._home = home
        self._index = index

    @property
    def proto(self) -> TensorProto:
        """The model's own tensor this one stands for."""
        return self._proto

    def _load(self) -> None:
        self._array = np.asarray(to_array(self._proto, self._home))

    def tobytes(self) -> bytes:
        return bytes(np.ascontiguousarray(self.numpy()).tobytes())

    def tofile(self, file: Any) -> None:
        file.write(self.tobytes())


@dataclass
class IrView:
    """``model`` seen as ``ir``; ``commit()`` writes the rewritten graph back into ``model.proto``."""

    model: Model
    ir: ir.Model
    kept: list[TensorProto] = field(default_factory=list)
    #: kept index → position in the main graph's initializer list, for the tensors that came from there
    main_position: dict[int, int] = field(default_factory=dict)
    #: names the model's value_info described before; onnx-ir writes one for every initializer too
    typed: set[str] = field(default_factory=set)
    #: whether some tensor of the model is stored outside the proto (then new ones are stored so too)
    external: bool | None = None
    #: whether one of those is in a data file, not only external in memory (``tensors.inline_origin``)
    in_file: bool = False

    @classmethod
    def of(cls, model: Model) -> IrView:
        with warnings.catch_warnings():
            # onnx warns of the keys it does not know in external_data (``onnxsparse.inline``); those tensors
            # are swapped for ModelTensors below, which keep the keys.
            warnings.filterwarnings("ignore", message="Ignoring unknown external data key")
            view = cls(model, ir.serde.deserialize_model(model.proto))
        view.typed = {v.name for g in iter_graphs(model.proto.graph) for v in g.value_info}
        ir_graphs = [view.ir.graph, *view.ir.graph.subgraphs()]  # parents first, nodes and attributes in order
        pairs = list(zip(iter_graphs(model.proto.graph), ir_graphs, strict=True))
        for graph_number, (proto_graph, ir_graph) in enumerate(pairs):
            for position, t in enumerate(proto_graph.initializer):
                value = ir_graph.initializers[t.name]
                value.const_value = view._wrap(t)
                if graph_number == 0:
                    view.main_position[len(view.kept) - 1] = position
            for pnode, inode in zip(proto_graph.node, ir_graph, strict=True):
                for a in pnode.attribute:
                    if a.type == AttributeProto.TENSOR and external_info(a.t) is not None:
                        inode.attributes[a.name] = ir.AttrTensor(a.name, view._wrap(a.t))
        return view

    def _wrap(self, t: TensorProto) -> ModelTensor:
        self.kept.append(t)
        return ModelTensor(t, self.model, len(self.kept) - 1)

    def new_tensor(self, array: np.ndarray, name: str) -> ModelTensor:
        """A tensor the pass makes, stored like the model's own (a large one goes to the spill store)."""
        t = numpy_helper.from_array(np.ascontiguousarray(array), name)
        if self.external is None:  # asked once: the tensors made here are external only where one was before
            stored = [k for k in self.kept if external_info(k) is not None]
            self.external = bool(stored)
            self.in_file = not stored or any(not inline_origin(k) for k in stored)
        if self.external:
            set_array(t, array, self.model, spill=array.nbytes >= 1024)
            if not self.in_file and external_info(t) is not None:
                mark_inline_origin(t)  # a lazily loaded inline model: spilled in memory, saved inline again
        return self._wrap(t)

    def commit(self) -> None:
        """Write the rewritten graph into ``model.proto`` (the same object; kept weights not copied)."""
        new = ir.serde.serialize_model(self.ir)
        for g in iter_graphs(new.graph):
            weights = {t.name for t in g.initializer}
            infos = [v for v in g.value_info if v.name not in weights or v.name in self.typed]
            if len(infos) != len(g.value_info):
                del g.value_info[:]
                g.value_info.extend(infos)
            for t in g.initializer:
                if g is not new.graph:
                    self._resolve(t)
            for node in g.node:
                for a in node.attribute:
                    if a.type == AttributeProto.TENSOR:
                        self._resolve(a.t)
        old = self.model.proto
        kept_main: dict[int, str] = {}  # position in the old main graph's initializers → the tensor's name now
        fresh: list[TensorProto] = []
        for t in new.graph.initializer:
            index = _kept_index(t)
            if index is not None and index in self.main_position:
                kept_main[self.main_position[index]] = t.name
            else:
                fresh.append(t)
        for i in range(len(old.graph.initializer) - 1, -1, -1):
            if i not in kept_main:
                del old.graph.initializer[i]
            elif old.graph.initializer[i].name != kept_main[i]:
                old.graph.initializer[i].name = kept_main[i]
        _replace_fields(old.graph, new.graph, skip={"initializer"})
        for t in fresh:  # one copy of a new tensor's bytes: from its own proto, not through the placeholder
            index = _kept_index(t)
            added = old.graph.initializer.add()
            added.CopyFrom(t if index is None else self.kept[index])
            added.name = t.name
        _replace_fields(old, new, skip={"graph"})

    def _resolve(self, t: TensorProto) -> None:
        """Put a kept tensor's proto (its data and external keys) in place of its placeholder, name kept."""
        index = _kept_index(t)
        if index is None:
            return
        name = t.name
        t.CopyFrom(self.kept[index])
        t.name = name


def _kept_index(t: TensorProto) -> int | None:
    if t.data_location != TensorProto.EXTERNAL:
        return None
    for e in t.external_data:
        if e.key == "location" and e.value.startswith(_KEPT):
            return int(e.value[len(_KEPT) :])
    return None


# ------------------------------------------------------------------------------ rewriting helpers for passes


def add_initializer(graph: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
    """``tensor`` as a new initializer of ``graph``, named like the tensor (a name ``NameGen`` made: unique)."""
    value = ir.Value(
        name=tensor.name,
        shape=tensor.shape,  # type: ignore[arg-type]  # frozen; shared as onnx-ir's LiftConstantsToInitializers does
        type=ir.TensorType(tensor.dtype),
        const_value=tensor,
    )
    graph.register_initializer(value)
    return value


def insert_after_definition(graph: ir.Graph, value: ir.Value, nodes: Sequence[ir.Node]) -> None:
    """Put ``nodes`` (which read ``value``) right after ``value``'s producer in ``graph``, or first in ``graph``
    for a graph input, an initializer or an outer value: the graph stays in order without a sort."""
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, nodes)
    elif len(graph):
        graph.insert_before(next(iter(graph)), nodes)
    else:
        for node in nodes:
            graph.append(node)


def drop_if_unread(value: ir.Value) -> None:
    """Remove a weight (initializer or Constant node) a rewrite replaced, once nothing reads it any more (as
    the pipeline's final cleanup would): a pass run alone does not leave both copies in the model."""
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    producer = value.producer()
    if value.is_initializer() and value.graph is not None and value.name is not None:
        value.graph.initializers.pop(value.name)
    elif producer is not None and producer.op_type == "Constant" and producer.graph is not None:
        producer.graph.remove(producer, safe=True)


def _replace_fields(dst: ModelProto | GraphProto, src: ModelProto | GraphProto, skip: set[str]) -> None:
    """Make every field of ``dst`` but ``skip`` equal to ``src``'s (proto2: scalars keep their presence)."""
    for fd in dst.DESCRIPTOR.fields:
        if fd.name not in skip:
            dst.ClearField(fd.name)
    copy_fields(dst, src, skip)
