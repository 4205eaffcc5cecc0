"""``onnxsparse run``: load a model, apply a pipeline of passes, save the result, print what changed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from onnxsparse.commands._common import MODEL_ARG, json_option, shapes_option, show_progress
from onnxsparse.errors import GateFailure, OnnxSparseError
from onnxsparse.presets import DEFAULT_PIPELINE, PRESETS

if TYPE_CHECKING:
    from onnxsparse.pipeline import Pipeline, PipelineResult


@click.command("run")
@MODEL_ARG
@click.option(
    "-p",
    "--pipeline",
    "pipeline_text",
    default=None,
    help="Passes to apply, e.g. 'gemm-to-conv,prune{pattern=2:4;exclude=head.*},validate'. "
    f"See 'onnxsparse passes' for every pass and option. [default: {DEFAULT_PIPELINE}]",
)
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    help="A named pipeline instead of -p: " + "; ".join(f"{k} = {v}" for k, v in sorted(PRESETS.items())),
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the result (never the input; written atomically, only on success).",
)
@json_option
@shapes_option
@click.option("--calib", metavar="DATA", help="Calibration data for qdq: .npz, a folder of .npy/.npz files.")
@click.option("--calib-samples", type=int, help="Use at most this many calibration samples.")
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Store weights in OUTPUT.data (default: when the input did or the model exceeds 2 GB).",
)
@click.option(
    "--check/--no-check", default=True, show_default=True, help="Run onnx.checker (full_check) on the result."
)
def command(
    model: str,
    pipeline_text: str | None,
    preset: str | None,
    output: Path,
    json_path: str | None,
    shapes: str | None,
    calib: str | None,
    calib_samples: int | None,
    external_data: bool | None,
    check: bool,
) -> None:
    """Apply a pipeline of passes to MODEL and write the result to OUTPUT.

    \b
    Examples:
      onnxsparse run model.onnx -o sparse.onnx                       # default: prune to 2:4, validate
      onnxsparse run model.onnx -p 'gemm-to-conv,prune' -o trt8.onnx
      onnxsparse run model.onnx -p 'prune{pattern=3:4;masks=m34.npz}' -o step1.onnx
      onnxsparse run model.onnx -p 'prune,qdq{percentile=99.99}' --calib data.npz -o int8.onnx
      onnxsparse run model.onnx --preset progressive --calib train.npz -o sparse.onnx

    A validation gate that fails exits with code 2 and writes no output.
    """
    from onnxsparse.ir.model_io import load_model, save_model
    from onnxsparse.ir.paths import check_outputs
    from onnxsparse.ir.shapes import parse_shapes
    from onnxsparse.pipeline import PassContext, Pipeline, pass_paths

    if pipeline_text and preset:
        raise OnnxSparseError("give either -p/--pipeline or --preset, not both")
    pipeline = Pipeline(PRESETS[preset] if preset else (pipeline_text or DEFAULT_PIPELINE))
    pass_inputs, pass_outputs = pass_paths(pipeline)
    check_outputs(
        [model, calib, *pass_inputs], [("-o", output), ("--json", json_path), *pass_outputs], output_model=output
    )
    if calib is not None and all(p.reads_calibration() is False for p in pipeline):
        click.secho(
            f"warning: --calib is given but no pass of '{pipeline.text()}' reads calibration data "
            "(qdq, finetune and prune{method=...} do); ignoring it",
            fg="yellow",
            err=True,
        )
    m = load_model(model, lazy=True)
    ctx = PassContext(
        shapes=parse_shapes(shapes),
        calibration=calib,
        calib_samples=calib_samples,
        progress=show_progress(),
        workdir=output.parent,
    )
    size_before = _size(Path(model))
    try:
        result = pipeline.run(m, ctx, check=check)
    except GateFailure as gate:
        partial = getattr(gate, "result", None)
        failed = getattr(gate, "pass_result", None)  # the gate's own report, e.g. validate's per-layer table
        if partial is not None:
            if failed is not None:
                failed.name = failed.name or "validate"
                partial.results.append(failed)
            _print_report(pipeline, partial, None, size_before, json_path)
        raise
    save_model(result.model, output, external_data=external_data)
    _print_report(pipeline, result, output, size_before, json_path)


def _size(path: Path) -> int:
    from onnxsparse.ir.paths import model_files

    return sum(f.stat().st_size for f in model_files(path) if f.is_file())


def _print_report(
    pipeline: Pipeline, result: PipelineResult, output: Path | None, size_before: int, json_path: str | None
) -> None:
    from onnxsparse.render import grouped_reasons, human_bytes, table, write_json

    data: dict[str, Any] = result.to_dict()
    data["pipeline"] = pipeline.text()
    data["output"] = str(output) if output else None
    if json_path == "-":
        write_json(data, "-")
        return
    for p, r in zip(pipeline.passes, result.results, strict=False):
        head = f"{p.name}: {len(r.report.changed)} changed, {len(r.report.skipped)} skipped ({r.seconds:.2f}s)"
        click.echo(click.style(head, bold=True))
        custom = p.render(r)
        if custom:
            click.echo(custom)
        else:
            for line in grouped_reasons(r.report.skipped):
                click.echo(line)
    ops = sorted(set(result.ops_before) | set(result.ops_after))
    rows = [
        (op, result.ops_before.get(op, 0), result.ops_after.get(op, 0))
        for op in ops
        if result.ops_before.get(op, 0) != result.ops_after.get(op, 0)
    ]
    if rows:
        click.echo("\n" + table(rows, ["op", "before", "after"]))
    if output is not None:
        click.echo(
            f"\nwrote {output} ({human_bytes(size_before)} -> {human_bytes(_size(output))}) in {result.seconds:.2f}s"
        )
    if json_path:
        write_json(data, json_path)
