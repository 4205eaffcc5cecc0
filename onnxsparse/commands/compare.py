"""``onnxsparse compare``: how close a candidate model's outputs stay to its reference's on real inputs.

The report follows Polygraphy's ``run --onnxrt`` comparison — per output, then one PASSED/FAILED summary —
with the figures that judge a pruned model: cosine, relative L2, max |error|, top-1 agreement for logits.
Exit codes: 0 ok, 1 error (bad model, data or option; models with different inputs/outputs), 2 the
``--min-cosine`` gate failed (the table is printed first).
"""

from __future__ import annotations

from typing import Any

import click

from onnxsparse.commands._common import json_option


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(report: Any) -> str:
    """The human report: what was compared, one row per output, and the gate's verdict."""
    from onnxsparse.compare import combined_rel_l2
    from onnxsparse.render import table

    failed = set(report.failed)
    gated = report.min_cosine is not None
    rows = []
    for o in report.outputs:
        status = ("FAILED" if o.name in failed else ("PASSED" if o.cosine is not None else "-")) if gated else None
        shape = "x".join(str(d) for d in o.shape) or "scalar"
        row = [
            o.name,
            o.dtype,
            shape,
            _fmt(o.cosine, ".6f"),
            _fmt(o.cosine_min, ".6f"),
            _fmt(o.rel_l2, ".3e"),
            _fmt(o.max_abs, ".3e"),
            _fmt(o.mean_abs, ".3e"),
            _fmt(o.top1, ".4f"),
            f"{o.equal:.4f}",
        ]
        if o.nonfinite:
            row[3] += f" ({o.nonfinite} non-finite)"
        rows.append([*row, status] if gated else row)
    headers = ["output", "dtype", "shape", "cosine", "min cos", "rel L2", "max |err|", "mean |err|", "top-1", "equal"]
    lines = [
        f"reference  {report.reference}",
        f"candidate  {report.candidate}",
        f"data       {report.data}: {report.samples} samples in {report.batches} batches ({report.seconds:.2f} s)",
        "",
        table(rows, [*headers, "status"] if gated else headers, align="lll" + "r" * 7 + ("l" if gated else "")),
        "",
        f"all outputs: rel L2 {combined_rel_l2(report.outputs):.3e}",
    ]
    if gated:
        n_float = sum(o.cosine is not None for o in report.outputs)
        verdict = "FAILED" if failed else "PASSED"
        lines.append(f"{verdict} | {n_float - len(failed)}/{n_float} outputs with cosine >= {report.min_cosine}")
    return "\n".join(lines)


@click.command("compare")
@click.argument("reference", type=click.Path(dir_okay=False, path_type=str))
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--data",
    required=True,
    metavar="DATA",
    help="Inputs to run both models on, in --calib's formats: a .npz (keys = input names, first axis = "
    "samples) or a folder of .npy/.npz.",
)
@click.option("--samples", type=int, help="Use at most this many samples.")
@click.option(
    "--batch-size",
    type=int,
    help="Samples per inference (default: the model's fixed batch; 32 for one .npz; else as stored).",
)
@click.option(
    "--top1", is_flag=True, help="Also report top-1 agreement: argmax over the last axis of each float output (logits)."
)
@click.option(
    "--min-cosine",
    type=float,
    metavar="X",
    help="Fail (exit 2) when any float output's mean per-sample cosine is below X.",
)
@json_option
def command(
    reference: str,
    candidate: str,
    data: str,
    samples: int | None,
    batch_size: int | None,
    top1: bool,
    min_cosine: float | None,
    json_path: str | None,
) -> None:
    """Compare CANDIDATE's outputs with REFERENCE's on DATA (both run in ONNX Runtime, batch by batch).

    \b
    Examples:
      onnxsparse compare dense.onnx sparse.onnx --data eval.npz
      onnxsparse compare dense.onnx sparse.onnx --data eval.npz --top1 --min-cosine 0.95
      onnxsparse compare dense.onnx int8.onnx --data eval_dir/ --samples 256 --json report.json

    Per output: mean, minimum and 5th-percentile cosine over samples (each sample's output flattened),
    relative L2 error ||c - r|| / ||r||, max and mean |c - r|, top-1 agreement (--top1) and the share of
    exactly equal elements (integer outputs). The models must have the same input and output names, dtypes
    and ranks. Exit codes: 0 ok, 1 error, 2 the --min-cosine gate failed.
    """
    from onnxsparse.compare import compare_models
    from onnxsparse.ir.model_io import load_model
    from onnxsparse.render import write_json

    if json_path and json_path != "-":
        from onnxsparse.ir.paths import check_outputs

        check_outputs([reference, candidate, data], [("--json", json_path)])
    ref = load_model(reference, lazy=True)
    cand = load_model(candidate, lazy=True)
    report = compare_models(
        ref,
        cand,
        data,
        samples=samples,
        batch_size=batch_size,
        top1=top1,
        min_cosine=min_cosine,
        progress=True,  # a bar on a terminal, else a line every 30 s (none for runs under 5 s)
    )
    if json_path == "-":
        write_json(report.to_dict(), "-")
    else:
        click.echo(render(report))
        if json_path:
            write_json(report.to_dict(), json_path)
    report.gate()
