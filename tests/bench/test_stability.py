"""CPU tests of the timing-stability logic: the warm-up's stopping rule (made-up measurements, a fake clock)
and the comparison of repeated bench reports (tools/bench_stability.py)."""

from __future__ import annotations

import json

import pytest

from onnxsparse.bench.stability import agree, compare_runs, max_deviation, settle


class FakeClock:
    """Time advances only when a measurement runs: each block takes ``step`` seconds."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        return self.now


def _measure(values: list[float], clock: FakeClock):
    it = iter(values)
    calls: list[float] = []

    def measure() -> float:
        clock.now += clock.step
        v = next(it, values[-1])
        calls.append(v)
        return v

    return measure, calls


def test_agree_is_relative_to_the_larger_value():
    assert agree(100.0, 101.0, 0.01) and agree(101.0, 100.0, 0.01)
    assert not agree(100.0, 102.0, 0.01)
    assert not agree(0.0, 0.0, 0.01)  # no time measured is no agreement


def test_settle_waits_for_the_minimum_time_even_when_steady_at_once():
    clock = FakeClock(0.125)  # exact in binary: 8 blocks make exactly 1 s
    measure, calls = _measure([1.0], clock)
    s = settle(measure, min_s=1.0, max_s=5.0, clock=clock)
    assert s.settled and len(calls) == 8 and s.seconds == 1.0


def test_settle_goes_on_until_two_consecutive_blocks_agree():
    # a clock ramp: times fall by 3%, 2%, then stay within 0.5%
    clock = FakeClock(0.1)
    values = [1.10, 1.067, 1.046, 1.03, 1.0, 0.998, 0.997]
    measure, _ = _measure(values, clock)
    s = settle(measure, min_s=0.2, max_s=5.0, tol=0.01, clock=clock)
    assert s.settled and s.blocks == values[:6]  # 1.0 → 0.998 is the first pair within 1%
    assert not agree(s.blocks[-3], s.blocks[-2], 0.01)


def test_settle_gives_up_at_the_maximum_and_says_so():
    clock = FakeClock(0.125)
    values = [1.0 + 0.05 * (i % 2) for i in range(100)]  # never two blocks within 1%
    measure, calls = _measure(values, clock)
    s = settle(measure, min_s=0.25, max_s=1.0, clock=clock)
    assert not s.settled and s.seconds == 1.0 and len(calls) == 8


def test_settle_runs_two_blocks_even_with_no_time_asked():
    clock = FakeClock(0.1)
    measure, calls = _measure([1.0, 2.0, 2.0], clock)
    s = settle(measure, min_s=0.0, max_s=0.0, clock=clock)
    assert len(calls) == 2 and not s.settled  # 1.0 vs 2.0: stopped by the maximum, not steady
    assert json.loads(json.dumps(s.to_dict()))["blocks"] == [1.0, 2.0]


def test_max_deviation():
    assert max_deviation([1.0, 1.0, 1.0]) == 0.0
    assert max_deviation([0.9, 1.0, 1.1]) == pytest.approx(0.1)
    assert max_deviation([38.57, 35.54, 35.19]) == pytest.approx(0.0586, abs=1e-4)
    with pytest.raises(ValueError):
        max_deviation([])


def _report(times: dict[str, tuple[float, float]], untimed: tuple[str, ...] = ()) -> dict:
    layers = [
        {"name": n, "m": 4096, "n": 768, "k": 768, "dense_ms": d, "sparse_ms": s, "speedup": d / s}
        for n, (d, s) in times.items()
    ]
    layers += [
        {"name": n, "m": None, "n": None, "k": None, "dense_ms": None, "sparse_ms": None, "speedup": None}
        for n in untimed
    ]
    return {"layers": layers}


def test_compare_runs_finds_the_worst_layer_per_metric():
    runs = [
        _report({"a": (10.0, 8.0), "b": (20.0, 10.0)}, untimed=("attn",)),
        _report({"a": (10.0, 8.0), "b": (22.0, 11.0)}),  # b: both times +10%, speed-up unchanged
        _report({"a": (10.6, 8.0), "b": (21.0, 10.5)}),
    ]
    res = compare_runs(runs)
    assert res["runs"] == 3 and [r["name"] for r in res["layers"]] == ["a", "b"]
    b = res["layers"][1]
    assert b["dense_ms"] == [20.0, 22.0, 21.0] and b["dense_ms_deviation"] == pytest.approx(1 / 21)
    assert b["speedup_deviation"] == pytest.approx(0.0)
    assert res["worst"]["dense_ms"]["layer"] == "b"
    assert res["worst"]["speedup"]["layer"] == "a"
    a_speedups = [10 / 8, 10 / 8, 10.6 / 8]
    assert res["worst"]["speedup"]["deviation"] == pytest.approx(max_deviation(a_speedups))


def test_compare_runs_rejects_runs_of_different_layers_and_single_runs():
    with pytest.raises(ValueError, match="other layers"):
        compare_runs([_report({"a": (1.0, 1.0)}), _report({"b": (1.0, 1.0)})])
    with pytest.raises(ValueError, match="two reports"):
        compare_runs([_report({"a": (1.0, 1.0)})])


def test_tool_on_the_committed_h100_runs(tmp_path, capsys):
    """tools/bench_stability.py reads real bench JSONs (the committed H100 runs) and writes its summary."""
    from pathlib import Path

    from bench_stability import main

    res_dir = Path(__file__).resolve().parents[2] / "tools" / "results"
    files = sorted(res_dir.glob("bert_base_fp16_graph_run?.json"))
    if len(files) < 3:
        pytest.skip("no committed bench runs")
    out = tmp_path / "s.json"
    assert main([str(f) for f in files] + ["--json", str(out)]) == 0
    data = json.loads(out.read_text())
    reports = [json.loads(f.read_text()) for f in files]
    timed = {lg["name"] for lg in reports[0]["layers"] if lg["dense_ms"] is not None}
    assert {r["name"] for r in data["layers"]} == timed
    for metric, worst in data["worst"].items():
        expect = max(
            max_deviation(
                [r[metric] for r in (next(lg for lg in rep["layers"] if lg["name"] == name) for rep in reports)]
            )
            for name in timed
        )
        assert worst["deviation"] == pytest.approx(expect)
        assert data["within_limit"][metric] == (expect <= 0.05)
    assert "MxNxK" in capsys.readouterr().out


def test_tiny_products_get_more_search_rounds():
    from onnxsparse.bench.gpu import rounds_for  # torch is imported inside functions only: fine on CPU

    assert rounds_for(32, 768, 768, 2) == 6  # BERT pooler: ~0.1 µs of math, launch-bound
    assert rounds_for(4096, 768, 768, 2) == 2  # Q/K/V: ~12 µs estimated, real 9.6 µs on an H100
    assert rounds_for(4096, 3072, 768, 1) == 1
