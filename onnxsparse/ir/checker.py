"""``onnx.checker`` on an in-memory model whose tensors live in files, without changing the working directory.

The checker resolves external-data locations against the folder of the model *file* it is given (for an
in-memory proto: the process's working directory), and it only checks that each location is a relative path
to a regular file — it never reads the bytes. So the proto (small: its weights are external) is written into
a temporary folder next to an empty stand-in file per data file, with the locations pointing at the stand-ins
for the duration, and the checker is given that path. Why not ``os.chdir`` into the model's folder (what this
replaced): the working directory is process-wide state, wrong for a library called from threads, and edited
tensors live in scratch files at absolute paths the checker refuses anyway.

Why not onnx-ir's ``CheckerPass``: it checks a different model. To keep large weights out of the C API it
moves every initializer into the graph inputs and drops every initializer over 1 KB
(``passes/common/_c_api_utils.call_onnx_api``), so the external-data locations of the weights — the part
that goes wrong when a tool writes ``-o m.onnx.data`` or a scratch path — are not checked, and neither is
the model as it will be saved (its initializers are not inputs). This checks the proto as it is.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

from onnxsparse.ir.graph import iter_graphs
from onnxsparse.ir.tensors import TensorHome, external_path


def check_proto(proto: onnx.ModelProto, home: TensorHome | None, *, full_check: bool) -> None:
    """Run the checker on ``proto``; external tensors are resolved against ``home`` (its folder, or its scratch files).

    Raises the checker's own exceptions (``ValidationError``, ``InferenceError``); callers word them.
    """
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(proto))
    if not external:
        onnx.checker.check_model(proto, full_check=full_check)
        return
    with stand_ins(proto, home) as folder:
        path = folder / "model.onnx"
        path.write_bytes(proto.SerializeToString())
        onnx.checker.check_model(str(path), full_check=full_check)


@contextlib.contextmanager
def stand_ins(proto: onnx.ModelProto, home: TensorHome | None) -> Iterator[Path]:
    """A temporary folder holding an empty file for every data file ``proto`` reads, locations pointing there.

    ``external_path`` verifies each real file exists first (the checker would only see the stand-in). The
    locations are restored on exit.
    """
    folder = Path(tempfile.mkdtemp(prefix="onnxsparse-check-"))
    links: dict[Path, str] = {}
    saved: list[tuple[onnx.StringStringEntryProto, str]] = []
    try:
        for t in _tensors(proto):
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            target = external_path(t, home)
            if target not in links:
                links[target] = f"d{len(links)}.bin"
                (folder / links[target]).touch()
            for entry in t.external_data:
                if entry.key == "location":
                    saved.append((entry, entry.value))
                    entry.value = links[target]
        yield folder
    finally:
        for entry, value in saved:
            entry.value = value
        shutil.rmtree(folder, ignore_errors=True)


def _tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor that may hold external data: initializers and tensor attributes, subgraphs included."""
    for g in iter_graphs(proto.graph):
        yield from g.initializer
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors
