"""Choose what to prune by the error that is left *after* the least-squares refit (optimal brain surgeon).

For a projection y = W x (W: out x n) with input covariance H over the calibration tokens, removing the
input channels P and refitting the kept weights by least squares (least_squares.py) leaves the
output error

    E(P) = trace( W_P  ([H^-1]_PP)^-1  W_P^T )            (H damped: H + lambda I)

which is the classic OBS cost. It is minimised greedily, one unit at a time: the unit u whose removal
costs least given the units already removed is taken, then W and H^-1 are updated as if u were
gone and the rest refitted,

    W    <- W    - W_:,u  ([H^-1]_uu)^-1  [H^-1]_u,:
    H^-1 <- H^-1 - [H^-1]_:,u ([H^-1]_uu)^-1 [H^-1]_u,:

(SlimGPT and ZipLM use this family for structured pruning). A unit is one FFN channel (a column of
down_proj) or one attention unit (the head_dim columns of o_proj of its query heads). Unlike the
SlimLLM scores, the criterion knows that the refit will let the kept channels stand in for correlated
pruned ones. Cost: one n x n inverse and O(n^2 + out n) per removed unit. The greedy runs in
float32 by default (like GPTQ's inverse-Hessian updates): it only ranks candidates, and the refit
itself (least_squares.py) is solved again in float64 from the float64 covariance.
"""

from __future__ import annotations

import torch

SELECTION_DTYPE = torch.float32


def _damped_inverse(cov: torch.Tensor, damping: float, dtype: torch.dtype) -> torch.Tensor:
    """(cov + lambda I)^-1 in `dtype`, with at most two n x n temporaries of that dtype."""
    a = cov.to(dtype, copy=True)
    a.diagonal().add_(damping * float(cov.diagonal().mean().clamp(min=1e-30)))
    factor = torch.linalg.cholesky(a)
    del a
    return torch.cholesky_inverse(factor)


def prune_columns_by_refit_error(w: torch.Tensor, cov: torch.Tensor, count: int, damping: float,
                                 dtype: torch.dtype = SELECTION_DTYPE) -> torch.Tensor:
    """Indices of `count` input columns of `w` (out x n) to prune, greedily by refit error."""
    hinv = _damped_inverse(cov, damping, dtype)
    w = w.to(dtype, copy=True)
    alive = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    pruned = []
    for _ in range(count):
        d = hinv.diagonal()
        err = w.square().sum(0) / d
        err[~alive] = float("inf")
        j = int(torch.argmin(err))
        row = hinv[j] / d[j]
        w -= torch.outer(w[:, j], row)
        hinv -= torch.outer(hinv[:, j], row)
        alive[j] = False
        pruned.append(j)
    return torch.tensor(pruned, dtype=torch.long, device=w.device)


def keep_units_by_refit_error(w: torch.Tensor, cov: torch.Tensor, unit_size: int, buckets: torch.Tensor,
                              prune_per_bucket: int, damping: float,
                              dtype: torch.dtype = SELECTION_DTYPE) -> torch.Tensor:
    """Keep mask over units (blocks of `unit_size` consecutive columns of `w`): in every bucket
    `prune_per_bucket` units are pruned, chosen greedily by refit error across all buckets."""
    n_units = w.shape[1] // unit_size
    hinv = _damped_inverse(cov, damping, dtype)
    w = w.to(dtype, copy=True)
    buckets = buckets.cpu()
    keep = torch.ones(n_units, dtype=torch.bool)
    quota = {int(b): prune_per_bucket for b in buckets.unique()}
    cols = torch.arange(w.shape[1], device=w.device).view(n_units, unit_size)
    for _ in range(prune_per_bucket * len(quota)):
        candidates = [u for u in range(n_units) if keep[u] and quota[int(buckets[u])] > 0]
        idx = cols[candidates]  # (k, s)
        blocks = hinv[idx[:, :, None], idx[:, None, :]]  # (k, s, s)
        w_blocks = w[:, idx].permute(1, 0, 2)  # (k, out, s)
        solved = torch.linalg.solve(blocks, w_blocks.transpose(1, 2))  # (k, s, out) = B^-1 W_u^T
        err = (solved * w_blocks.transpose(1, 2)).sum((1, 2))
        best = int(torch.argmin(err))
        u, block_cols = candidates[best], idx[best]
        factor = torch.linalg.solve(blocks[best], hinv[block_cols])  # B^-1 [H^-1]_u,:
        w -= w[:, block_cols] @ factor
        hinv -= hinv[:, block_cols] @ factor
        keep[u] = False
        quota[int(buckets[u])] -= 1
    return keep
