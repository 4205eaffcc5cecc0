#!/usr/bin/env python3
"""OCR and detection agreement for ddddocr's trained models (``real_models/ddddocr/``, ``fetch_real_models.py``).

``common.onnx`` reads a grayscale text line: input ``input1[1,1,64,W]`` float in [0,1], output logits
``[T,1,8210]`` (the graph declares ``[1,seqlen]``, ORT warns, the values are logits) over ddddocr's
``CHARSET_BETA`` (index 0 = CTC blank); ``common_old.onnx`` is the same network over ``CHARSET_OLD``. The
preprocessing mirrors ddddocr 1.6.1 (``core/ocr_engine.py``): resize to height 64 keeping the aspect (LANCZOS),
convert to ``L``, divide by 255. Greedy CTC: argmax per step, collapse repeats, drop blanks.

Test images are rendered here with Pillow's bundled font (``ImageFont.load_default(size)``, so no system font
is needed): seeded random alphanumeric strings, sizes, offsets, ink and background shades and light noise —
deterministic for one Pillow version. The metrics compare a candidate (pruned, quantised) model against the
dense one on the same images; the dense model's own accuracy against the rendered text is reported as a sanity
check that the images are in its domain.

``common_det.onnx`` (YOLOX, ``images[1,3,416,416]`` BGR 0..255, grey 114 padding, output ``[1,3549,6]``) gets
``detector_agreement``: IoU of the anchor sets whose score (objectness x class) passes 0.1, and the F1 of the
boxes after ddddocr's decode + NMS, matched at IoU >= 0.5.

CLI: ``python tools/ddddocr_eval.py --compare DENSE.onnx CANDIDATE.onnx [--n 200] [--det]`` prints JSON;
``python tools/ddddocr_eval.py --calib-out real_models/ddddocr/data`` writes ``calib.npz`` / ``det_calib.npz``.
"""

from __future__ import annotations

import argparse
import ast
import json
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "real_models" / "ddddocr"
OCR_MODEL = MODEL_DIR / "common.onnx"
DET_MODEL = MODEL_DIR / "common_det.onnx"
CHARSETS = MODEL_DIR / "charsets.py"
DATA_DIR = MODEL_DIR / "data"
HEIGHT = 64
DET_SIZE = 416
ALPHABET = string.ascii_letters + string.digits
#: ddddocr's detector post-processing thresholds (core/detection_engine.py get_bbox)
SCORE_THR, NMS_THR = 0.1, 0.45


def load_charset(name: str = "CHARSET_BETA", path: Path | str = CHARSETS) -> list[str]:
    """A character table from ddddocr's ``charsets.py``, read with ``ast.literal_eval`` (the file is not run)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            value = ast.literal_eval(node.value)
            if isinstance(value, list) and all(isinstance(c, str) for c in value):
                return value
    raise ValueError(f"{path} has no list {name}")


def charset_for(model_path: Path | str) -> list[str]:
    """``CHARSET_OLD`` for ``common_old*`` models, else ``CHARSET_BETA`` (ddddocr's pairing)."""
    return load_charset("CHARSET_OLD" if Path(model_path).name.startswith("common_old") else "CHARSET_BETA")


# ------------------------------------------------------------------------------------------- images


def _pil() -> Any:
    from PIL import Image, ImageDraw, ImageFont

    return Image, ImageDraw, ImageFont


def render_text(text: str, rng: np.random.Generator) -> Any:
    """A captcha-like RGB line of ``text``: random size, offset, shades and pixel noise."""
    image_mod, draw_mod, font_mod = _pil()
    font = font_mod.load_default(size=int(rng.integers(34, 48)))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(6, 20)), int(rng.integers(4, 12))
    width, height = right - left + 2 * pad_x, bottom - top + 2 * pad_y
    bg = int(rng.integers(200, 256))
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    image = image_mod.new("RGB", (width, height), (bg, bg, bg))
    draw_mod.Draw(image).text((pad_x - left, pad_y - top), text, fill=ink, font=font)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-18, 19, size=(height, width, 1))
    return image_mod.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def preprocess(image: Any, width: int | None = None) -> np.ndarray:
    """ddddocr's OCR input ``[1,1,64,W]`` float32; ``width`` forces W (for stacking calibration samples)."""
    image_mod, _, _ = _pil()
    w = width if width is not None else max(1, int(image.size[0] * (HEIGHT / image.size[1])))
    gray = image.resize((w, HEIGHT), image_mod.LANCZOS).convert("L")
    return (np.asarray(gray, dtype=np.float32) / 255.0)[None, None]


def samples(n: int, seed: int = 0, width: int | None = None) -> tuple[list[str], list[np.ndarray]]:
    """``n`` (text, OCR input) pairs: strings of 4-7 characters from ``ALPHABET``, rendered and preprocessed."""
    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(list(ALPHABET), size=int(rng.integers(4, 8)))) for _ in range(n)]
    return texts, [preprocess(render_text(t, rng), width) for t in texts]


def ctc_greedy(logits: np.ndarray, charset: Sequence[str]) -> str:
    """Greedy CTC decode of ``[T,1,C]`` (or ``[T,C]``) logits: argmax, collapse repeats, drop blank 0."""
    steps = logits.reshape(logits.shape[0], -1) if logits.ndim == 2 else logits[:, 0, :]
    best = steps.argmax(axis=-1)
    keep = np.concatenate([[True], best[1:] != best[:-1]]) & (best != 0)
    return "".join(charset[i] for i in best[keep] if i < len(charset))


def _session(model: Any) -> Any:
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the declared [1,seqlen] output shape is wrong; ORT warns on every run
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def recognise(model: Any, inputs: Sequence[np.ndarray], charset: Sequence[str]) -> list[str]:
    sess = _session(model)
    name = sess.get_inputs()[0].name
    return [ctc_greedy(sess.run(None, {name: x})[0], charset) for x in inputs]


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def char_agreement(ref: Sequence[str], hyp: Sequence[str]) -> float:
    """1 - total edit distance / total reference length (1.0 when every string matches)."""
    total = sum(max(len(r), 1) for r in ref)
    return 1.0 - sum(_edit_distance(r, h) for r, h in zip(ref, hyp, strict=True)) / total


def agreement(dense_path: Any, cand_path: Any, n: int = 200, seed: int = 0) -> dict[str, float]:
    """How often the candidate OCR model reads the same text as the dense one, on ``n`` rendered lines.

    ``text_agreement``: fraction of images decoded to the identical string; ``char_agreement``: 1 - edit
    distance / length of the dense reading; ``dense_accuracy`` / ``candidate_accuracy``: exact match with the
    rendered text (case-sensitive), the sanity check that the images suit the model.
    """
    charset = charset_for(dense_path if isinstance(dense_path, str | Path) else OCR_MODEL)
    texts, inputs = samples(n, seed)
    dense = recognise(dense_path, inputs, charset)
    cand = recognise(cand_path, inputs, charset)
    return {
        "text_agreement": float(np.mean([d == c for d, c in zip(dense, cand, strict=True)])),
        "char_agreement": char_agreement(dense, cand),
        "dense_accuracy": float(np.mean([d == t for d, t in zip(dense, texts, strict=True)])),
        "candidate_accuracy": float(np.mean([c == t for c, t in zip(cand, texts, strict=True)])),
    }


# ------------------------------------------------------------------------------------------- detector


def det_image(rng: np.random.Generator) -> np.ndarray:
    """A click-captcha-like ``[1,3,416,416]`` BGR 0..255 input: 3-6 large glyphs scattered on a noisy field."""
    image_mod, draw_mod, font_mod = _pil()
    w, h = int(rng.integers(280, 417)), int(rng.integers(160, 260))
    base = rng.integers(120, 256, size=3)
    field = np.clip(base + rng.integers(-40, 41, size=(h, w, 3)), 0, 255).astype(np.uint8)
    image = image_mod.fromarray(field)
    draw = draw_mod.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        font = font_mod.load_default(size=int(rng.integers(30, 56)))
        ink = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.text(
            (int(rng.integers(0, w - 40)), int(rng.integers(0, h - 50))),
            str(rng.choice(list(ALPHABET))),
            fill=ink,
            font=font,
        )
    # ddddocr's preproc: scale the longer side to 416 (linear), pad with 114, HWC->CHW, BGR as cv2 decodes it
    r = min(DET_SIZE / h, DET_SIZE / w)
    resized = np.asarray(image.resize((int(w * r), int(h * r)), image_mod.BILINEAR))[:, :, ::-1]
    padded = np.full((DET_SIZE, DET_SIZE, 3), 114, dtype=np.uint8)
    padded[: resized.shape[0], : resized.shape[1]] = resized
    return np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32)[None]


def _decode(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """YOLOX grid decode of ``[1,A,6]``: (boxes xyxy ``[A,4]``, scores ``[A]``), as ddddocr's demo_postprocess."""
    grids, strides = [], []
    for stride in (8, 16, 32):
        size = DET_SIZE // stride
        xv, yv = np.meshgrid(np.arange(size), np.arange(size))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((size * size, 1), stride))
    grid, stride_col = np.concatenate(grids), np.concatenate(strides)
    pred = raw[0].astype(np.float64)
    xy = (pred[:, :2] + grid) * stride_col
    wh = np.exp(pred[:, 2:4]) * stride_col
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    return boxes, pred[:, 4] * pred[:, 5:].max(axis=1)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(box[:2], others[:, :2]), np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(hi - lo + 1, 0, None), axis=1)
    area = lambda b: np.prod(b[..., 2:] - b[..., :2] + 1, axis=-1)  # noqa: E731
    return inter / (area(box) + area(others) - inter)


def detections(raw: np.ndarray) -> np.ndarray:
    """ddddocr's boxes: scores > 0.1, single-class NMS at IoU 0.45; ``[K,4]`` xyxy in the 416 frame."""
    boxes, scores = _decode(raw)
    keep = scores > SCORE_THR
    boxes, scores = boxes[keep], scores[keep]
    order, kept = np.argsort(-scores, kind="stable"), []
    while order.size:
        kept.append(order[0])
        order = order[1:][_iou(boxes[order[0]], boxes[order[1:]]) <= NMS_THR]
    return boxes[kept]


def _box_f1(ref: np.ndarray, hyp: np.ndarray) -> float:
    if not len(ref) and not len(hyp):
        return 1.0
    matched, used = 0, np.zeros(len(hyp), dtype=bool)
    for box in ref:
        if len(hyp):
            iou = np.where(used, -1.0, _iou(box, hyp))
            j = int(np.argmax(iou))
            if iou[j] >= 0.5:
                used[j], matched = True, matched + 1
    return 2 * matched / (len(ref) + len(hyp))


def detector_agreement(dense_path: Any, cand_path: Any, n: int = 50, seed: int = 0) -> dict[str, float]:
    """``score_map_iou``: mean IoU of the anchors scoring > 0.1 (dense vs candidate); ``box_f1``: mean F1 of the
    candidate's final boxes against the dense model's (IoU >= 0.5); ``dense_boxes``: mean dense box count."""
    dense, cand = _session(dense_path), _session(cand_path)
    name = dense.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    ious, f1s, counts = [], [], []
    for _ in range(n):
        x = det_image(rng)
        rd, rc = dense.run(None, {name: x})[0], cand.run(None, {name: x})[0]
        md, mc = _decode(rd)[1] > SCORE_THR, _decode(rc)[1] > SCORE_THR
        union = np.count_nonzero(md | mc)
        ious.append(1.0 if union == 0 else np.count_nonzero(md & mc) / union)
        bd = detections(rd)
        f1s.append(_box_f1(bd, detections(rc)))
        counts.append(len(bd))
    return {"score_map_iou": float(np.mean(ious)), "box_f1": float(np.mean(f1s)), "dense_boxes": float(np.mean(counts))}


# ------------------------------------------------------------------------------------------- calibration


def make_calib(out_dir: Path | str, n: int = 64, n_det: int = 32, seed: int = 1, width: int = 192) -> dict[str, Path]:
    """``calib.npz`` (``input1[n,1,64,width]``, for common.onnx / common_old.onnx) and ``det_calib.npz``
    (``images[n_det,3,416,416]``), samples on axis 0; a seed other than the evaluation's (0) keeps them apart."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, inputs = samples(n, seed, width)
    rng = np.random.default_rng(seed)
    written = {}
    for name, arrays in (
        ("calib", {"input1": np.concatenate(inputs)}),
        ("det_calib", {"images": np.concatenate([det_image(rng) for _ in range(n_det)])}),
    ):
        path = out / f"{name}.npz"
        tmp = path.with_name(f".{path.name}.part")
        with open(tmp, "wb") as f:
            np.savez(f, **dict[str, Any](arrays))
        tmp.replace(path)
        written[name] = path
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("DENSE", "CANDIDATE"))
    parser.add_argument("--det", action="store_true", help="the models are detectors (common_det.onnx)")
    parser.add_argument("--n", type=int, help="images to compare (default 200 OCR, 50 detector)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-out", type=Path, help="write calib.npz and det_calib.npz into this folder")
    args = parser.parse_args(argv)
    if not args.compare and not args.calib_out:
        parser.error("give --compare DENSE CANDIDATE or --calib-out DIR")
    try:
        if args.calib_out:
            for name, path in make_calib(args.calib_out).items():
                print(f"{name}: {path}")
        if args.compare:
            dense, cand = args.compare
            fn = detector_agreement if args.det else agreement
            n = args.n if args.n is not None else (50 if args.det else 200)
            print(json.dumps(fn(dense, cand, n, args.seed), indent=1))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
