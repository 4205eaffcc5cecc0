"""``onnxsparse build``: a TensorRT engine with sparse weights enabled, or the trtexec command that makes one.

TensorRT is optional. Where its Python package cannot be imported the command prints the equivalent trtexec
command (and, with ``--trtexec-script``, writes it as an executable bash script), then exits 1: no engine is
built. Where it can, the engine is built through the Python API and the builder's "(Sparsity)" lines are
reported: how many layers were eligible for sparse tactics and how many TensorRT chose.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from onnxsparse.commands._common import MODEL_ARG, json_option, shapes_option
from onnxsparse.errors import OnnxSparseError

if TYPE_CHECKING:
    from onnxsparse.ir.model_io import Model
    from onnxsparse.trt.builder import BuildOptions, BuildPlan, BuildResult

#: engine.PRECISIONS, spelled here so ``build --help`` need not import onnx (tests/commands/test_build.py
#: checks that the two agree)
PRECISIONS = ("fp16", "int8", "best", "fp32")
_SHAPES_HELP = "trtexec-style NAME:DxD,... for the optimization profile ({})."


@click.command("build")
@MODEL_ARG
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Engine file to write (atomically, only when the build succeeds).",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp16",
    show_default=True,
    help="fp16; int8 (needs Q/DQ nodes: run the qdq pass first); best (fp16 + int8); fp32.",
)
@shapes_option
@click.option("--min-shapes", metavar="NAME:DxD,...", help=_SHAPES_HELP.format("smallest shapes"))
@click.option("--opt-shapes", metavar="NAME:DxD,...", help=_SHAPES_HELP.format("shapes TensorRT tunes for"))
@click.option("--max-shapes", metavar="NAME:DxD,...", help=_SHAPES_HELP.format("largest shapes"))
@click.option("--workspace", metavar="SIZE", help="Workspace memory-pool limit, e.g. 4G, 512M (bare number: MiB).")
@click.option(
    "--timing-cache",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Timing cache file: read if it exists, written back after the build.",
)
@click.option(
    "--trtexec-script",
    "script_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the equivalent trtexec build as an executable bash script.",
)
@click.option(
    "--trt-version",
    type=click.Choice(["auto", "10", "11"]),
    default="auto",
    show_default=True,
    help="TensorRT major version the trtexec command targets (auto: the installed one, else 10).",
)
@json_option
def command(
    model: str,
    output: Path,
    precision: str,
    shapes: str | None,
    min_shapes: str | None,
    opt_shapes: str | None,
    max_shapes: str | None,
    workspace: str | None,
    timing_cache: Path | None,
    script_path: Path | None,
    trt_version: str,
    json_path: str | None,
) -> None:
    """Build a TensorRT engine from MODEL with 2:4 sparse weights enabled.

    \b
    Examples:
      onnxsparse build sparse.onnx -o model.engine
      onnxsparse build sparse.onnx -o model.engine --min-shapes x:1x3x224x224 \\
          --opt-shapes x:8x3x224x224 --max-shapes x:32x3x224x224 --workspace 4G
      onnxsparse build sparse_int8.onnx -o model.engine --precision int8 --timing-cache trt.cache
      onnxsparse build sparse.onnx -o model.engine --trt-version 11 --trtexec-script build.sh

    TensorRT 10 builds with the FP16/INT8 builder flags. TensorRT 11 has no precision flags (networks are
    strongly typed): fp16/best builds parse a float16 copy made by the to-fp16 pass, int8 builds parse the
    Q/DQ model as it is. Without TensorRT this prints the trtexec equivalent and exits 1.
    """
    from onnxsparse.ir.model_io import load_model
    from onnxsparse.ir.paths import check_outputs, data_file
    from onnxsparse.ir.shapes import parse_shapes
    from onnxsparse.trt.builder import (
        BuildOptions,
        TensorRTMissing,
        build_engine,
        import_tensorrt,
        make_plan,
        parse_size,
        resolve_profiles,
        trt_major,
        two_four_layers,
    )
    from onnxsparse.trt.trtexec import fp16_model_path, trtexec_script, write_script

    m = load_model(model, lazy=True)
    model_path = Path(model).resolve()
    engine_path = output.resolve()
    missing: TensorRTMissing | None = None
    try:
        trt = import_tensorrt()
    except TensorRTMissing as e:
        trt, missing = None, e
    major = trt_major(trt) if trt is not None else (10 if trt_version == "auto" else int(trt_version))
    outputs: list[tuple[str, Path | str | None]] = [
        ("-o", output),
        ("--trtexec-script", script_path),
        ("--json", json_path),
        ("--timing-cache", timing_cache),
    ]
    if script_path is not None:  # what the script will write when it runs: its log, the float16 model for TRT 11
        outputs.append(("the build log of --trtexec-script", engine_path.with_name(engine_path.name + ".build.log")))
        if make_plan(m.proto, precision, major).to_fp16:
            fp16 = fp16_model_path(engine_path)
            outputs += [
                ("the float16 model of --trtexec-script", fp16),
                ("the float16 model's data of --trtexec-script", data_file(fp16)),
            ]
    check_outputs([model], outputs)
    profiles = resolve_profiles(
        m.proto, parse_shapes(min_shapes), parse_shapes(opt_shapes), parse_shapes(max_shapes), parse_shapes(shapes)
    )
    options = BuildOptions(
        precision=precision,
        profiles=profiles,
        workspace=parse_size(workspace) if workspace else None,
        timing_cache=timing_cache.resolve() if timing_cache else None,
    )
    if trt is None or missing is not None:
        plan = make_plan(m.proto, precision, major)
        _without_tensorrt(model_path, engine_path, plan, options, script_path, json_path, m, str(missing))
        raise TensorRTMissing(
            f"{missing}; no engine was built. Install TensorRT 10+ on a machine with an NVIDIA "
            "GPU, or run the trtexec command above there"
        ) from None
    installed = trt_major(trt)
    if trt_version != "auto" and int(trt_version) != installed:
        raise OnnxSparseError(f"--trt-version {trt_version} but TensorRT {installed} is installed")
    plan = make_plan(m.proto, precision, installed)
    if script_path is not None:
        write_script(script_path, trtexec_script(model_path, engine_path, plan, options))
    if plan.to_fp16:
        result = build_engine(float16_copy(m), engine_path, options, trt)
        result.onnx_parsed = FLOAT16_COPY
    else:
        result = build_engine(m, engine_path, options, trt)
    _report(result, two_four_layers(m), json_path)


#: what the report says TensorRT parsed when the build made a float16 copy
FLOAT16_COPY = "float16 copy made by to-fp16"


def float16_copy(model: Model) -> Model:
    """A float16 copy of ``model`` made by the ``to-fp16`` pass, with no ``source`` (the builder writes it to
    a temporary file for TensorRT's parser); ``model`` is left as it is.

    Why here: TensorRT 11 networks are strongly typed, so an fp16 build needs a float16 model, and the
    builder (core) must not import a pass.
    """
    from onnxsparse.ir.model_io import Model as ModelType
    from onnxsparse.ir.model_io import load_model
    from onnxsparse.passes.to_fp16 import ToFp16Pass
    from onnxsparse.pipeline import Pipeline

    if model.source is not None:
        copy = load_model(model.source)
    else:
        proto = type(model.proto)()
        proto.CopyFrom(model.proto)
        copy = ModelType(proto=proto, base_dir=model.base_dir, store=model.store)
    copy = Pipeline([ToFp16Pass()]).run(copy).model
    copy.source = None  # no longer that file's contents
    return copy


def _without_tensorrt(
    model_path: Path,
    engine_path: Path,
    plan: BuildPlan,
    options: BuildOptions,
    script: Path | None,
    json_path: str | None,
    m: Model,
    reason: str,
) -> None:
    from onnxsparse.render import write_json
    from onnxsparse.trt.builder import two_four_layers
    from onnxsparse.trt.trtexec import render_steps, trtexec_script, trtexec_steps, write_script

    steps = trtexec_steps(model_path, engine_path, plan, options)
    if script is not None:
        write_script(script, trtexec_script(model_path, engine_path, plan, options))
    data = {
        "built": False,
        "reason": reason,
        **plan.to_dict(),
        "commands": steps,
        "trtexec_script": str(script) if script else None,
        "two_four_layers": len(two_four_layers(m)),
    }
    if json_path:
        write_json(data, json_path)
    if json_path == "-":
        return
    click.echo(f"# TensorRT is not available here; the equivalent build for TensorRT {plan.trt_major}:")
    for note in plan.notes:
        click.echo(f"# note: {note}")
    click.echo(render_steps(steps))
    if plan.trt_major == 10:
        click.echo("# for TensorRT 11 (strongly typed, no precision flags): add --trt-version 11")
    if script is not None:
        click.echo(f"# written to {script} (executable)")


def _report(result: BuildResult, expected: list[str], json_path: str | None) -> None:
    from onnxsparse.render import human_bytes, write_json

    data = {"built": True, **result.to_dict(), "two_four_layers": len(expected)}
    if json_path:
        write_json(data, json_path)
    if json_path == "-":
        return
    plan = result.plan
    click.echo(
        f"engine: {result.engine} ({human_bytes(result.engine_bytes)}), TensorRT {result.trt_version}, "
        f"{plan.precision}, flags {'+'.join(plan.flags)}{', strongly typed' if plan.strongly_typed else ''}, "
        f"{result.seconds:.1f}s"
    )
    for note in plan.notes:
        click.echo(f"note: {note}")
    s = result.sparsity
    if not s.seen:
        click.echo("sparsity: the builder logged no (Sparsity) lines")
    else:
        click.echo(
            f"sparsity: {len(expected)} layer(s) have 2:4 weights; TensorRT found {s.eligible} eligible "
            f"and chose sparse tactics for {s.chosen}"
        )
        if s.chosen_layers:
            click.echo("  sparse: " + ", ".join(s.chosen_layers))
        if s.dense_layers:
            click.echo("  eligible but dense (a dense kernel was faster): " + ", ".join(s.dense_layers))
    if result.warnings:
        click.echo(f"{len(result.warnings)} builder warning(s), logged on stderr")
