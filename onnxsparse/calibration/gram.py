"""Input statistics of a layer: the Gram matrix H = XᵀX, the row count and the column sums, as mergeable sums.

Statistics are sums, never activations: each calibration batch is folded in (``update``) and dropped, so
memory is K²·8 bytes per layer whatever the amount of data, and two collections over different data merge
exactly (``a + b``), which lets sensitivity and parallel workers split the work. Everything accumulates in
float64: a float32 sum over 10⁵+ rows loses the small eigenvalues SparseGPT's inverse depends on.

With ``paired`` the statistics also hold the cross term C = X̃ᵀX between the layer's input X̃ in the model being
pruned and its input X in the dense model, and Σx (``ref_colsum``): what the dense-target correction needs to fit
the pruned layer to the *dense* output X Wᵀ instead of the output X̃ Wᵀ on its already perturbed input.

``groups`` > 1 holds one independent H per convolution group (a grouped Conv is ``groups`` separate GEMMs).
``diag_only`` keeps only the diagonal (Σx², what Wanda needs): the fallback for a K too large for K².
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: rows widened to float64 at once: at most 8 MiB of them, whatever a batch holds (a [128 x 64] batch of
#: K = 1536 inputs would otherwise take 100 MB as float64, twice over with a mask or a reference)
_PIECE_BYTES = 8 * 2**20


def _rows_per_piece(k: int) -> int:
    return max(64, _PIECE_BYTES // (8 * k))


@dataclass
class GramStats:
    """Σ xxᵀ (or Σ x² with ``diag_only``), Σ x and the number of rows, per group, in float64."""

    k: int
    groups: int = 1
    diag_only: bool = False
    h: np.ndarray | None = None  # [groups, K, K] (or [groups, K] when diag_only)
    colsum: np.ndarray | None = None  # [groups, K]
    rows: np.ndarray | None = None  # [groups] weighted row counts (masked rows weigh 0)
    paired: bool = False
    cross: np.ndarray | None = None  # [groups, K, K]: Σ x̃ xᵀ (paired)
    ref_colsum: np.ndarray | None = None  # [groups, K]: Σ x of the dense model's input (paired)

    def __post_init__(self) -> None:
        if self.h is None:
            shape = (self.groups, self.k) if self.diag_only else (self.groups, self.k, self.k)
            self.h = np.zeros(shape, dtype=np.float64)
        if self.colsum is None:
            self.colsum = np.zeros((self.groups, self.k), dtype=np.float64)
        if self.rows is None:
            self.rows = np.zeros(self.groups, dtype=np.float64)
        if self.paired and self.cross is None:
            self.cross = np.zeros((self.groups, self.k, self.k), dtype=np.float64)
        if self.paired and self.ref_colsum is None:
            self.ref_colsum = np.zeros((self.groups, self.k), dtype=np.float64)

    @property
    def nbytes(self) -> int:
        assert self.h is not None and self.colsum is not None
        extra = 0 if self.cross is None or self.ref_colsum is None else self.cross.nbytes + self.ref_colsum.nbytes
        return int(self.h.nbytes + self.colsum.nbytes + extra)

    @property
    def samples(self) -> float:
        """Rows seen (weighted) by group 0 — every group sees the same rows."""
        assert self.rows is not None
        return float(self.rows[0])

    @staticmethod
    def planned_bytes(k: int, groups: int = 1, diag_only: bool = False, paired: bool = False) -> int:
        """What a ``GramStats(k, groups, diag_only, paired)`` will hold, before allocating it (for the report)."""
        one = 8 * groups * (k if diag_only else k * k) + 8 * groups * k
        return one * 2 if paired else one

    def update(self, x: np.ndarray, group: int = 0, weights: np.ndarray | None = None) -> None:
        """Fold rows ``x[rows, K]`` into group ``group``; ``weights[rows]`` (0 = padding) scales each row."""
        assert self.h is not None and self.colsum is not None and self.rows is not None
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.k:
            raise ValueError(f"expected rows of {self.k} values, got shape {x.shape}")
        if x.shape[0] == 0:
            return
        wt = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        if wt is not None:
            keep = wt != 0
            if not keep.all():  # drop padded rows before widening to float64
                x, wt = x[keep], wt[keep]
            if (wt == 1).all():  # a 0/1 mask: the kept rows count once each
                wt = None
        step = _rows_per_piece(self.k)
        if x.shape[0] > step:  # widen to float64 a piece at a time: bounded memory, the same sums
            for i in range(0, x.shape[0], step):
                self.update(x[i : i + step], group, None if wt is None else wt[i : i + step])
            return
        x64 = x.astype(np.float64)
        if wt is not None:
            self.rows[group] += float(wt.sum())
            self.colsum[group] += wt @ x64
            xw = x64 * np.sqrt(wt)[:, None]
        else:
            self.rows[group] += x64.shape[0]
            self.colsum[group] += x64.sum(axis=0)
            xw = x64
        if self.diag_only:
            self.h[group] += np.einsum("ij,ij->j", xw, xw)
        else:
            self.h[group] += xw.T @ xw

    def update_reference(
        self, x_ref: np.ndarray, x: np.ndarray, group: int = 0, weights: np.ndarray | None = None
    ) -> None:
        """Fold the dense model's rows ``x_ref`` next to the same rows ``x`` of the model being pruned (paired)."""
        assert self.cross is not None and self.ref_colsum is not None
        if np.shape(x) != np.shape(x_ref):
            raise ValueError(f"paired rows differ in shape: {np.shape(x)} vs {np.shape(x_ref)}")
        x, x_ref = np.asarray(x), np.asarray(x_ref)
        wt = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        if wt is not None:
            keep = wt != 0
            if not keep.all():
                x, x_ref, wt = x[keep], x_ref[keep], wt[keep]
            if (wt == 1).all():
                wt = None
        step = _rows_per_piece(self.k)
        if x.shape[0] > step:
            for i in range(0, x.shape[0], step):
                self.update_reference(
                    x_ref[i : i + step], x[i : i + step], group, None if wt is None else wt[i : i + step]
                )
            return
        a, b = x.astype(np.float64), x_ref.astype(np.float64)
        if wt is not None:
            self.ref_colsum[group] += wt @ b
            a *= wt[:, None]
        else:
            self.ref_colsum[group] += b.sum(axis=0)
        self.cross[group] += a.T @ b

    def __add__(self, other: GramStats) -> GramStats:
        key = (self.k, self.groups, self.diag_only, self.paired)
        if key != (other.k, other.groups, other.diag_only, other.paired):
            raise ValueError("cannot merge statistics of different layers")
        assert self.h is not None and self.colsum is not None and self.rows is not None
        assert other.h is not None and other.colsum is not None and other.rows is not None
        out = GramStats(
            self.k,
            self.groups,
            self.diag_only,
            self.h + other.h,
            self.colsum + other.colsum,
            self.rows + other.rows,
            self.paired,
        )
        if self.paired:
            assert self.cross is not None and other.cross is not None
            assert self.ref_colsum is not None and other.ref_colsum is not None
            out.cross, out.ref_colsum = self.cross + other.cross, self.ref_colsum + other.ref_colsum
        return out

    def gram(self, group: int = 0) -> np.ndarray:
        """H of one group ([K, K]); with ``diag_only`` it is the diagonal matrix of Σx² (what Wanda sees)."""
        assert self.h is not None
        return np.diag(self.h[group]) if self.diag_only else self.h[group]

    def sq_norms(self, group: int = 0) -> np.ndarray:
        """Σ x_k² per input column (Wanda's ‖X_k‖₂²)."""
        assert self.h is not None
        return self.h[group].copy() if self.diag_only else np.diagonal(self.h[group]).copy()

    def mean(self, group: int = 0) -> np.ndarray:
        """E[x] per input column over the (weighted) rows."""
        assert self.colsum is not None and self.rows is not None
        return self.colsum[group] / max(float(self.rows[group]), 1e-300)

    def ref_mean(self, group: int = 0) -> np.ndarray:
        """E[x] of the dense model's input (paired statistics)."""
        assert self.ref_colsum is not None and self.rows is not None
        return self.ref_colsum[group] / max(float(self.rows[group]), 1e-300)
