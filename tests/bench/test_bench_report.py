"""Bench report arithmetic (CPU): per-layer choice, model estimate, JSON; timings are hand-made numbers."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from onnxsparse.bench.gemms import LayerGemm
from onnxsparse.bench.report import LAYER_HEADERS, build_report, layer_rows, summary_lines
from onnxsparse.render import table, write_json


@dataclass
class FakeTiming:
    """Stand-in for gpu.GemmTiming (a measurement needs a GPU); same fields the report reads."""

    dense_ms: float
    sparse_ms: float
    ok: bool = True

    def to_dict(self):
        return {
            "dense_ms": self.dense_ms,
            "sparse_ms": self.sparse_ms,
            "ok": self.ok,
            "speedup": self.dense_ms / self.sparse_ms,
            "error": 0.0,
        }


def _layer(name, m, n, k, reason=None):
    return LayerGemm(name=name, op_type="MatMul", m=m, n=n, k=k, m_padded=None if reason else m, reason=reason)


LAYERS = [
    _layer("q", 4096, 768, 768),
    _layer("k", 4096, 768, 768),
    _layer("ffn1", 4096, 3072, 768),
    _layer("small", 32, 768, 768),
    _layer("head", 32, 2, 768, reason="N=2 not a multiple of 16 (fp16 cuSPARSELt)"),
]
TIMINGS = {
    (4096, 768, 768, "", 4096): FakeTiming(0.020, 0.010),
    (4096, 3072, 768, "", 4096): FakeTiming(0.060, 0.040),
    (32, 768, 768, "", 32): FakeTiming(0.005, 0.008),
}


def test_choices_and_estimates():
    report = build_report(LAYERS, TIMINGS, "fp16")
    choice = {r.layer.name: r.choice for r in report.layers}
    assert choice == {"q": "sparse", "k": "sparse", "ffn1": "sparse", "small": "dense", "head": "skip"}
    s = report.summary()
    dense = 0.020 * 2 + 0.060 + 0.005
    best = 0.010 * 2 + 0.040 + 0.005
    assert s["dense_ms"] == pytest.approx(dense)
    assert s["sparse_all_ms"] == pytest.approx(0.010 * 2 + 0.040 + 0.008)
    assert s["best_ms"] == pytest.approx(best)
    assert s["speedup_estimate"] == pytest.approx(dense / best)
    flops = [lg.flops for lg in LAYERS[:4]]
    speedups = [2.0, 2.0, 1.5, 0.625]
    weighted = sum(f * v for f, v in zip(flops, speedups, strict=True)) / sum(flops)
    assert s["flop_weighted_speedup"] == pytest.approx(weighted)
    assert s["keep_dense"] == ["small"]
    assert s["timed_flops_fraction"] == pytest.approx(sum(flops) / (sum(flops) + LAYERS[4].flops))


def test_min_speedup_and_wrong_results_keep_dense():
    timings = dict(TIMINGS)
    timings[(4096, 3072, 768, "", 4096)] = FakeTiming(0.060, 0.040, ok=False)
    report = build_report(LAYERS, timings, "fp16", min_speedup=2.5)
    choice = {r.layer.name: r.choice for r in report.layers}
    assert choice["q"] == "dense" and choice["ffn1"] == "dense"
    s = report.summary()
    assert s["wrong_results"] == ["ffn1"]
    assert s["speedup_estimate"] == pytest.approx(1.0)
    assert any("WRONG" in line for line in summary_lines(report))


def test_table_and_json(tmp_path):
    report = build_report(LAYERS, TIMINGS, "fp16", device={"gpu": "test"})
    text = table(layer_rows(report), LAYER_HEADERS)
    assert "sparse slower: keep dense" in text and "N=2 not a multiple" in text and "2.00x" in text
    path = tmp_path / "r.json"
    write_json(report.to_dict(), path)
    data = json.loads(path.read_text())
    assert data["summary"]["sparse_layers"] == 3
    assert [row["choice"] for row in data["layers"]] == ["sparse", "sparse", "sparse", "dense", "skip"]
    assert {s["count"] for s in data["shapes"]} == {2, 1}
