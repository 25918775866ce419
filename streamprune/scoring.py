"""Head and channel importance (docs/method.md "Head scoring" and "Channel scoring"), computed from running statistics.

Heads: every quantity the Pearson similarity and the greedy search need is a second-order statistic
of the head outputs. With Y_u = A_u W_o,u^T the contribution of unit u (a head, or a KV group of heads)
to the o_proj output, M[c, u, v] = cov(Y_u[:, c], Y_v[:, c]) is a quadratic form of the covariance of
the attention output A, so it is built from sum(A) and A^T A accumulated over calibration batches;
after that no candidate set ever touches the N tokens again.

Channels: the FFN output covariance (for its PCA) and per-feature / per-channel squared norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = 1e-30


class MomentAccumulator:
    """Running mean and covariance of row vectors, kept in float64 so fp16 runs stay exact enough.

    Rows are shifted by the first batch's mean before accumulating: E[xx^T] - mu mu^T cancels
    catastrophically for the few huge-mean dims LLaMA models have ("massive activations"), while the
    shifted sums stay small. Each batch's Gram is formed in float32 (fast on any GPU; float64 inputs
    stay float64), a block of columns at a time so the temporaries stay small, and added to a
    float64 total.
    """

    GRAM_BLOCK = 1024

    def __init__(self, dim: int, device: torch.device, with_gram: bool = True):
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device) if with_gram else None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.reshape(-1, rows.shape[-1])
        rows = rows if rows.dtype == torch.float64 else rows.float()
        if self.shift is None:
            self.shift = rows.mean(0)
        rows = rows - self.shift
        self.count += rows.shape[0]
        self.sum += rows.sum(0, dtype=torch.float64)
        if self.gram is None:  # mean only
            return
        for start in range(0, rows.shape[1], self.GRAM_BLOCK):  # column blocks bound the temporaries
            cols = slice(start, start + self.GRAM_BLOCK)
            self.gram[:, cols] += rows.T @ rows[:, cols]

    def mean(self) -> torch.Tensor:
        return self.sum / self.count + self.shift.double()

    def covariance(self, inplace: bool = False) -> torch.Tensor:
        """gram / n - mu mu^T, built in one C x C allocation (no separate outer-product temporary).

        `inplace` turns the accumulator's own Gram into the covariance (no second C x C matrix; the
        accumulator cannot take more rows afterwards)."""
        mu = self.sum / self.count
        if not inplace:
            return torch.addr(self.gram, mu, mu, beta=1.0 / self.count, alpha=-1.0)
        cov, self.gram = self.gram, None
        return cov.mul_(1.0 / self.count).addr_(mu, mu, alpha=-1.0)


# ----------------------------------------------------------------------------------------------
# Attention heads
# ----------------------------------------------------------------------------------------------


@dataclass
class UnitStats:
    """Per-output-dim covariances of the unit contributions to the o_proj output.

    M: (C, U, U) with M[c, u, v] = cov(Y_u[:, c], Y_v[:, c]); r = M.sum(-1) = cov(Y_u, Y) per c;
    var_y = cov(Y, Y) per c. Float64 throughout.
    """

    M: torch.Tensor
    r: torch.Tensor
    var_y: torch.Tensor

    @classmethod
    def from_covariance(cls, cov_a: torch.Tensor, w_o: torch.Tensor, unit_size: int, chunk: int = 256,
                        dtype: torch.dtype = torch.float32) -> UnitStats:
        """cov_a: (Hd, Hd) covariance of the attention output; w_o: (C, Hd) o_proj weight.

        The products run in `dtype` and land in a float64 M: this is C x Hd^2 multiply-adds (as much as
        an o_proj forward over Hd tokens), and float32 makes it 2-4x faster on CPUs at a relative error
        near 2e-7, which is below what the float32 per-batch Grams of the accumulator already carry.
        Output dims are processed `chunk` at a time: the temporaries stay at chunk x Hd, small enough
        to stay in cache (chunk 256 measured twice as fast as 1024 on the 7B shape).
        """
        c, hd = w_o.shape
        units = hd // unit_size
        cov = cov_a.to(dtype)
        M = torch.empty(c, units, units, dtype=torch.float64, device=w_o.device)
        for start in range(0, c, chunk):
            w = w_o[start:start + chunk].to(dtype)
            w_units = w.reshape(-1, units, unit_size)
            for v in range(units):
                cols = slice(v * unit_size, (v + 1) * unit_size)
                t_v = (w[:, cols] @ cov[cols, :]).reshape(-1, units, unit_size)
                M[start:start + chunk, :, v] = (w_units * t_v).sum(-1)
        M = 0.5 * (M + M.transpose(1, 2))  # exact symmetry, so swap updates stay consistent
        r = M.sum(-1)
        return cls(M=M, r=r, var_y=r.sum(-1))

    @property
    def num_units(self) -> int:
        return self.M.shape[1]


def _pearson_sum(cov_s: torch.Tensor, var_s: torch.Tensor, var_y: torch.Tensor) -> torch.Tensor:
    """sum_c |cov_S,c| / sqrt(var_S,c var_Y,c); dims with zero variance contribute 0. Works batched."""
    denom = torch.sqrt(torch.clamp(var_s, min=0) * var_y)
    return torch.where(denom > _EPS, cov_s.abs() / denom.clamp(min=_EPS), torch.zeros_like(denom)).sum(-1)


def similarity(stats: UnitStats, keep: torch.Tensor) -> float:
    """sim(S) = sum over output dims of |pearson(Y_S, Y)| for the kept-unit mask `keep`."""
    s = keep.to(torch.float64)
    cov_s = stats.r @ s
    var_s = torch.einsum("cuv,u,v->c", stats.M, s, s)
    return float(_pearson_sum(cov_s, var_s, stats.var_y))


def leave_one_out_scores(stats: UnitStats) -> torch.Tensor:
    """score_u = sim(all units except u): high means removing u hurts little, so u is pruned first."""
    M, r = stats.M, stats.r
    diag = torch.diagonal(M, dim1=1, dim2=2)  # (C, U)
    cov_s = stats.var_y[:, None] - r  # cov(Y - Y_u, Y)
    var_s = stats.var_y[:, None] - 2 * r + diag  # var(Y - Y_u)
    return _pearson_sum(cov_s.T, var_s.T, stats.var_y[None, :])


def initial_keep(scores: torch.Tensor, buckets: torch.Tensor, prune_per_bucket: int) -> torch.Tensor:
    """In every bucket prune the `prune_per_bucket` units with the highest leave-one-out score."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    for b in buckets.unique():
        members = (buckets == b).nonzero().flatten()
        order = torch.argsort(scores[members], descending=True, stable=True)
        keep[members[order[:prune_per_bucket]]] = False
    return keep


def greedy_swap(stats: UnitStats, keep: torch.Tensor, buckets: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The greedy search of docs/method.md "Head scoring": for each initially pruned unit p, try swapping it with every
    kept unit k of the same bucket and apply the swap that most increases sim(S), if any does.

    Swaps are evaluated in closed form from M: with q = M s (s the kept indicator),
    var' = var + 2(q_p - q_k) + M_pp + M_kk - 2 M_pk and cov' = cov + r_p - r_k, for all k at once.
    Returns the new mask and the similarity after each step (starting value first): non-decreasing.
    """
    keep = keep.clone()
    M, r = stats.M, stats.r
    s = keep.to(torch.float64)
    q = torch.einsum("cuv,v->cu", M, s)
    cov_s, var_s = r @ s, q @ s
    history = [float(_pearson_sum(cov_s, var_s, stats.var_y))]
    for p in (~keep).nonzero().flatten().tolist():
        cands = (keep & (buckets == buckets[p])).nonzero().flatten()
        if cands.numel() == 0:
            continue
        cov_new = cov_s[:, None] + r[:, p, None] - r[:, cands]
        var_new = (var_s[:, None] + 2 * (q[:, p, None] - q[:, cands])
                   + M[:, p, p, None] + M[:, cands, cands] - 2 * M[:, p, cands])
        sims = _pearson_sum(cov_new.T, var_new.T, stats.var_y[None, :])
        best = int(torch.argmax(sims))
        if sims[best] <= history[-1] * (1 + 1e-12):
            history.append(history[-1])
            continue
        k = int(cands[best])
        keep[p], keep[k] = True, False
        q += M[:, :, p] - M[:, :, k]
        cov_s, var_s = cov_new[:, best], var_new[:, best]
        history.append(float(sims[best]))
    return keep, history


# ----------------------------------------------------------------------------------------------
# FFN channels
# ----------------------------------------------------------------------------------------------


# The eigendecomposition and the projection run in float32: together they are the two O(C^3) /
# O(I C^2) steps of a layer, and float32 halves them on CPUs (and more on most GPUs). The covariance
# is still accumulated in float64; what float32 perturbs is tiny next to what the scores are used for
# (a ranking): the eigenvalue error is about 6e-8 * lambda_max, so each weight w_k moves by at most
# 1.5e-8 * lambda_max / mean(lambda) (the sigmoid's slope is <= 1/4), and near-degenerate eigenvectors
# only rotate inside subspaces whose weights are nearly equal, which leaves V diag(w^2) V^T unchanged.
PCA_DTYPE = torch.float32


@dataclass
class FeatureSpace:
    """The PCA weighting of docs/method.md "Channel scoring" in the form the channel scores use:
    ||q_i||^2 = floor * ||u_i||^2 + ||u_i basis||^2 for every down vector u_i (basis: C x r)."""

    basis: torch.Tensor
    floor: float = 0.0


def feature_space_from_covariance(cov_y: torch.Tensor, dtype: torch.dtype = PCA_DTYPE) -> FeatureSpace:
    """PCA of the FFN output covariance (C x C): basis = V diag(w), w_k = sigmoid(|l_k| / mean|l|).

    The definition's q_i = |u_i V| * w only enters the scores through its norm, and
    ||q_i|| = || u_i V diag(w) ||: the absolute value drops out, and folding w into the basis once
    saves an I x C multiply per channel chunk.
    """
    eigvals, eigvecs = torch.linalg.eigh(cov_y.to(dtype))
    mag = eigvals.abs()
    weights = torch.sigmoid(mag / mag.mean().clamp(min=_EPS))
    eigvecs *= weights  # scales column k by w_k, in place: no second C x C buffer
    return FeatureSpace(eigvecs)


def feature_space_from_samples(batches: list[torch.Tensor], mean: torch.Tensor,
                               dtype: torch.dtype = PCA_DTYPE) -> FeatureSpace:
    """The same weighting from the N x N token Gram, for when there are fewer tokens N than dims C.

    The covariance S = Yc^T Yc / N then has rank below N: its other C - N eigenvalues are 0, with
    weight sigmoid(0) = 1/2. Writing sum_k w_k^2 (u.v_k)^2 = |u|^2 / 4 + sum_k (w_k^2 - 1/4)(u.v_k)^2,
    only eigenvalues l_k > 0 are left in the sum, and those are the eigenvalues of K = Yc Yc^T / N,
    with v_k = Yc^T a_k / sqrt(N l_k) for K's eigenvectors a_k. So
        (w_k^2 - 1/4)(u.v_k)^2 = [(w_k^2 - 1/4) / l_k] (u . Yc^T a_k)^2 / N,
    where the factor tends to 1 / (4 mean(l)) as l_k -> 0: bounded, so no division blows up. This
    replaces the O(C^3) eigendecomposition by O(N^2 C + N^3) and the projection's I C^2 by I C N.
    `batches` are the FFN outputs (any leading shape, last dim C) and `mean` their mean.
    """
    centred = [b.reshape(-1, b.shape[-1]).to(dtype) - mean.to(dtype) for b in batches]
    dim, n = centred[0].shape[1], sum(c.shape[0] for c in centred)
    starts = [0]
    for c in centred:
        starts.append(starts[-1] + c.shape[0])
    gram = torch.empty(n, n, dtype=dtype, device=centred[0].device)
    for i, ci in enumerate(centred):
        for j, cj in enumerate(centred[: i + 1]):
            block = ci @ cj.T / n
            gram[starts[i]:starts[i + 1], starts[j]:starts[j + 1]] = block
            gram[starts[j]:starts[j + 1], starts[i]:starts[i + 1]] = block.T
    eigvals, eigvecs = torch.linalg.eigh(gram)
    del gram
    eigvals = eigvals.clamp(min=0)
    mean_eig = (eigvals.sum() / dim).clamp(min=_EPS)  # the mean over all C eigenvalues, zeros included
    x = eigvals / mean_eig
    w = torch.sigmoid(x)
    # (w^2 - 1/4) / l = (w + 1/2) (w - 1/2) / l, and w - 1/2 = tanh(x/2) / 2: evaluated without cancellation
    tanh_over_x = torch.where(x > 1e-4, torch.tanh(x / 2) / x.clamp(min=1e-4), 0.5 - x * x / 24)
    factor = (w + 0.5) * 0.5 * tanh_over_x / mean_eig
    eigvecs *= torch.sqrt(factor / n)
    basis = sum(c.T @ eigvecs[starts[i]:starts[i + 1]] for i, c in enumerate(centred))
    return FeatureSpace(basis, floor=0.25)


def channel_scores(
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    x_sq_sum: torch.Tensor,
    z_sq_sum: torch.Tensor,
    feature_space: FeatureSpace | None,
    chunk: int = 2048,
) -> torch.Tensor:
    """Channel score I_gate + I_up + I_down (docs/method.md "Channel scoring"), float64, length I.

    x_sq_sum: per-feature sum of squares of the FFN input (C); z_sq_sum: per-channel sum of squares of
    act(gate) * up (I); feature_space: the PCA weighting of the FFN output. With None (the
    --no-feature-space ablation) I_down uses the plain norm of the down vector: no eigenbasis weighting.
    Channels are scored `chunk` at a time so the temporaries stay at chunk x C (a 70B layer's whole
    I x C in float64 would be 1.9 GB each).
    """
    n_x = x_sq_sum.double().sqrt()
    scores = torch.empty(w_gate.shape[0], dtype=torch.float64, device=w_gate.device)
    for start in range(0, w_gate.shape[0], chunk):
        rows = slice(start, start + chunk)
        i_gate = torch.linalg.vector_norm(w_gate[rows].double() * n_x, dim=1)
        i_up = torch.linalg.vector_norm(w_up[rows].double() * n_x, dim=1)
        u = w_down[:, rows].T  # (chunk, C): row i is channel i's down vector
        u_norm = torch.linalg.vector_norm(u, dim=1, dtype=torch.float64)
        if feature_space is None:
            q_norm = u_norm
        else:
            basis = feature_space.basis
            projected = torch.linalg.vector_norm(u.to(basis.dtype) @ basis, dim=1, dtype=torch.float64)
            q_norm = torch.sqrt(feature_space.floor * u_norm.square() + projected.square())
        scores[rows] = i_gate + i_up + z_sq_sum[rows].double().sqrt() * q_norm
    return scores


def lowest_channels(scores: torch.Tensor, count: int, protect_lowest: float = 0.0) -> torch.Tensor:
    """Indices of the `count` lowest-scoring channels (stable, so ties break by index).

    `protect_lowest` > 0 is the official SlimLLM code's detail: the lowest-scored fraction of channels
    is left alone and the next `count` are pruned (as many as the layer allows).
    """
    skip = min(round(protect_lowest * scores.numel()), scores.numel() - count)
    return torch.argsort(scores, stable=True)[skip:skip + count]
