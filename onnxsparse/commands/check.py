"""``onnxsparse check``: the ``validate`` pass run alone on a model — a per-layer n:m report and a CI gate.

Exit codes: 0 the model passes (or no gate was asked for), 1 an error (bad model, bad option), 2 a gate failed.
The table is printed before a gate failure is reported, so a failing CI log shows which layers are dense.
"""

from __future__ import annotations

import click

from onnxsparse.commands._common import MODEL_ARG, json_option, shapes_option, show_progress


@click.command("check")
@MODEL_ARG
@shapes_option
@json_option
@click.option(
    "--min-coverage",
    type=float,
    metavar="X",
    help="Fail (exit 2) when the FLOP-weighted n:m coverage is below X (a fraction, e.g. 0.9).",
)
@click.option("--require-all", is_flag=True, help="Fail (exit 2) when any eligible layer is not n:m.")
@click.option("--pattern", default="2:4", show_default=True, help="n:m pattern to check.")
def command(
    model: str, shapes: str | None, json_path: str | None, min_coverage: float | None, require_all: bool, pattern: str
) -> None:
    """Report per-layer n:m sparsity of MODEL and gate on it (no model is written).

    \b
    Examples:
      onnxsparse check sparse.onnx
      onnxsparse check sparse.onnx --shapes images:1x3x640x640 --min-coverage 0.9
      onnxsparse check sparse.onnx --require-all --json report.json
      onnxsparse check step1.onnx --pattern 3:4 --json -

    Coverage is the share of all weighted-layer FLOPs (Conv, ConvTranspose, Gemm, MatMul) whose weight is
    n:m; it falls back to parameter counts when a symbolic dim has no --shapes value.
    Exit codes: 0 ok, 1 error, 2 a gate failed.
    """
    from onnxsparse.ir.model_io import load_model
    from onnxsparse.ir.paths import check_outputs
    from onnxsparse.ir.shapes import parse_shapes
    from onnxsparse.passes.validate import ValidateConfig, ValidatePass, render_report
    from onnxsparse.pipeline import PassContext
    from onnxsparse.render import write_json

    check_outputs([model], [("--json", json_path)])
    check_pass = ValidatePass(ValidateConfig(pattern=pattern, min_coverage=min_coverage, require_all=require_all))
    m = load_model(model, lazy=True)
    ctx = PassContext(shapes=parse_shapes(shapes), progress=show_progress())
    report = check_pass.analyse(m, ctx)
    data = {"model": model, **report.details}
    if json_path == "-":
        write_json(data, "-")
    else:
        click.echo(render_report(report))
        if json_path:
            write_json(data, json_path)
    check_pass.gate(report)
