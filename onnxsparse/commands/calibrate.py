"""``onnxsparse calibrate``: calibrate activations on data and write a TensorRT-style int8 Q/DQ model.

The same work as ``onnxsparse run MODEL -p 'qdq{...}' --calib DATA``, with the pass options as flags and a
table of the calibrated ranges.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from onnxsparse.commands._common import MODEL_ARG, json_option, show_progress
from onnxsparse.errors import OnnxSparseError


@click.command("calibrate")
@MODEL_ARG
@click.option(
    "--calib",
    "calib",
    required=True,
    metavar="DATA",
    help="Calibration data: a .npz (keys = input names, first axis = samples) or a folder of .npy/.npz.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the Q/DQ model (never the input; written atomically, only on success).",
)
@click.option(
    "--percentile",
    type=float,
    default=99.99,
    show_default=True,
    help="Percentile of |x| taken as an activation's range (method percentile).",
)
@click.option(
    "--method",
    type=click.Choice(["percentile", "max"]),
    default="percentile",
    show_default=True,
    help="Activation range: a percentile of |x|, or max |x|.",
)
@click.option("--calib-samples", type=int, help="Use at most this many calibration samples.")
@click.option(
    "--batch-size",
    type=int,
    help="Samples per inference (default: the model's fixed batch; 32 for one .npz; else as stored).",
)
@click.option(
    "--per-channel/--per-tensor",
    default=True,
    show_default=True,
    help="Weight scales per output channel or one per weight.",
)
@click.option("--quantize-outputs", is_flag=True, help="Also Q/DQ each layer's output (int8 epilogue).")
@click.option(
    "--skip-residual/--no-skip-residual",
    default=True,
    show_default=True,
    help="Q/DQ on the skip input of residual Adds fed by a quantized layer.",
)
@click.option(
    "--activation-matmuls",
    is_flag=True,
    help="Also Q/DQ both inputs of MatMuls of two activations (attention QK^T, PV).",
)
@click.option("--include", metavar="REGEX", help="Only layers whose node or weight name matches.")
@click.option("--exclude", metavar="REGEX", help="Leave layers whose node or weight name matches.")
@json_option
def command(
    model: str,
    calib: str,
    output: Path,
    percentile: float,
    method: str,
    calib_samples: int | None,
    batch_size: int | None,
    per_channel: bool,
    quantize_outputs: bool,
    skip_residual: bool,
    activation_matmuls: bool,
    include: str | None,
    exclude: str | None,
    json_path: str | None,
) -> None:
    """Calibrate MODEL on DATA and write it with int8 Q/DQ placed for TensorRT to OUTPUT.

    \b
    Examples:
      onnxsparse calibrate sparse.onnx --calib calib.npz -o int8.onnx
      onnxsparse calibrate sparse.onnx --calib calib_dir/ --calib-samples 512 --batch-size 16 -o int8.onnx
      onnxsparse calibrate model.onnx --calib calib.npz --method max --exclude 'head' -o int8.onnx --json -
    """
    from onnxsparse.ir.model_io import load_model, save_model
    from onnxsparse.ir.paths import check_outputs
    from onnxsparse.passes.qdq import QdqPass
    from onnxsparse.pipeline import PassContext, Pipeline
    from onnxsparse.render import table, write_json

    check_outputs([model, calib], [("-o", output), ("--json", json_path)], output_model=output)
    qdq = QdqPass(
        percentile=percentile,
        method=method,
        per_channel=per_channel,
        quantize_outputs=quantize_outputs,
        skip_residual=skip_residual,
        activation_matmuls=activation_matmuls,
        include=include,
        exclude=exclude,
        batch_size=batch_size,
    )
    m = load_model(model, lazy=True)
    ctx = PassContext(calibration=calib, calib_samples=calib_samples, progress=show_progress(), workdir=output.parent)
    pipeline = Pipeline([qdq])
    result = pipeline.run(m, ctx)
    r = result.results[0]
    if not r.report.changed:  # writing a model with nothing quantized would be a silent no-op
        chosen = " and ".join(f"--{k} '{v}'" for k, v in (("include", include), ("exclude", exclude)) if v)
        why = f"no layer matched {chosen}" if chosen else "no layer could be quantized"
        raise OnnxSparseError(
            f"{why}: nothing to quantize, no model written ({len(r.report.skipped)} layer(s) "
            "skipped; 'onnxsparse inspect' lists the layers)"
        )
    save_model(result.model, output)
    data: dict[str, Any] = {**result.to_dict(), "pipeline": pipeline.text(), "output": str(output)}
    if json_path == "-":
        write_json(data, "-")
        return
    calib_info = r.report.details.get("calibration", {})
    rows = [
        (name, f"{t['amax']:.6g}", f"{t['scale']:.6g}", t["dtype"]) for name, t in calib_info.get("tensors", {}).items()
    ]
    if rows:
        click.echo(table(rows, ["tensor", "amax", "scale", "dtype"]))
    rendered = qdq.render(r)
    if rendered:
        click.echo(rendered)
    if calib_info:
        what = f"{calib_info['method']}" + (
            f" {calib_info['percentile']}" if calib_info["method"] == "percentile" else ""
        )
        click.echo(
            f"\ncalibrated {len(rows)} tensors on {calib_info['samples']} samples in "
            f"{calib_info['batches']} batches ({what}, {calib_info['seconds']:.2f}s)"
        )
    click.echo(f"wrote {output}: {len(r.report.changed)} layers quantized, {len(r.report.skipped)} skipped")
    if json_path:
        write_json(data, json_path)
