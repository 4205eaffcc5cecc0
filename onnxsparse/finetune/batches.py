"""Mini-batches for the fine-tune loop: seeded order, trimmed to each batch's longest row, optionally bucketed.

numpy only, no onnx and no onnxruntime: the training worker (which runs against ORT's training build in a
subprocess) imports this, and nothing here may pull in the inference ``onnxruntime``.

Why trim: sentence data is padded to the longest sentence of the whole set (64 tokens, say), while a batch's
longest sentence is often a third of that. Where the model's sequence dim is dynamic, feeding a batch cut to
its own longest row gives the same loss (padded positions are masked out of it) at a fraction of the work.
Why bucket: batches of similar lengths cut the padding further; the batches of an epoch are then shuffled, so
the order stays seeded and reproducible but is not sorted by length.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

#: bucketing sorts by length within pools of this many batches (not the whole epoch), so a batch's company
#: still varies from epoch to epoch
BUCKET_POOL = 50


def row_lengths(mask: np.ndarray, seq_axis: int) -> np.ndarray:
    """Per sample: one past the last position (along ``seq_axis``) where ``mask`` is non-zero; 0 for none.

    The last non-zero position, not the count of non-zeros: left-padded rows (zeros first) must keep their
    full length, or trimming would cut real tokens off.
    """
    nz = np.asarray(mask) != 0
    nz = np.moveaxis(nz, seq_axis, -1).reshape(nz.shape[0], -1, nz.shape[seq_axis]).any(axis=1)
    last = nz.shape[1] - np.argmax(nz[:, ::-1], axis=1)
    return np.where(nz.any(axis=1), last, 0).astype(np.int64)


def trim(batch: Mapping[str, np.ndarray], axes: Mapping[str, int], length: int) -> dict[str, np.ndarray]:
    """``batch`` with every input in ``axes`` cut to ``length`` along its axis (others as they are)."""
    out = dict(batch)
    for name, axis in axes.items():
        arr = out[name]
        if arr.shape[axis] > length:
            index = [slice(None)] * arr.ndim
            index[axis] = slice(0, length)
            out[name] = np.ascontiguousarray(arr[tuple(index)])
    return out


class Batches:
    """Shuffled mini-batches over arrays of equal first dimension, one epoch after another, forever.

    ``lengths`` (per sample, from ``row_lengths``) with ``trim_axes`` cuts each batch to its longest row;
    ``bucket`` groups samples of similar length (needs ``lengths``). ``tokens_fed`` / ``tokens_full`` count
    positions fed vs what untrimmed batches would have fed (batch × padded length), for the report.
    """

    def __init__(
        self,
        data: Mapping[str, np.ndarray],
        batch_size: int,
        seed: int,
        drop_last: bool,
        lengths: np.ndarray | None = None,
        trim_axes: Mapping[str, int] | None = None,
        bucket: bool = False,
        shuffle: bool = True,
    ) -> None:
        counts = {k: len(v) for k, v in data.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"data arrays differ in their first dimension: {counts}")
        if bucket and lengths is None:
            raise ValueError("bucketing needs per-sample lengths")
        self.data = dict(data)
        self.n = next(iter(counts.values()))
        self.batch_size = min(batch_size, self.n)
        self.drop_last = drop_last
        self.lengths = None if lengths is None else np.asarray(lengths, np.int64)
        self.trim_axes = dict(trim_axes or {})
        self.bucket = bucket
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.padded = max((self.data[k].shape[a] for k, a in self.trim_axes.items()), default=0)
        self.tokens_fed = 0
        self.tokens_full = 0

    @property
    def per_epoch(self) -> int:
        if self.drop_last:
            return max(1, self.n // self.batch_size)
        return math.ceil(self.n / self.batch_size)

    def epoch_order(self) -> list[np.ndarray]:
        """The sample indices of each batch of one epoch (advances the seeded generator)."""
        order = self.rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        bs = self.batch_size
        if self.bucket and self.lengths is not None:
            pools = [order[i : i + bs * BUCKET_POOL] for i in range(0, self.n, bs * BUCKET_POOL)]
            order = np.concatenate([p[np.argsort(self.lengths[p], kind="stable")] for p in pools])
        batches = [order[b * bs : (b + 1) * bs] for b in range(self.per_epoch)]
        batches = [b for b in batches if len(b)]
        if self.bucket and self.shuffle:
            batches = [batches[i] for i in self.rng.permutation(len(batches))]
        return [np.sort(b) for b in batches]

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of samples ``idx``, trimmed where asked."""
        batch = {k: np.ascontiguousarray(v[idx]) for k, v in self.data.items()}
        if self.trim_axes and self.lengths is not None:
            length = max(1, int(self.lengths[idx].max()))
            batch = trim(batch, self.trim_axes, length)
            self.tokens_fed += len(idx) * length
            self.tokens_full += len(idx) * self.padded
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            for idx in self.epoch_order():
                yield self.take(idx)

    def stats(self) -> dict[str, Any]:
        return {"tokens_fed": self.tokens_fed, "tokens_untrimmed": self.tokens_full}
