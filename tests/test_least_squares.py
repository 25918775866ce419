"""Least-squares recovery against a literal float64 torch.linalg.lstsq on explicit activations."""

from __future__ import annotations

import pytest
import torch

from streamprune.least_squares import CrossMoments, refit_from_input_moments, refit_to_target
from streamprune.scoring import MomentAccumulator


def _ridge_lstsq(x: torch.Tensor, t: torch.Tensor, w_prior: torch.Tensor, lam: float):
    """min ||t - x W^T - b||^2 + lam N ||W - W_prior||^2 as one augmented lstsq problem (bias undamped)."""
    n, k = x.shape
    design = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    reg = torch.cat([torch.eye(k, dtype=x.dtype), torch.zeros(k, 1, dtype=x.dtype)], 1) * (lam * n) ** 0.5
    a = torch.cat([design, reg])
    rhs = torch.cat([t, (lam * n) ** 0.5 * w_prior.T])
    sol = torch.linalg.lstsq(a, rhs, driver="gelsd").solution
    return sol[:k].T, sol[k]


def _activations(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    offset = torch.randn(d, generator=g, dtype=torch.float64) * 3  # large means, as LLaMA activations have
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + offset


def _lam(x_kept: torch.Tensor, damping: float) -> float:
    return damping * float(x_kept.var(0, unbiased=False).mean())


@pytest.mark.parametrize("damping", [1e-2, 1e-6])
def test_refit_to_target_matches_lstsq(damping):
    x = _activations(300, 12, seed=0)
    kept = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(7, 12, generator=g, dtype=torch.float64)
    target = x @ w.T + 0.1 * torch.randn(300, 7, generator=g, dtype=torch.float64) + 2.0
    moments = CrossMoments(int(kept.sum()), 7, torch.device("cpu"))
    for xb, tb in zip(x[:, kept].split(64), target.split(64), strict=True):
        moments.add(xb, tb)
    fit = refit_to_target(moments, w[:, kept], None, damping)
    ref_w, ref_b = _ridge_lstsq(x[:, kept], target, w[:, kept], _lam(x[:, kept], damping))
    assert torch.allclose(fit.weight, ref_w, rtol=1e-7, atol=1e-9)
    assert torch.allclose(fit.bias, ref_b, rtol=1e-7, atol=1e-8)
    resid = target - x[:, kept] @ fit.weight.T - fit.bias
    removed = target - x[:, kept] @ w[:, kept].T
    assert fit.mse_recovered == pytest.approx(float(resid.square().mean()), rel=1e-6)
    assert fit.mse_removed == pytest.approx(float(removed.square().mean()), rel=1e-6)
    assert fit.mse_recovered < fit.mse_removed


def test_refit_from_input_moments_equals_target_form():
    """Same-input target t = W x + b: the |P|-right-hand-side closed form equals the general solve."""
    x = _activations(200, 10, seed=2)
    kept = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    acc = MomentAccumulator(10, torch.device("cpu"))
    for xb in x.split(50):
        acc.add(xb)
    fit = refit_from_input_moments(acc.covariance(), acc.mean(), kept, w, b, damping=1e-3)
    ref_w, ref_b = _ridge_lstsq(x[:, kept], x @ w.T + b, w[:, kept], _lam(x[:, kept], 1e-3))
    assert torch.allclose(fit.weight, ref_w, rtol=1e-7, atol=1e-9)
    assert torch.allclose(fit.bias, ref_b, rtol=1e-7, atol=1e-8)
    resid = x @ w.T + b - x[:, kept] @ fit.weight.T - fit.bias
    assert fit.mse_recovered == pytest.approx(float(resid.square().mean()), rel=1e-6)
    removed = x[:, ~kept] @ w[:, ~kept].T
    assert fit.mse_removed == pytest.approx(float(removed.square().mean()), rel=1e-6)


def test_fewer_tokens_than_channels_stays_finite_and_near_prior():
    """A rank-deficient Gram (N < |K|) is solvable thanks to the damping; unexcited directions keep W."""
    x = _activations(8, 20, seed=4)
    kept = torch.ones(20, dtype=torch.bool)
    kept[::4] = False
    w = torch.randn(5, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    acc = MomentAccumulator(20, torch.device("cpu"))
    acc.add(x)
    fit = refit_from_input_moments(acc.covariance(), acc.mean(), kept, w, None, damping=1e-2)
    assert torch.isfinite(fit.weight).all() and torch.isfinite(fit.bias).all()
    ref_w, _ = _ridge_lstsq(x[:, kept], x @ w.T, w[:, kept], _lam(x[:, kept], 1e-2))
    assert torch.allclose(fit.weight, ref_w, rtol=1e-6, atol=1e-8)
    assert fit.mse_recovered < fit.mse_removed


def test_float32_batches_accumulate_like_float64():
    x = _activations(256, 16, seed=6)
    t = x @ torch.randn(16, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    exact, single = CrossMoments(16, 4, torch.device("cpu")), CrossMoments(16, 4, torch.device("cpu"))
    for xb, tb in zip(x.split(32), t.split(32), strict=True):
        exact.add(xb, tb)
        single.add(xb.float(), tb.float())
    w = torch.zeros(4, 16, dtype=torch.float64)
    a, b = refit_to_target(exact, w, None, 0.1), refit_to_target(single, w, None, 0.1)
    assert torch.allclose(a.weight, b.weight, rtol=1e-4, atol=1e-5)


def _refit_error(x: torch.Tensor, w: torch.Tensor, kept: torch.Tensor, damping: float) -> float:
    acc = MomentAccumulator(x.shape[1], torch.device("cpu"))
    acc.add(x)
    return refit_from_input_moments(acc.covariance(), acc.mean(), kept, w, None, damping).mse_recovered


def test_refit_selection_first_pick_is_the_cheapest_single_removal():
    from streamprune.refit_selection import prune_columns_by_refit_error

    x = _activations(400, 9, seed=8)
    w = torch.randn(5, 9, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    acc = MomentAccumulator(9, torch.device("cpu"))
    acc.add(x)
    errors = []
    for j in range(9):
        kept = torch.ones(9, dtype=torch.bool)
        kept[j] = False
        errors.append(_refit_error(x, w, kept, 1e-8))
    first = prune_columns_by_refit_error(w, acc.covariance(), 1, damping=1e-8, dtype=torch.float64)
    assert int(first[0]) == min(range(9), key=errors.__getitem__)
    # Greedy over three steps: never worse than removing the three smallest-norm columns.
    three = prune_columns_by_refit_error(w, acc.covariance(), 3, damping=1e-8, dtype=torch.float64)
    assert len(set(three.tolist())) == 3
    greedy = torch.ones(9, dtype=torch.bool)
    greedy[three] = False
    naive = torch.ones(9, dtype=torch.bool)
    naive[torch.argsort(w.norm(dim=0))[:3]] = False
    assert _refit_error(x, w, greedy, 1e-8) <= _refit_error(x, w, naive, 1e-8) + 1e-12


def test_unit_selection_respects_buckets_and_matches_exhaustive_search_for_one_unit():
    from streamprune.refit_selection import keep_units_by_refit_error

    x = _activations(500, 12, seed=10)  # 6 units of 2 columns, 2 buckets of 3 units
    w = torch.randn(4, 12, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    acc = MomentAccumulator(12, torch.device("cpu"))
    acc.add(x)
    buckets = torch.tensor([0, 0, 0, 1, 1, 1])
    keep = keep_units_by_refit_error(w, acc.covariance(), 2, buckets, 1, damping=1e-8, dtype=torch.float64)
    assert keep.tolist().count(False) == 2 and not keep[:3].all() and not keep[3:].all()
    # With one bucket and one unit to prune, the pick is the exhaustive minimum.
    one = keep_units_by_refit_error(w, acc.covariance(), 2, torch.zeros(6, dtype=torch.long), 1, damping=1e-8,
                                   dtype=torch.float64)
    errors = []
    for u in range(6):
        kept = torch.ones(12, dtype=torch.bool)
        kept[2 * u:2 * u + 2] = False
        errors.append(_refit_error(x, w, kept, 1e-8))
    assert int((~one).nonzero()) == min(range(6), key=errors.__getitem__)
