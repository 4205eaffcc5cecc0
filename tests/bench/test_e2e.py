"""End-to-end estimate (CPU): Amdahl arithmetic, trtexec profile parsing and name matching, M buckets.

The TensorRT profiles here are HAND-WRITTEN in the format trtexec's ``--exportProfile`` writes (TensorRT
samples/common/sampleReporting.cpp, ``Profiler::exportJSONProfile``: a list starting with {"count": N},
then {"name", "timeMs", "averageMs", "medianMs", "percentage"} per layer; older TensorRT has no medianMs).
No TensorRT ran to make them.
"""

from __future__ import annotations

import json

import pytest

from onnxsparse.bench.e2e import (
    LayerTime,
    _tokens,
    amdahl,
    by_share,
    estimate,
    parse_trt_profile,
    profile_estimate,
    summary_lines,
)
from onnxsparse.bench.gemms import plan_m
from onnxsparse.errors import OnnxSparseError


def test_amdahl_and_shares():
    r = amdahl(10.0, 4.0, 2.0)
    assert r == pytest.approx({"total_dense_ms": 10.0, "gemm_share": 0.4, "total_sparse_ms": 8.0, "speedup": 1.25})
    with pytest.raises(OnnxSparseError, match="more than the dense total"):
        amdahl(3.0, 4.0, 2.0)
    with pytest.raises(OnnxSparseError, match="positive"):
        amdahl(0.0, 0.0, 0.0)
    rows = by_share(2.0)
    assert [r["gemm_share"] for r in rows] == [0.5, 0.7, 0.9]
    assert [r["speedup"] for r in rows] == pytest.approx([1 / 0.75, 1 / 0.65, 1 / 0.55])
    assert by_share(1.0)[2]["speedup"] == pytest.approx(1.0)  # no GEMM gain, no gain at any share


LAYERS = [
    LayerTime("/enc/fc1/MatMul", ("/enc/fc1/MatMul", "/enc/fc1/Add", "/enc/relu/Relu"), 0.020, 0.010),
    LayerTime("/enc/fc2/MatMul", ("/enc/fc2/MatMul", "/enc/fc2/Add"), 0.030, 0.020),
    LayerTime("/enc/fc3/MatMul", ("/enc/fc3/MatMul",), 0.010, 0.005),
]


def _profile(tmp_path, entries, count=100, name="profile.json"):
    """A hand-written trtexec --exportProfile file (see the module docstring)."""
    rows = [{"count": count}]
    total = sum(avg for _, avg in entries)
    for layer, avg in entries:
        row = {
            "name": layer,
            "timeMs": avg * count,
            "averageMs": avg,
            "medianMs": avg * 0.98,
            "percentage": 100 * avg / total,
        }
        rows.append(row)
    path = tmp_path / name
    path.write_text(json.dumps(rows, indent=1))
    return path


ENTRIES = [
    ("Reformatting CopyNode for Input Tensor 0 to /enc/fc1/MatMul + /enc/fc1/Add", 0.004),
    ("/enc/fc1/MatMul + /enc/fc1/Add + PWN(/enc/relu/Relu)", 0.050),
    ("/enc/fc2/MatMul + /enc/fc2/Add", 0.040),
    ("{ForeignNode[/enc/attn/MatMul.../enc/attn/Softmax]}", 0.060),
    ("/enc/norm/LayerNormalization", 0.006),
]


def test_parse_hand_written_profile(tmp_path):
    prof = parse_trt_profile(_profile(tmp_path, ENTRIES))
    assert prof.count == 100 and len(prof.entries) == 5
    assert prof.total_ms == pytest.approx(sum(avg for _, avg in ENTRIES))
    e = prof.entries[1]
    assert (e.average_ms, e.time_ms, e.median_ms) == pytest.approx((0.050, 5.0, 0.049))
    # older TensorRT: no medianMs; averageMs missing too → timeMs / count
    old = tmp_path / "old.json"
    old.write_text(json.dumps([{"count": 10}, {"name": "a", "timeMs": 2.0, "percentage": 100.0}]))
    prof = parse_trt_profile(old)
    assert prof.entries[0].average_ms == pytest.approx(0.2) and prof.entries[0].median_ms is None


@pytest.mark.parametrize(
    "text, match",
    [
        ("{}", "not a trtexec profile"),
        ("[]", "not a trtexec profile"),
        ('[{"name": "a", "averageMs": 1}]', "not a trtexec profile"),
        ('[{"count": 3}]', "lists no layers"),
        ('[{"count": 3}, {"averageMs": 1}]', "entry 1 has no name"),
        ('[{"count": 3}, {"name": "a", "averageMs": "fast"}]', "entry 1"),
        ("[{", "not a JSON file"),
    ],
)
def test_bad_profiles_are_one_line_errors(tmp_path, text, match):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(OnnxSparseError, match=match) as info:
        parse_trt_profile(path)
    assert "\n" not in str(info.value)
    with pytest.raises(OnnxSparseError, match="no such file"):
        parse_trt_profile(tmp_path / "missing.json")


def test_tokens_of_trt_layer_names():
    assert _tokens("/a/MatMul + /a/Add + PWN(/a/Relu)") == {"/a/MatMul", "/a/Add", "/a/Relu"}
    assert _tokens("PWN(PWN(/b/Mul, /b/Erf), /b/Add)") == {"/b/Mul", "/b/Erf", "/b/Add"}
    assert _tokens("{ForeignNode[/x/MatMul.../x/Softmax]}") == {"/x/MatMul", "/x/Softmax"}


def test_profile_matched_by_name(tmp_path):
    prof = parse_trt_profile(_profile(tmp_path, ENTRIES))
    r = profile_estimate(prof, LAYERS)
    # fc1 and fc2 take TensorRT's time scaled by our speed-up; fc3 is hidden in no entry: our own times
    dense = 0.050 + 0.040 + 0.010
    best = 0.050 * (0.010 / 0.020) + 0.040 * (0.020 / 0.030) + 0.005
    total = sum(avg for _, avg in ENTRIES)
    assert r["total_dense_ms"] == pytest.approx(total)
    assert r["total_sparse_ms"] == pytest.approx(total - dense + best)
    assert r["speedup"] == pytest.approx(total / (total - dense + best))
    assert r["matched_layers"] == 2 and r["unmatched_layers"] == ["/enc/fc3/MatMul"]
    assert {m["layer"]: m["trt_layer"] for m in r["matched"]}["/enc/fc1/MatMul"] == ENTRIES[1][0]


def test_one_trt_layer_holding_two_of_ours_is_shared_by_our_dense_times(tmp_path):
    prof = parse_trt_profile(_profile(tmp_path, [("/enc/fc1/MatMul + /enc/fc2/MatMul", 0.1), ("/other", 0.1)]))
    r = profile_estimate(prof, LAYERS[:2])
    shares = {m["layer"]: m["trt_ms"] for m in r["matched"]}
    assert shares == pytest.approx({"/enc/fc1/MatMul": 0.04, "/enc/fc2/MatMul": 0.06})


def test_estimate_sections_and_text(tmp_path):
    none = estimate(LAYERS)
    assert "e2e" not in none and [s["gemm_share"] for s in none["by_share"]] == [0.5, 0.7, 0.9]
    assert none["gemm_speedup"] == pytest.approx(0.060 / 0.035)
    text = "\n".join(summary_lines(none))
    assert "weighted GEMMs only" in text and "50% -> " in text and "no measured total" in text
    total = estimate(LAYERS, total_ms=0.2)
    assert total["e2e"]["source"] == "total-ms"
    assert total["e2e"]["total_sparse_ms"] == pytest.approx(0.2 - 0.060 + 0.035)
    assert "end to end (--total-ms)" in "\n".join(summary_lines(total))
    prof = estimate(LAYERS, profile=parse_trt_profile(_profile(tmp_path, ENTRIES)))
    assert prof["e2e"]["source"] == "trt-profile"
    assert "matched to TensorRT layers by name" in "\n".join(summary_lines(prof))


def test_m_buckets():
    assert plan_m(100, "fp16") == 112  # cuSPARSELt's multiple of 16
    assert plan_m(100, "fp16", 64) == 128
    assert plan_m(4096, "fp16", 16) == 4096
    assert plan_m(100, "int8", 48) == 160  # 144 rows, then int8's multiple of 32
    with pytest.raises(OnnxSparseError, match="m-buckets"):
        plan_m(100, "fp16", 0)


def test_layer_named_after_its_epilogue_still_matches(tmp_path):
    prof = parse_trt_profile(_profile(tmp_path, [("/enc/fc2/Add", 0.03), ("/other", 0.07)]))
    r = profile_estimate(prof, LAYERS[1:2])
    assert r["matched_layers"] == 1 and r["total_sparse_ms"] == pytest.approx(0.1 - 0.03 + 0.03 * 2 / 3)
