"""The swappable parts of the per-layer method, and the options that choose them.

A layer is pruned by four parts (layer_pruning.LayerJob runs them in order); each kind is a `Protocol` below:

- a **head selector** (`HeadSelector`): which attention units to keep, from the attention output's covariance
  (SlimLLM's Pearson scores with a greedy swap search, or the error left after a refit);
- a **channel selector** (`ChannelSelector`): which FFN channels to prune, from statistics it asks the FFN pass
  to gather (SlimLLM's feature-space scores, or the error left after a refit);
- a **recovery** (`Recovery`) of the two output projections, o_proj and down_proj (plain removal, SlimLLM's
  per-row a*y+b, or a least-squares refit of every kept weight); for down_proj it returns a `DownProjFit` that
  follows the pruned FFN's sweep over the calibration batches;
- a **reconstruction** (`Reconstruction`): gradient training of the pruned windows after the closed form
  (reconstruction.GradientReconstruction), or none.

`MethodParts.from_switches` builds them once per run from the user's options; a new part is a class that
satisfies its Protocol, chosen there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .allocation import HeadUnits, LayerPlan
from .least_squares import CrossMoments, LeastSquaresFit, refit_from_input_moments, refit_to_target
from .reconstruction import GradientReconstruction, ReconstructionSettings, TrainedWindow, WindowProblem
from .recovery import RegressionFit, RegressionSums, apply_fit, fit_from_moments
from .refit_selection import keep_units_by_refit_error, prune_columns_by_refit_error
from .scoring import (
    PCA_DTYPE,
    FeatureSpace,
    MomentAccumulator,
    UnitStats,
    channel_scores,
    feature_space_from_covariance,
    feature_space_from_samples,
    greedy_swap,
    initial_keep,
    leave_one_out_scores,
    lowest_channels,
    similarity,
)


@dataclass(frozen=True)
class MethodSwitches:
    """The options the per-layer method reads (ratios are handled in allocation).

    No defaults and no help here: each field is the `PruneOptions` field of the same name (options.py
    documents it), copied by name in `PruneOptions.switches()`, except `reconstruction`, which
    `PruneOptions.reconstruction()` assembles from the --reconstruct-* options.
    """

    greedy: bool
    feature_space: bool
    regression: bool
    recovery: str
    target: str
    selection: str
    protect_lowest: float
    damping: float
    reconstruction: ReconstructionSettings | None  # from PruneOptions.reconstruction(): None when off

    @property
    def least_squares(self) -> bool:
        return self.regression and self.recovery == "lstsq"

    @property
    def dense_target(self) -> bool:
        return self.least_squares and self.target == "dense"


@dataclass
class LayerReport:
    """What happened in one layer, as written to the run report (None fields are left out)."""

    layer: int
    similarity_initial: float | None = None
    greedy_swaps: int | None = None
    similarity_final: float | None = None
    o_proj_fit: dict | None = None
    heads_kept: int | None = None
    heads_total: int | None = None
    kept_heads: list[int] | None = None
    kv_heads_kept: int | None = None
    down_proj_fit: dict | None = None
    channels_kept: int | None = None
    channels_total: int | None = None
    reconstruction: list[dict] | None = None  # one WindowReport per reconstructed window
    # Filled in by layer_pruning.LayerPruner once the layer is done:
    plan_ratio: float | None = None  # the allocation's ratio for this layer
    score: float | None = None  # the dense pass's score (None: not scored)
    params_before: int | None = None
    params_after: int | None = None
    split_trials: list[dict] | None = None  # --split search: one SplitTrial per candidate

    def to_dict(self) -> dict:
        """None fields are left out, except `score`: a layer no dense pass scored says so."""
        return {k: v for k, v in self.__dict__.items() if v is not None or k == "score"}


# ----------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------


@dataclass
class HeadProblem:
    """One layer's attention, as the head selector and the o_proj recovery see it."""

    cov_a: torch.Tensor  # covariance of the o_proj input A (float64)
    mean_a: torch.Tensor
    w_o: torch.Tensor  # dense o_proj weight, at least float32
    b_o: torch.Tensor | None  # dense o_proj bias, float64
    plan: LayerPlan
    units: HeadUnits
    head_dim: int
    report: LayerReport
    cross: CrossMoments | None = None  # A with the dense-model target, for least squares to it

    @property
    def unit_size(self) -> int:
        return self.units.heads_per_unit * self.head_dim

    @cached_property
    def unit_stats(self) -> UnitStats:
        return UnitStats.from_covariance(self.cov_a, self.w_o, self.unit_size)

    def kept_columns(self, keep_units: torch.Tensor) -> torch.Tensor:
        """Bool mask over o_proj's input columns for the kept units."""
        mask = torch.repeat_interleave(keep_units.to(self.w_o.device), self.unit_size)
        return mask


@runtime_checkable
class HeadSelector(Protocol):
    """Chooses the attention units a layer keeps."""

    def keep_units(self, problem: HeadProblem) -> torch.Tensor:
        """Bool mask over the units (on the CPU), `problem.plan.prune_units_per_bucket` dropped in each bucket.
        May fill in the head fields of `problem.report`."""
        ...


class SlimLLMHeads:
    """docs/method.md "Head scoring": leave-one-out Pearson similarity, then the greedy swap search."""

    def __init__(self, greedy: bool):
        self.greedy = greedy

    def keep_units(self, p: HeadProblem) -> torch.Tensor:
        stats = p.unit_stats
        scores = leave_one_out_scores(stats)
        buckets = p.units.buckets().to(scores.device)
        keep = initial_keep(scores, buckets, p.plan.prune_units_per_bucket)
        p.report.similarity_initial = similarity(stats, keep)
        if self.greedy:
            keep, history = greedy_swap(stats, keep, buckets)
            p.report.greedy_swaps = sum(1 for a, b in zip(history, history[1:], strict=False) if b > a)
        p.report.similarity_final = similarity(stats, keep)
        return keep.cpu()


class RefitHeads:
    """Units chosen by the o_proj output error left after the least-squares refit (refit_selection.py)."""

    def __init__(self, damping: float):
        self.damping = damping

    def keep_units(self, p: HeadProblem) -> torch.Tensor:
        return keep_units_by_refit_error(p.w_o, p.cov_a, p.unit_size, p.units.buckets(),
                                         p.plan.prune_units_per_bucket, self.damping)


# ----------------------------------------------------------------------------------------------
# FFN channels
# ----------------------------------------------------------------------------------------------


def _sum_of_squares(batch: torch.Tensor) -> torch.Tensor:
    """Per-feature sum over a batch's tokens of x^2, in float64, without a float64 copy of the batch
    (for a 7B FFN activation that copy and its square were 180 MB of temporaries per batch)."""
    return torch.linalg.vector_norm(batch, dim=(0, 1), dtype=torch.float32).double().square()


@dataclass
class ChannelStatistics:
    """Accumulated over the FFN pass on the pruned-attention output (what the selector asked for)."""

    x_sq: torch.Tensor  # per-feature sum of squares of the FFN input
    z_sq: torch.Tensor  # per-channel sum of squares of act(gate) * up
    y_moments: MomentAccumulator | None = None  # FFN output, for the PCA
    z_moments: MomentAccumulator | None = None  # FFN intermediate, for the refit error
    dense_out: list[torch.Tensor] = field(default_factory=list)  # dense FFN output per batch
    feature_space: FeatureSpace | None = None  # SlimLLMChannels.prepare: the PCA weighting of the output dims

    def add(self, xn: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> None:
        self.x_sq += _sum_of_squares(xn)
        self.z_sq += _sum_of_squares(z)
        if self.y_moments is not None:
            self.y_moments.add(y)
        if self.z_moments is not None:
            self.z_moments.add(z)


@dataclass
class ChannelChoice:
    pruned: torch.Tensor  # channel indices
    z_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # (cov, mean) of all channels, when gathered


@runtime_checkable
class ChannelSelector(Protocol):
    """Chooses the FFN channels a layer prunes, from statistics it asks the FFN pass to gather."""

    def statistics(self, n_in: int, n_channels: int, n_out: int, n_tokens: int, device) -> ChannelStatistics:
        """Empty statistics for an FFN of these sizes, holding the accumulators this selector needs."""
        ...

    def prepare(self, stats: ChannelStatistics) -> None:
        """The heavy step on the gathered statistics before scoring (SlimLLM's PCA; the job times it apart as
        "pca", since the eigendecomposition dominates on CPUs); nothing for selectors without one."""
        ...

    def choose(self, mlp: torch.nn.Module, stats: ChannelStatistics, count: int) -> ChannelChoice:
        """The `count` channels to prune, from the dense FFN `mlp` and the prepared statistics."""
        ...


class SlimLLMChannels:
    """docs/method.md "Channel scoring": I_gate + I_up + I_down with the PCA feature-space weighting (or
    plain norms)."""

    def __init__(self, feature_space: bool, protect_lowest: float):
        self.feature_space, self.protect_lowest = feature_space, protect_lowest

    def statistics(self, n_in: int, n_channels: int, n_out: int, n_tokens: int, device) -> ChannelStatistics:
        stats = _zero_stats(n_in, n_channels, device)
        if self.feature_space:
            # Fewer calibration tokens than output dims: the PCA comes from the token Gram (exact,
            # cheaper), which needs only the mean of the outputs; otherwise from the C x C covariance.
            stats.y_moments = MomentAccumulator(n_out, device, with_gram=n_tokens >= n_out)
        return stats

    def prepare(self, stats: ChannelStatistics) -> None:
        if not self.feature_space:
            return
        if stats.y_moments.gram is None:
            stats.feature_space = feature_space_from_samples(stats.dense_out, stats.y_moments.mean())
        else:
            cov_y = stats.y_moments.covariance().to(PCA_DTYPE)
            stats.y_moments = None  # free the float64 Gram before the eigendecomposition's workspace
            stats.feature_space = feature_space_from_covariance(cov_y)
            del cov_y

    def choose(self, mlp: torch.nn.Module, stats: ChannelStatistics, count: int) -> ChannelChoice:
        scores = channel_scores(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, stats.x_sq,
                                stats.z_sq, stats.feature_space)
        stats.feature_space = None
        return ChannelChoice(lowest_channels(scores, count, self.protect_lowest))


class RefitChannels:
    """Channels chosen by the down_proj output error left after the least-squares refit."""

    def __init__(self, damping: float):
        self.damping = damping

    def statistics(self, n_in: int, n_channels: int, n_out: int, n_tokens: int, device) -> ChannelStatistics:
        stats = _zero_stats(n_in, n_channels, device)
        stats.z_moments = MomentAccumulator(n_channels, device)
        return stats

    def prepare(self, stats: ChannelStatistics) -> None:
        pass  # the refit error needs no step of its own before scoring

    def choose(self, mlp: torch.nn.Module, stats: ChannelStatistics, count: int) -> ChannelChoice:
        z_stats = (stats.z_moments.covariance(), stats.z_moments.mean())
        stats.z_moments = None
        pruned = prune_columns_by_refit_error(mlp.down_proj.weight, z_stats[0], count, self.damping)
        return ChannelChoice(pruned, z_stats)


def _zero_stats(n_in: int, n_channels: int, device) -> ChannelStatistics:
    return ChannelStatistics(torch.zeros(n_in, dtype=torch.float64, device=device),
                             torch.zeros(n_channels, dtype=torch.float64, device=device))


# ----------------------------------------------------------------------------------------------
# Recovery
# ----------------------------------------------------------------------------------------------


@dataclass
class DownProjInput:
    """What a down_proj recovery gets: the dense weight (its kept columns, and whole), the dense bias, and
    what the channel selector learnt about the FFN intermediate."""

    w_kept: torch.Tensor | None  # (C, |K|), at least float32, on the compute device
    b_old: torch.Tensor | None  # float64; None: down_proj has no bias
    module_bias: torch.Tensor | None  # the dense bias in compute dtype, as the forward uses it
    compute_dtype: torch.dtype
    report: LayerReport
    # The dense weight as stored, all channels: converted (at least float32, compute device) only by a recovery
    # that refits from the whole intermediate's covariance, so no other one pays for a full-width float32 copy.
    w_dense: torch.Tensor | None
    kept: torch.Tensor  # kept channel indices
    z_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # ChannelChoice.z_stats: (cov, mean) of all channels

    def drop_dense(self) -> None:
        """Forget the dense weights and the channel covariance once the fit is built (the fit holds what it
        needs), so that releasing them from the layer frees their memory."""
        self.w_kept = self.w_dense = self.z_stats = None


@runtime_checkable
class DownProjFit(Protocol):
    """One layer's down_proj recovery, following the pruned FFN's sweep over the calibration batches.

    Per batch the sweep calls `observe(z, x, y, t)` with the pruned intermediate z, the pruned output x, the dense
    output y and the target t (None: y). With `keeps_intermediate` the weights exist only after the sweep: x is
    None, the sweep keeps z per batch and `finish` turns those into outputs (in place); otherwise the sweep
    computes x with `forward_weights()` and keeps x. `finish` then settles `w` and `b`, and `output` turns each
    kept batch into the sub-layer's final output.
    """

    keeps_intermediate: bool
    w: torch.Tensor
    b: torch.Tensor | None

    def forward_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def observe(self, z: torch.Tensor, x: torch.Tensor | None, y: torch.Tensor, t: torch.Tensor | None) -> None: ...

    def finish(self, kept: list[torch.Tensor]) -> None: ...

    def output(self, kept: torch.Tensor) -> torch.Tensor: ...


class _FixedBeforeSweep:
    """A down-projection fit whose weights are settled before the pruned FFN's sweep: the sweep only
    applies them (nothing to observe, nothing to finish, the forward's own output kept)."""

    keeps_intermediate = False

    def observe(self, z, x, y, t) -> None:
        pass

    def finish(self, kept: list[torch.Tensor]) -> None:
        pass

    def output(self, kept: torch.Tensor) -> torch.Tensor:
        return kept.float()


class PlainDownProj(_FixedBeforeSweep):
    """Plain removal: the kept columns unchanged, the dense bias kept."""

    def __init__(self, inp: DownProjInput):
        self.inp = inp
        self.w, self.b = inp.w_kept, inp.b_old

    def forward_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.w.to(self.inp.compute_dtype), self.inp.module_bias


class AffineDownProj:
    """docs/method.md "Affine recovery" of down_proj: y_c = a_c x_c + b_c fitted over the sweep."""

    keeps_intermediate = False

    def __init__(self, inp: DownProjInput):
        self.inp = inp
        self.w, self.b = inp.w_kept, inp.b_old
        self.sums = RegressionSums(inp.w_kept.shape[0], inp.w_kept.device)

    def forward_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.w.to(self.inp.compute_dtype), self.inp.module_bias

    def observe(self, z, x, y, t) -> None:
        self.sums.add(x, y)

    def finish(self, kept: list[torch.Tensor]) -> None:
        fit = self.sums.fit()
        self.w, self.b = apply_fit(self.w, self.b, fit)
        self.inp.report.down_proj_fit = fit.summary()
        self.scale, self.shift = fit.scale.float(), fit.shift.float()

    def output(self, kept: torch.Tensor) -> torch.Tensor:
        return kept.float() * self.scale + self.shift


class LeastSquaresDownProj:
    """Accumulates C_KK and C_tK over the sweep (keeping z), solves, then computes the outputs."""

    keeps_intermediate = True  # the weights exist only after the sweep

    def __init__(self, inp: DownProjInput, damping: float):
        self.inp, self.damping = inp, damping
        self.w, self.b = inp.w_kept, inp.b_old
        self.moments = CrossMoments(inp.w_kept.shape[1], inp.w_kept.shape[0], inp.w_kept.device)

    def forward_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise RuntimeError("the least-squares down_proj has weights only after the sweep")

    def observe(self, z, x, y, t) -> None:
        self.moments.add(z, y if t is None else t)

    def finish(self, kept: list[torch.Tensor]) -> None:
        fit = refit_to_target(self.moments, self.w, self.b, self.damping)
        self.moments = None
        _take_fit(self, fit)
        w_c, b_c = self.w.to(self.inp.compute_dtype), self.b.to(self.inp.compute_dtype)
        for i, z in enumerate(kept):  # z -> output in place: never both lists whole
            kept[i] = F.linear(z, w_c, b_c)

    def output(self, kept: torch.Tensor) -> torch.Tensor:
        return kept.float()


class PrefitDownProj(_FixedBeforeSweep):
    """Least squares straight from the covariance the channel selector gathered (no second Gram)."""

    def __init__(self, inp: DownProjInput, fit: LeastSquaresFit):
        self.inp = inp
        self.w, self.b = inp.w_kept, inp.b_old
        _take_fit(self, fit)

    def forward_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.w.to(self.inp.compute_dtype), self.b.to(self.inp.compute_dtype)


def _take_fit(target: LeastSquaresDownProj | PrefitDownProj, fit: LeastSquaresFit) -> None:
    target.w, target.b = fit.weight.to(target.w.dtype), fit.bias
    target.inp.report.down_proj_fit = fit.summary()


@runtime_checkable
class Recovery(Protocol):
    """Recovers the output projections after pruning: o_proj from the attention statistics, down_proj over the
    pruned FFN's sweep."""

    # True: fits to the dense model's hidden states (--target dense), so the job gathers its statistics against
    # them; False: to the sub-layer's own dense output on the same input.
    dense_target: bool

    def o_proj(self, problem: HeadProblem, keep_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pruned o_proj's (weight, bias) for the kept units; may fill in `problem.report.o_proj_fit`."""
        ...

    def down_proj(self, inp: DownProjInput) -> DownProjFit: ...


class PlainRemoval:
    """No recovery: kept weights unchanged, no bias added (`--no-regression`)."""

    dense_target = False

    def o_proj(self, p: HeadProblem, keep_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return p.w_o[:, p.kept_columns(keep_units)], p.b_o

    def down_proj(self, inp: DownProjInput) -> DownProjFit:
        return PlainDownProj(inp)


class AffineRecovery:
    """docs/method.md "Affine recovery": per output dim y_c = a_c x_c + b_c (the paper's)."""

    dense_target = False

    def o_proj(self, p: HeadProblem, keep_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        fit = _attention_affine_fit(p, keep_units.to(p.w_o.device))
        p.report.o_proj_fit = fit.summary()
        cols = p.kept_columns(keep_units)
        return apply_fit(p.w_o[:, cols], p.b_o, fit)

    def down_proj(self, inp: DownProjInput) -> DownProjFit:
        return AffineDownProj(inp)


class LeastSquaresRecovery:
    """docs/method.md "Least-squares recovery": every kept weight refitted, to the sub-layer's dense output
    or the dense model's."""

    def __init__(self, damping: float, dense_target: bool):
        self.damping, self.dense_target = damping, dense_target

    def o_proj(self, p: HeadProblem, keep_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask = p.kept_columns(keep_units)
        if p.cross is not None:
            fit = refit_to_target(p.cross, p.w_o[:, mask], p.b_o, self.damping, kept=mask)
            p.cross = None
        else:
            fit = refit_from_input_moments(p.cov_a, p.mean_a, mask, p.w_o, p.b_o, self.damping)
        p.report.o_proj_fit = fit.summary()
        return fit.weight.to(p.w_o.dtype), fit.bias

    def down_proj(self, inp: DownProjInput) -> DownProjFit:
        if inp.z_stats is None or self.dense_target:
            return LeastSquaresDownProj(inp, self.damping)
        # The channel selector gathered the whole intermediate's covariance: solve from it, no second sweep.
        w = inp.w_dense.to(inp.w_kept.device, inp.w_kept.dtype)
        mask = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)
        mask[inp.kept.to(w.device)] = True
        return PrefitDownProj(inp, refit_from_input_moments(*inp.z_stats, mask, w, inp.b_old, self.damping))


def _attention_affine_fit(p: HeadProblem, keep: torch.Tensor) -> RegressionFit:
    """o_proj regression in closed form: x = pruned output, y = dense output, both linear in A."""
    stats, units = p.unit_stats, p.units
    kept_dims = torch.repeat_interleave(torch.repeat_interleave(keep, units.heads_per_unit), p.head_dim)
    s_units = keep.to(torch.float64)
    cov_xy = stats.r @ s_units
    var_x = torch.einsum("cuv,u,v->c", stats.M, s_units, s_units)
    mean_x = _matvec64(p.w_o, p.mean_a * kept_dims)  # pruned heads contribute 0: no column copy of W_o
    mean_y = _matvec64(p.w_o, p.mean_a)
    if p.b_o is not None:
        mean_x, mean_y = mean_x + p.b_o, mean_y + p.b_o
    return fit_from_moments(mean_x, mean_y, var_x, cov_xy, stats.var_y)


def _matvec64(w: torch.Tensor, v: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """w @ v in float64, `chunk` rows of w at a time (no whole float64 copy of w)."""
    return torch.cat([w[i:i + chunk].double() @ v.double() for i in range(0, w.shape[0], chunk)])


# ----------------------------------------------------------------------------------------------
# Reconstruction (docs/method.md "Reconstruction by gradient")
# ----------------------------------------------------------------------------------------------


@runtime_checkable
class Reconstruction(Protocol):
    """Trains the kept weights of a layer's pruned windows after the closed form. The job keeps each window's input
    on the pruned stream, and with `learns_from_pruned_stream` the dense window's output on it; with
    `keeps_dense_input` the pruner keeps the layer's input on the dense stream (the training pairs come from the
    dense model's own stream then)."""

    keeps_dense_input: bool
    learns_from_pruned_stream: bool

    def windows(self, plan: LayerPlan) -> tuple[str, ...]:
        """The windows (reconstruction.WINDOWS, in that order) to train in this layer; () for none."""
        ...

    def train(self, problem: WindowProblem) -> TrainedWindow: ...


class NoReconstruction:
    """The closed form alone (`--reconstruct off`): no window in any layer."""

    keeps_dense_input = False
    learns_from_pruned_stream = False

    def windows(self, plan: LayerPlan) -> tuple[str, ...]:
        return ()

    def train(self, problem: WindowProblem) -> TrainedWindow:
        raise RuntimeError("no window is trained with --reconstruct off")


# ----------------------------------------------------------------------------------------------
# Assembly
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodParts:
    """The parts of one run, built once from its switches."""

    heads: HeadSelector
    channels: ChannelSelector
    recovery: Recovery
    reconstruction: Reconstruction

    @classmethod
    def from_switches(cls, s: MethodSwitches) -> MethodParts:
        if s.selection == "refit":
            heads, channels = RefitHeads(s.damping), RefitChannels(s.damping)
        else:
            heads, channels = SlimLLMHeads(s.greedy), SlimLLMChannels(s.feature_space, s.protect_lowest)
        if not s.regression:
            recovery = PlainRemoval()
        elif s.recovery == "lstsq":
            recovery = LeastSquaresRecovery(s.damping, s.dense_target)
        else:
            recovery = AffineRecovery()
        reconstruction = NoReconstruction() if s.reconstruction is None else GradientReconstruction(s.reconstruction)
        return cls(heads, channels, recovery, reconstruction)
