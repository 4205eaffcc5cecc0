"""``onnxsparse check``: table and JSON output, exit codes 0 / 1 / 2 through click's runner, and the
``run -p prune`` → ``check`` round trip."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from conftest import fixture_path

from onnxsparse.cli import main


def _invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture()
def pruned_cnn(tmp_path: Path) -> Path:
    out = tmp_path / "cnn_sparse.onnx"
    res = _invoke("run", fixture_path("cnn"), "-p", "prune", "-o", out)
    assert res.exit_code == 0, res.output
    assert "7 tensor(s) pruned to 2:4: " in res.output  # prune's own summary (PrunePass.render)
    assert "skipped 1: C_in/group=3 is not divisible by 4 [stem]" in res.output
    return out


def test_table_and_exit_0(pruned_cnn: Path) -> None:
    res = _invoke("check", pruned_cnn, "--shapes", "x:1x3x32x32", "--require-all", "--min-coverage", "0.9")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:6] == ["layer", "op", "weight", "shape", "axis", "status"]
    row = next(line for line in lines if line.startswith("block1.conv1 "))
    assert " sparse " in row and "50.0%" in row and "0/" in row
    assert "ineligible: C_in/group=3 is not divisible by 4" in next(line for line in lines if line.startswith("stem "))
    assert "7/7 eligible layers are 2:4" in res.output and "gate passed" in res.output


def test_json_stdout(pruned_cnn: Path) -> None:
    res = _invoke("check", pruned_cnn, "--json", "-", "--shapes", "x:2x3x32x32")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)  # nothing but JSON on stdout
    assert data["pattern"] == "2:4" and data["summary"]["coverage_basis"] == "flops"
    assert {r["layer"]: r["status"] for r in data["layers"]}["up"] == "sparse"
    assert data["gate"]["passed"] is True


def test_json_file_and_table(pruned_cnn: Path, tmp_path: Path) -> None:
    rep = tmp_path / "r.json"
    res = _invoke("check", pruned_cnn, "--json", rep)
    assert res.exit_code == 0 and "eligible layers" in res.output
    data = json.loads(rep.read_text())
    # batch is symbolic, but it scales every layer alike: FLOPs at batch 1, without --shapes
    assert data["summary"]["layers"] == 9 and data["summary"]["coverage_basis"] == "flops"
    assert data["summary"]["flops_at"] == {"batch": 1}


def test_gate_is_the_same_with_or_without_shapes(pruned_cnn: Path) -> None:
    """Issue 12: the gate passed at 96.2% by params without --shapes and failed at 93.7% by FLOPs with them."""
    results = []
    for extra in ([], ["--shapes", "x:1x3x32x32"], ["--shapes", "x:8x3x32x32"]):
        res = _invoke("check", pruned_cnn, "--min-coverage", "0.95", "--json", "-", *extra)
        assert res.exit_code == 2, res.output
        summary = json.loads(res.stdout)["summary"]
        assert summary["coverage_basis"] == "flops"
        results.append(summary["coverage"])
    assert results[0] == pytest.approx(results[1]) == pytest.approx(results[2])
    assert results[0] == pytest.approx(0.937, abs=5e-4)


def test_params_fallback_is_warned_and_recorded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """seq is symbolic and attention's QK^T grows with seq² while the projections grow with seq: no one FLOP
    weighting fits every length, so the gate weighs parameters, says so, and the JSON records why."""
    out = tmp_path / "t.onnx"
    assert _invoke("run", fixture_path("transformer_block"), "-p", "prune", "-o", out).exit_code == 0
    with caplog.at_level("WARNING"):
        res = _invoke("check", out, "--min-coverage", "0.5", "--json", "-")
    summary = json.loads(res.stdout)["summary"]
    assert summary["coverage_basis"] == "params" and summary["flops_at"] is None
    assert "symbolic dim 'seq' does not scale layer 'attn.qk'" in summary["coverage_basis_detail"]
    assert "the coverage gate weights layers by parameters" in caplog.text
    res = _invoke("check", out, "--min-coverage", "0.5", "--json", "-", "--shapes", "x:1x8x64")
    assert json.loads(res.stdout)["summary"]["coverage_basis"] == "flops"


def test_gate_failures_exit_2(tmp_path: Path) -> None:
    dense = fixture_path("cnn")
    res = _invoke("check", dense, "--min-coverage", "0.5")
    assert res.exit_code == 2
    assert "gate failed" in res.stderr and "below min-coverage 50.0%" in res.stderr
    assert "block1.conv1" in res.stdout  # the table still shows what is dense
    res = _invoke("check", dense, "--require-all", "--json", "-")
    assert res.exit_code == 2
    data = json.loads(res.stdout)
    assert data["gate"]["passed"] is False and "7 eligible layer(s) are not 2:4" in data["gate"]["failures"][0]
    # partly pruned: require-all fails, a modest coverage gate passes
    out = tmp_path / "partly.onnx"
    assert _invoke("run", dense, "-p", "prune{exclude=^pw$}", "-o", out).exit_code == 0
    assert _invoke("check", out, "--require-all").exit_code == 2
    assert _invoke("check", out, "--min-coverage", "0.5", "--shapes", "x:1x3x32x32").exit_code == 0


def test_pattern_option(tmp_path: Path) -> None:
    out = tmp_path / "p34.onnx"
    assert _invoke("run", fixture_path("transformer_block"), "-p", "prune{pattern=3:4}", "-o", out).exit_code == 0
    assert _invoke("check", out, "--pattern", "3:4", "--require-all").exit_code == 0
    assert _invoke("check", out, "--pattern", "2:4", "--require-all").exit_code == 2


@pytest.mark.parametrize(
    "args",
    [
        ["missing.onnx"],
        ["{cnn}", "--pattern", "4:2"],
        ["{cnn}", "--min-coverage", "1.5"],
        ["{cnn}", "--shapes", "nope:1x2"],
        ["{cnn}", "--shapes", "x:1x3"],
        ["{notonnx}"],
    ],
)
def test_errors_exit_1(args: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    args = [a.format(cnn=fixture_path("cnn"), notonnx=bad) for a in args]
    res = _invoke("check", *args)
    assert res.exit_code == 1, res.output
    assert res.stderr.startswith("error: ") and "Traceback" not in res.output


def test_check_does_not_write(pruned_cnn: Path) -> None:
    before = sorted(p.name for p in pruned_cnn.parent.iterdir())
    data = pruned_cnn.read_bytes()
    assert _invoke("check", pruned_cnn).exit_code == 0
    assert sorted(p.name for p in pruned_cnn.parent.iterdir()) == before and pruned_cnn.read_bytes() == data


def test_run_with_validate_gate_exit_2_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    res = _invoke("run", fixture_path("cnn"), "-p", "validate{min-coverage=0.5}", "-o", out)
    assert res.exit_code == 2 and not out.exists()
    res = _invoke("run", fixture_path("cnn"), "-p", "prune,validate{require-all=true}", "-o", out)
    assert res.exit_code == 0, res.output
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


@pytest.mark.slow
@pytest.mark.parametrize("batch,seq", [(2, 16), (1, 32)])
def test_bert_corpus_model_gets_flop_weighted_coverage(tmp_path: Path, batch: int, seq: int) -> None:
    """BERT-base (corpus graph, generated weights): onnx's inference loses the sequence length at the
    position-id Slice; with ORT's symbolic inference as fallback every layer has FLOPs, so coverage is
    FLOP-weighted, and an FFN layer's FLOPs are 2·M·N·K with M = batch·seq tokens."""
    from corpus import materialize

    path = materialize("bert_base", tmp_path / "bert")
    shapes = ",".join(f"{name}:{batch}x{seq}" for name in ("input_ids", "attention_mask", "token_type_ids"))
    res = _invoke("check", path, "--shapes", shapes, "--json", "-")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    summary = report["summary"]
    assert summary["coverage_basis"] == "flops" and summary["total_flops"] > 0
    assert all(r["flops"] is not None for r in report["layers"])
    ffn = [r for r in report["layers"] if r["layer"].endswith("intermediate/dense/MatMul")]
    assert len(ffn) == 12
    for row in ffn:
        k, n = row["shape"]  # MatMul weight [K, N]
        assert (k, n) == (768, 3072)
        assert row["gemm"]["m"] == batch * seq == 32
        assert row["flops"] == 2 * 32 * n * k
    assert summary["total_flops"] == sum(r["flops"] for r in report["layers"])
