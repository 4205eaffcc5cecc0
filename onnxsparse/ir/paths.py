"""The one place that decides whether the paths a command will write are safe, checked before any work starts.

Every command collects the files it reads (models, calibration/training data, teachers, masks) and the files
it writes (model, JSON report, masks, scripts, engines), each output with the flag the user gave it, and
calls ``check_outputs``. It refuses — with ``<flag> '<path as the user typed it>': <why>`` — an output that is
an input, an input model's external-data file, another output, or the external-data file the output model
will be saved with, and an output whose folder is missing or not writable. Checking each flag on its own
was not enough (``run m.onnx -o m.onnx.data`` passed the model check and destroyed the input's weights), so
the rule lives here and nowhere else.

"The same file" means: the same path after resolving symlinks and ``..``, or (both existing) the same inode —
``os.path.samefile`` catches hard links, which no path comparison can. Nothing here imports onnx at module
level: the CLI imports this before any command runs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from onnxsparse.errors import OnnxSparseError

PathLike = str | os.PathLike[str]

#: What ``model_io.save_model`` names the external-data file of ``out.onnx``.
DATA_SUFFIX = ".data"


def data_file(model_path: PathLike) -> Path:
    """The external-data file ``save_model`` writes beside ``model_path`` (``out.onnx`` → ``out.onnx.data``)."""
    p = Path(model_path)
    return p.with_name(p.name + DATA_SUFFIX)


def model_files(path: PathLike) -> list[Path]:
    """``path`` and every external-data file its initializers reference, resolved against the model's folder.

    Reads the protobuf without external data (cheap: weights are not touched). A file that is not an ONNX
    model, or does not exist, yields just ``[path]``: the command's own loader reports that better.
    """
    p = Path(path)
    files = [p]
    if not p.is_file():
        return files
    import onnx  # lazily: the CLI imports this module before any command (start-up time)
    from google.protobuf.message import DecodeError

    from onnxsparse.ir import wire

    try:  # inline weights stay in the file (wire.read_model): this costs kilobytes, not the model's size
        proto, _ = wire.read_model(p)
    except (DecodeError, RuntimeError, ValueError, OSError):
        return files
    from onnxsparse.ir.graph import iter_graphs

    seen: set[str] = set()
    for graph in iter_graphs(proto.graph):
        for t in graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            if location and location not in seen and location != p.name:  # p.name: its own inline weights
                seen.add(location)
                files.append(p.parent / location)
    return files


def _input_files(inputs: Sequence[PathLike | None]) -> list[tuple[Path, str]]:
    """(file, description) for every file an input stands for: a model's data files, a folder's files."""
    found: list[tuple[Path, str]] = []
    for raw in inputs:
        if raw is None or str(raw) in ("", "-"):
            continue
        p = Path(raw)
        if p.is_dir():
            found.append((p, f"the input folder {raw}"))
            with contextlib.suppress(OSError):
                found.extend((c, f"the input {c}") for c in sorted(p.iterdir()) if c.is_file())
        elif p.is_file() and p.suffix.lower() == ".onnx":
            files = model_files(p)
            found.append((p, f"the input model {raw}"))
            found.extend((d, f"the external-data file of the input model {raw}") for d in files[1:])
        else:
            found.append((p, f"the input {raw}"))
    return found


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare it as written
        return p.absolute()


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name one file: equal resolved paths, or (both existing) one inode."""
    pa, pb = Path(a), Path(b)
    if _resolved(pa) == _resolved(pb):
        return True
    try:
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except OSError:
        return False


@dataclass(frozen=True)
class _Out:
    flag: str
    path: Path
    shown: str  # the path as the user typed it
    what: str  # how another output's error refers to this one
    is_data: bool = False  # the external-data file of the output model, not a path the user typed


def check_outputs(
    inputs: Sequence[PathLike | None],
    outputs: Sequence[tuple[str, PathLike | None]],
    output_model: PathLike | None = None,
) -> None:
    """Refuse unsafe outputs before any work starts; see the module docstring for the rules.

    ``inputs``: every file (or folder) the command reads; ``.onnx`` files among them bring their
    external-data files (``model_files``), folders the files directly in them. (Models are recognised by
    suffix only: sniffing content could parse a multi-GB data file as a protobuf; pass ``model_files(p)``
    for a model named otherwise.) ``outputs``: ``(flag, path)`` pairs; ``None`` and ``-`` (stdout) are
    skipped. ``output_model``: the output that is a model, whose external-data file (``data_file``) is
    reserved too — whether or not this save ends up writing one.
    """
    outs: list[_Out] = []
    for flag, raw in outputs:
        if raw is None or str(raw) in ("", "-"):
            continue
        out = _Out(flag, Path(raw), str(raw), f"{flag} {raw}")
        outs.append(out)
        if output_model is not None and same_file(out.path, output_model) and not any(o.is_data for o in outs):
            data = data_file(out.path)
            what = f"the external-data file {data.name} that {flag} {raw} writes"
            outs.append(_Out(flag, data, str(raw), what, is_data=True))
    sources = _input_files(inputs)
    for i, out in enumerate(outs):
        prefix = f"{out.flag} '{out.shown}'"
        for src, what in sources:
            if same_file(out.path, src):
                if out.is_data:
                    raise OnnxSparseError(
                        f"{prefix}: would write {out.path.name}, which is {what}; "
                        "choose another name (inputs are never modified)"
                    )
                raise OnnxSparseError(f"{prefix}: is {what}; choose another path (inputs are never modified)")
        for other in outs[:i]:
            if same_file(out.path, other.path):
                raise OnnxSparseError(f"{prefix}: is also {other.what}; every output needs its own path")
        if not out.is_data:  # the data file's folder is the model's, checked with it
            _check_writable(out.path, prefix)


def _check_writable(p: Path, prefix: str) -> None:
    if p.is_dir():
        raise OnnxSparseError(f"{prefix}: is a folder; give a file name")
    folder = p.parent
    if not folder.exists():
        raise OnnxSparseError(f"{prefix}: its folder {folder} does not exist")
    if not folder.is_dir():
        raise OnnxSparseError(f"{prefix}: its folder {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OnnxSparseError(f"{prefix}: its folder {folder} is not writable")


@contextlib.contextmanager
def atomic_writer(path: PathLike, mode: str = "w", flag: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success rename it into place, on failure remove it.

    Errors name ``path`` as the user gave it (with ``flag`` when known), never the temporary file. The
    temporary file is created with ``open(..., "x")`` (not ``mkstemp``) so it gets the umask's permissions.
    """
    p = Path(path)
    prefix = f"{flag} '{path}'" if flag else f"'{path}'"
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        f = open(tmp, mode.replace("w", "x"))  # noqa: SIM115 - closed below, before the rename
    except OSError as e:
        raise OnnxSparseError(f"{prefix}: cannot write there: {e.strerror or e}") from None
    try:
        with f:
            yield f
        os.replace(tmp, p)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OnnxSparseError(f"{prefix}: cannot write: {e.strerror or e}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: PathLike, text: str, flag: str | None = None, executable: bool = False) -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_writer``); ``executable`` adds the x bits."""
    with atomic_writer(path, "w", flag) as f:
        f.write(text)
        if executable:
            mode = os.fstat(f.fileno()).st_mode
            os.fchmod(f.fileno(), mode | ((mode & 0o444) >> 2))
