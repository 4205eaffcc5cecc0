"""render.table fits the terminal (COLUMNS), shortening names in the middle and prose at the end; --wide and
the JSON keep everything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import fixture_path

from onnxsparse.cli import main
from onnxsparse.render import shorten_end, shorten_middle, table

LONG = "/bert/encoder/layer.11/attention/self/query/MatMul"


def test_shorten() -> None:
    assert shorten_middle(LONG, 20) == "/bert/enco…ry/MatMul" and len(shorten_middle(LONG, 20)) == 20
    assert shorten_middle("short", 20) == "short" and shorten_middle(LONG, 1) == "…"
    assert shorten_end("ineligible: C_in/group=3", 12) == "ineligible:…"


def test_table_fits_and_never_cuts_numbers() -> None:
    rows = [(LONG, "MatMul", 123456789, "weight is computed at run time by Add 'attn.k_proj.add'")] * 3
    headers = ["layer", "op", "params", "status"]
    full = table(rows, headers, width=1000)
    assert LONG in full and max(len(line) for line in full.splitlines()) > 100
    fitted = table(rows, headers, width=60)
    lines = fitted.splitlines()
    assert all(len(line) <= 60 for line in lines), fitted
    assert "123456789" in lines[2] and "…" in lines[2]
    assert lines[2].startswith("/bert/enc") and "MatMul" in lines[2]  # both ends of the name survive
    cells = lines[2].split("  ")
    assert cells[-1].startswith("weight is") and cells[-1].endswith("…")  # prose: cut at the end


@pytest.mark.parametrize("command", ["check", "inspect"])
def test_cli_tables_follow_columns_and_wide(tmp_path: Path, command: str) -> None:
    model = tmp_path / "long.onnx"
    import onnx

    m = onnx.load(str(fixture_path("transformer_block")))
    for node in m.graph.node:
        node.name = f"/model/encoder/layer.0/{node.name}/with/a/long/exporter/path"
    onnx.save(m, str(model))
    runner = CliRunner()
    narrow = runner.invoke(main, [command, str(model)], env={"COLUMNS": "100"})
    assert narrow.exit_code == 0, narrow.output
    table_lines = [ln for ln in narrow.stdout.splitlines() if ln.startswith("/model") or ln.startswith("…")]
    assert table_lines and all(len(ln) <= 100 for ln in table_lines), narrow.stdout
    wide = runner.invoke(main, [command, str(model), "--wide"], env={"COLUMNS": "100"})
    assert "/model/encoder/layer.0/attn.qk/with/a/long/exporter/path" in wide.stdout
    data = runner.invoke(main, [command, str(model), "--json", "-"], env={"COLUMNS": "40"})
    text = json.dumps(json.loads(data.stdout))
    assert "/model/encoder/layer.0/attn.qk/with/a/long/exporter/path" in text and "…" not in text
