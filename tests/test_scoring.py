"""Closed-form statistics against direct computations over explicit tokens."""

from __future__ import annotations

import pytest
import torch

from streamprune.recovery import RegressionSums
from streamprune.scoring import (
    MomentAccumulator,
    UnitStats,
    channel_scores,
    feature_space_from_covariance,
    feature_space_from_samples,
    greedy_swap,
    initial_keep,
    leave_one_out_scores,
    similarity,
)

N, C, H, D = 300, 12, 6, 4


def _heads_problem(seed: int = 0, dtype: torch.dtype = torch.float64):
    """Float64 products by default, so the algebra is checked to 1e-9; the engine uses float32."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, H * D, generator=g, dtype=torch.float64) * torch.rand(H * D, generator=g, dtype=torch.float64)
    a = a + 0.3 * torch.randn(N, 1, generator=g, dtype=torch.float64)  # correlated heads, non-zero means
    w = torch.randn(C, H * D, generator=g, dtype=torch.float64)
    acc = MomentAccumulator(H * D, torch.device("cpu"))
    for chunk in a.split(64):
        acc.add(chunk)
    return a, w, UnitStats.from_covariance(acc.covariance(), w, D, chunk=5, dtype=dtype)


def _direct_similarity(a, w, keep) -> float:
    """sum_c |pearson(Y_S[:, c], Y[:, c])| straight from the definition."""
    cols = torch.repeat_interleave(keep, D)
    y, y_s = a @ w.T, a[:, cols] @ w[:, cols].T
    total = 0.0
    for c in range(C):
        total += abs(float(torch.corrcoef(torch.stack([y_s[:, c], y[:, c]]))[0, 1]))
    return total


def test_similarity_matches_direct_pearson():
    a, w, stats = _heads_problem()
    for keep in ([1, 1, 0, 1, 0, 1], [0, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]):
        mask = torch.tensor(keep, dtype=torch.bool)
        assert abs(similarity(stats, mask) - _direct_similarity(a, w, mask)) < 1e-9


def test_float32_unit_stats_agree_with_float64():
    """The engine's float32 products: same leave-one-out order and greedy result, scores within 1e-5."""
    for seed in range(3):
        _, _, exact = _heads_problem(seed)
        _, _, fast = _heads_problem(seed, torch.float32)
        torch.testing.assert_close(fast.M, exact.M, rtol=1e-5, atol=1e-6 * float(exact.M.abs().max()))
        s_exact, s_fast = leave_one_out_scores(exact), leave_one_out_scores(fast)
        torch.testing.assert_close(s_fast, s_exact, rtol=1e-5, atol=0)
        assert torch.equal(torch.argsort(s_fast), torch.argsort(s_exact))
        buckets = torch.zeros(H, dtype=torch.long)
        keep0 = initial_keep(s_exact, buckets, 3)
        assert torch.equal(greedy_swap(fast, keep0, buckets)[0], greedy_swap(exact, keep0, buckets)[0])


def test_leave_one_out_scores_match_direct():
    a, w, stats = _heads_problem(1)
    scores = leave_one_out_scores(stats)
    for h in range(H):
        mask = torch.ones(H, dtype=torch.bool)
        mask[h] = False
        assert abs(float(scores[h]) - _direct_similarity(a, w, mask)) < 1e-9


def test_greedy_swap_never_lowers_similarity_and_respects_buckets():
    for seed in range(5):
        a, w, stats = _heads_problem(seed)
        buckets = torch.arange(H) // 3  # two KV groups of three query heads
        keep0 = initial_keep(leave_one_out_scores(stats), buckets, 1)
        keep, history = greedy_swap(stats, keep0, buckets)
        assert all(b >= a_ - 1e-12 for a_, b in zip(history, history[1:], strict=False))
        assert abs(history[-1] - _direct_similarity(a, w, keep)) < 1e-9
        for b in (0, 1):  # each group still loses exactly one head
            assert int((~keep)[buckets == b].sum()) == 1


def test_greedy_swap_can_improve_on_the_single_head_ranking():
    improved = 0
    for seed in range(20):
        _, _, stats = _heads_problem(seed)
        keep0 = initial_keep(leave_one_out_scores(stats), torch.zeros(H, dtype=torch.long), 3)
        _, history = greedy_swap(stats, keep0, torch.zeros(H, dtype=torch.long))
        improved += history[-1] > history[0] + 1e-9
    assert improved > 0  # otherwise the search would be dead code on these problems


@pytest.mark.parametrize("pca_dtype", [torch.float64, torch.float32])
def test_channel_scores_match_method_definition(pca_dtype):
    g = torch.Generator().manual_seed(0)
    n, c, i = 200, 8, 10
    x = torch.randn(n, c, generator=g, dtype=torch.float64)
    wg, wu = torch.randn(i, c, generator=g, dtype=torch.float64), torch.randn(i, c, generator=g, dtype=torch.float64)
    wd = torch.randn(c, i, generator=g, dtype=torch.float64)
    wd[0] *= 300  # one "massive" output dim: a heavy-tailed spectrum, the hard case for float32
    z = torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)
    y = z @ wd.T
    acc = MomentAccumulator(c, torch.device("cpu"))
    acc.add(y)
    fs = feature_space_from_covariance(acc.covariance(), pca_dtype)
    got = channel_scores(wg, wu, wd, (x * x).sum(0), (z * z).sum(0), fs, chunk=3)
    # Direct: PCA of centred y, w_k = sigmoid(|l_k| / mean |l|), q_i = |u_i V| * w.
    yc = y - y.mean(0)
    lam, v = torch.linalg.eigh(yc.T @ yc / n)
    wk = torch.sigmoid(lam.abs() / lam.abs().mean())
    nx = x.norm(dim=0)
    want = ((wg * nx).norm(dim=1) + (wu * nx).norm(dim=1)
            + z.norm(dim=0) * ((wd.T @ v).abs() * wk).norm(dim=1))
    tol = 1e-9 if pca_dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=0)
    assert torch.equal(torch.argsort(got), torch.argsort(want))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_feature_space_from_tokens_equals_the_covariance_route_when_tokens_are_few(dtype):
    """Fewer tokens (N = 24) than dims (C = 40): the N x N token-Gram route must give the same
    channel scores as the C x C eigendecomposition, including a huge-variance dim and exact zeros."""
    g = torch.Generator().manual_seed(3)
    n_batches, tokens, c, i = 3, 8, 40, 30
    y = torch.randn(n_batches, tokens, c, generator=g, dtype=torch.float64) * torch.rand(c, generator=g)
    y[..., 0] *= 400  # massive dim
    y[..., 1] = 7.0  # constant dim: zero variance
    y += torch.linspace(-3, 3, c, dtype=torch.float64)  # non-zero means
    acc = MomentAccumulator(c, torch.device("cpu"))
    for b in y:
        acc.add(b)
    wg, wu = torch.randn(i, c, generator=g, dtype=torch.float64), torch.randn(i, c, generator=g, dtype=torch.float64)
    wd = torch.randn(c, i, generator=g, dtype=torch.float64)
    x_sq, z_sq = torch.rand(c, generator=g, dtype=torch.float64), torch.rand(i, generator=g, dtype=torch.float64)
    exact = channel_scores(wg, wu, wd, x_sq, z_sq, feature_space_from_covariance(acc.covariance(), torch.float64))
    batches = [b[None] for b in y]  # (1, tokens, C) batches, as the engine keeps them
    fs = feature_space_from_samples(batches, acc.mean(), dtype)
    assert fs.basis.shape == (c, n_batches * tokens) and fs.floor == 0.25
    got = channel_scores(wg, wu, wd, x_sq, z_sq, fs)
    tol = 1e-10 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, exact, rtol=tol, atol=0)
    assert torch.equal(torch.argsort(got), torch.argsort(exact))


def test_regression_fit_is_least_squares_and_never_worse():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(500, 6, generator=g, dtype=torch.float64)
    x = 0.6 * y + 0.2 * torch.randn(500, 6, generator=g, dtype=torch.float64) + 0.1
    x[:, 5] = 3.0  # a constant output dim: guarded, a = 1
    sums = RegressionSums(6, torch.device("cpu"))
    for xs, ys in zip(x.split(100), y.split(100), strict=True):
        sums.add(xs, ys)
    fit = sums.fit()
    for c in range(5):
        design = torch.stack([x[:, c], torch.ones(500, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(design, y[:, c:c + 1]).solution.flatten()
        assert abs(float(fit.scale[c] - sol[0])) < 1e-9 and abs(float(fit.shift[c] - sol[1])) < 1e-9
    assert float(fit.scale[5]) == 1.0
    assert abs(float(fit.shift[5]) - float(y[:, 5].mean() - 3.0)) < 1e-9
    recovered = x * fit.scale + fit.shift
    assert abs(fit.mse_removed - float(((x - y) ** 2).mean())) < 1e-9
    assert abs(fit.mse_recovered - float(((recovered - y) ** 2).mean())) < 1e-9
    assert fit.mse_recovered < fit.mse_removed


def test_moments_survive_huge_means():
    """LLaMA's massive-activation dims: mean 1e4 with spread 1e-2 must not cancel to garbage."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 3, generator=g) * 1e-2 + torch.tensor([1e4, 0.0, -3e3])
    acc = MomentAccumulator(3, torch.device("cpu"))
    for chunk in x.split(512):
        acc.add(chunk.float())
    direct = torch.cov(x.double().T, correction=0)
    torch.testing.assert_close(acc.covariance(), direct, rtol=1e-3, atol=1e-9)
    sums = RegressionSums(3, torch.device("cpu"))
    y = 2 * x + 1 + torch.randn(4096, 3, generator=g) * 1e-3
    for xs, ys in zip(x.split(512), y.split(512), strict=True):
        sums.add(xs.float(), ys.float())
    fit = sums.fit()
    torch.testing.assert_close(fit.scale, torch.full((3,), 2.0, dtype=torch.float64), rtol=2e-2, atol=0)
