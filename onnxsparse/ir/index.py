"""One weighted-layer index per model state: ``find_layers`` runs once, every pass and module reads it.

``find_layers`` walks every graph, follows each weight's chain and maps its axes; a fine-tune used to run it up
to five times on an unchanged graph (mask partitioning, trainable sets, QAT, the pass itself). The
``LayerCache`` held by each ``Model`` (``model.layer_cache``) keeps the ``LayerIndex`` built for the model's
current proto and each set of shapes asked for, so a second question costs a lookup.

When it goes stale: the layers hold the proto's nodes and tensors, so a pass that rewires the graph
(gemm-to-conv, qdq, to-fp16) makes them wrong. ``Pipeline.run`` therefore invalidates the cache after every
pass that reports ``modified`` unless the pass declares ``values_only`` (prune writes weight values in place:
the same nodes, the same tensors, the same axes), and after its final cleanup/toposort (they copy nodes and
initializers). Code that edits the graph outside a pipeline calls ``model.layer_cache.invalidate()``. As a
safety net an entry is also dropped when the proto object, or the node/initializer count of its main graph,
differs from when it was built.

The layers are shared between callers: treat them as read-only (the lists handed out are copies).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import onnx

from onnxsparse.ir.layers import Layer, find_layers
from onnxsparse.ir.shapes import Shape


def _fingerprint(proto: onnx.ModelProto) -> tuple[int, int]:
    """A cheap structural check: main-graph node and initializer counts (O(1) on protobuf)."""
    return len(proto.graph.node), len(proto.graph.initializer)


@dataclass
class LayerIndex:
    """The weighted layers of one proto as ``find_layers(proto, shapes)`` found them, with name lookups."""

    proto: onnx.ModelProto
    shapes: dict[str, Shape] | None
    layers: list[Layer]
    fingerprint: tuple[int, int]
    _by_name: dict[str, Layer] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for layer in self.layers:
            self._by_name.setdefault(layer.name, layer)  # a duplicated name keeps its first layer

    def get(self, name: str) -> Layer | None:
        """The (first) layer called ``name``, or None."""
        return self._by_name.get(name)

    def fresh(self, proto: onnx.ModelProto) -> bool:
        """Whether this index still describes ``proto`` (same object, same main-graph counts)."""
        return proto is self.proto and _fingerprint(proto) == self.fingerprint


class LayerCache:
    """The ``LayerIndex`` of a model's current state, one per set of shapes; ``builds`` counts the walks."""

    def __init__(self) -> None:
        self._entries: list[LayerIndex] = []
        self.builds = 0

    def index(self, proto: onnx.ModelProto, shapes: Mapping[str, Shape] | None = None) -> LayerIndex:
        """The index of ``proto`` for ``shapes``, built on the first request after a change."""
        wanted = None if shapes is None else dict(shapes)
        self._entries = [e for e in self._entries if e.fresh(proto)]
        for entry in self._entries:
            if entry.shapes == wanted:
                return entry
        self.builds += 1
        entry = LayerIndex(proto, wanted, find_layers(proto, wanted), _fingerprint(proto))
        self._entries.append(entry)
        return entry

    def invalidate(self) -> None:
        """Forget every index: the graph structure changed (nodes rewired, added, removed or copied)."""
        self._entries.clear()

    def __getstate__(self) -> dict[str, object]:
        """A pickled model (sent to a worker process) travels without its index: it is rebuilt there if asked."""
        return {"_entries": [], "builds": 0}

    def __repr__(self) -> str:
        return f"LayerCache({len(self._entries)} index(es), {self.builds} build(s))"


class HasLayerCache(Protocol):
    """What the index needs of a model: its proto and its cache. ``model_io.Model`` is one; written as a
    protocol so that this module does not import ``model_io`` (which imports it for ``LayerCache``)."""

    @property
    def proto(self) -> onnx.ModelProto: ...

    @property
    def layer_cache(self) -> LayerCache: ...


def layer_index(model: HasLayerCache, shapes: Mapping[str, Shape] | None = None) -> LayerIndex:
    """The model's weighted-layer index for ``shapes`` (None: no inferred shapes), built once per state."""
    return model.layer_cache.index(model.proto, shapes)


def model_layers(model: HasLayerCache, shapes: Mapping[str, Shape] | None = None) -> list[Layer]:
    """``find_layers(model.proto, shapes)`` through the model's cache (a new list; the layers are shared)."""
    return list(layer_index(model, shapes).layers)
