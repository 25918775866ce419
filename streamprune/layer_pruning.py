"""Prune one decoder layer on the calibration hidden states it receives (METHOD.md sections 2-4).

Order inside a layer follows METHOD.md section 0: attention is scored, pruned and recovered first;
the FFN is then scored on the hidden states the *pruned* attention produces. The hidden-state buffer
is updated in place, batch by batch, so the layer's output becomes the next layer's input.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .allocation import HeadUnits, LayerPlan
from .architecture import LAYER_PREFIX
from .modeling import StreamPruneConfig, StreamPruneDecoderLayer
from .recovery import RegressionFit, RegressionSums, apply_fit, fit_from_moments
from .scoring import (
    MomentAccumulator,
    UnitStats,
    channel_scores,
    feature_space_basis,
    greedy_swap,
    initial_keep,
    leave_one_out_scores,
    lowest_channels,
    similarity,
)


@dataclass(frozen=True)
class MethodSwitches:
    """The four parts of the method that ablations turn off (ratios are handled in allocation)."""

    greedy: bool = True
    feature_space: bool = True
    regression: bool = True


class Timer:
    """Wall-clock seconds per named phase; synchronises CUDA so GPU work is charged where it runs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class LayerRuntime:
    """What every layer's forward needs: rotary tables for the calibration length, batching, device."""

    device: torch.device
    dtype: torch.dtype
    batch_size: int
    position_embeddings: tuple[torch.Tensor, torch.Tensor]

    def batches(self, n: int) -> list[slice]:
        return [slice(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]


def build_layer(config: StreamPruneConfig, layer_idx: int, tensors: dict[str, torch.Tensor],
                runtime: LayerRuntime) -> StreamPruneDecoderLayer:
    """The layer module on the compute device, from checkpoint tensors (no random init, no meta copies)."""
    prefix = LAYER_PREFIX.format(layer_idx)
    with torch.device("meta"):
        layer = StreamPruneDecoderLayer(config, layer_idx)
    state = {name[len(prefix):]: t for name, t in tensors.items()}
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.to(device=runtime.device, dtype=runtime.dtype).eval()


@torch.no_grad()
def dense_forward(layer: StreamPruneDecoderLayer, hidden: torch.Tensor, runtime: LayerRuntime) -> float:
    """Run the dense layer over all samples in place; returns the mean token cosine(input, output)."""
    total, count = 0.0, 0
    for sl in runtime.batches(hidden.shape[0]):
        x = hidden[sl].to(runtime.device)
        y = layer(x.to(runtime.dtype), position_embeddings=runtime.position_embeddings).float()
        total += float(F.cosine_similarity(x.float(), y, dim=-1).double().sum())
        count += x.shape[0] * x.shape[1]
        hidden[sl] = y.to(hidden.device)
    return total / count


@dataclass
class LayerResult:
    tensors: dict[str, torch.Tensor]  # output tensors, full names, storage dtype
    spec: dict  # sizes and bias flags for StreamPruneConfig.layer_configs
    report: dict = field(default_factory=dict)


@torch.no_grad()
def prune_layer(
    layer: StreamPruneDecoderLayer,
    stored: dict[str, torch.Tensor],
    hidden: torch.Tensor,
    plan: LayerPlan,
    units: HeadUnits,
    dense_spec: dict,
    switches: MethodSwitches,
    runtime: LayerRuntime,
    timer: Timer,
    out_dtype: torch.dtype,
) -> LayerResult:
    """Prune `layer` per `plan`, overwrite `hidden` with the pruned layer's output, return new tensors.

    `stored` are the layer's weights at full name, at least as precise as the checkpoint (the engine
    passes the layer's own parameters when the compute dtype holds the stored values exactly, so no
    second copy of the layer is kept). Written tensors are sliced and rescaled from these and cast
    to `out_dtype`, the checkpoint's dtype, one tensor at a time.
    """
    prefix = LAYER_PREFIX.format(plan.layer)
    out = _Output(out_dtype)
    out.update(stored)
    spec = dict(dense_spec)
    report: dict = {"layer": plan.layer}
    attn_cache = _attention_pass(layer, hidden, runtime, timer)
    _prune_attention(layer, stored, attn_cache, hidden, plan, units, switches, runtime, timer, out, spec, report)
    del attn_cache  # its Hd x Hd float64 Gram must not live on through the FFN phase
    _prune_mlp(layer, stored, hidden, plan, switches, runtime, timer, out, spec, report)
    if not torch.isfinite(hidden).all():
        report["non_finite"] = True
    return LayerResult({k: v for k, v in out.items() if k.startswith(prefix)}, spec, report)


class _Output(dict):
    """Output tensors, moved to the CPU and cast to the checkpoint dtype as they are added."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        super().__setitem__(name, tensor.detach().to("cpu", self.dtype))

    def update(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self[name] = tensor


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


@dataclass
class _AttentionCache:
    head_outputs: list[torch.Tensor]  # A per batch (input of o_proj), compute dtype
    moments: MomentAccumulator


def _attention_pass(layer, hidden: torch.Tensor, runtime: LayerRuntime, timer: Timer) -> _AttentionCache:
    """Dense attention over all samples: keep each batch's head outputs and their running moments."""
    attn = layer.self_attn
    cache = _AttentionCache([], MomentAccumulator(attn.o_proj.in_features, runtime.device))
    captured: list[torch.Tensor] = []
    handle = attn.o_proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        for sl in runtime.batches(hidden.shape[0]):
            with timer.phase("forward"):
                x = hidden[sl].to(runtime.device, runtime.dtype)
                attn(hidden_states=layer.input_layernorm(x), position_embeddings=runtime.position_embeddings)
                a = captured.pop()
            with timer.phase("statistics"):
                cache.moments.add(a)
            cache.head_outputs.append(a)
    finally:
        handle.remove()
    return cache


def _kept_heads(keep_units: torch.Tensor, units: HeadUnits) -> torch.Tensor:
    return torch.repeat_interleave(keep_units, units.heads_per_unit).nonzero().flatten()


def _rows(head_idx: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a projection laid out head by head."""
    return (head_idx[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def _select_heads(stats: UnitStats, plan: LayerPlan, units: HeadUnits, switches: MethodSwitches, report: dict):
    scores = leave_one_out_scores(stats)
    buckets = units.buckets().to(scores.device)
    keep = initial_keep(scores, buckets, plan.prune_units_per_bucket)
    report["similarity_initial"] = similarity(stats, keep)
    if switches.greedy:
        keep, history = greedy_swap(stats, keep, buckets)
        report["greedy_swaps"] = sum(1 for a, b in zip(history, history[1:], strict=False) if b > a)
    report["similarity_final"] = similarity(stats, keep)
    return keep.cpu()


def _prune_attention(layer, stored, cache: _AttentionCache, hidden, plan, units, switches, runtime, timer,
                     out: dict, spec: dict, report: dict) -> None:
    """Choose heads, rewrite q/k/v/o, and add the pruned, recovered attention output to `hidden`."""
    attn = layer.self_attn
    prefix = LAYER_PREFIX.format(plan.layer) + "self_attn."
    head_dim = attn.head_dim
    w_o = stored[prefix + "o_proj.weight"].to(runtime.device, torch.float64)
    b_o = stored.get(prefix + "o_proj.bias")
    b_o = None if b_o is None else b_o.to(runtime.device, torch.float64)
    n_heads = w_o.shape[1] // head_dim
    keep_units = torch.ones(units.num_units, dtype=torch.bool)
    fit: RegressionFit | None = None
    if plan.prunes_attention:
        with timer.phase("scoring"):
            cov_a = cache.moments.covariance()
            stats = UnitStats.from_covariance(cov_a, w_o, units.heads_per_unit * head_dim)
            keep_units = _select_heads(stats, plan, units, switches, report)
        if switches.regression:
            with timer.phase("regression"):
                keep_dev = keep_units.to(runtime.device)
                fit = _attention_fit(stats, keep_dev, w_o, b_o, cache.moments.mean(), head_dim, units)
                report["o_proj_fit"] = fit.summary()
    heads = _kept_heads(keep_units, units)
    cols = _rows(heads, head_dim).to(runtime.device)
    new_w_o, new_b_o = w_o[:, cols], b_o
    if fit is not None:
        new_w_o, new_b_o = apply_fit(new_w_o, b_o, fit)
    with timer.phase("forward"):
        w_c, b_c = new_w_o.to(runtime.dtype), None if new_b_o is None else new_b_o.to(runtime.dtype)
        for sl, a in zip(runtime.batches(hidden.shape[0]), cache.head_outputs, strict=True):
            y = F.linear(a[..., cols], w_c, b_c)
            hidden[sl] = (hidden[sl].to(runtime.device) + y.float()).to(hidden.device)
    cache.head_outputs.clear()
    _write_attention(stored, out, spec, prefix, heads, keep_units, units, head_dim, n_heads, new_w_o, new_b_o)
    report.update(heads_kept=int(heads.numel()), heads_total=n_heads,
                  kept_heads=heads.tolist(), kv_heads_kept=spec["num_key_value_heads"])


def _attention_fit(stats: UnitStats, keep: torch.Tensor, w_o, b_o, mean_a, head_dim, units) -> RegressionFit:
    """o_proj regression in closed form: x = pruned output, y = dense output, both linear in A."""
    s = torch.repeat_interleave(keep, units.heads_per_unit)
    cols = _rows(s.nonzero().flatten().cpu(), head_dim).to(w_o.device)
    s_units = keep.to(torch.float64)
    cov_xy = stats.r @ s_units
    var_x = torch.einsum("cuv,u,v->c", stats.M, s_units, s_units)
    mean_x = w_o[:, cols] @ mean_a[cols]
    mean_y = w_o @ mean_a
    if b_o is not None:
        mean_x, mean_y = mean_x + b_o, mean_y + b_o
    return fit_from_moments(mean_x, mean_y, var_x, cov_xy, stats.var_y)


def _write_attention(stored, out, spec, prefix, heads, keep_units, units: HeadUnits, head_dim, n_heads,
                     new_w_o, new_b_o) -> None:
    _take_rows(stored, out, prefix, ("q_proj",), _rows(heads, head_dim))
    n_kv = stored[prefix + "k_proj.weight"].shape[0] // head_dim
    kv_heads = torch.arange(n_kv)
    if units.kv_heads_per_unit:  # MHA heads or whole KV groups: k/v rows go with the unit
        kv_heads = keep_units.nonzero().flatten()
    _take_rows(stored, out, prefix, ("k_proj", "v_proj"), _rows(kv_heads, head_dim))
    _set_linear(out, prefix + "o_proj", new_w_o, new_b_o)
    spec.update(num_attention_heads=int(heads.numel()), num_key_value_heads=int(kv_heads.numel()),
                o_bias=new_b_o is not None)


def _take_rows(stored: dict, out: dict, prefix: str, projections: tuple[str, ...], rows: torch.Tensor) -> None:
    """Copy the kept output rows (weight and bias, where present) of unchanged projections."""
    for p in projections:
        weight = stored[prefix + f"{p}.weight"]
        out[prefix + f"{p}.weight"] = weight[rows.to(weight.device)]
        if prefix + f"{p}.bias" in stored:
            out[prefix + f"{p}.bias"] = stored[prefix + f"{p}.bias"][rows.to(weight.device)]


def _set_linear(out: dict, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    out[name + ".weight"] = weight
    if bias is not None:
        out[name + ".bias"] = bias


# ----------------------------------------------------------------------------------------------
# FFN
# ----------------------------------------------------------------------------------------------


def _mlp_inner(mlp, x: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """act(gate(x)) * up(x) restricted to the channels `rows`."""
    g = F.linear(x, mlp.gate_proj.weight[rows], None if mlp.gate_proj.bias is None else mlp.gate_proj.bias[rows])
    u = F.linear(x, mlp.up_proj.weight[rows], None if mlp.up_proj.bias is None else mlp.up_proj.bias[rows])
    return mlp.act_fn(g) * u


def _prune_mlp(layer, stored, hidden, plan: LayerPlan, switches, runtime, timer, out, spec, report) -> None:
    """Score channels on the pruned-attention output, rewrite gate/up/down, finish the layer output."""
    mlp, norm = layer.mlp, layer.post_attention_layernorm
    prefix = LAYER_PREFIX.format(plan.layer) + "mlp."
    n_channels = mlp.gate_proj.out_features
    collect = plan.prunes_mlp
    x_sq = torch.zeros(mlp.gate_proj.in_features, dtype=torch.float64, device=runtime.device)
    z_sq = torch.zeros(n_channels, dtype=torch.float64, device=runtime.device)
    y_moments = MomentAccumulator(mlp.down_proj.out_features, runtime.device) if switches.feature_space else None
    dense_out: list[torch.Tensor] = []
    for sl in runtime.batches(hidden.shape[0]):
        with timer.phase("forward"):
            xn = norm(hidden[sl].to(runtime.device, runtime.dtype))
            z = _mlp_inner(mlp, xn, slice(None))
            y = mlp.down_proj(z)
        if not collect:
            hidden[sl] = (hidden[sl].to(runtime.device) + y.float()).to(hidden.device)
            continue
        with timer.phase("statistics"):
            x_sq += xn.double().pow(2).sum((0, 1))
            z_sq += z.double().pow(2).sum((0, 1))
            if y_moments is not None:
                y_moments.add(y)
        dense_out.append(y)
    if not collect:
        report.update(channels_kept=n_channels, channels_total=n_channels)
        return
    basis = None
    if y_moments is not None:
        with timer.phase("pca"):  # the C x C eigendecomposition, timed apart: it dominates on CPUs
            basis = feature_space_basis(y_moments.covariance())
        del y_moments
    with timer.phase("scoring"):
        scores = channel_scores(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, x_sq, z_sq, basis)
        del basis
        pruned = lowest_channels(scores, plan.prune_channels)
        keep_mask = torch.ones(n_channels, dtype=torch.bool, device=scores.device)
        keep_mask[pruned] = False
        kept = keep_mask.nonzero().flatten()
    _finish_mlp(mlp, norm, stored, hidden, kept, dense_out, prefix, switches, runtime, timer, out, spec, report)
    report.update(channels_kept=int(kept.numel()), channels_total=n_channels)


def _finish_mlp(mlp, norm, stored, hidden, kept, dense_out, prefix, switches, runtime, timer, out, spec, report):
    """Pruned FFN output per batch, regression against the dense output, then the layer output."""
    sums = RegressionSums(mlp.down_proj.out_features, runtime.device)
    w_down = mlp.down_proj.weight[:, kept]
    b_down = mlp.down_proj.bias
    pruned_out: list[torch.Tensor] = []
    for sl, y in zip(runtime.batches(hidden.shape[0]), dense_out, strict=True):
        with timer.phase("forward"):
            xn = norm(hidden[sl].to(runtime.device, runtime.dtype))
            x = F.linear(_mlp_inner(mlp, xn, kept), w_down, b_down)
        if switches.regression:
            with timer.phase("regression"):
                sums.add(x, y)
        pruned_out.append(x)
    dense_out.clear()
    stored_down = stored[prefix + "down_proj.weight"]
    new_w = stored_down[:, kept.cpu()].to(runtime.device, torch.float64)
    old_b = stored.get(prefix + "down_proj.bias")
    new_b = None if old_b is None else old_b.to(runtime.device, torch.float64)
    scale = shift = None
    if switches.regression:
        fit = sums.fit()
        new_w, new_b = apply_fit(new_w, new_b, fit)
        scale, shift = fit.scale.float(), fit.shift.float()
        report["down_proj_fit"] = fit.summary()
    with timer.phase("forward"):
        for sl, x in zip(runtime.batches(hidden.shape[0]), pruned_out, strict=True):
            x = x.float() if scale is None else x.float() * scale + shift
            hidden[sl] = (hidden[sl].to(runtime.device) + x).to(hidden.device)
    _take_rows(stored, out, prefix, ("gate_proj", "up_proj"), kept)
    _set_linear(out, prefix + "down_proj", new_w, new_b)
    spec.update(intermediate_size=int(kept.numel()), down_bias=new_b is not None)
