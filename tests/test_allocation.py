"""Per-layer ratio allocation."""

from __future__ import annotations

import pytest

from streamprune.allocation import (
    LayerPlan,
    RemovalCounter,
    default_attention_scale,
    default_num_pruned_layers,
    equal_budget_plans,
    head_units,
    layer_multipliers,
    solve_allocation,
)
from streamprune.architecture import read_shape
from streamprune.errors import StreamPruneError

LLAMA7B = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
           "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000}
LLAMA7B_PARAMS = 6_738_415_616
SMOLLM2 = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
           "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True}
SMOLLM2_PARAMS = 134_515_008


def _solve(shape, params, ratio, scores, **options):
    """solve_allocation with the method's own choices (heads, with recovery) unless `options` say otherwise."""
    return solve_allocation(shape, params, ratio, scores, **{"gqa_mode": "heads", "regression": True, **options})


def _scores(n):
    return [0.80 + 0.15 * (i / (n - 1)) - 0.3 * (i == 0) for i in range(n)]  # first layer least redundant


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.35, 0.5])
@pytest.mark.parametrize(("config", "params"), [(LLAMA7B, LLAMA7B_PARAMS), (SMOLLM2, SMOLLM2_PARAMS)])
def test_target_hit_within_half_a_percent(config, params, ratio):
    shape = read_shape(config)
    alloc = _solve(shape, params, ratio, _scores(shape.num_layers))
    assert abs(alloc.achieved_ratio - ratio) < 0.005
    assert sum(p.multiplier > 0 for p in alloc.plans) == default_num_pruned_layers(ratio, shape.num_layers)


def test_reference_layer_counts_and_multipliers():
    assert default_num_pruned_layers(0.2, 32) == 26 and default_num_pruned_layers(0.5, 32) == 30
    m = layer_multipliers(_scores(32), 32, 10.0, 26)
    assert abs(sum(m) - 26) < 1e-9 and m[0] == 0  # the least redundant layer is left alone
    assert m[31] > m[10] > 0  # more redundant layers lose more


def test_uniform_allocation_prunes_every_layer_equally():
    shape = read_shape(LLAMA7B)
    alloc = _solve(shape, LLAMA7B_PARAMS, 0.2, None, attention_scale=1.0)
    heads = {p.prune_units_per_bucket for p in alloc.plans}
    assert len(heads) == 1 and heads != {0}
    assert max(p.prune_channels for p in alloc.plans) - min(p.prune_channels for p in alloc.plans) <= 1


def test_default_attention_share_keeps_heads_below_35_percent_and_three_quarters_of_the_ffn_rate_above():
    shape = read_shape(LLAMA7B)
    low = _solve(shape, LLAMA7B_PARAMS, 0.2, _scores(32))
    assert low.attention_scale == 0.0 and all(p.prune_units_per_bucket == 0 for p in low.plans)
    assert abs(low.achieved_ratio - 0.2) < 1e-3  # the FFN takes the whole budget
    high = _solve(shape, LLAMA7B_PARAMS, 0.5, _scores(32))
    explicit = _solve(shape, LLAMA7B_PARAMS, 0.5, _scores(32), attention_scale=0.75)
    paper = _solve(shape, LLAMA7B_PARAMS, 0.5, _scores(32), attention_scale=1.0)
    assert high.attention_scale == 0.75 and high.plans == explicit.plans
    heads = [sum(p.prune_units_per_bucket for p in a.plans) for a in (high, paper)]
    assert 0 < heads[0] < heads[1]  # fewer heads than the paper's equal share, more channels
    assert abs(high.achieved_ratio - 0.5) < 1e-3
    assert default_attention_scale(0.34) == 0.0 and default_attention_scale(0.35) == 0.75


def test_attention_scale_moves_removal_between_heads_and_channels_at_the_same_total():
    shape = read_shape(LLAMA7B)
    by_scale = {s: _solve(shape, LLAMA7B_PARAMS, 0.3, _scores(32), attention_scale=s) for s in (0.5, 1, 2)}
    heads = [sum(p.prune_units_per_bucket for p in a.plans) for a in by_scale.values()]
    channels = [sum(p.prune_channels for p in a.plans) for a in by_scale.values()]
    assert heads == sorted(heads) and heads[0] < heads[-1]
    assert channels == sorted(channels, reverse=True) and channels[0] > channels[-1]
    assert all(abs(a.achieved_ratio - 0.3) < 1e-3 for a in by_scale.values())


def test_impossible_ratio_is_refused_with_the_maximum():
    shape = read_shape(SMOLLM2)
    with pytest.raises(StreamPruneError, match="too large: at most"):
        _solve(shape, SMOLLM2_PARAMS, 0.9, _scores(30))


def test_every_layer_keeps_a_head_per_group_and_a_channel():
    shape = read_shape(SMOLLM2)
    alloc = _solve(shape, SMOLLM2_PARAMS, 0.6, _scores(30))
    for plan in alloc.plans:
        assert plan.prune_units_per_bucket <= 2 and plan.prune_channels <= 1535


@pytest.mark.parametrize(("config", "units_per_bucket"), [(SMOLLM2, 3), (LLAMA7B, 32)])
def test_equal_budget_plans_move_the_same_budget_between_heads_and_channels(config, units_per_bucket):
    shape = read_shape(config)
    units = head_units(shape, "heads")
    counter = RemovalCounter(shape, units, regression=True)
    allocation = _solve(shape, SMOLLM2_PARAMS if config is SMOLLM2 else LLAMA7B_PARAMS, 0.5,
                                  _scores(shape.num_layers))
    plan = min(allocation.plans, key=lambda p: abs(p.ratio - 0.5))  # room to move both ways
    candidates = equal_budget_plans(plan, shape, units, regression=True)
    budget = counter.removed(plan.prune_units_per_bucket, plan.prune_channels)
    assert plan in candidates and 2 <= len(candidates) <= 5
    assert all(abs(counter.removed(c.prune_units_per_bucket, c.prune_channels) - budget) <= counter.per_channel
               for c in candidates)
    assert all(0 <= c.prune_units_per_bucket < units_per_bucket for c in candidates)
    assert all(0 < c.prune_channels < shape.intermediate_size for c in candidates)
    by_heads = sorted(candidates, key=lambda c: c.prune_units_per_bucket)  # more heads, fewer channels
    assert [c.prune_channels for c in by_heads] == sorted((c.prune_channels for c in by_heads), reverse=True)
    assert by_heads[0].prune_units_per_bucket == 0
    assert all(c.layer == plan.layer and c.ratio == plan.ratio for c in candidates)


def test_equal_budget_plans_leave_out_splits_the_ffn_cannot_absorb():
    shape = read_shape(SMOLLM2)
    units = head_units(shape, "heads")
    # Almost the whole FFN and two of three heads per group: with no head pruned the channels would not
    # suffice, with fewer heads they must still fit; every candidate keeps at least one channel.
    plan = LayerPlan(5, 0.9, 1.0, 0.9, 2, 1500)
    candidates = equal_budget_plans(plan, shape, units, regression=True)
    assert [c.prune_units_per_bucket for c in candidates] == [2]
