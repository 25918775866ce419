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
        self.t_sq += torch.linalg.vector_norm(t, dtype=torch.float64).square()
        xs = x - self.x.shift
        for start in range(0, t.shape[1], self.x.GRAM_BLOCK):  # column blocks bound the float64 temporaries
            cols = slice(start, start + self.x.GRAM_BLOCK)
            self.cross[:, cols] += xs.T @ t[:, cols]

    @property
    def count(self) -> int:
        return self.x.count

    def mean_t(self) -> torch.Tensor:
        return self.t_sum / self.count + self.t_shift.double()

    def cov_xt(self, inplace: bool = False) -> torch.Tensor:
        mx, mt = self.x.sum / self.count, self.t_sum / self.count
        if not inplace:
            return torch.addr(self.cross, mx, mt, beta=1.0 / self.count, alpha=-1.0)
        cov, self.cross = self.cross, None
        return cov.mul_(1.0 / self.count).addr_(mx, mt, alpha=-1.0)

    def total_var_t(self) -> float:
        mt = self.t_sum / self.count
        return float(self.t_sq / self.count - mt @ mt)


def _damp_in_place(cov_kk: torch.Tensor, damping: float) -> float:
    """cov_kk += lambda I with lambda = damping * mean(diag); returns lambda."""
    lam = damping * float(cov_kk.diagonal().mean().clamp(min=1e-30))
    cov_kk.diagonal().add_(lam)
    return lam


def _cholesky(a: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Lower Cholesky factor of the damped (positive definite) matrix; `inplace` overwrites `a`
    (LAPACK factors in place), which saves a |K| x |K| float64 matrix at the memory peak."""
    if inplace:
        return torch.linalg.cholesky(a, out=a)
    return torch.linalg.cholesky(a)


def refit_to_target(moments: CrossMoments, w_kept: torch.Tensor, b: torch.Tensor | None,
                    damping: float, kept: torch.Tensor | None = None) -> LeastSquaresFit:
    """W' = (C_tK + lambda W_K)(C_KK + lambda I)^-1, b' = mean(t) - W' mean(x_K), from streamed moments.

    `w_kept` is the dense projection restricted to the kept input columns (out x |K|), `b` its bias.
    `kept` (a bool mask over the accumulated x channels) selects K when the moments cover more inputs
    than are kept; by default every accumulated channel is kept. The moments are consumed: their
    matrices become the covariances and the damped system in place, so the solve holds at most two
    |K| x |K| and two |K| x out float64 matrices.
    """
    mean_k, mean_t, var_t = moments.x.mean(), moments.mean_t(), moments.total_var_t()
    cov_kk, cov_kt = moments.x.covariance(inplace=True), moments.cov_xt(inplace=True)
    if kept is not None:
        idx = kept.nonzero().flatten()
        cov_kk, cov_kt, mean_k = cov_kk[idx[:, None], idx], cov_kt[idx], mean_k[idx]
    w_k = w_kept  # float32 or wider; products below go through float64 a block of rows at a time
    b_old = torch.zeros_like(mean_t) if b is None else b.double()
    before = _mse(var_t, cov_kk, cov_kt, w_k, mean_t - w_k.double() @ mean_k - b_old)
    lam = _damp_in_place(cov_kk, damping)
    factor = _cholesky(cov_kk, inplace=True)
    del cov_kk
    rhs = cov_kt
    for start in range(0, rhs.shape[0], _ROWS):  # (|K|, out): C_Kt + lambda W_K^T, in place
        rhs[start:start + _ROWS] += lam * w_k.T[start:start + _ROWS].double()
    weight_t = torch.cholesky_solve(rhs, factor)
    del factor
    # E||t - W'x - b'||^2 with W' A = rhs^T (A = C_KK + lambda I): var_t - tr(W' rhs) + 2 lambda tr(W' W_K^T)
    # - lambda ||W'||^2, so neither C_KK nor C_Kt is needed again.
    after = var_t - _dot(weight_t, rhs) + lam * (2 * _dot(weight_t, w_k.T) - _dot(weight_t, weight_t))
    del rhs
    weight = weight_t.T
    bias = mean_t - weight @ mean_k
    return LeastSquaresFit(weight, bias, damping, before, max(after, 0.0) / weight.shape[0])


def refit_from_input_moments(cov: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor, w: torch.Tensor,
                             b: torch.Tensor | None, damping: float) -> LeastSquaresFit:
    """The same fit when the target is the dense projection on the same input (t = W x + b).

    `cov`/`mean` are the moments of the full input x (all channels), `kept` a bool mask over them,
    `w` the dense weight (out x in). Only W[:, P] C_PK (C_KK + lambda I)^-1 is solved: |P| right-hand
    sides instead of `out`.
    """
    k_idx, p_idx = kept.nonzero().flatten(), (~kept).nonzero().flatten()
    a = cov[k_idx[:, None], k_idx]  # advanced indexing on both axes: no |K| x n intermediate
    cov_kp = cov[k_idx[:, None], p_idx]
    cov_pp = cov[p_idx[:, None], p_idx]
    w_k, w_p = w[:, k_idx].double(), w[:, p_idx].double()
    lam = _damp_in_place(a, damping)
    factor = _cholesky(a)
    g = torch.cholesky_solve(cov_kp, factor)  # A^-1 C_KP, |K| x |P|
    weight = w_k + w_p @ g.T
    b_old = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if b is None else b.double()
    bias = b_old + w_p @ (mean[p_idx] - g.T @ mean[k_idx])
    # Errors of the pruned contribution e = W_P x_P (- its correction): E||e - mean e||^2 + ||mean e||^2.
    removed = _quad(w_p, cov_pp) + float((w_p @ mean[p_idx]).square().sum())
    # cov of x_P - G^T x_K, with C_KK = A - lambda I
    resid = cov_pp - 2 * cov_kp.T @ g + g.T @ (a @ g) - lam * g.T @ g
    recovered = _quad(w_p, resid)
    out = w.shape[0]
    return LeastSquaresFit(weight, bias, damping, removed / out, max(recovered, 0.0) / out)


_ROWS = 512  # rows per block in the float64 reductions below: temporaries of 512 x n, not out x n


def _quad(w: torch.Tensor, cov: torch.Tensor) -> float:
    """trace(W cov W^T), float64, a block of rows of W at a time."""
    total = 0.0
    for start in range(0, w.shape[0], _ROWS):
        rows = w[start:start + _ROWS].double()
        total += float(((rows @ cov) * rows).sum())
    return total


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum(a * b) over all elements, float64, a block of rows at a time."""
    return sum(float((a[i:i + _ROWS].double() * b[i:i + _ROWS].double()).sum()) for i in range(0, a.shape[0], _ROWS))


def _mse(var_t: float, cov_kk: torch.Tensor, cov_kt: torch.Tensor, w: torch.Tensor, mean_err: torch.Tensor) -> float:
    """Mean over tokens and dims of (t - W x_K - c)^2 with mean error `mean_err` (population moments)."""
    total = var_t - 2 * _dot(w, cov_kt.T) + _quad(w, cov_kk) + float(mean_err.square().sum())
    return max(total, 0.0) / w.shape[0]
