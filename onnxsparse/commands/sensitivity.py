"""``onnxsparse sensitivity``: how much each layer alone costs in output error when pruned, and a plan.

With ``--max-error`` or ``--min-cosine`` it chooses the layers that give the largest estimated speed-up within
that budget, writes them as a plan (``--plan-out``, read by ``prune{plan=...}``), applies the plan on a copy
and prints the measured error next to the estimate. Exit codes: 0 ok, 1 error (bad model, data or option).
"""

from __future__ import annotations

import os
from typing import Any

import click

from onnxsparse.commands._common import MODEL_ARG, json_option


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(report: Any) -> str:
    """The sorted table (most sensitive first), the skipped layers, and the plan with estimate vs measurement."""
    from onnxsparse.render import grouped_reasons, human_count, table

    planned = set(report.plan.layers) if report.plan is not None else set()
    bench = report.gains_basis == "bench"
    rows = []
    for r in report.layers:
        gain = f"{r['gain'] * 1000:.1f}" if bench else f"{100 * r['gain']:.1f}%"
        rows.append(
            [
                r["layer"],
                r["op"],
                r["gemm"] or "?",
                human_count(r["flops"]) if r["flops"] else "?",
                gain,
                _fmt(r["rel_l2"], ".3e"),
                _fmt(r["cosine"], ".6f"),
                _fmt(r["layer_error"], ".3e"),
                ("yes" if r["layer"] in planned else "") if report.plan is not None else None,
            ]
        )
    gain_head = "saved µs" if bench else f"{report.gains_basis} share"
    headers = ["layer", "op", "MxNxK", "FLOPs", gain_head, "rel L2", "cosine", "layer rel L2"]
    if report.plan is not None:
        headers.append("plan")
    else:
        rows = [row[:-1] for row in rows]
    lines = [
        f"{report.model}: each layer alone pruned to {report.pattern} with {report.method}",
        f"data: {report.data} ({report.eval_samples} held-out, {report.stats_samples} for statistics)",
        "",
        table(rows, headers, align="lllrrrrr" + ("l" if report.plan is not None else "")),
    ]
    lines.extend(grouped_reasons(report.skipped))
    lines.append(
        f"\n{len(report.layers)} layers scored in {report.seconds['layers']:.1f} s "
        f"(total {report.seconds['total']:.1f} s); rel L2 and cosine: model outputs vs dense on the held-out "
        "samples; layer rel L2: the layer's own output error on the statistics samples (from its H)"
    )
    plan = report.plan
    if plan is not None:
        est, meas = plan.estimated, plan.measured
        if plan.budget["kind"] == "cosine":
            what = f"cosine >= {plan.budget['min_cosine']}"
            est_txt = f"cosine {est['cosine']:.4f} (1 - cosine added over layers)"
            meas_txt = f"cosine {_fmt(meas['cosine'], '.4f')} (rel L2 {meas['rel_l2']:.4f})"
        else:
            what = f"rel L2 <= {plan.budget['max_error']}"
            est_txt = f"rel L2 {est['rel_l2']:.4f} (added over layers)"
            meas_txt = f"rel L2 {meas['rel_l2']:.4f} (cosine {_fmt(meas['cosine'], '.4f')})"
        gain_txt = (
            f"estimated speed-up {est['speedup']:.3f}x of the timed GEMMs"
            if est.get("speedup")
            else f"{100 * est.get(f'{report.gains_basis}_share', 0.0):.1f}% of the {report.gains_basis} pruned"
        )
        lines.append(f"plan ({what}): {len(plan.layers)}/{len(report.layers)} layers, {gain_txt}")
        lines.append(f"  estimated {est_txt}; measured {meas_txt}")
        if plan.dropped:
            lines.append(
                f"  dropped after measuring over budget: {', '.join(plan.dropped)} ({plan.measurements} measurements)"
            )
    return "\n".join(lines)


@click.command("sensitivity")
@MODEL_ARG
@click.option(
    "--calib",
    required=True,
    metavar="DATA",
    help="Calibration data (.npz keyed by input name, or a folder of .npy/.npz): the first "
    "--eval-samples samples are held out for scoring, the rest give the statistics.",
)
@click.option(
    "--method",
    type=click.Choice(["magnitude", "wanda", "sparsegpt"]),
    default="magnitude",
    show_default=True,
    help="How each layer is pruned (as prune{method=...}).",
)
@click.option("--pattern", default="2:4", show_default=True, help="n:m pattern.")
@click.option("--eval-samples", type=int, default=32, show_default=True, help="Held-out samples to score on.")
@click.option("--eval-data", metavar="DATA", help="Score on this data instead of holding out part of --calib.")
@click.option(
    "--mask-input",
    metavar="NAME",
    help="Model input with the attention mask: padded tokens are left out of the statistics.",
)
@click.option("--batch-size", type=int, help="Samples per inference (default: the model's fixed batch, or 32).")
@click.option("--include", metavar="REGEX", help="Only score layers whose node or weight name matches.")
@click.option("--exclude", metavar="REGEX", help="Leave out layers whose node or weight name matches.")
@click.option(
    "--bench",
    "bench",
    metavar="BENCH.json",
    help="A `onnxsparse bench --json` report: per-layer savings for the plan (default: FLOP share).",
)
@click.option("--jobs", type=int, help="Worker processes scoring layers in parallel [default: min(cores, 4)].")
@click.option(
    "--max-error",
    type=float,
    metavar="E",
    help="Choose the plan: the largest estimated speed-up whose output rel L2 stays within E.",
)
@click.option(
    "--min-cosine",
    type=float,
    metavar="C",
    help="Choose the plan: the largest estimated speed-up whose output cosine stays >= C.",
)
@click.option("--plan-out", metavar="PLAN.json", help="Write the plan here (for prune{plan=PLAN.json}).")
@json_option
def command(
    model: str,
    calib: str,
    method: str,
    pattern: str,
    eval_samples: int,
    eval_data: str | None,
    mask_input: str | None,
    batch_size: int | None,
    include: str | None,
    exclude: str | None,
    bench: str | None,
    jobs: int | None,
    max_error: float | None,
    min_cosine: float | None,
    plan_out: str | None,
    json_path: str | None,
) -> None:
    """Prune each layer of MODEL alone and measure the model-output error on held-out samples.

    \b
    Examples:
      onnxsparse sensitivity model.onnx --calib calib.npz
      onnxsparse sensitivity model.onnx --calib calib.npz --method sparsegpt --jobs 2 --json sens.json
      onnxsparse sensitivity model.onnx --calib calib.npz --max-error 0.1 --bench bench.json --plan-out plan.json
      onnxsparse run model.onnx -p 'prune{plan=plan.json}' -o sparse.onnx

    The table lists the most sensitive layers first. A plan assumes that the layers' errors add; it is then
    applied as prune{plan=...} applies it and measured on the same held-out samples, and layers are dropped
    while the measurement is over the budget. Exit codes: 0 ok, 1 error.
    """
    from onnxsparse.errors import OnnxSparseError
    from onnxsparse.ir.model_io import load_model
    from onnxsparse.ir.paths import check_outputs
    from onnxsparse.plan import plan_document
    from onnxsparse.render import write_json
    from onnxsparse.sensitivity import SensitivityOptions, run_sensitivity

    if plan_out and max_error is None and min_cosine is None:
        raise OnnxSparseError("--plan-out needs a budget: --max-error E or --min-cosine C")
    outputs = [("--plan-out", plan_out), ("--json", json_path if json_path != "-" else None)]
    check_outputs([model, calib, eval_data, bench], outputs)
    options = SensitivityOptions(
        method=method,
        pattern=pattern,
        eval_samples=eval_samples,
        jobs=jobs if jobs is not None else min(os.cpu_count() or 1, 4),
        mask_input=mask_input,
        include=include,
        exclude=exclude,
        batch_size=batch_size,
    )
    m = load_model(model, lazy=True)
    report = run_sensitivity(
        m, calib, options, eval_data=eval_data, bench=bench, max_error=max_error, min_cosine=min_cosine, progress=True
    )
    if plan_out and report.plan is not None:
        write_json(plan_document(report.method, report.pattern, report.plan), plan_out)
    if json_path == "-":
        write_json(report.to_dict(), "-")
        return
    click.echo(render(report))
    if plan_out:
        click.echo(f"wrote {plan_out}")
    if json_path:
        write_json(report.to_dict(), json_path)
