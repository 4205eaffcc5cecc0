"""The eval curve of a fine-tune: eval loss and cosine to the teacher over a fixed eval set.

numpy only (the model call is whatever the worker passes): loaded by the training worker from this file's
folder, and used by ``tools/finetune_torch_ref.py`` so that the PyTorch reference scores the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class Evaluator:
    """Eval loss and cosine to the teacher over the whole eval set, in fixed batches (targets computed once).

    Cosine, per sample and output: of the output pooled over the mask's positions (the mean over real
    positions, as a sentence embedding is pooled) where the loss is masked, else of the flattened output;
    averaged over samples and outputs. ``batches``: a ``training_batches.Batches`` without shuffling.
    """

    def __init__(
        self,
        job: dict[str, Any],
        batches: Any,
        teacher: Any,
        feeds_of: Callable[[dict[str, np.ndarray]], list[Any]],
        targets_of: Callable[[dict[str, np.ndarray], list[Any]], list[np.ndarray]],
    ) -> None:
        self.items = []
        for idx in batches.epoch_order():
            batch = batches.take(idx)
            feeds = feeds_of(batch)
            self.items.append((batch, feeds, targets_of(batch, feeds)))
        self.job = job
        self.teacher = teacher
        mask = job.get("mask") or {}
        self.mask_name = mask.get("name")
        self.masked = set(mask.get("masked_outputs", ()))

    def __call__(self, module: Any) -> dict[str, float]:
        module.eval()
        total, count, cos_sum, cos_n = 0.0, 0, 0.0, 0
        n_out = len(self.job["loss_outputs"])
        for batch, feeds, targets in self.items:
            result = module(*feeds, *targets)
            loss, outs = float(np.asarray(result[0])), result[1 : 1 + n_out]
            rows = len(feeds[0]) if feeds else 1
            total += loss * rows
            count += rows
            if self.teacher is not None:
                for name, y, t in zip(self.job["loss_outputs"], outs, targets, strict=True):
                    c = cosines(
                        np.asarray(y), np.asarray(t), batch.get(self.mask_name) if name in self.masked else None
                    )
                    cos_sum += float(c.sum())
                    cos_n += c.size
        module.train()
        out = {"loss": total / max(count, 1)}
        if cos_n:
            out["cosine"] = cos_sum / cos_n
        return out


def cosines(y: np.ndarray, t: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    y64, t64 = y.astype(np.float64), t.astype(np.float64)
    if mask is not None:
        m = (np.asarray(mask) != 0).astype(np.float64)
        m = m.reshape(m.shape + (1,) * (y64.ndim - m.ndim))
        axes = tuple(range(1, np.asarray(mask).ndim))
        denom = np.maximum(m.sum(axis=axes), 1.0)
        y64, t64 = (y64 * m).sum(axis=axes) / denom, (t64 * m).sum(axis=axes) / denom
    y64, t64 = y64.reshape(len(y64), -1), t64.reshape(len(t64), -1)
    dot = np.sum(y64 * t64, axis=1)
    norm = np.linalg.norm(y64, axis=1) * np.linalg.norm(t64, axis=1)
    return dot / np.maximum(norm, 1e-30)
