"""Per-layer pruning ratios (docs/method.md "Layer ratios"), solved so the whole model hits the user's target.

The user's `--ratio R` is the fraction of the model's TOTAL parameters to remove (embeddings and
lm_head included, a tied embedding counted once). Layer l gets r_l = R_base * m_l with
m_l = K softmax(alpha s)_l over the K most redundant layers (highest input/output cosine s_l). R_base is
found by bisection on the exact parameter count after rounding to whole heads / KV groups / channels,
then a few single channels (or steps of `--channel-multiple` channels) are added or removed so the total
lands on the target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from .architecture import ModelShape
from .errors import StreamPruneError


@dataclass(frozen=True)
class HeadUnits:
    """What one prunable attention unit is, for a model and a GQA mode.

    - MHA: a unit is one head with its q, k, v rows and o columns.
    - GQA, mode "groups": a unit is a whole KV group (its query heads plus its k and v head).
    - GQA, mode "heads": a unit is one query head; every KV group loses the same number of query
      heads (a bucket per group), so the layer stays a valid grouped-query layer and k/v are untouched.
    """

    heads_per_unit: int
    num_units: int
    num_buckets: int
    params_per_unit: int
    kv_heads_per_unit: int  # KV heads removed with one unit (0 in "heads" mode)

    @property
    def units_per_bucket(self) -> int:
        return self.num_units // self.num_buckets

    def buckets(self) -> torch.Tensor:
        """Bucket id of each unit: units are ordered head by head, KV group by KV group."""
        return torch.arange(self.num_units) // self.units_per_bucket


def head_units(shape: ModelShape, gqa_mode: str) -> HeadUnits:
    c, d = shape.hidden_size, shape.head_dim
    qkv_b = d if shape.qkv_bias else 0
    if not shape.is_gqa:
        return HeadUnits(1, shape.num_heads, 1, 4 * d * c + 3 * qkv_b, 1)
    if gqa_mode == "groups":
        n = shape.heads_per_group
        return HeadUnits(n, shape.num_kv_heads, 1, (2 * n + 2) * d * c + (n + 2) * qkv_b, 1)
    if gqa_mode == "heads":
        return HeadUnits(1, shape.num_heads, shape.num_kv_heads, 2 * d * c + qkv_b, 0)
    raise ValueError(f"unknown GQA mode {gqa_mode!r}")  # options.py lists the choices and validates them


def channel_params(shape: ModelShape) -> int:
    return 3 * shape.hidden_size + (2 if shape.mlp_bias else 0)


@dataclass(frozen=True)
class AllocationSettings:
    """The options the allocation reads. No defaults and no help here: each field is the `PruneOptions` field of
    the same name (options.py documents it), copied by name in `PruneOptions.allocation_settings()`; the
    ratio-dependent defaults (None) are resolved in `solve_allocation`."""

    gqa_mode: str
    regression: bool
    alpha: float | None
    num_pruned_layers: int | None
    attention_scale: float | None
    channel_multiple: int

    def check(self, shape: ModelShape) -> None:
        """Refuse, in one line, settings this model cannot take (the engine calls it before the dense pass)."""
        L, k = shape.num_layers, self.num_pruned_layers
        if k is not None and not 1 <= k <= L:
            raise StreamPruneError(f"--layers must be between 1 and {L}, got {k}")
        if self.channel_multiple >= shape.intermediate_size:
            raise StreamPruneError(f"--channel-multiple must be below the FFN width {shape.intermediate_size} (a "
                                   f"pruned layer keeps a positive multiple of it), got {self.channel_multiple}")


@dataclass(frozen=True)
class ChannelGrid:
    """The FFN channel counts a layer may prune (docs/method.md "Channel multiple"): none, so the dense width
    stays, or any count that leaves a multiple of `multiple` channels, at least `multiple` of them. With
    multiple 1 that is every count from 0 to width - 1, the method's plain rounding."""

    width: int
    multiple: int

    @property
    def most(self) -> int:
        """The most channels one layer can lose (it keeps `multiple`)."""
        return self.width - self.multiple

    def allows(self, prune: int) -> bool:
        kept = self.width - prune
        return prune == 0 or (0 < prune <= self.most and kept % self.multiple == 0)

    def nearest(self, prune: int) -> int:
        """The allowed count closest to `prune` (ties keep more channels). Monotone in `prune`, which the
        bisection on R_base relies on."""
        kept = self.width - prune
        below = kept // self.multiple * self.multiple
        candidates = [k for k in (self.width, below + self.multiple, below) if self.allows(self.width - k)]
        return self.width - min(candidates, key=lambda k: abs(k - kept))


@dataclass
class LayerPlan:
    """What one layer loses: `prune_units_per_bucket` attention units in each bucket and `prune_channels`."""

    layer: int
    score: float | None
    multiplier: float
    ratio: float
    prune_units_per_bucket: int
    prune_channels: int

    @property
    def prunes_attention(self) -> bool:
        return self.prune_units_per_bucket > 0

    @property
    def prunes_mlp(self) -> bool:
        return self.prune_channels > 0


@dataclass
class Allocation:
    plans: list[LayerPlan]
    params_before: int
    params_after: int
    target_ratio: float
    base_ratio: float
    alpha: float | None
    pruned_layers: int
    attention_scale: float  # the share used, resolved from the ratio when the option was left unset

    @property
    def achieved_ratio(self) -> float:
        return 1 - self.params_after / self.params_before

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "plans"}
        out["achieved_ratio"] = self.achieved_ratio
        return out


def default_alpha(ratio: float) -> float:
    """The reference settings: alpha 10 at low ratios (20 %), 7 at high ones (50 %)."""
    return 10.0 if ratio < 0.35 else 7.0


def default_attention_scale(ratio: float) -> float:
    """Held-out measurements on SmolLM2 (docs/results.md): keeping every head and pruning only FFN channels
    is best at 20 % (1.81x dense perplexity vs 1.92x for the paper's equal share), but at 50 % the FFN
    alone would lose about 90 % of its channels (40x vs 6.4x). From 35 % on, attention pruned at 3/4 of
    the FFN's rate beat both the paper's equal share and no heads (35 %: 3.26x vs 3.50x and 3.31x, 2 seeds
    except the paper's 1; 50 %, 3 seeds: 6.28x vs 6.38x)."""
    return 0.0 if ratio < 0.35 else 0.75


def default_num_pruned_layers(ratio: float, num_layers: int) -> int:
    """K layers to prune: the reference prunes 26 of 32 at 20 % and 30 of 32 at 50 %; interpolate."""
    frac = min(max(26 / 32 + (ratio - 0.2) * (4 / 32) / 0.3, 26 / 32), 30 / 32)
    return max(1, min(num_layers, round(frac * num_layers)))


def layer_multipliers(scores: list[float] | None, num_layers: int, alpha: float, k: int) -> list[float]:
    """m_l = K softmax(alpha s)_l over the K highest-scoring layers, 0 elsewhere; all 1 when uniform."""
    if scores is None:
        return [1.0] * num_layers
    s = torch.tensor(scores, dtype=torch.float64)
    chosen = torch.argsort(s, descending=True, stable=True)[:k]
    weights = torch.softmax(alpha * s[chosen], dim=0) * k
    m = torch.zeros(num_layers, dtype=torch.float64)
    m[chosen] = weights
    return m.tolist()


class RemovalCounter:
    """Parameters removed by a layer at ratio r, after rounding and caps (monotone in r)."""

    def __init__(self, shape: ModelShape, units: HeadUnits, regression: bool, channel_multiple: int = 1):
        self.shape, self.units = shape, units
        self.per_channel = channel_params(shape)
        self.regression = regression
        self.grid = ChannelGrid(shape.intermediate_size, channel_multiple)

    @classmethod
    def for_settings(cls, shape: ModelShape, settings: AllocationSettings) -> RemovalCounter:
        units = head_units(shape, settings.gqa_mode)
        return cls(shape, units, settings.regression, settings.channel_multiple)

    @property
    def per_step(self) -> int:
        """Parameters of the smallest change of a pruned layer's FFN: `channel_multiple` channels."""
        return self.grid.multiple * self.per_channel

    def counts(self, r: float, attention_scale: float) -> tuple[int, int]:
        """(units per bucket, FFN channels) a layer at ratio r prunes: a share min(attention_scale * r, 1) of
        its units (at least one kept per bucket) and a share r of its channels (at least one kept), rounded
        to the channel grid."""
        per_bucket = self.units.units_per_bucket
        prune_units = min(round(min(attention_scale * r, 1.0) * per_bucket), per_bucket - 1)
        prune_channels = min(round(r * self.shape.intermediate_size), self.shape.intermediate_size - 1)
        return max(prune_units, 0), self.grid.nearest(max(prune_channels, 0))

    def removed(self, prune_units: int, prune_channels: int) -> int:
        total = prune_units * self.units.num_buckets * self.units.params_per_unit
        total += prune_channels * self.per_channel
        if self.regression:  # recovery adds an o_proj / down_proj bias where the layer has none
            c = self.shape.hidden_size
            total -= c * (prune_units > 0 and not self.shape.o_bias)
            total -= c * (prune_channels > 0 and not self.shape.mlp_bias)
        return total


def solve_allocation(
    shape: ModelShape,
    params_before: int,
    target_ratio: float,
    scores: list[float] | None,
    settings: AllocationSettings,
) -> Allocation:
    """Per-layer plans whose total removal is as close as rounding allows to target_ratio * params_before.

    `scores` are the per-layer cosine similarities from the dense pass, or None for uniform ratios.
    A layer at ratio r loses a share min(attention_scale * r, 1) of its attention units (at least one
    kept per bucket) and a share r of its FFN channels, rounded so the kept width is a multiple of
    `channel_multiple`; attention_scale None picks default_attention_scale(target_ratio), as alpha and
    num_pruned_layers None pick theirs: the ratio-dependent defaults are resolved here and nowhere else. The
    options' own ranges (ratio in [0, 1), ...) are checked by PruneOptions.validate before this is called,
    the model-dependent ones by settings.check.
    """
    settings.check(shape)
    attention_scale = settings.attention_scale
    if attention_scale is None:
        attention_scale = default_attention_scale(target_ratio)
    counter = RemovalCounter.for_settings(shape, settings)
    L = shape.num_layers
    if scores is None:
        alpha_used, k = None, L
    else:
        alpha_used = default_alpha(target_ratio) if settings.alpha is None else settings.alpha
        k = settings.num_pruned_layers
        k = default_num_pruned_layers(target_ratio, L) if k is None else k
    m = layer_multipliers(scores, L, alpha_used or 0.0, k)
    target = target_ratio * params_before

    def removed_at(base: float) -> tuple[int, list[tuple[int, int]]]:
        counts = [counter.counts(min(base * mi, 1.0), attention_scale) for mi in m]
        return sum(counter.removed(u, ch) for u, ch in counts), counts

    base = _bisect_base(removed_at, target, max_base=1.0 / min(x for x in m if x > 0), params=params_before,
                        channel_multiple=settings.channel_multiple)
    _, counts = removed_at(base)
    counts = _correct_with_channels(counts, m, counter, target)
    plans = [
        LayerPlan(i, None if scores is None else float(scores[i]), float(m[i]), min(base * m[i], 1.0), u, ch)
        for i, (u, ch) in enumerate(counts)
    ]
    removed = sum(counter.removed(u, ch) for u, ch in counts)
    return Allocation(plans, params_before, params_before - removed, target_ratio, base, alpha_used, k,
                      attention_scale)


def _bisect_base(removed_at, target: float, max_base: float, params: int, channel_multiple: int) -> float:
    """Smallest-error R_base: bisection on the step function removed_at(base) around the target."""
    if target <= 0:
        return 0.0
    most, _ = removed_at(max_base)
    if most < target:
        channels = "one FFN channel" if channel_multiple == 1 else f"{channel_multiple} FFN channels"
        raise StreamPruneError(
            f"--ratio is too large: at most {most / params:.1%} of the parameters can be removed while "
            f"keeping at least one head (per KV group) and {channels} in every layer"
        )
    lo, hi = 0.0, max_base
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if removed_at(mid)[0] >= target:
            hi = mid
        else:
            lo = mid
    return hi if abs(removed_at(hi)[0] - target) <= abs(removed_at(lo)[0] - target) else lo


def _correct_with_channels(counts, m, counter: RemovalCounter, target: float) -> list[tuple[int, int]]:
    """Add or remove FFN channels in steps of `channel_multiple` (the finest unit: one channel by default) in
    layers whose FFN is pruned, most redundant first; a layer's FFN is never pruned away or left whole by it."""
    counts = list(counts)
    deficit = target - sum(counter.removed(u, ch) for u, ch in counts)
    steps = round(deficit / counter.per_step)
    order = [i for i in sorted(range(len(m)), key=lambda i: -m[i]) if counts[i][1] > 0]
    per_step = counter.grid.multiple  # channels
    while steps and order:
        moved = False
        for i in order:
            u, ch = counts[i]
            new = ch + (per_step if steps > 0 else -per_step)
            if new > 0 and counter.grid.allows(new):
                counts[i] = (u, new)
                steps += -1 if steps > 0 else 1
                moved = True
            if not steps:
                break
        if not moved:
            break
    return counts


def equal_budget_plans(plan: LayerPlan, shape: ModelShape, settings: AllocationSettings,
                       max_candidates: int = 4) -> list[LayerPlan]:
    """The splits of `plan`'s parameter budget between attention units and FFN channels (`--split search`).

    Units pruned per bucket 0, s, 2s, ... (s chosen so there are at most `max_candidates`) and the plan's
    own count, each with the number of FFN channels (on the channel grid) whose removal is closest to the
    plan's. A split that would need more channels than the layer has, or misses the budget by more than
    one step of channels' parameters, is left out; the plan itself is always a candidate.
    """
    counter = RemovalCounter.for_settings(shape, settings)
    budget = counter.removed(plan.prune_units_per_bucket, plan.prune_channels)
    per_bucket = counter.units.units_per_bucket
    step = math.ceil(per_bucket / max_candidates)
    plans = []
    for prune_units in sorted(set(range(0, per_bucket, step)) | {plan.prune_units_per_bucket}):
        channels = _channels_for_budget(counter, prune_units, budget)
        if channels is not None:
            plans.append(replace(plan, prune_units_per_bucket=prune_units, prune_channels=channels))
    return plans


def _channels_for_budget(counter: RemovalCounter, prune_units: int, budget: int) -> int | None:
    """The FFN channel count on the grid that, with `prune_units` per bucket, removes closest to `budget`
    parameters, or None when even that misses it by more than one step."""
    grid = counter.grid
    guess = round((budget - counter.removed(prune_units, 0)) / counter.per_channel)
    near = grid.nearest(min(max(guess, 0), grid.width - 1))
    options = [c for c in (near - grid.multiple, near, near + grid.multiple) if grid.allows(c)]
    best = min(options, key=lambda c: abs(counter.removed(prune_units, c) - budget))
    return best if abs(counter.removed(prune_units, best) - budget) <= counter.per_step else None
