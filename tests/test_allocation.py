"""Per-layer ratio allocation."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from streamprune.allocation import (
    AllocationSettings,
    ChannelGrid,
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


def _settings(**options) -> AllocationSettings:
    """The method's own choices (heads, with recovery, the ratio's defaults) unless `options` say otherwise."""
    defaults = {"gqa_mode": "heads", "regression": True, "alpha": None, "num_pruned_layers": None,
                "attention_scale": None, "channel_multiple": 1}
    return AllocationSettings(**{**defaults, **options})


def _solve(shape, params, ratio, scores, **options):
    return solve_allocation(shape, params, ratio, scores, _settings(**options))


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
    candidates = equal_budget_plans(plan, shape, _settings())
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
    # Almost the whole FFN and two of three heads per group: with no head pruned the channels would not
    # suffice, with fewer heads they must still fit; every candidate keeps at least one channel.
    plan = LayerPlan(5, 0.9, 1.0, 0.9, 2, 1500)
    candidates = equal_budget_plans(plan, shape, _settings())
    assert [c.prune_units_per_bucket for c in candidates] == [2]


# ------------------------------------------------------------------------------------ --channel-multiple

QWEN2_05B = {"model_type": "qwen2", "num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14,
             "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True}


def _params(shape) -> int:
    """Total parameters of a dense model of this shape (a tied embedding counted once)."""
    spec = shape.dense_layer_spec()
    layers = sum(math.prod(dims) for i in range(shape.num_layers)
                 for dims in shape.adapter.expected_layer_shapes(shape, i, spec).values())
    return layers + shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2) + shape.hidden_size


def test_channel_multiple_1_is_the_allocation_from_before_the_option():
    """Plans and --split search candidates of LLaMA-7B and SmolLM2 at 20 % and 50 %, digested; the digest was
    computed with allocation.py as it was before --channel-multiple existed (commit 662d120)."""
    rows = []
    for config, params in ((LLAMA7B, LLAMA7B_PARAMS), (SMOLLM2, SMOLLM2_PARAMS)):
        shape = read_shape(config)
        for ratio in (0.2, 0.5):
            alloc = _solve(shape, params, ratio, _scores(shape.num_layers), channel_multiple=1)
            rows.append([(p.prune_units_per_bucket, p.prune_channels) for p in alloc.plans])
            splits = [equal_budget_plans(p, shape, _settings()) for p in alloc.plans if p.prunes_mlp]
            rows.append([[(c.prune_units_per_bucket, c.prune_channels) for c in split] for split in splits])
    assert hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16] == "0ff6feda055e84e3"


@pytest.mark.parametrize("multiple", [8, 64, 256])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("config", [SMOLLM2, LLAMA7B, QWEN2_05B], ids=["smollm2", "llama7b", "qwen2-0.5b"])
def test_channel_multiple_keeps_ffn_widths_multiples_and_hits_the_target_within_half_a_step(config, ratio, multiple):
    shape = read_shape(config)
    params = _params(shape)
    if config is SMOLLM2:
        assert params == SMOLLM2_PARAMS  # the helper counts as the engine does
    alloc = _solve(shape, params, ratio, _scores(shape.num_layers), channel_multiple=multiple)
    kept = [shape.intermediate_size - p.prune_channels for p in alloc.plans if p.prunes_mlp]
    assert len(kept) == default_num_pruned_layers(ratio, shape.num_layers)
    assert all(k % multiple == 0 and k >= multiple for k in kept), kept
    # The correction moves whole steps of `multiple` channels, so the total lands within half a step.
    step = multiple * RemovalCounter(shape, head_units(shape, "heads"), True).per_channel
    assert abs(alloc.params_after - (1 - ratio) * params) <= step / 2
    if multiple == 256:
        assert len(set(kept)) > 1  # still a per-layer allocation, not one width


@pytest.mark.parametrize("multiple", [8, 64])
def test_channel_multiple_applies_to_every_split_the_search_tries(multiple):
    shape = read_shape(SMOLLM2)
    settings = _settings(channel_multiple=multiple)
    counter = RemovalCounter.for_settings(shape, settings)
    alloc = solve_allocation(shape, SMOLLM2_PARAMS, 0.5, _scores(30), settings)
    for plan in (p for p in alloc.plans if p.prunes_mlp):
        candidates = equal_budget_plans(plan, shape, settings)
        assert plan in candidates
        budget = counter.removed(plan.prune_units_per_bucket, plan.prune_channels)
        for c in candidates:
            assert (shape.intermediate_size - c.prune_channels) % multiple == 0
            assert abs(counter.removed(c.prune_units_per_bucket, c.prune_channels) - budget) <= counter.per_step


def test_channel_grid_rounds_to_the_nearest_allowed_width_and_keeps_an_unpruned_dense_width():
    grid = ChannelGrid(1000, 256)  # 1000 is not a multiple: unpruned layers keep it, pruned ones 256, 512 or 768
    assert [grid.nearest(p) for p in (0, 100, 200, 300, 600, 999)] == [0, 0, 232, 232, 488, 744]
    assert [grid.allows(p) for p in (0, 232, 744, 1000 - 1024, 1000, 100)] == [True, True, True, False, False, False]
    assert all(ChannelGrid(1536, 1).nearest(p) == p for p in range(1536))  # plain rounding


def test_a_channel_multiple_as_wide_as_the_ffn_is_refused():
    shape = read_shape(SMOLLM2)
    with pytest.raises(StreamPruneError, match=r"--channel-multiple must be below the FFN width 1536 \(.*\), got 1536"):
        _solve(shape, SMOLLM2_PARAMS, 0.2, _scores(30), channel_multiple=1536)
    with pytest.raises(StreamPruneError, match="and 1024 FFN channels in every layer"):
        _solve(shape, SMOLLM2_PARAMS, 0.2, _scores(30), channel_multiple=1024)  # only 1024 channels can stay
