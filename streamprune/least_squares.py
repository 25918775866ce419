"""Least-squares recovery of a pruned output projection (o_proj or down_proj), from streamed moments.

A projection y = W x + b loses the input channels P and keeps K. Plain removal keeps W[:, K]; the
SlimLLM fit rescales each output row (y_c ~ a_c x_c + b_c). Least squares instead refits every kept
weight so the kept inputs explain as much of a target t as they can:

    min over W', b'   sum over tokens ||t - W' x_K - b'||^2  +  lambda N ||W' - W[:, K]||_F^2

With population moments (divided by the token count N) the solution is

    W' = (C_tK + lambda W[:, K]) (C_KK + lambda I)^-1,        b' = mean(t) - W' mean(x_K),

where C_KK = cov(x_K) and C_tK = cov(t, x_K). The ridge pulls W' towards the dense weights (not
towards zero), so a direction the calibration tokens never excite keeps its dense value; lambda is
`damping` times the mean of diag(C_KK), which makes it independent of the activations' scale. The
bias b' is the exact least-squares intercept (an input column of ones, not damped).

When the target is the dense projection's own output on the same input, t = W x + b, then
C_tK = W[:, K] C_KK + W[:, P] C_PK and the solution reduces to

    W' = W[:, K] + W[:, P] C_PK (C_KK + lambda I)^-1,     b' = b + W[:, P] mean(x_P) + (W[:, K] - W') mean(x_K),

which needs only the input covariance (`refit_from_input_moments`). It contains the paper's per-row
affine fit and FLAP's bias compensation (b' = b + W[:, P] mean(x_P)) as restricted special cases, so
on the calibration tokens it is never worse than either when lambda -> 0.

Every statistic is accumulated in float64; the solve is a float64 Cholesky factorisation of the
damped K x K matrix (positive definite for lambda > 0, also with fewer tokens than channels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scoring import MomentAccumulator

DEFAULT_DAMPING = 1e-2


@dataclass
class LeastSquaresFit:
    weight: torch.Tensor  # (out, |K|) float64
    bias: torch.Tensor  # (out,) float64
    damping: float
    mse_removed: float  # mean over tokens and output dims of (t - W[:, K] x_K - b)^2: plain removal
    mse_recovered: float  # the same for W' x_K + b'

    def summary(self) -> dict:
        return {"damping": self.damping, "mse_removed": self.mse_removed, "mse_recovered": self.mse_recovered}


class CrossMoments:
    """Running mean/covariance of inputs x and their cross-covariance with a target t, in float64.

    The x side is a MomentAccumulator (shifted sums, float32 batch products added to a float64
    total); the target is shifted by its first batch's mean too, so huge-mean dims do not cancel.
    Memory: |x|^2 + |x| |t| float64 values, e.g. 0.9 GB for a 7B down_proj keeping 8800 channels.
    """

    def __init__(self, dim_x: int, dim_t: int, device: torch.device):
        self.x = MomentAccumulator(dim_x, device)  # also usable on its own (e.g. for head scoring)
        self.t_shift: torch.Tensor | None = None
        self.t_sum = torch.zeros(dim_t, dtype=torch.float64, device=device)
        self.t_sq = torch.zeros((), dtype=torch.float64, device=device)  # trace of the t Gram (shifted)
        self.cross = torch.zeros(dim_x, dim_t, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        t = t.reshape(-1, t.shape[-1])
        x = x if x.dtype == torch.float64 else x.float()
        t = t if t.dtype == torch.float64 else t.float()
        self.x.add(x)
        if self.t_shift is None:
            self.t_shift = t.mean(0)
        t = t - self.t_shift
        self.t_sum += t.sum(0, dtype=torch.float64)
        self.t_sq += t.double().square().sum()
        self.cross += (x - self.x.shift).T @ t

    @property
    def count(self) -> int:
        return self.x.count

    def mean_t(self) -> torch.Tensor:
        return self.t_sum / self.count + self.t_shift.double()

    def cov_xt(self) -> torch.Tensor:
        mx, mt = self.x.sum / self.count, self.t_sum / self.count
        return torch.addr(self.cross, mx, mt, beta=1.0 / self.count, alpha=-1.0)

    def total_var_t(self) -> float:
        mt = self.t_sum / self.count
        return float(self.t_sq / self.count - mt @ mt)


def _damped_cholesky(cov_kk: torch.Tensor, damping: float) -> torch.Tensor:
    lam = damping * float(cov_kk.diagonal().mean().clamp(min=1e-30))
    a = cov_kk.clone()
    a.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:  # only for damping 0 with a singular Gram: add a tiny jitter and retry
        a.diagonal().add_(1e-10 * float(cov_kk.diagonal().mean()) + 1e-30)
        factor = torch.linalg.cholesky(a)
    return factor, lam


def refit_to_target(moments: CrossMoments, w_kept: torch.Tensor, b: torch.Tensor | None,
                    damping: float = DEFAULT_DAMPING, kept: torch.Tensor | None = None) -> LeastSquaresFit:
    """W' = (C_tK + lambda W_K)(C_KK + lambda I)^-1, b' = mean(t) - W' mean(x_K), from streamed moments.

    `w_kept` is the dense projection restricted to the kept input columns (out x |K|), `b` its bias.
    `kept` (a bool mask over the accumulated x channels) selects K when the moments cover more inputs
    than are kept; by default every accumulated channel is kept.
    """
    cov_kk, cov_kt, mean_k = moments.x.covariance(), moments.cov_xt(), moments.x.mean()
    if kept is not None:
        idx = kept.nonzero().flatten()
        cov_kk, cov_kt, mean_k = cov_kk[idx[:, None], idx], cov_kt[idx], mean_k[idx]
    mean_t = moments.mean_t()
    w_k = w_kept.double()
    factor, lam = _damped_cholesky(cov_kk, damping)
    rhs = cov_kt + lam * w_k.T  # (|K|, out)
    weight = torch.cholesky_solve(rhs, factor).T
    bias = mean_t - weight @ mean_k
    b_old = torch.zeros_like(mean_t) if b is None else b.double()
    var_t = moments.total_var_t()
    before = _mse(var_t, cov_kk, cov_kt, w_k, mean_t - w_k @ mean_k - b_old)
    after = _mse(var_t, cov_kk, cov_kt, weight, torch.zeros_like(mean_t))
    return LeastSquaresFit(weight, bias, damping, before, after)


def refit_from_input_moments(cov: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor, w: torch.Tensor,
                             b: torch.Tensor | None, damping: float = DEFAULT_DAMPING) -> LeastSquaresFit:
    """The same fit when the target is the dense projection on the same input (t = W x + b).

    `cov`/`mean` are the moments of the full input x (all channels), `kept` a bool mask over them,
    `w` the dense weight (out x in). Only W[:, P] C_PK (C_KK + lambda I)^-1 is solved: |P| right-hand
    sides instead of `out`.
    """
    k_idx, p_idx = kept.nonzero().flatten(), (~kept).nonzero().flatten()
    cov_kk = cov[k_idx[:, None], k_idx]  # advanced indexing on both axes: no |K| x n intermediate
    cov_kp = cov[k_idx[:, None], p_idx]
    w_k, w_p = w[:, k_idx].double(), w[:, p_idx].double()
    factor, lam = _damped_cholesky(cov_kk, damping)
    g = torch.cholesky_solve(cov_kp, factor)  # (C_KK + lambda I)^-1 C_KP, |K| x |P|
    weight = w_k + w_p @ g.T
    b_old = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if b is None else b.double()
    bias = b_old + w_p @ (mean[p_idx] - g.T @ mean[k_idx])
    # Errors of the pruned contribution e = W_P x_P (- its correction): E||e - mean e||^2 + ||mean e||^2.
    cov_pp = cov[p_idx[:, None], p_idx]
    removed = _quad(w_p, cov_pp) + float((w_p @ mean[p_idx]).square().sum())
    resid = cov_pp - 2 * cov_kp.T @ g + g.T @ cov_kk @ g  # cov of x_P - G^T x_K
    recovered = _quad(w_p, resid)
    out = w.shape[0]
    return LeastSquaresFit(weight, bias, damping, removed / out, max(recovered, 0.0) / out)


def _quad(w: torch.Tensor, cov: torch.Tensor) -> float:
    """trace(W cov W^T)."""
    return float(((w @ cov) * w).sum())


def _mse(var_t: float, cov_kk: torch.Tensor, cov_kt: torch.Tensor, w: torch.Tensor, mean_err: torch.Tensor) -> float:
    """Mean over tokens and dims of (t - W x_K - c)^2 with mean error `mean_err` (population moments)."""
    total = var_t - 2 * float((w * cov_kt.T).sum()) + _quad(w, cov_kk) + float(mean_err.square().sum())
    return max(total, 0.0) / w.shape[0]
