"""Where ONNX Runtime training comes from: an isolated install of ``onnxruntime-training-cpu`` beside (not over)
the user's ``onnxruntime``, or this environment's own ``onnxruntime`` when that one already trains.

ORT training lives in ``onnxruntime-training-cpu`` (last release 1.19.2), which provides the same
``onnxruntime`` module as the inference package. Rather than replace the user's ``onnxruntime``, it is
installed with ``pip --target`` into a cache folder (``onnxsparse setup-training``) and the training loop runs
in a subprocess that puts that folder first on ``sys.path`` (``onnxsparse.finetune.worker``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from onnxsparse.errors import OnnxSparseError
from onnxsparse.finetune import worker as training_worker

log = logging.getLogger("onnxsparse.finetune.run")


def cache_dir() -> Path:
    """``$ONNXSPARSE_CACHE``, else ``$XDG_CACHE_HOME/onnxsparse``, else ``~/.cache/onnxsparse``."""
    env = os.environ.get("ONNXSPARSE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "onnxsparse"


def runtime_dir() -> Path:
    """Where the isolated training runtime lives (``$ONNXSPARSE_TRAINING_RUNTIME`` overrides).

    Wheels are per Python version, so the folder name carries the interpreter tag.
    """
    env = os.environ.get("ONNXSPARSE_TRAINING_RUNTIME")
    if env:
        return Path(env).expanduser()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}-{sysconfig.get_platform().replace('-', '_')}"
    return cache_dir() / f"ort-training-{training_worker.RUNTIME_VERSION}-{tag}"


def install_command(target: Path | None = None) -> list[str]:
    """The pip command that installs the training runtime into ``target`` (isolated, no dependencies).

    ``--no-deps``: its dependencies (numpy, onnx, protobuf) are already in the environment and must not be
    shadowed by copies in the target folder; ORT 1.19.2's wheel is built against numpy 2 and runs with 2.x.
    """
    return [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-deps",
        "--target",
        str(target or runtime_dir()),
        f"{training_worker.RUNTIME_PACKAGE}=={training_worker.RUNTIME_VERSION}",
    ]


def _setup_hint() -> str:
    return "run `onnxsparse setup-training` (or `onnxsparse finetune --install-runtime ...`)"


@dataclass(frozen=True)
class Runtime:
    """How training runs: ``inprocess`` (this env's onnxruntime trains) or ``subprocess`` with ``path`` first."""

    mode: str
    path: Path | None
    version: str

    def describe(self) -> str:
        where = "this environment's onnxruntime" if self.mode == "inprocess" else str(self.path)
        return f"onnxruntime-training {self.version} ({where})"


def _has_training(folder: Path) -> bool:
    return (folder / "onnxruntime" / "training" / "api").is_dir() and any(
        (folder / "onnxruntime" / "capi").glob("onnxruntime_pybind11_state*")
    )


def _installed_version(folder: Path) -> str:
    for info in folder.glob("onnxruntime_training*.dist-info"):
        return info.name.removesuffix(".dist-info").split("-")[1]
    return "unknown"


def find_runtime() -> Runtime | None:
    """The training runtime to use, or None where there is none."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is not None and spec.submodule_search_locations:
        pkg = Path(next(iter(spec.submodule_search_locations)))
        if _has_training(pkg.parent) and os.environ.get("ONNXSPARSE_TRAINING_SUBPROCESS") != "1":
            import onnxruntime

            return Runtime("inprocess", None, onnxruntime.__version__)
    folder = runtime_dir()
    if _has_training(folder):
        return Runtime("subprocess", folder, _installed_version(folder))
    return None


def require_runtime() -> Runtime:
    rt = find_runtime()
    if rt is None:
        raise OnnxSparseError(
            f"ONNX Runtime training is not installed: {_setup_hint()} — it installs "
            f"{training_worker.RUNTIME_PACKAGE}=={training_worker.RUNTIME_VERSION} into {runtime_dir()}, "
            "apart from your onnxruntime"
        )
    return rt


def install_runtime(target: Path | None = None, force: bool = False) -> Runtime:
    """Install ``onnxruntime-training-cpu`` into ``target`` (default ``runtime_dir()``) and check it imports.

    The install goes to a temporary sibling folder that is renamed into place only once pip succeeded, so an
    interrupted install never leaves a half-populated runtime that ``find_runtime`` would pick up.
    """
    target = Path(target or runtime_dir())
    target.parent.mkdir(parents=True, exist_ok=True)
    with _install_lock(target):  # two test workers or shells installing at once wait for each other
        if force or not _has_training(target):
            _pip_install(target)
    rt = Runtime("subprocess", target, _installed_version(target))
    _smoke_test(rt)
    return rt


def _pip_install(target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        cmd = install_command(tmp)
        log.info("installing the training runtime: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            last = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            if sys.version_info >= (3, 13) or sysconfig.get_platform().endswith("aarch64"):
                last.append(
                    f"{training_worker.RUNTIME_PACKAGE} {training_worker.RUNTIME_VERSION} has wheels for "
                    "Python 3.8-3.12 on Linux x86_64, macOS and Windows only: fine-tune from such a Python"
                )
            raise OnnxSparseError(
                f"installing {training_worker.RUNTIME_PACKAGE}=={training_worker.RUNTIME_VERSION} failed "
                f"({last[-1].strip() if last else f'pip exit {proc.returncode}'}); command: {' '.join(cmd)}"
            )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _install_lock(target: Path) -> Iterator[None]:
    """An exclusive advisory lock beside ``target`` (POSIX ``flock``; no lock where that does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows: installs are rare and manual there
        yield
        return
    with open(target.parent / f".{target.name}-install.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _smoke_test(rt: Runtime) -> None:
    """Import the training API in a subprocess the way the loop will (catches numpy/ABI mismatches early)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import importlib.util as u; s = u.spec_from_file_location('w', sys.argv[2]); m = u.module_from_spec(s); "
        "s.loader.exec_module(m); ort, a, api = m.import_training_api(); print(ort.__version__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(rt.path), training_worker.__file__],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise OnnxSparseError(f"the training runtime in {rt.path} does not import: {last[-1] if last else '?'}")
