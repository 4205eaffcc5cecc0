"""``onnxsparse inspect``: opset, size, inputs/outputs, op counts and the weighted layers of a model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from onnxsparse.commands._common import MODEL_ARG, json_option, shapes_option

if TYPE_CHECKING:
    from onnxsparse.ir.model_io import Model


def _fmt_shape(shape: Sequence[int | str | None] | None) -> str:
    if shape is None:
        return "?"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def inspect_model(model: Model, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Everything ``inspect`` shows, as data."""
    from onnxsparse.ir.graph import iter_graphs, op_counts
    from onnxsparse.ir.index import model_layers
    from onnxsparse.ir.model_io import model_nbytes
    from onnxsparse.ir.shapes import infer_shapes

    proto = model.proto
    inferred = infer_shapes(proto, shapes)
    layers = []
    for layer in model_layers(model, inferred):
        gemm = layer.gemm_shape(inferred)
        layers.append(
            {
                "name": layer.name,
                "op": layer.op_type,
                "graph": layer.graph_path,
                "weight": layer.weight_name,
                # the weight as the op sees it (after the Transpose/Reshape/DequantizeLinear chain) and as stored:
                # 2:4 groups run along the stored tensor's K axis, which is what validate reports too
                "weight_shape": list(layer.weight_shape) if layer.weight_shape else None,
                "weight_k_axis": layer.reduction_axis,
                "stored_shape": list(layer.source.shape) if layer.source is not None else None,
                "via": [n.op_type for n in reversed(layer.chain)],
                "reduction_axis": layer.source_reduction_axis,
                "reduction_size": layer.reduction_size,
                "gemm": None if gemm is None else {"m": gemm.m, "n": gemm.n, "k": gemm.k, "flops": gemm.flops},
                "ineligible": None if layer.reason is None else str(layer.reason),
                "ineligible_code": None if layer.reason is None else layer.reason.code.name,
            }
        )
    return {
        "path": str(model.source) if model.source else None,
        "ir_version": proto.ir_version,
        "opsets": {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "weights_bytes": model_nbytes(model),
        "external_data": model.has_external_data(),
        "subgraphs": sum(1 for _ in iter_graphs(proto.graph)) - 1,
        "inputs": [
            {"name": i.name, "shape": _fmt_shape(inferred.get(i.name))}
            for i in proto.graph.input
            if i.name not in {t.name for t in proto.graph.initializer}
        ],
        "outputs": [{"name": o.name, "shape": _fmt_shape(inferred.get(o.name))} for o in proto.graph.output],
        "op_counts": op_counts(proto.graph),
        "layers": layers,
    }


@click.command("inspect")
@MODEL_ARG
@shapes_option
@json_option
def command(model: str, shapes: str | None, json_path: str | None) -> None:
    """Show a model's opset, size, inputs/outputs, op counts and weighted layers.

    Weighted layers are the Conv/ConvTranspose/Gemm/MatMul nodes; for each: where its weight comes from,
    the weight's shape, the reduction axis 2:4 groups run along, the GEMM it computes (with --shapes for
    symbolic dims) and why it cannot be made sparse, if so.
    """
    from onnxsparse.ir.model_io import load_model
    from onnxsparse.ir.paths import check_outputs
    from onnxsparse.ir.shapes import parse_shapes
    from onnxsparse.render import human_bytes, human_count, table, write_json

    check_outputs([model], [("--json", json_path)])
    info = inspect_model(load_model(model, lazy=True), parse_shapes(shapes))
    if json_path:
        write_json(info, json_path)
        if json_path == "-":
            return
    opsets = ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
    click.echo(f"{info['path']}\n  IR {info['ir_version']}, opsets: {opsets}, producer: {info['producer'] or '-'}")
    click.echo(
        f"  weights: {human_bytes(info['weights_bytes'])}"
        + (" (external data)" if info["external_data"] else "")
        + f", subgraphs: {info['subgraphs']}"
    )
    for kind in ("inputs", "outputs"):
        click.echo(f"  {kind}: " + ", ".join(f"{v['name']} {v['shape']}" for v in info[kind]))
    click.echo("\n" + table(sorted(info["op_counts"].items(), key=lambda kv: -kv[1]), ["op", "count"]))
    rows = []
    for L in info["layers"]:
        gemm = L["gemm"]
        rows.append(
            (
                L["name"],
                L["op"],
                L["weight"] or "-",
                _fmt_shape(L["weight_shape"]),
                "-" if L["stored_shape"] is None else _fmt_shape(L["stored_shape"]),
                "→".join(L["via"]) or "-",
                "" if L["reduction_axis"] is None else L["reduction_axis"],
                "-" if gemm is None else f"{gemm['m']}x{gemm['n']}x{gemm['k']}",
                "-" if gemm is None else human_count(gemm["flops"]),
                L["ineligible"] or "eligible",
            )
        )
    if rows:
        headers = ["layer", "op", "weight", "op shape", "stored", "via", "K axis", "MxNxK", "FLOPs", "status"]
        click.echo("\n" + table(rows, headers, align="llllllrlrl"))
        click.echo(
            "op shape: the weight as the op reads it; stored, K axis: the initializer and the axis of it that "
            "2:4 groups run along (as 'check' reports them); via: the ops from stored to op"
        )
