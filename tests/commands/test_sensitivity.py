"""``onnxsparse sensitivity``: per-layer scores against an independent recomputation, the sorted table and
JSON, plans within budget (FLOP share and ``--bench`` gains), the measured plan against ``prune{plan=...}``
run separately, parallel workers, and bad input (one line, exit 1, nothing written).

The model is generated here: three MatMuls where the middle weight is already nearly 2:4 (two of every four
entries tiny), so it must come out as the least sensitive layer. Every expected number is recomputed from ONNX
Runtime outputs with numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import run_ort
from onnx import TensorProto, helper, numpy_helper

from onnxsparse.cli import main
from onnxsparse.plan import choose_plan

HELD = 12  # --eval-samples in these tests


def _invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _mlp(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32) / 4
    w2 = rng.standard_normal((32, 32)).astype(np.float32) / 5
    groups = w2.reshape(8, 4, 32)
    groups[:, 2:, :] *= 1e-3  # two of every four along K are tiny: magnitude 2:4 barely changes this layer
    w3 = rng.standard_normal((32, 8)).astype(np.float32) / 5
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("MatMul", ["a2", "w3"], ["y"], name="fc3"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    model = _mlp(tmp_path / "mlp.onnx")
    x = np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return model, tmp_path / "calib.npz", x


def _rel_l2(ref: np.ndarray, cand: np.ndarray) -> float:
    return float(np.linalg.norm(cand.astype(np.float64) - ref) / np.linalg.norm(ref.astype(np.float64)))


def _cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    return float(((r * c).sum(1) / np.linalg.norm(r, axis=1) / np.linalg.norm(c, axis=1)).mean())


def _pruned(model: Path, pipeline: str, out: Path, *extra: object) -> Path:
    res = _invoke("run", model, "-p", pipeline, "-o", out, *extra)
    assert res.exit_code == 0, res.output
    return out


def test_scores_sorted_and_recomputed(setup: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    model, calib, x = setup
    out = tmp_path / "sens.json"
    res = _invoke("sensitivity", model, "--calib", calib, "--eval-samples", HELD, "--jobs", 1, "--json", out)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["eval_samples"] == HELD and report["stats_samples"] == 40 - HELD
    names = [r["layer"] for r in report["layers"]]
    errors = [r["rel_l2"] for r in report["layers"]]
    assert sorted(names) == ["fc1", "fc2", "fc3"]
    assert errors == sorted(errors, reverse=True) and names[-1] == "fc2"  # the nearly-2:4 layer is least sensitive
    dense = run_ort(model, {"x": x[:HELD]})[0]
    for row in report["layers"]:
        alone = _pruned(model, f"prune{{include=^{row['layer']}$}}", tmp_path / f"{row['layer']}.onnx")
        cand = run_ort(alone, {"x": x[:HELD]})[0]
        assert row["rel_l2"] == pytest.approx(_rel_l2(dense, cand), rel=1e-5)
        assert row["cosine"] == pytest.approx(_cosine(dense, cand), rel=1e-6)
    assert errors[-1] < 0.01 < errors[0]
    # the table shows the same order
    table = [line.split()[0] for line in res.stdout.splitlines() if line.split()[:1] and line.split()[0] in names]
    assert table == names
    assert report["gains_basis"] == "flops"
    shares = {r["layer"]: r["gain"] for r in report["layers"]}
    assert shares["fc2"] == pytest.approx(32 * 32 / (16 * 32 + 32 * 32 + 32 * 8))


def test_plan_within_budget_measured_as_prune_applies_it(setup: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    model, calib, x = setup
    res = _invoke("sensitivity", model, "--calib", calib, "--eval-samples", HELD, "--json", "-")
    scores = {r["layer"]: r["rel_l2"] for r in json.loads(res.stdout)["layers"]}
    budget = scores["fc2"] + min(scores["fc1"], scores["fc3"]) * 1.01  # fits fc2 and one of the others
    plan_path = tmp_path / "plan.json"
    res = _invoke(
        "sensitivity",
        model,
        "--calib",
        calib,
        "--eval-samples",
        HELD,
        "--max-error",
        f"{budget:.6f}",
        "--plan-out",
        plan_path,
        "--json",
        tmp_path / "s.json",
    )
    assert res.exit_code == 0, res.output
    plan = json.loads(plan_path.read_text())
    assert plan["version"] == 1 and plan["method"] == "magnitude" and plan["pattern"] == "2:4"
    assert "fc2" in plan["layers"] and len(plan["layers"]) == 2
    assert sum(scores[n] for n in plan["layers"]) <= budget
    unchosen = [n for n in scores if n not in plan["layers"]]
    assert all(sum(scores[n] for n in plan["layers"]) + scores[u] > budget for u in unchosen)  # nothing more fits
    # what `prune{plan=...}` writes, measured independently on the held-out samples
    applied = _pruned(model, f"prune{{plan={plan_path}}}", tmp_path / "planned.onnx")
    dense = run_ort(model, {"x": x[:HELD]})[0]
    cand = run_ort(applied, {"x": x[:HELD]})[0]
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["plan"]["measured"]["rel_l2"] == pytest.approx(_rel_l2(dense, cand), rel=1e-6)
    assert report["plan"]["measured"]["rel_l2"] <= budget
    assert plan["estimated"]["rel_l2"] == pytest.approx(sum(scores[n] for n in plan["layers"]), rel=1e-9)
    assert "measured rel L2" in res.stdout and "estimated rel L2" in res.stdout and f"wrote {plan_path}" in res.stdout


def test_sparsegpt_plan_with_min_cosine_and_parallel_jobs(setup: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    """Two workers give the numbers one process gives; the plan is measured with statistics from the
    non-held-out samples, exactly as `run -p prune{plan=...} --calib <those samples>` prunes."""
    model, calib, x = setup
    one = _invoke(
        "sensitivity",
        model,
        "--calib",
        calib,
        "--eval-samples",
        HELD,
        "--method",
        "sparsegpt",
        "--jobs",
        1,
        "--json",
        "-",
    )
    assert one.exit_code == 0, one.output
    plan_path = tmp_path / "plan.json"
    two = _invoke(
        "sensitivity",
        model,
        "--calib",
        calib,
        "--eval-samples",
        HELD,
        "--method",
        "sparsegpt",
        "--jobs",
        2,
        "--min-cosine",
        "0.99",
        "--plan-out",
        plan_path,
        "--json",
        "-",
    )
    assert two.exit_code == 0, two.output
    a = {r["layer"]: r for r in json.loads(one.stdout)["layers"]}
    report = json.loads(two.stdout)
    for r in report["layers"]:
        assert r["rel_l2"] == pytest.approx(a[r["layer"]]["rel_l2"], rel=1e-6)
        assert r["layer_error"] is not None and r["method"] == "sparsegpt"
    plan = json.loads(plan_path.read_text())
    assert plan["method"] == "sparsegpt" and plan["layers"]
    assert sum(1 - a[n]["cosine"] for n in plan["layers"]) <= 0.01 + 1e-12
    np.savez(tmp_path / "rest.npz", x=x[HELD:])
    applied = _pruned(model, f"prune{{plan={plan_path}}}", tmp_path / "planned.onnx", "--calib", tmp_path / "rest.npz")
    dense = run_ort(model, {"x": x[:HELD]})[0]
    cand = run_ort(applied, {"x": x[:HELD]})[0]
    assert report["plan"]["measured"]["cosine"] == pytest.approx(_cosine(dense, cand), rel=1e-6)
    assert report["plan"]["measured"]["cosine"] >= 0.99


def test_bench_gains_and_speedup_estimate(setup: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    """Gains from a `bench --json` report (hand-written timings): fc3 is slower sparse, so never planned."""
    model, calib, _ = setup
    bench = {
        "dtype": "fp16",
        "layers": [
            {"name": "fc1", "dense_ms": 0.010, "sparse_ms": 0.008},
            {"name": "fc2", "dense_ms": 0.020, "sparse_ms": 0.014},
            {"name": "fc3", "dense_ms": 0.005, "sparse_ms": 0.006},
        ],
    }
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    res = _invoke(
        "sensitivity",
        model,
        "--calib",
        calib,
        "--eval-samples",
        HELD,
        "--bench",
        tmp_path / "bench.json",
        "--max-error",
        "10",
        "--json",
        "-",
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["gains_basis"] == "bench"
    assert sorted(report["plan"]["layers"]) == ["fc1", "fc2"]
    assert report["plan"]["estimated"]["speedup"] == pytest.approx(0.035 / (0.035 - 0.002 - 0.006))
    gains = {r["layer"]: (r["gain"], r["gain_note"]) for r in report["layers"]}
    assert gains["fc3"] == (0.0, "sparse not faster in --bench")


def test_choose_plan_prefers_best_single_layer() -> None:
    # greedy by ratio takes a (tiny error) and then cannot fit b; b alone gains more
    assert choose_plan({"a": 0.02, "b": 0.99}, {"a": 0.05, "b": 0.9}, 1.0) == ["b"]
    assert choose_plan({"a": 0.0, "b": 0.5, "c": 0.5}, {"a": 0.1, "b": 0.3, "c": 0.2}, 0.6) == ["a", "b"]
    assert choose_plan({"a": 0.2}, {"a": 0.0}, 1.0) == []  # no gain: never pruned


def test_unknown_layer_in_plan_is_an_error(setup: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    model, _, _ = setup
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "method": "magnitude", "pattern": "2:4", "layers": ["fc1", "fc9"]}))
    out = tmp_path / "o.onnx"
    res = _invoke("run", model, "-p", f"prune{{plan={plan}}}", "-o", out)
    assert res.exit_code == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "fc9" in res.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("arrays", "extra", "message"),
    [
        ({"inp": np.zeros((20, 16), np.float32)}, (), "has 'inp', which is not a model input"),
        ({"x": np.zeros((20, 15), np.float32)}, (), "dim 1 must be 16"),
        (
            {"x": np.zeros((20, 16), np.float32)},
            ("--method", "wanda", "--eval-samples", "20"),
            "all 20 calibration samples are held out",
        ),
        (
            {"x": np.zeros((20, 16), np.float32)},
            ("--max-error", "0.1", "--min-cosine", "0.9"),
            "give --max-error or --min-cosine, not both",
        ),
        ({"x": np.zeros((20, 16), np.float32)}, ("--plan-out", "PLAN"), "--plan-out needs a budget"),
    ],
)
def test_bad_input_one_line_no_output(
    setup: tuple[Path, Path, np.ndarray], tmp_path: Path, arrays: dict, extra: tuple, message: str
) -> None:
    model, _, _ = setup
    np.savez(tmp_path / "bad.npz", **arrays)
    plan, rep = tmp_path / "plan.json", tmp_path / "rep.json"
    extra = tuple(str(plan) if e == "PLAN" else e for e in extra)
    args = ("--plan-out", plan) if "--plan-out" not in extra and "--max-error" in extra else ()
    res = _invoke("sensitivity", model, "--calib", tmp_path / "bad.npz", *extra, *args, "--json", rep)
    assert res.exit_code == 1, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.stderr
    assert "Traceback" not in res.output
    assert not plan.exists() and not rep.exists()


def test_plan_over_budget_when_measured_drops_layers(setup: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    """Here 1 - cosine does not add up (all three together measure worse than the sum): the plan fitted on the
    estimate is measured over budget, so the layer with the least gain per error is dropped and it is measured
    again, within budget."""
    model, calib, x = setup
    res = _invoke("sensitivity", model, "--calib", calib, "--eval-samples", HELD, "--json", "-")
    scores = {r["layer"]: 1 - r["cosine"] for r in json.loads(res.stdout)["layers"]}
    dense = run_ort(model, {"x": x[:HELD]})[0]
    everything = run_ort(_pruned(model, "prune", tmp_path / "all.onnx"), {"x": x[:HELD]})[0]
    min_cos = 1 - sum(scores.values()) - 1e-4  # the estimate for all three fits ...
    assert _cosine(dense, everything) < min_cos  # ... the measurement does not
    plan_path = tmp_path / "plan.json"
    res = _invoke(
        "sensitivity",
        model,
        "--calib",
        calib,
        "--eval-samples",
        HELD,
        "--min-cosine",
        f"{min_cos:.6f}",
        "--plan-out",
        plan_path,
        "--json",
        "-",
    )
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)["plan"]
    assert plan["measurements"] == 2 and len(plan["dropped"]) == 1 and len(plan["layers"]) == 2
    flops = {"fc1": 16 * 32, "fc2": 32 * 32, "fc3": 32 * 8}
    assert plan["dropped"] == [min(("fc1", "fc3"), key=lambda n: flops[n] / scores[n])]
    applied = _pruned(model, f"prune{{plan={plan_path}}}", tmp_path / "planned.onnx")
    measured = _cosine(dense, run_ort(applied, {"x": x[:HELD]})[0])
    assert plan["measured"]["cosine"] == pytest.approx(measured, rel=1e-6) and measured >= min_cos


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_each_model_state_is_walked_once(
    setup: tuple[Path, Path, np.ndarray], tmp_path: Path, layer_walks: list[onnx.GraphProto], method: str
) -> None:
    """The layer index is built once per model: the input (candidates, then statistics), the scorer's copy
    (every layer pruned and put back: values only), and each measured plan's pruned copy. The scorer that
    measures plans runs another model's outputs and never walks its own copy."""
    model, calib, _ = setup
    args = ["sensitivity", model, "--calib", calib, "--eval-samples", HELD, "--method", method, "--jobs", 1]
    res = _invoke(*args, "--min-cosine", "0", "--json", "-")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert sorted(r["layer"] for r in report["layers"]) == ["fc1", "fc2", "fc3"]
    assert report["plan"]["measurements"] == 1 and len(report["plan"]["layers"]) == 3
    assert len(layer_walks) == 3  # input, scorer, plan
    assert all(a is not b for i, a in enumerate(layer_walks) for b in layer_walks[i + 1 :])  # three graphs
