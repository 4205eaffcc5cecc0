"""n:m pruning solvers on plain arrays: magnitude, Wanda, SparseGPT, and the corrections that follow them.

Every solver takes a 2-D weight ``w[N_out, K]`` whose K axis is the n:m grouping axis in contiguous groups of
``m`` (``onnxsparse.pruning.layout`` builds that view of a stored tensor, e.g. K ordered (kh, kw, C_in) for a
Conv), works on a float64 copy and returns ``(w_new, keep)``: ``keep`` is True where an entry may stay non-zero
and holds at most ``n`` True per group; ``w_new`` is exactly 0 outside ``keep``. ``prefer`` (an existing
non-zero mask) restricts the choice to those entries: progressive 3:4 → 2:4 picks its 2:4 among the 3:4
survivors, and every earlier zero stays zero.

Why not a library: the reference SparseGPT (IST-DASLab/sparsegpt, ``sparsegpt.py``'s ``fasterprune``) and
Wanda are PyTorch code over ``nn.Module`` layers; this project must not depend on torch at run time, and ONNX
weights arrive as numpy arrays. The column sweep below follows ``fasterprune`` line by line (dead inputs,
damping, ``cholesky(cholesky_inverse(cholesky(H)), upper=True)``, lazy block updates, the n:m mask chosen at
each group's first column from ``w² / [Hinv]²ᵢᵢ``) in float64 instead of float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxsparse.errors import OnnxSparseError
from onnxsparse.sparsity import nm_keep


@dataclass
class SolveInfo:
    """What a solver measured: the OBS loss it accumulated and how many inputs were dead (Hᵢᵢ = 0)."""

    loss: float = 0.0
    dead_inputs: int = 0
    damp: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def _check(w: np.ndarray, m: int) -> np.ndarray:
    w = np.array(w, dtype=np.float64)  # a working copy
    if w.ndim != 2:
        raise ValueError(f"solver weight must be 2-D [N_out, K], got shape {w.shape}")
    if w.shape[1] % m:
        raise ValueError(f"K={w.shape[1]} is not divisible by m={m}")
    return w


def _select(score: np.ndarray, n: int, m: int, prefer: np.ndarray | None) -> np.ndarray:
    """Top-``n`` per group of ``m`` along axis 1 by ``score`` (ties to the lower index), within ``prefer``."""
    keep = nm_keep(score, 1, n, m, prefer=prefer)
    if prefer is not None:
        keep &= prefer  # a group with fewer than n preferred entries keeps only those
    return keep


def magnitude(w: np.ndarray, n: int, m: int, prefer: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """n:m by |w| (the ``prune`` pass's default rule, here on the solver view)."""
    w = _check(w, m)
    keep = _select(np.abs(w), n, m, prefer)
    np.multiply(w, keep, out=w)  # in place on the working copy
    w += 0.0  # -0.0 -> +0.0
    return w, keep


def wanda(
    w: np.ndarray, sq_norms: np.ndarray, n: int, m: int, prefer: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖₂ from the inputs' squared column norms; no weight update."""
    w = _check(w, m)
    norms = np.sqrt(np.maximum(np.asarray(sq_norms, dtype=np.float64).reshape(1, -1), 0.0))
    keep = _select(np.abs(w) * norms, n, m, prefer)
    np.multiply(w, keep, out=w)  # in place on the working copy
    w += 0.0  # -0.0 -> +0.0
    return w, keep


def damped(h: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(H with dead inputs set to 1 and λ·mean(diag H) added to the diagonal, dead mask, the damping added)."""
    h = np.array(h, dtype=np.float64)
    diag = np.diagonal(h).copy()
    dead = diag == 0
    idx = np.flatnonzero(dead)
    h[idx, idx] = 1.0
    lam = float(damp) * float(np.mean(np.diagonal(h)))
    h[np.diag_indices_from(h)] += lam
    return h, dead, lam


def _damped_hinv(h: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(U, dead mask, damping) for ``damped(h)``: U is the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), what
    ``cholesky(cholesky_inverse(cholesky(H)), upper=True)`` gives in the reference, from one Cholesky and one
    triangular inverse instead of three factorisations.

    With P the reversal permutation, P H P = M Mᵀ (M lower) makes H = V Vᵀ with V = P M P upper, so
    H⁻¹ = V⁻ᵀ V⁻¹ and U = V⁻¹ = P M⁻¹ P (upper, positive diagonal: the unique Cholesky factor). At most three
    K×K float64 arrays are alive at once (H itself aside): for K = 1536, 57 MB instead of 95 MB."""
    hd, dead, lam = damped(h, damp)
    try:
        lower = np.linalg.cholesky(hd[::-1, ::-1])
        del hd
        inv = np.linalg.inv(lower)
        del lower
        return np.ascontiguousarray(inv[::-1, ::-1]), dead, lam
    except np.linalg.LinAlgError:
        raise OnnxSparseError(
            "the layer's input Gram matrix H is singular even after damping; raise damp "
            "(e.g. damp=0.1) or give more calibration samples"
        ) from None


def sparsegpt(
    w: np.ndarray,
    h: np.ndarray,
    n: int,
    m: int,
    block_size: int = 128,
    damp: float = 0.01,
    prefer: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, SolveInfo]:
    """SparseGPT (Frantar & Alistarh 2023) for n:m: the OBS column sweep with lazy block updates.

    Minimises ‖X(W − Ŵ)ᵀ‖² column by column: at each group's first column the n:m mask of that group is chosen
    from w²/[H⁻¹]²ᵢᵢ (largest kept), then each pruned entry's error is spread over the columns to its right
    through the upper Cholesky factor of H⁻¹, within the block at once and to later blocks lazily.
    """
    w = _check(w, m)
    cols = w.shape[1]
    if h.shape != (cols, cols):
        raise ValueError(f"H must be [{cols}, {cols}], got {h.shape}")
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    block = max(m, block_size - block_size % m)  # a block always holds whole groups
    hinv, dead, lam = _damped_hinv(h, damp)
    w[:, dead] = 0.0
    keep = np.zeros(w.shape, dtype=bool)
    loss = 0.0
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].copy()
        q1 = np.zeros_like(w1)
        err1 = np.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = np.diagonal(hinv1)
        keep1 = np.zeros(w1.shape, dtype=bool)
        for i in range(i2 - i1):
            if i % m == 0:
                score = w1[:, i : i + m] ** 2 / (d1[i : i + m].reshape(1, -1) ** 2)
                pref = None if prefer is None else prefer[:, i1 + i : i1 + i + m]
                keep1[:, i : i + m] = _select(score, n, m, pref)
            col = w1[:, i]
            q = np.where(keep1[:, i], col, 0.0)
            q1[:, i] = q
            e = (col - q) / d1[i]
            loss += float(np.dot(e, e)) / 2.0
            w1[:, i:] -= np.outer(e, hinv1[i, i:])
            err1[:, i] = e
        w[:, i1:i2] = q1
        keep[:, i1:i2] = keep1
        if i2 < cols:
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w *= keep
    w += 0.0
    return w, keep, SolveInfo(loss=loss, dead_inputs=int(dead.sum()), damp=lam)


#: refit works on row blocks of about this many bytes per [rows, K] float64 array (it keeps seven of them)
REFIT_BLOCK_BYTES = 8 * 2**20


def refit(
    w_dense: np.ndarray,
    h: np.ndarray,
    keep: np.ndarray,
    w_start: np.ndarray | None = None,
    damp: float = 0.01,
    iters: int = 30,
    tol: float = 1e-10,
) -> np.ndarray:
    """Least-squares re-fit of the kept weights with the mask fixed (layer-wise output reconstruction).

    Per output row r: minimise (w_r − ŵ_r)ᵀ H (w_r − ŵ_r) over ŵ_r supported on ``keep[r]``, i.e. solve
    H_SS ŵ_S = (H w_r)_S. SparseGPT only approximates this optimum (its updates stop at the sweep's column);
    here the rows are solved together by Jacobi-preconditioned conjugate gradients on the masked system,
    started from ``w_start`` (the SparseGPT result): one [rows, K] × [K, K] product per iteration, no per-row
    factorisation. Rows are independent, so they go in blocks (``REFIT_BLOCK_BYTES``) to bound memory on a
    wide layer (an 8210-row classifier). H is damped as in ``sparsegpt`` so the system stays well conditioned.
    """
    hd, dead, _ = damped(h, damp)
    wd = np.array(w_dense, dtype=np.float64)
    wd[:, dead] = 0.0
    out = np.zeros_like(wd)
    start = np.zeros_like(wd) if w_start is None else np.asarray(w_start, dtype=np.float64)
    step = max(1, REFIT_BLOCK_BYTES // (8 * max(wd.shape[1], 1)))
    for r0 in range(0, wd.shape[0], step):
        rows = slice(r0, r0 + step)
        mask = keep[rows] & ~dead.reshape(1, -1)
        out[rows] = _cg(wd[rows], hd, mask, start[rows], iters, tol)
    out += 0.0
    return out


def _cg(wd: np.ndarray, hd: np.ndarray, mask: np.ndarray, x0: np.ndarray, iters: int, tol: float) -> np.ndarray:
    """Masked, Jacobi-preconditioned CG for H_SS x_S = (H w)_S, every row of ``wd`` at once."""
    b = (wd @ hd) * mask
    x = x0 * mask
    precond = np.where(mask, 1.0 / np.diagonal(hd).reshape(1, -1), 0.0)
    r = b - (x @ hd) * mask
    z = r * precond
    p = z.copy()
    rz = np.einsum("ij,ij->i", r, z)
    ref = np.einsum("ij,ij->i", b, b * precond) + 1e-300
    for _ in range(max(iters, 0)):
        if float(np.max(rz / ref)) < tol:
            break
        ap = (p @ hd) * mask
        pap = np.einsum("ij,ij->i", p, ap)
        alpha = np.divide(rz, pap, out=np.zeros_like(rz), where=pap > 0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        z = r * precond
        rz_new = np.einsum("ij,ij->i", r, z)
        beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0)
        p = z + beta[:, None] * p
        rz = rz_new
    return x * mask


def dense_target(w: np.ndarray, h: np.ndarray, cross: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """The dense weight that best maps the perturbed input to the dense output: argmin ‖X Wᵀ − X̃ W*ᵀ‖².

    ``h`` = X̃ᵀX̃ (this layer's input in the model being pruned), ``cross`` = X̃ᵀX (X: its input in the dense
    model). Normal equations: H̃ W*ᵀ = C Wᵀ. Pruning W* against H̃ then minimises the distance to the *dense*
    model's output rather than to this layer's output on an input that upstream pruning already changed, so
    each layer also absorbs the error of the layers before it (the asymmetric calibration of GPTAQ, Li et al.
    2025, here for n:m pruning). The damping is a ridge term that pulls W* towards W, not towards 0:
    (H̃ + λI) W*ᵀ = C Wᵀ + λ Wᵀ — a ridge towards 0 shrank every weight and cost accuracy (measured). With
    X̃ = X it gives W itself for any λ.
    """
    hd, dead, lam = damped(h, damp)
    w64 = np.asarray(w, dtype=np.float64)
    rhs = np.asarray(cross, dtype=np.float64) @ w64.T + lam * w64.T
    try:
        out = np.linalg.solve(hd, rhs).T
    except np.linalg.LinAlgError:
        raise OnnxSparseError("the layer's input Gram matrix H is singular even after damping; raise damp") from None
    out[:, dead] = 0.0
    return np.ascontiguousarray(out)


def bias_delta(w_old: np.ndarray, w_new: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Bias correction: the Δb that keeps E[y] unchanged, (W_old − W_new)·E[x] per output row."""
    return (np.asarray(w_old, dtype=np.float64) - np.asarray(w_new, dtype=np.float64)) @ np.asarray(
        mean, dtype=np.float64
    )


def output_error(w_old: np.ndarray, w_new: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    """(‖X(W_old − W_new)ᵀ‖², ‖X W_oldᵀ‖²) from H = XᵀX alone: tr(ΔW H ΔWᵀ) and tr(W H Wᵀ)."""
    d = np.asarray(w_old, dtype=np.float64) - np.asarray(w_new, dtype=np.float64)
    wo = np.asarray(w_old, dtype=np.float64)
    return float(np.einsum("ij,ij->", d @ h, d)), float(np.einsum("ij,ij->", wo @ h, wo))
