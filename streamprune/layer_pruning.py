"""Prune one decoder layer on the calibration hidden states it receives (METHOD.md sections 2-4).

Order inside a layer follows METHOD.md section 0: attention is scored, pruned and recovered first;
the FFN is then scored on the hidden states the *pruned* attention produces. The hidden-state buffer
is updated in place, batch by batch, so the layer's output becomes the next layer's input.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .allocation import HeadUnits, LayerPlan
from .architecture import LAYER_PREFIX
from .least_squares import DEFAULT_DAMPING, CrossMoments, refit_from_input_moments, refit_to_target
from .modeling import StreamPruneConfig, StreamPruneDecoderLayer
from .recovery import RegressionFit, RegressionSums, apply_fit, fit_from_moments
from .refit_selection import keep_units_by_refit_error, prune_columns_by_refit_error
from .scoring import (
    PCA_DTYPE,
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
    """The four parts of the method that ablations turn off (ratios are handled in allocation)."""

    greedy: bool = True
    feature_space: bool = True
    regression: bool = True
    recovery: str = "affine"  # with regression: "affine" (SlimLLM per-row a*y+b) or "lstsq" (least squares)
    target: str = "pruned"  # least squares fits each sub-layer's dense output on the pruned stream ("pruned")
    # or the dense model's own hidden states ("dense"), which also corrects error from earlier layers
    selection: str = "slimllm"  # "slimllm" (Pearson heads, PCA channels) or "refit" (error left after the refit)
    protect_lowest: float = 0.0  # fraction of lowest-scored FFN channels never pruned (official code: 0.01)
    damping: float = DEFAULT_DAMPING  # ridge of the least-squares recovery, relative to mean diag of the Gram

    @property
    def least_squares(self) -> bool:
        return self.regression and self.recovery == "lstsq"

    @property
    def dense_target(self) -> bool:
        return self.least_squares and self.target == "dense"


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
                runtime: LayerRuntime, consume: bool = False) -> StreamPruneDecoderLayer:
    """The layer module on the compute device, from checkpoint tensors (no random init, no meta copies).

    With `consume`, each checkpoint tensor is removed from `tensors` as soon as its compute-dtype copy
    exists, so building a float32 layer from float16 tensors peaks at the float32 layer plus one
    tensor rather than plus the whole float16 layer.
    """
    prefix = LAYER_PREFIX.format(layer_idx)
    with torch.device("meta"):
        layer = StreamPruneDecoderLayer(config, layer_idx)
    state = {}
    for name in [n for n in tensors if n.startswith(prefix)]:
        tensor = tensors.pop(name) if consume else tensors[name]  # popped: freed once converted
        state[name[len(prefix):]] = tensor.to(runtime.device, runtime.dtype)
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval()


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


@torch.no_grad()
def dense_forward_with_mid(layer: StreamPruneDecoderLayer, hidden: torch.Tensor, runtime: LayerRuntime) -> torch.Tensor:
    """Run the dense layer in place over `hidden`; returns the hidden states after its attention block.

    These are the dense model's own targets for the least-squares recovery with target "dense".
    """
    mid = torch.empty_like(hidden)
    attn, mlp = layer.self_attn, layer.mlp
    for sl in runtime.batches(hidden.shape[0]):
        x = hidden[sl].to(runtime.device, runtime.dtype)
        h = x + attn(hidden_states=layer.input_layernorm(x), position_embeddings=runtime.position_embeddings)[0]
        mid[sl] = h.float().to(hidden.device)
        hidden[sl] = (h + mlp(layer.post_attention_layernorm(h))).float().to(hidden.device)
    return mid


@dataclass
class DenseTargets:
    """The dense model's hidden states after this layer's attention block (mid) and after the layer (out)."""

    mid: torch.Tensor
    out: torch.Tensor


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
    weights_released: Callable[[], None] | None = None,
    targets: DenseTargets | None = None,
) -> LayerResult:
    """Prune `layer` per `plan`, overwrite `hidden` with the pruned layer's output, return new tensors.

    `stored` are the layer's weights at full name, at least as precise as the checkpoint (the engine
    passes the layer's own parameters when the compute dtype holds the stored values exactly, so no
    second copy of the layer is kept). Written tensors are sliced and rescaled from these and cast
    to `out_dtype`, the checkpoint's dtype, one tensor at a time.

    `layer` and `stored` are consumed: each dense weight is released (from both) as soon as its
    pruned version is in the output, so the dense layer and the pruned one are never both whole in
    memory. `weights_released` is called once no weight of the layer is held any more, only its
    output tensors and activations; on CPU the engine starts reading the next layer there, so the
    read-ahead copy never coincides with the layer's memory peak.
    """
    prefix = LAYER_PREFIX.format(plan.layer)
    out = _Output(out_dtype)
    spec = dict(dense_spec)
    report: dict = {"layer": plan.layer}
    attn_cache = _attention_pass(layer, hidden, runtime, timer, targets)
    _prune_attention(layer, stored, attn_cache, hidden, plan, units, switches, runtime, timer, out, spec, report)
    del attn_cache  # its head outputs must not live on through the FFN phase
    _prune_mlp(layer, stored, hidden, plan, switches, runtime, timer, out, spec, report,
               weights_released or (lambda: None), targets)
    out.update(stored)  # what the two phases did not release: the norms, unchanged
    if not torch.isfinite(hidden).all():
        report["non_finite"] = True
    return LayerResult({k: v for k, v in out.items() if k.startswith(prefix)}, spec, report)


def _release(module: torch.nn.Module, stored: dict, prefix: str, projections: tuple[str, ...]) -> None:
    """Drop dense projections whose pruned versions are in the output: from `stored` and `module`.

    `prefix` is the module's full name with a trailing dot, e.g. "model.layers.3.mlp.".
    """
    for p in projections:
        for kind in ("weight", "bias"):
            stored.pop(f"{prefix}{p}.{kind}", None)
        setattr(module, p, None)


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


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
    moments: MomentAccumulator | None
    cross: CrossMoments | None = None  # A with the dense-model target of o_proj, when fitting to it


def _attention_pass(layer, hidden: torch.Tensor, runtime: LayerRuntime, timer: Timer,
                    targets: DenseTargets | None) -> _AttentionCache:
    """Dense attention over all samples: keep each batch's head outputs and their running moments
    (and, with dense targets, their cross moments with what o_proj should add: mid_dense - input)."""
    attn = layer.self_attn
    cross = None
    if targets is not None:
        cross = CrossMoments(attn.o_proj.in_features, attn.o_proj.out_features, runtime.device)
    moments = cross.x if cross is not None else MomentAccumulator(attn.o_proj.in_features, runtime.device)
    cache = _AttentionCache([], moments, cross)
    captured: list[torch.Tensor] = []
    handle = attn.o_proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        for sl in runtime.batches(hidden.shape[0]):
            with timer.phase("forward"):
                x = hidden[sl].to(runtime.device, runtime.dtype)
                attn(hidden_states=layer.input_layernorm(x), position_embeddings=runtime.position_embeddings)
                a = captured.pop()
            with timer.phase("statistics"):
                if cache.cross is not None:
                    cache.cross.add(a, targets.mid[sl].to(runtime.device) - x.float())
                else:
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
    w_o = stored[prefix + "o_proj.weight"].to(runtime.device, _at_least_float32(runtime.dtype))
    b_o = stored.get(prefix + "o_proj.bias")
    b_o = None if b_o is None else b_o.to(runtime.device, torch.float64)
    n_heads = w_o.shape[1] // head_dim
    keep_units = torch.ones(units.num_units, dtype=torch.bool)
    fit: RegressionFit | None = None
    if plan.prunes_attention:
        with timer.phase("scoring"):
            cov_a, mean_a = cache.moments.covariance(), cache.moments.mean()
            cache.moments = None  # the float64 Gram: only its covariance is needed from here on
            stats = UnitStats.from_covariance(cov_a, w_o, units.heads_per_unit * head_dim)
            if switches.selection == "refit":
                buckets = units.buckets()
                keep_units = keep_units_by_refit_error(w_o, cov_a, units.heads_per_unit * head_dim, buckets,
                                                       plan.prune_units_per_bucket, switches.damping)
            else:
                keep_units = _select_heads(stats, plan, units, switches, report)
            if not switches.least_squares:
                del cov_a
        if switches.least_squares:
            with timer.phase("regression"):
                kept_dims = _rows(_kept_heads(keep_units, units), head_dim)
                mask = torch.zeros(w_o.shape[1], dtype=torch.bool, device=runtime.device)
                mask[kept_dims.to(runtime.device)] = True
                if cache.cross is not None:
                    ls_fit = refit_to_target(cache.cross, w_o[:, mask], b_o, switches.damping, kept=mask)
                    cache.cross = None
                else:
                    ls_fit = refit_from_input_moments(cov_a, mean_a, mask, w_o, b_o, switches.damping)
                del cov_a
                report["o_proj_fit"] = ls_fit.summary()
        elif switches.regression:
            with timer.phase("regression"):
                keep_dev = keep_units.to(runtime.device)
                fit = _attention_fit(stats, keep_dev, w_o, b_o, mean_a, head_dim, units)
                report["o_proj_fit"] = fit.summary()
    heads = _kept_heads(keep_units, units)
    n_kv_kept = _write_qkv(attn, stored, out, prefix, heads, keep_units, units, head_dim)
    cols = _rows(heads, head_dim).to(runtime.device)
    new_w_o, new_b_o = w_o[:, cols], b_o
    del w_o
    _release(attn, stored, prefix, ("o_proj",))
    if fit is not None:
        new_w_o, new_b_o = apply_fit(new_w_o, b_o, fit)
    elif plan.prunes_attention and switches.least_squares:
        new_w_o, new_b_o = ls_fit.weight.to(new_w_o.dtype), ls_fit.bias
        del ls_fit
    with timer.phase("forward"):
        w_c, b_c = new_w_o.to(runtime.dtype), None if new_b_o is None else new_b_o.to(runtime.dtype)
        for sl, a in zip(runtime.batches(hidden.shape[0]), cache.head_outputs, strict=True):
            y = F.linear(a[..., cols], w_c, b_c)
            hidden[sl] = (hidden[sl].to(runtime.device) + y.float()).to(hidden.device)
    cache.head_outputs.clear()
    _set_linear(out, prefix + "o_proj", new_w_o, new_b_o)
    spec.update(num_attention_heads=int(heads.numel()), num_key_value_heads=n_kv_kept, o_bias=new_b_o is not None)
    report.update(heads_kept=int(heads.numel()), heads_total=n_heads, kept_heads=heads.tolist(),
                  kv_heads_kept=n_kv_kept)


def _attention_fit(stats: UnitStats, keep: torch.Tensor, w_o, b_o, mean_a, head_dim, units) -> RegressionFit:
    """o_proj regression in closed form: x = pruned output, y = dense output, both linear in A."""
    kept_dims = torch.repeat_interleave(torch.repeat_interleave(keep, units.heads_per_unit), head_dim)
    s_units = keep.to(torch.float64)
    cov_xy = stats.r @ s_units
    var_x = torch.einsum("cuv,u,v->c", stats.M, s_units, s_units)
    mean_x = _matvec64(w_o, mean_a * kept_dims)  # pruned heads contribute 0: no column copy of W_o
    mean_y = _matvec64(w_o, mean_a)
    if b_o is not None:
        mean_x, mean_y = mean_x + b_o, mean_y + b_o
    return fit_from_moments(mean_x, mean_y, var_x, cov_xy, stats.var_y)


def _matvec64(w: torch.Tensor, v: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """w @ v in float64, `chunk` rows of w at a time (no whole float64 copy of w)."""
    return torch.cat([w[i:i + chunk].double() @ v.double() for i in range(0, w.shape[0], chunk)])


def _write_qkv(attn, stored, out, prefix, heads, keep_units, units: HeadUnits, head_dim) -> int:
    """Kept rows of q/k/v into the output (dense ones released); returns the number of KV heads kept."""
    n_kv = stored[prefix + "k_proj.weight"].shape[0] // head_dim
    kv_heads = torch.arange(n_kv)
    if units.kv_heads_per_unit:  # MHA heads or whole KV groups: k/v rows go with the unit
        kv_heads = keep_units.nonzero().flatten()
    _move_rows(stored, attn, out, prefix, ("q_proj",), _rows(heads, head_dim))
    _move_rows(stored, attn, out, prefix, ("k_proj", "v_proj"), _rows(kv_heads, head_dim))
    return int(kv_heads.numel())


def _move_rows(stored: dict, module, out: dict, prefix: str, projections: tuple[str, ...], rows: torch.Tensor) -> None:
    """Put the kept output rows (weight and bias) of projections into the output and release the dense
    ones, one projection at a time, so at most one projection is held both dense and pruned."""
    for p in projections:
        for kind in ("weight", "bias"):
            name = f"{prefix}{p}.{kind}"
            if name in stored:
                tensor = stored[name]
                out[name] = tensor[rows.to(tensor.device)]
                del tensor
        _release(module, stored, prefix, (p,))


def _set_linear(out: dict, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    out[name + ".weight"] = weight
    if bias is not None:
        out[name + ".bias"] = bias


# ----------------------------------------------------------------------------------------------
# FFN
# ----------------------------------------------------------------------------------------------


def _kept_rows(linear: torch.nn.Linear, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a projection restricted to the output rows `rows` (copies)."""
    return linear.weight[rows], None if linear.bias is None else linear.bias[rows]


def _sum_of_squares(batch: torch.Tensor) -> torch.Tensor:
    """Per-feature sum over a batch's tokens of x^2, in float64, without a float64 copy of the batch
    (for a 7B FFN activation that copy and its square were 180 MB of temporaries per batch)."""
    return torch.linalg.vector_norm(batch, dim=(0, 1), dtype=torch.float32).double().square()


def _prune_mlp(layer, stored, hidden, plan: LayerPlan, switches, runtime, timer, out, spec, report,
               weights_released: Callable[[], None], targets: DenseTargets | None = None) -> None:
    """Score channels on the pruned-attention output, rewrite gate/up/down, finish the layer output."""
    mlp, norm = layer.mlp, layer.post_attention_layernorm
    prefix = LAYER_PREFIX.format(plan.layer) + "mlp."
    n_channels = mlp.gate_proj.out_features
    collect = plan.prunes_mlp
    x_sq = torch.zeros(mlp.gate_proj.in_features, dtype=torch.float64, device=runtime.device)
    z_sq = torch.zeros(n_channels, dtype=torch.float64, device=runtime.device)
    # Fewer calibration tokens than output dims: the PCA comes from the token Gram (exact, cheaper),
    # which needs only the mean of the outputs; otherwise from the C x C covariance.
    from_tokens = hidden.shape[0] * hidden.shape[1] < mlp.down_proj.out_features
    y_moments = z_moments = None
    if switches.selection == "refit":
        z_moments = MomentAccumulator(n_channels, runtime.device)
    elif switches.feature_space:
        y_moments = MomentAccumulator(mlp.down_proj.out_features, runtime.device, with_gram=not from_tokens)
    dense_out: list[torch.Tensor] = []
    for sl in runtime.batches(hidden.shape[0]):
        with timer.phase("forward"):
            xn = norm(hidden[sl].to(runtime.device, runtime.dtype))
            z = mlp.act_fn(mlp.gate_proj(xn)) * mlp.up_proj(xn)
            y = mlp.down_proj(z)
        if not collect:
            hidden[sl] = (hidden[sl].to(runtime.device) + y.float()).to(hidden.device)
            continue
        with timer.phase("statistics"):
            x_sq += _sum_of_squares(xn)
            z_sq += _sum_of_squares(z)
            if y_moments is not None:
                y_moments.add(y)
            if z_moments is not None:
                z_moments.add(z)
        dense_out.append(y)
    if not collect:
        weights_released()
        report.update(channels_kept=n_channels, channels_total=n_channels)
        return
    feature_space = None
    if y_moments is not None:
        with timer.phase("pca"):  # the eigendecomposition, timed apart: it dominates on CPUs
            if from_tokens:
                feature_space = feature_space_from_samples(dense_out, y_moments.mean())
            else:
                cov_y = y_moments.covariance().to(PCA_DTYPE)
                del y_moments  # free the float64 Gram before the eigendecomposition's workspace exists
                feature_space = feature_space_from_covariance(cov_y)
                del cov_y
    with timer.phase("scoring"):
        z_stats = None
        if z_moments is not None:
            z_stats = (z_moments.covariance(), z_moments.mean())
            del z_moments
            pruned = prune_columns_by_refit_error(mlp.down_proj.weight, z_stats[0], plan.prune_channels,
                                                  switches.damping)
        else:
            scores = channel_scores(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, x_sq, z_sq,
                                    feature_space)
            del feature_space
            pruned = lowest_channels(scores, plan.prune_channels, switches.protect_lowest)
        keep_mask = torch.ones(n_channels, dtype=torch.bool, device=pruned.device)
        keep_mask[pruned] = False
        kept = keep_mask.nonzero().flatten()
    _finish_mlp(mlp, norm, stored, hidden, kept, dense_out, prefix, switches, runtime, timer, out, spec, report,
                weights_released, targets, z_stats)
    report.update(channels_kept=int(kept.numel()), channels_total=n_channels)


def _finish_mlp(mlp, norm, stored, hidden, kept, dense_out, prefix, switches, runtime, timer, out, spec, report,
                weights_released: Callable[[], None], targets: DenseTargets | None = None,
                z_stats: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Pruned FFN output per batch, regression against the dense output, then the layer output.

    The dense gate/up/down are sliced to the kept channels once and released, one at a time, before
    the pruned forward: from there on only the pruned FFN is in memory.
    """
    gate = _kept_rows(mlp.gate_proj, kept)  # compute-dtype copies for the pruned forward
    _move_rows(stored, mlp, out, prefix, ("gate_proj",), kept)
    up = _kept_rows(mlp.up_proj, kept)
    _move_rows(stored, mlp, out, prefix, ("up_proj",), kept)
    b_down = mlp.down_proj.bias
    new_w = stored[prefix + "down_proj.weight"][:, kept.cpu()].to(runtime.device, _at_least_float32(runtime.dtype))
    old_b = stored.get(prefix + "down_proj.bias")
    new_b = None if old_b is None else old_b.to(runtime.device, torch.float64)
    prefit = switches.least_squares and targets is None and z_stats is not None
    if prefit:  # the refit follows from the FFN input covariance already gathered for the selection
        with timer.phase("regression"):
            w_full = stored[prefix + "down_proj.weight"].to(runtime.device, _at_least_float32(runtime.dtype))
            mask = torch.zeros(w_full.shape[1], dtype=torch.bool, device=runtime.device)
            mask[kept.to(runtime.device)] = True
            ls_fit = refit_from_input_moments(*z_stats, mask, w_full, new_b, switches.damping)
            del w_full, z_stats
        new_w, new_b = ls_fit.weight.to(new_w.dtype), ls_fit.bias
        report["down_proj_fit"] = ls_fit.summary()
        del ls_fit
        b_down = new_b.to(runtime.dtype)
    _release(mlp, stored, prefix, ("down_proj",))
    w_down = new_w.to(runtime.dtype)  # the same tensor when computing in float32
    sums = RegressionSums(new_w.shape[0], runtime.device)
    moments = None
    if switches.least_squares and not prefit:
        moments = CrossMoments(new_w.shape[1], new_w.shape[0], runtime.device)
    pruned_out: list[torch.Tensor] = []  # the pruned FFN output per batch, or its input z_K for least squares
    for sl, y in zip(runtime.batches(hidden.shape[0]), dense_out, strict=True):
        with timer.phase("forward"):
            xn = norm(hidden[sl].to(runtime.device, runtime.dtype))
            z = mlp.act_fn(F.linear(xn, *gate)) * F.linear(xn, *up)
        if moments is not None:
            with timer.phase("regression"):
                t = y if targets is None else targets.out[sl].to(runtime.device) - hidden[sl].to(runtime.device)
                moments.add(z, t)
            pruned_out.append(z)
            continue
        with timer.phase("forward"):
            x = F.linear(z, w_down, b_down)
        if switches.regression and not prefit:
            with timer.phase("regression"):
                sums.add(x, y)
        pruned_out.append(x)
    dense_out.clear()
    del gate, up, w_down
    scale = shift = None
    if moments is not None:
        with timer.phase("regression"):
            ls_fit = refit_to_target(moments, new_w, new_b, switches.damping)
        del moments
        new_w, new_b = ls_fit.weight.to(new_w.dtype), ls_fit.bias
        report["down_proj_fit"] = ls_fit.summary()
        del ls_fit
        w_c, b_c = new_w.to(runtime.dtype), new_b.to(runtime.dtype)
        with timer.phase("forward"):
            for i, z in enumerate(pruned_out):  # in place: never both lists whole
                pruned_out[i] = F.linear(z, w_c, b_c)
            del z
        del w_c, b_c
    elif switches.regression and not prefit:
        fit = sums.fit()
        new_w, new_b = apply_fit(new_w, new_b, fit)
        scale, shift = fit.scale.float(), fit.shift.float()
        report["down_proj_fit"] = fit.summary()
    _set_linear(out, prefix + "down_proj", new_w, new_b)
    del new_w
    weights_released()
    with timer.phase("forward"):
        for sl, x in zip(runtime.batches(hidden.shape[0]), pruned_out, strict=True):
            x = x.float() if scale is None else x.float() * scale + shift
            hidden[sl] = (hidden[sl].to(runtime.device) + x).to(hidden.device)
    spec.update(intermediate_size=int(kept.numel()), down_bias=new_b is not None)
