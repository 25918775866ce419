"""`--split search`: choose each layer's split between attention heads and FFN channels by trying them.

The fixed split (`--attention-scale`) prunes a share min(scale * r, 1) of a layer's heads and r of its
FFN channels, the same rule in every layer. With `--split search` the layer is pruned once per
candidate split of the same parameter budget (allocation.equal_budget_plans), each time on a copy of
its calibration hidden states, and the split whose output is closest to the dense layer's output on
the same input is kept. The attention and the FFN of one layer write into the same residual stream,
so their errors are comparable there; across layers they are not (docs/results.md, the error-driven
allocation), which is why the budget of each layer still comes from the allocation. With `--split-samples n`
the candidates are tried on n evenly spaced calibration sequences (split_trial_rows) and the engine then prunes
the chosen split once on all of them.

The distance weights each hidden dimension by the inverse of its mean square in the dense output.
LLaMA-family models carry a few "massive activation" dimensions (SmolLM2: mean square about 8,100
against 35-45 elsewhere) that the next RMSNorm largely divides away; an unweighted squared error is
dominated by them and picked worse splits on held-out text (6.62x vs 6.32x dense perplexity at 50 %,
against 6.06x with the weighting; docs/results.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .allocation import LayerPlan


@dataclass
class SplitTrial:
    """One candidate split of a layer's budget and the standardized error of its output."""

    prune_units_per_bucket: int
    prune_channels: int
    error: float

    def to_dict(self) -> dict:
        return asdict(self)


def dimension_weights(reference: torch.Tensor, batches: list[slice]) -> torch.Tensor:
    """1 / sum_t reference_td^2 per hidden dimension d (float64), accumulated batch by batch."""
    width = reference.shape[-1]
    square = torch.zeros(width, dtype=torch.float64)
    for sl in batches:
        square += reference[sl].to(torch.float64).reshape(-1, width).pow(2).sum(0).cpu()
    return 1.0 / square.clamp_min(torch.finfo(torch.float64).tiny)


def standardized_error(output: torch.Tensor, reference: torch.Tensor, batches: list[slice],
                       weights: torch.Tensor | None = None) -> float:
    """mean over tokens of sum_d (output - reference)_d^2 / m_d, with m_d the mean of reference_d^2.

    Accumulated batch by batch in float64, so no full-size float64 copy of the states is made.
    `weights` are dimension_weights(reference), passed in when several outputs share one reference.
    """
    if weights is None:
        weights = dimension_weights(reference, batches)
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


def search_split(candidates: list[LayerPlan], hidden: torch.Tensor, reference: torch.Tensor,
                 prune: Callable[[LayerPlan, torch.Tensor], object],
                 batches: list[slice]) -> tuple[object, LayerPlan, list[SplitTrial]]:
    """Prune with every candidate plan on a copy of `hidden`; keep the one whose output is nearest `reference`.

    `prune(plan, states)` prunes the layer per `plan`, overwriting `states` with the pruned layer's
    output, and returns its result. `hidden` is overwritten with the kept candidate's output; the
    kept result, its plan and every trial are returned. Ties keep the earlier candidate.
    """
    best = None
    trials = []
    weights = dimension_weights(reference, batches)  # one reference for every candidate
    for plan in candidates:
        states = hidden.clone()
        result = prune(plan, states)
        error = standardized_error(states, reference, batches, weights)
        trials.append(SplitTrial(plan.prune_units_per_bucket, plan.prune_channels, error))
        if best is None or error < best[0]:
            best = (error, result, plan, states)
        del states, result
    _, result, plan, states = best
    hidden.copy_(states)
    return result, plan, trials
