"""trtexec: the command line, the steps and the bash script equivalent to an onnxsparse ``build``.

Where TensorRT's Python package is missing, ``build`` prints (or writes, ``--trtexec-script``) these instead of
building. Kept apart from ``onnxsparse.trt.builder`` (the builder itself) because nothing here needs TensorRT or onnx:
it is argument text only, checked flag by flag in the tests, not run.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from onnxsparse import __version__


# What this module reads of ``engine.BuildPlan`` / ``engine.BuildOptions``, as protocols: engine imports this
# module, so naming engine's classes here would make the two depend on each other.
class _Shapes(Protocol):
    @property
    def min(self) -> tuple[int, ...]: ...
    @property
    def opt(self) -> tuple[int, ...]: ...
    @property
    def max(self) -> tuple[int, ...]: ...


class BuildPlan(Protocol):
    trt_major: int
    precision: str
    to_fp16: bool
    notes: list[str]


class BuildOptions(Protocol):
    @property
    def profiles(self) -> Mapping[str, _Shapes]: ...

    workspace: int | None
    timing_cache: Path | None


def _dims(shape: Iterable[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def fp16_model_path(engine_path: Path) -> Path:
    """Where the trtexec script for TensorRT 11 writes the float16 model: beside the engine."""
    return engine_path.with_name(engine_path.stem + ".fp16.onnx")


def trtexec_command(
    onnx_path: Path | str, engine_path: Path | str, plan: BuildPlan, options: BuildOptions
) -> list[str]:
    """The trtexec argument list equivalent to a build with ``plan`` and ``options``."""
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--sparsity=enable"]
    if plan.trt_major == 10:
        cmd += {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8"], "best": ["--best"]}[plan.precision]
    else:
        cmd.append("--stronglyTyped")  # always on in 11 (a no-op there); says how the file is read
    if options.profiles:
        for flag, attr in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
            value = ",".join(f"{name}:{_dims(getattr(p, attr))}" for name, p in options.profiles.items())
            cmd.append(f"{flag}={value}")
    if options.workspace:
        mib = -(-options.workspace // 2**20)  # round up to whole MiB
        cmd.append(f"--memPoolSize=workspace:{mib}M")
    if options.timing_cache is not None:
        cmd.append(f"--timingCacheFile={options.timing_cache}")
    return cmd


def trtexec_steps(model_path: Path, engine_path: Path, plan: BuildPlan, options: BuildOptions) -> list[list[str]]:
    """Commands to run in order: for TensorRT 11 fp16/best, first make the float16 model with onnxsparse."""
    steps: list[list[str]] = []
    onnx_path = model_path
    if plan.to_fp16:
        onnx_path = fp16_model_path(engine_path)
        steps.append(["onnxsparse", "run", str(model_path), "-p", "to-fp16", "-o", str(onnx_path)])
    steps.append(trtexec_command(onnx_path, engine_path, plan, options))
    return steps


def render_steps(steps: list[list[str]]) -> str:
    """Shell text for the steps, one command per line (long trtexec lines folded with backslashes)."""
    lines = []
    for step in steps:
        quoted = [shlex.quote(a) for a in step]
        if step[0] == "trtexec" and len(quoted) > 3:
            lines.append(" \\\n    ".join(quoted))
        else:
            lines.append(" ".join(quoted))
    return "\n".join(lines)


def trtexec_script(model_path: Path, engine_path: Path, plan: BuildPlan, options: BuildOptions) -> str:
    """An executable bash script with the trtexec build; its log is kept beside the engine."""
    log_path = engine_path.with_name(engine_path.name + ".build.log")
    steps = trtexec_steps(model_path, engine_path, plan, options)
    body = render_steps(steps[:-1])
    trtexec = render_steps(steps[-1:])
    notes = "".join(f"# note: {n}\n" for n in plan.notes)
    return (
        "#!/usr/bin/env bash\n"
        f"# Written by onnxsparse {__version__} `build`: the trtexec equivalent for TensorRT {plan.trt_major}.\n"
        "# onnxsparse did not run it. The (Sparsity) lines of the log say which layers TensorRT found eligible\n"
        "# for sparse tactics and which it chose (add --verbose if your TensorRT logs them only there).\n"
        f"{notes}"
        "set -euo pipefail\n"
        + (body + "\n" if body else "")
        + f"{trtexec} \\\n    2>&1 | tee {shlex.quote(str(log_path))}\n"
        + f"grep -F '(Sparsity)' {shlex.quote(str(log_path))} || echo 'no (Sparsity) lines in the log'\n"
    )


def write_script(path: Path, text: str) -> None:
    """Write ``text`` atomically and make it executable (errors name ``path``, never the temporary file)."""
    from onnxsparse.ir.paths import write_text

    write_text(path, text, flag="--trtexec-script", executable=True)
