"""Linear-regression recovery of o_proj and down_proj (docs/method.md "Affine recovery").

For every output dim c, fit y_c = a_c x_c + b_c by least squares, where y is the dense sub-layer output
and x the pruned one on the same input. The fit needs only per-dim sums, accumulated in float64.
Because a = 1, b = 0 is one candidate, the fitted output is never further from y (in mean squared
error) than plain removal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_VAR_EPS = 1e-20


@dataclass
class RegressionFit:
    scale: torch.Tensor  # a, (C,) float64
    shift: torch.Tensor  # b, (C,) float64
    mse_removed: float  # mean over tokens and dims of (x - y)^2: plain removal
    mse_recovered: float  # the same for a x + b

    def summary(self) -> dict:
        a, b = self.scale, self.shift
        return {
            "a_mean": float(a.mean()), "a_std": float(a.std()) if a.numel() > 1 else 0.0,
            "a_min": float(a.min()), "a_max": float(a.max()),
            "b_mean": float(b.mean()), "b_abs_mean": float(b.abs().mean()),
            "mse_removed": self.mse_removed, "mse_recovered": self.mse_recovered,
        }


def fit_from_moments(
    mean_x: torch.Tensor, mean_y: torch.Tensor, var_x: torch.Tensor, cov_xy: torch.Tensor, var_y: torch.Tensor
) -> RegressionFit:
    """a = cov(x, y) / var(x), b = mean(y) - a mean(x); a dim with var(x) = 0 gets a = 1, b = mean diff.

    Population moments (divided by N). The mean squared errors before and after follow from the same
    moments: E(x - y)^2 = var_x + var_y - 2 cov + (mean_x - mean_y)^2 and E(ax + b - y)^2 =
    var_y - 2a cov + a^2 var_x.
    """
    flat = var_x <= _VAR_EPS * (1 + mean_x.abs() ** 2)
    a = torch.where(flat, torch.ones_like(var_x), cov_xy / torch.where(flat, torch.ones_like(var_x), var_x))
    before = var_x + var_y - 2 * cov_xy + (mean_x - mean_y) ** 2
    after = (var_y - 2 * a * cov_xy + a * a * var_x).clamp(min=0)
    return RegressionFit(scale=a, shift=mean_y - a * mean_x, mse_removed=float(before.mean()),
                         mse_recovered=float(after.mean()))


class RegressionSums:
    """Running per-dim sums of x, y, x^2, y^2 and x*y over token rows, in float64.

    x and y are shifted by their first batch's means (the regression is shift-invariant except for
    b, which `fit` corrects), so huge-mean dims do not cancel catastrophically.
    """

    def __init__(self, dim: int, device: torch.device):
        z = lambda: torch.zeros(dim, dtype=torch.float64, device=device)  # noqa: E731
        self.n, self.sx, self.sy, self.sxx, self.sxy, self.syy = 0, z(), z(), z(), z(), z()
        self.shift_x: torch.Tensor | None = None
        self.shift_y: torch.Tensor | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).double()
        if self.shift_x is None:
            self.shift_x, self.shift_y = x.mean(0), y.mean(0)
        x, y = x - self.shift_x, y - self.shift_y
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += (x * x).sum(0)
        self.sxy += (x * y).sum(0)
        self.syy += (y * y).sum(0)

    def fit(self) -> RegressionFit:
        n = self.n
        mx, my = self.sx / n, self.sy / n
        var_x, cov, var_y = self.sxx / n - mx * mx, self.sxy / n - mx * my, self.syy / n - my * my
        return fit_from_moments(mx + self.shift_x, my + self.shift_y, var_x, cov, var_y)


def apply_fit(weight: torch.Tensor, bias: torch.Tensor | None, fit: RegressionFit) -> tuple[torch.Tensor, torch.Tensor]:
    """W'[c, :] = a_c W[c, :] and bias' = a_c bias_c + b_c (bias is the layer's own, if it has one).

    The weight is scaled in its own dtype (callers pass float32 or wider): one rounding of a product,
    which the cast to the checkpoint dtype rounds again anyway, and no float64 copy of a large matrix.
    """
    a = fit.scale.to(torch.float64)
    new_w = weight * a.to(weight.dtype)[:, None]
    new_b = fit.shift.clone()
    if bias is not None:
        new_b += a * bias.double()
    return new_w, new_b
