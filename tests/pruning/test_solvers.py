"""pruning.solvers against dense references on small random problems with correlated inputs: the error order
sparsegpt <= wanda <= magnitude, exact n:m results for several patterns, progressive preference, dead inputs,
singular H, the least-squares re-fit against an exact per-row solve, bias correction, and GramStats sums."""

from __future__ import annotations

import numpy as np
import pytest

from onnxsparse.errors import OnnxSparseError
from onnxsparse.pruning import GramStats, solvers
from onnxsparse.sparsity import group_nonzeros


def _problem(seed: int, n_out: int = 24, k: int = 64, rows: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """(W, X): inputs with strongly correlated columns of very different scales, as trained layers see."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.5
    x = rng.standard_normal((rows, k)) @ mix + 0.3 * rng.standard_normal((rows, k))
    x *= rng.uniform(0.05, 4.0, size=k)
    return rng.standard_normal((n_out, k)), x


def _err(w: np.ndarray, w_new: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(x @ w.T - x @ w_new.T) / np.linalg.norm(x @ w.T))


def _max_per_group(w: np.ndarray, m: int) -> int:
    return int(group_nonzeros(w != 0, 1, m).max())


@pytest.mark.parametrize("seed", range(5))
def test_reconstruction_error_orders_sparsegpt_wanda_magnitude(seed: int) -> None:
    w, x = _problem(seed)
    h = x.T @ x
    mag, _ = solvers.magnitude(w, 2, 4)
    wan, _ = solvers.wanda(w, np.diag(h), 2, 4)
    sgpt, keep, info = solvers.sparsegpt(w, h, 2, 4, block_size=16)
    e_mag, e_wan, e_sgpt = _err(w, mag, x), _err(w, wan, x), _err(w, sgpt, x)
    assert e_sgpt <= e_wan <= e_mag
    assert e_sgpt < 0.9 * e_mag  # a real gain, not a tie
    assert info.loss > 0 and info.dead_inputs == 0
    # the errors computed from H alone are the ones measured on X
    err, ref = solvers.output_error(w, sgpt, h)
    assert np.sqrt(err / ref) == pytest.approx(e_sgpt, rel=1e-9)
    # exact LS re-fit of the kept weights can only lower the error
    fit = solvers.refit(w, h, keep, sgpt, damp=0.0, iters=200)
    assert _err(w, fit, x) <= e_sgpt + 1e-12


@pytest.mark.parametrize(("n", "m"), [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8)])
@pytest.mark.parametrize("block", [4, 16, 128, 7])
def test_results_are_exactly_n_of_m(n: int, m: int, block: int) -> None:
    w, x = _problem(n * 10 + m, n_out=8, k=32)
    h = x.T @ x
    for out, keep in (
        solvers.magnitude(w, n, m),
        solvers.wanda(w, np.diag(h), n, m),
        solvers.sparsegpt(w, h, n, m, block_size=block)[:2],
    ):
        assert _max_per_group(out, m) <= n
        assert int(group_nonzeros(keep, 1, m).min()) == n  # exactly n kept per group
        assert np.all(out[~keep] == 0) and not np.signbit(out[~keep]).any()  # +0.0, not -0.0
        assert np.isfinite(out).all()


def test_progressive_preference_keeps_earlier_zeros() -> None:
    w, x = _problem(7)
    h = x.T @ x
    w34, keep34, _ = solvers.sparsegpt(w, h, 3, 4)
    w24, keep24, _ = solvers.sparsegpt(w34, h, 2, 4, prefer=w34 != 0)
    assert not (keep24 & ~keep34).any()
    assert np.all(w24[w34 == 0] == 0)
    assert _max_per_group(w24, 4) <= 2
    _, keepw = solvers.wanda(w34, np.diag(h), 2, 4, prefer=w34 != 0)
    assert not (keepw & ~keep34).any()
    # a group with fewer preferred entries than n keeps only those
    prefer = np.zeros_like(w, dtype=bool)
    prefer[:, 0] = True
    _, keep1, _ = solvers.sparsegpt(w, h, 2, 4, prefer=prefer)
    assert np.array_equal(keep1, prefer)


def test_dead_inputs_are_zeroed_and_the_rest_solved() -> None:
    w, x = _problem(3)
    x[:, [5, 17, 40]] = 0.0
    h = x.T @ x
    out, _, info = solvers.sparsegpt(w, h, 2, 4)
    assert info.dead_inputs == 3
    assert np.all(out[:, [5, 17, 40]] == 0)
    assert np.isfinite(out).all() and _max_per_group(out, 4) <= 2
    mag, _ = solvers.magnitude(w, 2, 4)
    assert _err(w, out, x) < _err(w, mag, x)


def test_singular_h_without_damping_is_one_line() -> None:
    w, x = _problem(4, k=32, rows=8)  # 8 rows: rank 8 < K = 32
    h = x.T @ x
    with pytest.raises(OnnxSparseError, match="singular") as exc:
        solvers.sparsegpt(w, h, 2, 4, damp=0.0)
    assert "\n" not in str(exc.value)
    out, _, _ = solvers.sparsegpt(w, h, 2, 4, damp=0.01)  # damping makes it solvable
    assert np.isfinite(out).all()


def test_refit_matches_an_exact_per_row_solve() -> None:
    w, x = _problem(11, n_out=10, k=32)
    h = x.T @ x
    _, keep, _ = solvers.sparsegpt(w, h, 2, 4)
    fit = solvers.refit(w, h, keep, None, damp=0.01, iters=300, tol=1e-20)
    hd, _, _ = solvers.damped(h, 0.01)
    exact = np.zeros_like(w)
    for r in range(w.shape[0]):
        s = keep[r]
        exact[r, s] = np.linalg.solve(hd[np.ix_(s, s)], (hd @ w[r])[s])
    np.testing.assert_allclose(fit, exact, rtol=1e-6, atol=1e-8)
    assert np.all(fit[~keep] == 0)


def test_bias_delta_keeps_the_mean_output() -> None:
    w, x = _problem(5)
    h = x.T @ x
    out, _, _ = solvers.sparsegpt(w, h, 2, 4)
    mean = x.mean(axis=0)
    delta = solvers.bias_delta(w, out, mean)
    np.testing.assert_allclose((x @ out.T + delta).mean(axis=0), (x @ w.T).mean(axis=0), atol=1e-9)


def test_bad_shapes_are_refused() -> None:
    w, _ = _problem(1, k=32)
    with pytest.raises(ValueError, match="divisible"):
        solvers.magnitude(w[:, :30], 2, 4)
    with pytest.raises(ValueError, match="H must be"):
        solvers.sparsegpt(w, np.eye(16), 2, 4)


def test_gram_stats_sum_merge_and_row_weights() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((50, 8)), rng.standard_normal((30, 8))
    sa, sb = GramStats(8), GramStats(8)
    sa.update(a)
    sb.update(b)
    both = sa + sb
    full = np.concatenate([a, b])
    np.testing.assert_allclose(both.gram(), full.T @ full)
    np.testing.assert_allclose(both.mean(), full.mean(axis=0))
    assert both.samples == 80 and both.nbytes == GramStats.planned_bytes(8)
    masked = GramStats(8)
    weights = (rng.random(80) > 0.3).astype(np.float64)
    masked.update(full, weights=weights)
    kept = full[weights > 0]
    np.testing.assert_allclose(masked.gram(), kept.T @ kept)
    np.testing.assert_allclose(masked.mean(), kept.mean(axis=0))
    diag = GramStats(8, diag_only=True)
    diag.update(full)
    np.testing.assert_allclose(diag.sq_norms(), (full**2).sum(axis=0))
    assert diag.nbytes == GramStats.planned_bytes(8, diag_only=True)
    with pytest.raises(ValueError):
        sa + diag


def test_dense_target_is_w_on_unperturbed_inputs_and_fits_the_dense_output() -> None:
    w, x = _problem(8, k=32)
    h = x.T @ x
    for damp in (0.0, 0.1):
        np.testing.assert_allclose(solvers.dense_target(w, h, h, damp=damp), w, rtol=1e-8, atol=1e-10)
    rng = np.random.default_rng(1)
    x_pert = x + 0.3 * rng.standard_normal(x.shape) * x.std(axis=0)  # upstream pruning moved the input
    hp, cross = x_pert.T @ x_pert, x_pert.T @ x
    star = solvers.dense_target(w, hp, cross, damp=0.0)
    lstsq = np.linalg.lstsq(x_pert, x @ w.T, rcond=None)[0].T
    np.testing.assert_allclose(star, lstsq, rtol=1e-6, atol=1e-8)
    # pruned against the dense output: closer to it than pruning W against the perturbed input's own output
    plain, k1, _ = solvers.sparsegpt(w, hp, 2, 4)
    plain = solvers.refit(w, hp, k1, plain, iters=100)
    fitted, k2, _ = solvers.sparsegpt(star, hp, 2, 4)
    fitted = solvers.refit(star, hp, k2, fitted, iters=100)
    dense_out = x @ w.T
    assert np.linalg.norm(dense_out - x_pert @ fitted.T) < np.linalg.norm(dense_out - x_pert @ plain.T)


def test_paired_gram_stats_hold_the_cross_term() -> None:
    rng = np.random.default_rng(2)
    x, x_ref = rng.standard_normal((40, 8)), rng.standard_normal((40, 8))
    weights = (rng.random(40) > 0.5).astype(np.float64)
    st = GramStats(8, paired=True)
    st.update(x[:25], weights=weights[:25])
    st.update_reference(x_ref[:25], x[:25], weights=weights[:25])
    other = GramStats(8, paired=True)
    other.update(x[25:], weights=weights[25:])
    other.update_reference(x_ref[25:], x[25:], weights=weights[25:])
    both = st + other
    keep = weights > 0
    assert both.cross is not None
    np.testing.assert_allclose(both.cross[0], x[keep].T @ x_ref[keep])
    np.testing.assert_allclose(both.ref_mean(), x_ref[keep].mean(axis=0))
    assert both.nbytes == GramStats.planned_bytes(8, paired=True)


def test_hinv_factor_is_the_upper_cholesky_of_the_inverse() -> None:
    _, x = _problem(9, k=48)
    hd, _, _ = solvers.damped(x.T @ x, 0.01)
    u, dead, lam = solvers._damped_hinv(x.T @ x, 0.01)
    assert not dead.any() and lam > 0
    assert np.allclose(np.tril(u, -1), 0) and (np.diagonal(u) > 0).all()
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(hd), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(u, np.linalg.cholesky(np.linalg.inv(hd)).T, rtol=1e-6, atol=1e-12)


def test_refit_in_row_blocks_equals_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    w, x = _problem(12, n_out=40, k=32)
    h = x.T @ x
    start, keep, _ = solvers.sparsegpt(w, h, 2, 4)
    whole = solvers.refit(w, h, keep, start, iters=15, tol=0.0)  # no early stop: same steps per row
    monkeypatch.setattr(solvers, "REFIT_BLOCK_BYTES", 8 * 32 * 7)  # 7 rows per block
    np.testing.assert_allclose(solvers.refit(w, h, keep, start, iters=15, tol=0.0), whole, rtol=1e-9, atol=1e-12)
