"""`--split search`: choose each layer's split between attention heads and FFN channels by trying them.

The fixed split (`--attention-scale`) prunes a share min(scale * r, 1) of a layer's heads and r of its
FFN channels, the same rule in every layer. With `--split search` the layer is pruned once per
candidate split of the same parameter budget (allocation.equal_budget_plans), each time on a copy of
its calibration hidden states, and the split whose output is closest to the dense layer's output on
the same input is kept. The attention and the FFN of one layer write into the same residual stream,
so their errors are comparable there; across layers they are not (docs/results.md, the error-driven
allocation), which is why the budget of each layer still comes from the allocation. With `--split-samples n`
the candidates are tried on n evenly spaced calibration sequences (split_trial_rows) and the chosen split is then
pruned once on all of them.

`SplitRule` says which splits a layer tries; `SplitTrials` scores the candidates' outputs and keeps the nearest.
The pruning itself is layer_pruning.LayerPruner's: it runs each candidate through its own layer job.

The distance weights each hidden dimension by the inverse of its mean square in the dense output.
LLaMA-family models carry a few "massive activation" dimensions (SmolLM2: mean square about 8,100
against 35-45 elsewhere) that the next RMSNorm largely divides away; an unweighted squared error is
dominated by them and picked worse splits on held-out text (6.62x vs 6.32x dense perplexity at 50 %,
against 6.06x with the weighting; docs/results.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Generic, TypeVar

import torch

from .allocation import AllocationSettings, LayerPlan, equal_budget_plans
from .architecture import ModelShape

ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class SplitRule:
    """How a layer's budget is split between heads and FFN channels: the plan's fixed split, or (`search`)
    every equal-budget split tried on `samples` calibration sequences (0: all of them)."""

    search: bool
    samples: int
    allocation: AllocationSettings  # candidates count removed parameters and round FFN widths as allocation does

    def candidates(self, plan: LayerPlan, shape: ModelShape) -> list[LayerPlan]:
        """The splits of the layer's budget to try: the plan alone unless a search has a choice."""
        if not self.search or not (plan.prunes_attention or plan.prunes_mlp):
            return [plan]
        return equal_budget_plans(plan, shape, self.allocation)

    def trial_rows(self, num_sequences: int) -> torch.Tensor | None:
        """The calibration sequences the candidates are tried on (split_trial_rows); None: all of them."""
        return split_trial_rows(num_sequences, self.samples)


@dataclass
class SplitTrial:
    """One candidate split of a layer's budget and the standardized error of its output."""

    prune_units_per_bucket: int
    prune_channels: int
    error: float

    def to_dict(self) -> dict:
        return asdict(self)


def dimension_weights(batches: Iterable[torch.Tensor], numerator: float = 1.0) -> torch.Tensor:
    """numerator / sum_t x_td^2 per hidden dimension d (float64), over the tokens of every batch.

    Accumulated batch by batch in float64, so no full-size float64 copy of the states is made.
    """
    square = 0.0
    for batch in batches:
        square = square + batch.to(torch.float64).reshape(-1, batch.shape[-1]).pow(2).sum(0).cpu()
    return numerator / square.clamp_min(torch.finfo(torch.float64).tiny)


def standardized_error(output: torch.Tensor, reference: torch.Tensor, batches: list[slice],
                       weights: torch.Tensor | None = None) -> float:
    """mean over tokens of sum_d (output - reference)_d^2 / m_d, with m_d the mean of reference_d^2.

    Accumulated batch by batch in float64, so no full-size float64 copy of the states is made.
    `weights` are the dimension_weights of `reference`, passed in when several outputs share one reference.
    """
    if weights is None:
        weights = dimension_weights(reference[sl] for sl in batches)
    width = reference.shape[-1]
    diff = torch.zeros(width, dtype=torch.float64)
    for sl in batches:
        ref = reference[sl].to(torch.float64).reshape(-1, width)
        diff += (output[sl].to(torch.float64).reshape(-1, width) - ref).pow(2).sum(0).cpu()
    return float((diff * weights).sum())


def split_trial_rows(num_sequences: int, samples: int) -> torch.Tensor | None:
    """The calibration sequences the split trials run on: None for all of them (`samples` 0 or >= the
    count), else `samples` evenly spaced indices, so a mixture's sources keep their shares."""
    if samples <= 0 or samples >= num_sequences:
        return None
    return torch.arange(samples) * num_sequences // samples


@dataclass
class _Candidate(Generic[ResultT]):
    error: float
    plan: LayerPlan
    states: torch.Tensor
    result: ResultT


class SplitTrials(Generic[ResultT]):
    """The candidate splits tried on one layer, each scored by the standardized error of its output against
    `reference` (the dense layer's output on the same input); the nearest is kept, ties keep the earlier."""

    def __init__(self, reference: torch.Tensor, batches: list[slice]):
        self.reference, self.batches = reference, batches
        self.weights = dimension_weights(reference[sl] for sl in batches)  # one reference for every candidate
        self.trials: list[SplitTrial] = []
        self._best: _Candidate[ResultT] | None = None

    def add(self, plan: LayerPlan, states: torch.Tensor, result: ResultT) -> None:
        """Score a candidate's output `states`; keep it (states and result) if it is the nearest so far."""
        error = standardized_error(states, self.reference, self.batches, self.weights)
        self.trials.append(SplitTrial(plan.prune_units_per_bucket, plan.prune_channels, error))
        if self._best is None or error < self._best.error:
            self._best = _Candidate(error, plan, states, result)

    @property
    def best(self) -> _Candidate[ResultT]:
        if self._best is None:
            raise ValueError("no candidate tried")
        return self._best
