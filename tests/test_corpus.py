"""The real-model corpus through the default pipeline and the gemm-to-conv option.

Corpus: torchvision resnet18 / mobilenet_v3_small / efficientnet_b0, BERT-base and ViT-tiny (transformers
configs, random weights), a model with If and one with Loop (scripted torch), one small CNN at every opset
11..21 — graphs committed in ``fixtures/corpus/`` without weights, filled from a seed by ``tools/corpus.py``
— and the three ddddocr models (``tools/fetch_real_models.py``).

For each: prune → validate → qdq (calibrated on generated inputs) → to-fp16 runs without error, the written
file passes the full ONNX checker and runs in ONNX Runtime (finite outputs, close to the pruned float32
model), and validate's report matches facts taken from the *torch modules* at export time (independent of
onnxsparse's layer discovery): every Conv2d/Linear is a weighted layer, exactly those with a reduction size
divisible by 4 end up 2:4, and the 2:4 FLOPs equal the eligible layers' multiply-accumulates × 2 (every
corpus model gets FLOPs at its example input shapes). gemm-to-conv alone rewrites every constant-weight
Gemm/MatMul and keeps the outputs equal within float32 summation-order error.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import DDDDOCR_NAMES, REAL_MODELS_DIR, make_feeds, run_ort
from corpus import example_inputs, load_manifest, materialize

from onnxsparse.ir.model_io import Model, load_model, ort_session, save_model
from onnxsparse.pipeline import PassContext, Pipeline

DEFAULT = "prune,validate,qdq,to-fp16"  # run as "prune" then the rest, to take the pruned outputs between
MANIFEST = load_manifest()
#: big enough to be worth a marker (still run in CI)
SLOW = {"bert_base", "vit_tiny"}
CONTROL_FLOW = {"if_branches", "loop_recurrence"}  # torch's hooks counted MACs of the executed path only
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MANIFEST] + [
    pytest.param(f"ddddocr_{n}", marks=pytest.mark.slow) for n in DDDDOCR_NAMES
]


@dataclass
class Subject:
    """A corpus model ready to run: its file, inputs, calibration batches and dense outputs."""

    name: str
    path: Path
    feeds: dict[str, np.ndarray]
    calib: list[dict[str, np.ndarray]]
    shapes: dict[str, tuple[int, ...]]
    facts: dict[str, Any]
    reference: list[np.ndarray]


_CACHE: dict[str, Subject] = {}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus")


def subject(name: str, folder: Path, real_models: dict[str, Path] | None = None) -> Subject:
    if name in _CACHE:
        return _CACHE[name]
    if name.startswith("ddddocr_"):
        assert real_models is not None
        path = real_models[name.removeprefix("ddddocr_")]
        feeds = make_feeds(path, seed=100)
        calib = [make_feeds(path, seed=s) for s in range(4)]
        facts = graph_facts(onnx.load(str(path), load_external_data=False))
    else:
        entry = MANIFEST[name]
        path = materialize(name, folder / name)
        feeds = example_inputs(name, seed=100)
        calib = [example_inputs(name, seed=s) for s in range(4)]
        facts = entry["facts"]
    shapes = {k: tuple(v.shape) for k, v in feeds.items()}
    _CACHE[name] = Subject(name, path, feeds, calib, shapes, facts, run_ort(path, feeds))
    return _CACHE[name]


@pytest.fixture
def model(request: pytest.FixtureRequest, corpus_dir: Path) -> Subject:
    name = request.param
    real = request.getfixturevalue("real_models") if name.startswith("ddddocr_") else None
    return subject(name, corpus_dir, real)


def graph_facts(proto: onnx.ModelProto) -> dict[str, Any]:
    """Layer counts read straight off a graph whose weights are plain initializers (the ddddocr models): a
    second, much simpler account than ``find_layers`` to check it against. Reduction size: Conv W[1]
    (= C_in/group), ConvTranspose W[0]/group, Gemm K by transB, MatMul W[-2]."""
    inits = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    layers = eligible = 0
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = inits.get(node.input[1])
        if w is None:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            k = w[1]
        elif node.op_type == "ConvTranspose":
            k = w[0] // int(attrs.get("group", 1))
        elif node.op_type == "Gemm":
            k = w[1] if attrs.get("transB", 0) else w[0]
        else:
            k = w[-2]
        layers += 1
        eligible += int(k % 4 == 0)
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"weighted_layers": layers, "eligible_2_4": eligible, "ops": ops}


def _hashes(path: Path) -> dict[str, str]:
    files = [path, path.with_name(path.name + ".data")]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.exists()}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-30))


def _check_written(result_model: Model, out: Path, s: Subject, pruned: list[np.ndarray]) -> None:
    save_model(result_model, out)
    onnx.checker.check_model(str(out), full_check=True)
    outputs = run_ort(out, s.feeds)
    assert [o.shape for o in outputs] == [r.shape for r in s.reference]
    for got, ref in zip(outputs, pruned, strict=True):
        if ref.dtype.kind == "f":
            assert np.isfinite(got).all()
            # int8 activations and weights plus float16: close to the pruned float32 model, not equal to it
            assert _cosine(got, ref) > 0.99, (s.name, _cosine(got, ref))


def _check_coverage(summary: dict[str, Any], rows: list[dict[str, Any]], s: Subject) -> None:
    """validate's numbers against the torch-side facts recorded at export."""
    facts = s.facts
    assert summary["dense_eligible"] == 0  # every eligible layer was pruned
    assert summary["sparse"] == summary["eligible"] == facts["eligible_2_4"]
    assert sum(1 for r in rows if r["weight"] is not None) == facts["weighted_layers"]
    if "macs" not in facts:
        return
    # The corpus models run with concrete input shapes: every one gets FLOPs (BERT's through the symbolic
    # shape inference fallback, onnx's alone loses the sequence length at its position-id Slice).
    assert summary["coverage_basis"] == "flops"
    if s.name not in CONTROL_FLOW:
        assert summary["sparse_flops"] == 2 * facts["eligible_macs"]
        assert summary["total_flops"] >= 2 * facts["macs"]


def _run_in_memory(m: Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ORT on the in-memory model (edited weights in scratch files included), without writing it out."""
    opts = __import__("onnxruntime").SessionOptions()
    opts.log_severity_level = 3
    return list(ort_session(m, opts).run(None, feeds))


def _two_stage(s: Subject, first: str, rest: str) -> tuple[Any, Any, list[np.ndarray]]:
    """The pipeline ``first + rest`` run in two steps on one model and context, so the float32 outputs
    after ``first`` (the pruned model) can be taken on the way without pruning twice."""
    model = load_model(s.path)
    ctx = PassContext(shapes=s.shapes, calibration=s.calib)
    head = Pipeline(first).run(model, ctx)
    pruned = _run_in_memory(head.model, s.feeds)
    tail = Pipeline(rest).run(head.model, ctx)
    return head, tail, pruned


@pytest.mark.parametrize("model", NAMES, indirect=True)
def test_default_pipeline(model: Subject, tmp_path: Path) -> None:
    s = model
    before = _hashes(s.path)
    head, tail, pruned = _two_stage(s, "prune", DEFAULT.removeprefix("prune,"))
    results = head.results + tail.results
    assert [r.name for r in results] == ["prune", "validate", "qdq", "to-fp16"]
    if s.facts["weighted_layers"]:
        assert results[2].modified and results[3].modified
    else:  # ddddocr common_old: ORT dynamic quantization (ConvInteger/MatMulInteger), no float layer to prune
        assert not results[0].modified and not results[2].modified  # (to-fp16 still converts)
    validate = results[1].report.details
    _check_coverage(validate["summary"], validate["layers"], s)
    _check_written(tail.model, tmp_path / "out.onnx", s, pruned)
    assert _hashes(s.path) == before


@pytest.mark.parametrize("model", NAMES, indirect=True)
def test_gemm_to_conv_keeps_outputs(model: Subject, tmp_path: Path) -> None:
    s = model
    result = Pipeline("gemm-to-conv").run(load_model(s.path), PassContext(shapes=s.shapes))
    report = result.results[0].report
    # every constant-weight Gemm/MatMul (all Linear modules) is rewritten
    assert len(report.changed) == s.facts["weighted_layers"] - s.facts["ops"].get("Conv", 0), report.skipped
    outputs = run_ort(result.model, s.feeds)
    for got, ref in zip(outputs, s.reference, strict=True):
        # A 1x1 Conv sums the same products as the Gemm in another order: fp32 rounding differs by a few ulps
        # of the largest partial sums, so the bound scales with the output's magnitude.
        scale = float(np.max(np.abs(ref))) if ref.size else 1.0
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(scale, 1e-6))


@pytest.mark.parametrize("model", NAMES, indirect=True)
def test_gemm_to_conv_option_in_default_pipeline(model: Subject, tmp_path: Path) -> None:
    s = model
    _, tail, pruned = _two_stage(s, "gemm-to-conv,prune", DEFAULT.removeprefix("prune,"))
    summary = tail.results[0].report.details["summary"]
    assert summary["dense_eligible"] == 0 and summary["sparse"] == summary["eligible"] == s.facts["eligible_2_4"]
    assert not {"Gemm", "MatMul"} & {n.op_type for n in tail.model.proto.graph.node if _constant_weight(n, tail)}
    _check_written(tail.model, tmp_path / "out.onnx", s, pruned)


def _constant_weight(node: onnx.NodeProto, result: Any) -> bool:
    inits = {t.name for t in result.model.proto.graph.initializer}
    return node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits


def test_corpus_graphs_are_small_and_weightless() -> None:
    """What is committed is graph only: every sizeable float tensor is external and its data file absent."""
    for entry in MANIFEST.values():
        path = Path(__file__).resolve().parent.parent / "fixtures" / "corpus" / entry["file"]
        assert path.stat().st_size < 256 * 1024
        proto = onnx.load(str(path), load_external_data=False)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert entry["weight_bytes"] == 0 or external
        assert not path.with_name(path.name + ".data").exists()


def test_materialize_is_deterministic(tmp_path: Path) -> None:
    a = materialize("resnet18", tmp_path / "a")
    b = materialize("resnet18", tmp_path / "b")
    assert (a.parent / "resnet18.onnx.data").read_bytes() == (b.parent / "resnet18.onnx.data").read_bytes()
    c = materialize("resnet18", tmp_path / "c", seed=1)
    assert (a.parent / "resnet18.onnx.data").read_bytes() != (c.parent / "resnet18.onnx.data").read_bytes()
    assert REAL_MODELS_DIR.name == "ddddocr"
