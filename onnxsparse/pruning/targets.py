"""The stored weights the ``prune`` pass edits: layers grouped by weight, other readers, magnitude n:m, masks.

A weight can be read by several layers (a shared tensor) or by nodes that are no layer (it would change under
them): ``group_targets`` and ``foreign_reader`` find both before anything is pruned. ``magnitude_nm`` prunes one
stored tensor in place (large external weights in slabs, ``onnxsparse.ir.stream``). The masks .npz (True = may be
non-zero) is what ``prune{masks=PATH}`` writes and the fine-tune hook reads. Kept apart from ``passes/prune.py``
so that the pass module is its options and the per-layer loop.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.layers import Layer
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.reasons import render
from onnxsparse.ir.stream import prune_tensor, streamable
from onnxsparse.ir.tensors import set_array
from onnxsparse.pass_base import PassReport
from onnxsparse.pruning.layout import problems
from onnxsparse.sparsity import StoredWeight, check_finite, count_violations, nm_keep


@dataclass
class Target:
    """One stored tensor and the layers that read it (several when a weight is shared)."""

    #: ``Source.key`` of the stored tensor: (graph key, kind, name)
    key: tuple[str, str, str]
    layers: list[Layer]

    @property
    def name(self) -> str:
        """The stored tensor's name."""
        return self.key[2]


def magnitude_nm(
    sw: StoredWeight, model: Model, n: int, m: int, old: np.ndarray | None
) -> tuple[int, int, np.ndarray, int, int]:
    """Magnitude n:m of one stored tensor: (violating groups before, groups, mask, non-zeros before, after)."""
    if streamable(sw.tensor, sw.values, sw.scale, sw.zp):
        # A large external weight: pruned in slabs straight into a scratch file (onnxsparse.ir.stream).
        st = prune_tensor(sw.tensor, model, sw.axis, n, m, prefer=old)
        assert st.mask is not None
        return st.violations, st.groups, st.mask, st.nonzero_before, st.nonzero_after
    check_finite(sw)
    nonzero = sw.nonzero()
    bad, groups = count_violations(nonzero, sw.axis, n, m)
    mask = np.ascontiguousarray(nonzero)
    nz_before = nz_after = int(np.count_nonzero(nonzero))
    if bad:
        prefer = nonzero if old is None else nonzero & old
        keep = nm_keep(sw.magnitude(), sw.axis, n, m, prefer=prefer)
        set_array(sw.tensor, sw.pruned(keep), model)
        mask = keep & nonzero
        nz_after = int(np.count_nonzero(mask))
    return bad, groups, mask, nz_before, nz_after


def calibration_note(target: Target, method: str) -> str | None:
    """Why a layer cannot get ``method`` (it gets magnitude instead); None when it can."""
    if len(target.layers) > 1:
        return f"weight shared by {len(target.layers)} layers: magnitude instead of {method}"
    layer = target.layers[0]
    why = problems(layer)
    if isinstance(why, str):
        return f"{why}: magnitude instead of {method}"
    return None


def group_targets(layers: list[Layer], report: PassReport) -> list[Target]:
    """Layers grouped by the stored tensor they read; layers without a constant weight are reported here."""
    by_key: dict[tuple[str, str, str], Target] = {}
    for layer in layers:
        if layer.source is None:
            report.skip(layer.name, render(layer.reason, "no constant weight"), op=layer.op_type, weight=None)
            continue
        key = layer.source.key
        by_key.setdefault(key, Target(key, [])).layers.append(layer)
    return list(by_key.values())


def weight_readers(proto: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Name → nodes reading it (any graph); graph outputs count as a reader with op ``<output>``."""
    from onnxsparse.ir.graph import iter_graphs

    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for g in iter_graphs(proto.graph):
        for node in g.node:
            for name in node.input:
                if name:
                    out[name].append(node)
        for o in g.output:
            out[o.name].append(
                onnx.helper.make_node("Identity", [o.name], [], name=f"graph output {o.name}", domain="<output>")
            )
    return out


def foreign_reader(target: Target, readers: dict[str, list[onnx.NodeProto]]) -> str | None:
    """A node other than the layers and their weight chains that reads the weight (it would change too)."""
    ours = {tuple(layer.node.output) for layer in target.layers}
    ours |= {tuple(n.output) for layer in target.layers for n in layer.chain}
    names = {target.name} | {o for layer in target.layers for n in layer.chain for o in n.output}
    for name in sorted(names):
        for node in readers.get(name, []):
            if tuple(node.output) not in ours:
                what = node.name if node.domain == "<output>" else f"{node.op_type} '{node.name or node.output[0]}'"
                return f"weight '{target.name}' also feeds {what}, which pruning would change"
    return None


def write_masks(path: Path, masks: dict[str, np.ndarray]) -> None:
    """Write the masks atomically (no half-written file if anything fails)."""
    if path.suffix != ".npz":
        raise OnnxSparseError(f"prune: masks path '{path}' must end in .npz")
    if not path.parent.exists():
        raise OnnxSparseError(f"prune: folder of masks path '{path}' does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **masks)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_masks(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Masks from an ``.npz`` written by ``prune{masks=PATH}``: initializer name → bool array, True = kept.

    The one reader, for the fine-tune hook as well: a missing file, a file that is not an .npz of arrays, or
    one with no masks is a one-line error.
    """
    p = Path(path)
    if not p.is_file():
        raise OnnxSparseError(f"no such masks file: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            masks = {k: np.asarray(z[k]).astype(bool) for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise OnnxSparseError(f"{p} is not a masks .npz ({e})") from e
    if not masks:
        raise OnnxSparseError(f"{p} holds no masks")
    return masks
