"""Prune one decoder layer on the calibration hidden states it receives (docs/method.md "Head scoring",
"Channel scoring" and "Recovery").

Order inside a layer follows docs/method.md "Calibration propagation": attention is scored, pruned and
recovered first; the FFN is then scored on the hidden states the *pruned* attention produces. The hidden-state buffer
is updated in place, batch by batch, so the layer's output becomes the next layer's input.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .allocation import HeadUnits, LayerPlan
from .architecture import LAYER_PREFIX, adapter_of
from .least_squares import CrossMoments
from .method_parts import ChannelStatistics, DownProjInput, HeadProblem, LayerReport, MethodParts, MethodSwitches
from .modeling import StreamPruneConfig, StreamPruneDecoderLayer
from .reconstruction import WINDOWS, WindowTrainer
from .scoring import MomentAccumulator


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
        layer = adapter_of(config).layer_module(config, layer_idx)
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
        h = x + attn(hidden_states=layer.input_layernorm(x), position_embeddings=runtime.position_embeddings,
                     attention_mask=None)[0]
        mid[sl] = h.float().to(hidden.device)
        hidden[sl] = (h + mlp(layer.post_attention_layernorm(h))).float().to(hidden.device)
    return mid


@dataclass
class DenseTargets:
    """The dense model's hidden states after this layer's attention block (mid) and after the layer (out),
    and its input to the layer (inp: kept only when a reconstruction window learns from the dense stream)."""

    mid: torch.Tensor
    out: torch.Tensor
    inp: torch.Tensor | None = None


@dataclass
class LayerSpec:
    """One layer's sizes and bias flags: an entry of StreamPruneConfig.layer_configs."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    down_bias: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerResult:
    tensors: dict[str, torch.Tensor]  # output tensors, full names, storage dtype
    spec: LayerSpec
    report: LayerReport


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
    lstsq_targets = targets if switches.dense_target else None  # dense streams may be kept for reconstruction only
    job = LayerJob(layer, stored, hidden, plan, units, MethodParts.from_switches(switches), runtime, timer,
                   _Output(out_dtype), LayerSpec(**dense_spec), LayerReport(plan.layer),
                   weights_released or (lambda: None), lstsq_targets, targets)
    return job.run()


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


@dataclass
class LayerJob:
    """One layer being pruned: the module, its weights, its calibration states, its budget, the parts.

    Order (docs/method.md "Calibration propagation"): attention is scored, pruned and recovered first; the
    FFN is then scored on the hidden states the *pruned* attention produces. `hidden` is updated in place, batch
    by batch, so the layer's output becomes the next layer's input.
    """

    layer: StreamPruneDecoderLayer
    stored: dict[str, torch.Tensor]
    hidden: torch.Tensor
    plan: LayerPlan
    units: HeadUnits
    parts: MethodParts
    runtime: LayerRuntime
    timer: Timer
    out: _Output
    spec: LayerSpec
    report: LayerReport
    weights_released: Callable[[], None]
    targets: DenseTargets | None = None  # least squares to the dense model's states (--target dense)
    dense_stream: DenseTargets | None = None  # the dense stream, for reconstruction from dense inputs

    def run(self) -> LayerResult:
        prefix = LAYER_PREFIX.format(self.plan.layer)
        windows = self._reconstruction_windows()
        from_pruned = self.parts.reconstruction is not None and self.parts.reconstruction.inputs == "pruned"
        whole_input = self.hidden.clone() if "layer" in windows else None
        whole_target = self._dense_layer_output(whole_input) if whole_input is not None and from_pruned else None
        layer_input = self.hidden.clone() if "attention" in windows else None
        attention_target = self._prune_attention(*self._attention_pass(),
                                                 keep_dense_output=from_pruned and layer_input is not None)
        if layer_input is not None:
            self._reconstruct("attention", layer_input, attention_target)
            del layer_input, attention_target
        mlp_input = self.hidden.clone() if "mlp" in windows else None
        mlp_target = self._prune_mlp(keep_dense_output=from_pruned and mlp_input is not None)
        if mlp_input is not None:
            self._reconstruct("mlp", mlp_input, mlp_target)
            del mlp_input, mlp_target
        if whole_input is not None:
            self._reconstruct("layer", whole_input, whole_target)
            del whole_input, whole_target
        self.out.update(self.stored)  # what the two phases did not release: the norms, unchanged
        return LayerResult({k: v for k, v in self.out.items() if k.startswith(prefix)}, self.spec, self.report)

    def _batches(self) -> list[slice]:
        return self.runtime.batches(self.hidden.shape[0])

    def _add_to_hidden(self, sl: slice, y: torch.Tensor) -> None:
        self.hidden[sl] = (self.hidden[sl].to(self.runtime.device) + y).to(self.hidden.device)

    def _release(self, module: torch.nn.Module, prefix: str, projections: tuple[str, ...]) -> None:
        """Drop dense projections whose pruned versions are in the output: from `stored` and `module`.

        `prefix` is the module's full name with a trailing dot, e.g. "model.layers.3.mlp.".
        """
        for p in projections:
            for kind in ("weight", "bias"):
                self.stored.pop(f"{prefix}{p}.{kind}", None)
            setattr(module, p, None)

    def _move_rows(self, module, prefix: str, projections: tuple[str, ...], rows: torch.Tensor) -> None:
        """Put the kept output rows (weight and bias) of projections into the output and release the
        dense ones, one projection at a time, so at most one projection is held both dense and pruned."""
        for p in projections:
            for kind in ("weight", "bias"):
                name = f"{prefix}{p}.{kind}"
                if name in self.stored:
                    tensor = self.stored[name]
                    self.out[name] = tensor[rows.to(tensor.device)]
                    del tensor
            self._release(module, prefix, (p,))

    def _set_linear(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.out[name + ".weight"] = weight
        if bias is not None:
            self.out[name + ".bias"] = bias

    # -- attention ------------------------------------------------------------------------------

    def _attention_pass(self) -> tuple[list[torch.Tensor], MomentAccumulator, CrossMoments | None]:
        """Dense attention over all samples: each batch's head outputs A and their running moments
        (and, with dense targets, their cross moments with what o_proj should add: mid_dense - input)."""
        layer, rt = self.layer, self.runtime
        attn = layer.self_attn
        cross = None
        if self.targets is not None:
            cross = CrossMoments(attn.o_proj.in_features, attn.o_proj.out_features, rt.device)
        moments = cross.x if cross is not None else MomentAccumulator(attn.o_proj.in_features, rt.device)
        head_outputs: list[torch.Tensor] = []
        captured: list[torch.Tensor] = []
        handle = attn.o_proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            for sl in self._batches():
                with self.timer.phase("forward"):
                    x = self.hidden[sl].to(rt.device, rt.dtype)
                    attn(hidden_states=layer.input_layernorm(x), position_embeddings=rt.position_embeddings,
                         attention_mask=None)
                    a = captured.pop()
                with self.timer.phase("statistics"):
                    if cross is not None:
                        cross.add(a, self.targets.mid[sl].to(rt.device) - x.float())
                    else:
                        moments.add(a)
                head_outputs.append(a)
        finally:
            handle.remove()
        return head_outputs, moments, cross

    def _prune_attention(self, head_outputs: list[torch.Tensor], moments: MomentAccumulator,
                         cross: CrossMoments | None, keep_dense_output: bool = False) -> torch.Tensor | None:
        """Choose heads, rewrite q/k/v/o, and add the pruned, recovered attention output to `hidden`.

        With `keep_dense_output`, returns the dense attention's output on this layer's input (float32, like
        `hidden`): the target of a reconstruction from the pruned stream.
        """
        attn, rt, units = self.layer.self_attn, self.runtime, self.units
        dense_output = self._dense_attention_output(head_outputs) if keep_dense_output else None
        prefix = LAYER_PREFIX.format(self.plan.layer) + "self_attn."
        head_dim = attn.head_dim
        w_o = self.stored[prefix + "o_proj.weight"].to(rt.device, _at_least_float32(rt.dtype))
        b_o = self.stored.get(prefix + "o_proj.bias")
        b_o = None if b_o is None else b_o.to(rt.device, torch.float64)
        n_heads = w_o.shape[1] // head_dim
        keep_units = torch.ones(units.num_units, dtype=torch.bool)
        recovered = None
        if self.plan.prunes_attention:
            with self.timer.phase("scoring"):
                problem = HeadProblem(moments.covariance(), moments.mean(), w_o, b_o, self.plan, units, head_dim,
                                      self.report, cross)
                del moments  # the float64 Gram: only its covariance is needed from here on
                keep_units = self.parts.heads.keep_units(problem)
            with self.timer.phase("regression"):
                recovered = self.parts.recovery.o_proj(problem, keep_units)
            del problem
        heads = _kept_heads(keep_units, units)
        n_kv_kept = self._write_qkv(attn, prefix, heads, keep_units, head_dim)
        cols = _rows(heads, head_dim).to(rt.device)
        new_w_o, new_b_o = recovered if recovered is not None else (w_o[:, cols], b_o)
        del w_o, recovered
        self._release(attn, prefix, ("o_proj",))
        with self.timer.phase("forward"):
            w_c, b_c = new_w_o.to(rt.dtype), None if new_b_o is None else new_b_o.to(rt.dtype)
            for sl, a in zip(self._batches(), head_outputs, strict=True):
                self._add_to_hidden(sl, F.linear(a[..., cols], w_c, b_c).float())
        head_outputs.clear()
        self._set_linear(prefix + "o_proj", new_w_o, new_b_o)
        self.spec.num_attention_heads, self.spec.num_key_value_heads = int(heads.numel()), n_kv_kept
        self.spec.o_bias = new_b_o is not None
        r = self.report
        r.heads_kept, r.heads_total, r.kept_heads, r.kv_heads_kept = int(heads.numel()), n_heads, heads.tolist(), \
            n_kv_kept
        return dense_output

    def _dense_attention_output(self, head_outputs: list[torch.Tensor]) -> torch.Tensor:
        """The dense o_proj applied to every batch's head outputs (before o_proj is pruned and released)."""
        o_proj = self.layer.self_attn.o_proj
        output = torch.empty_like(self.hidden)
        with self.timer.phase("forward"):
            for sl, a in zip(self._batches(), head_outputs, strict=True):
                output[sl] = o_proj(a).float().to(output.device)
        return output

    def _write_qkv(self, attn, prefix: str, heads, keep_units, head_dim: int) -> int:
        """Kept rows of q/k/v into the output (dense ones released); returns the number of KV heads kept."""
        n_kv = self.stored[prefix + "k_proj.weight"].shape[0] // head_dim
        kv_heads = torch.arange(n_kv)
        if self.units.kv_heads_per_unit:  # MHA heads or whole KV groups: k/v rows go with the unit
            kv_heads = keep_units.nonzero().flatten()
        self._move_rows(attn, prefix, ("q_proj",), _rows(heads, head_dim))
        self._move_rows(attn, prefix, ("k_proj", "v_proj"), _rows(kv_heads, head_dim))
        return int(kv_heads.numel())

    # -- FFN ------------------------------------------------------------------------------------

    def _prune_mlp(self, keep_dense_output: bool = False) -> torch.Tensor | None:
        """Score channels on the pruned-attention output, rewrite gate/up/down, finish the layer output.

        With `keep_dense_output` (and the FFN pruned), returns the dense FFN's output on its input (float32):
        the target of a reconstruction from the pruned stream.
        """
        mlp, norm, rt = self.layer.mlp, self.layer.post_attention_layernorm, self.runtime
        n_channels = mlp.gate_proj.out_features
        if not self.plan.prunes_mlp:
            for sl in self._batches():
                with self.timer.phase("forward"):
                    self._add_to_hidden(sl, mlp(norm(self.hidden[sl].to(rt.device, rt.dtype))).float())
            self.weights_released()
            self.report.channels_kept, self.report.channels_total = n_channels, n_channels
            return None
        stats = self.parts.channels.statistics(mlp.gate_proj.in_features, n_channels, mlp.down_proj.out_features,
                                               self.hidden.shape[0] * self.hidden.shape[1], rt.device)
        self._ffn_statistics(stats)
        dense_output = None
        if keep_dense_output:
            dense_output = torch.empty_like(self.hidden)
            for sl, y in zip(self._batches(), stats.dense_out, strict=True):
                dense_output[sl] = y.float().to(dense_output.device)
        choice = self.parts.channels.choose(mlp, stats, self.plan.prune_channels, self.timer)
        keep_mask = torch.ones(n_channels, dtype=torch.bool, device=choice.pruned.device)
        keep_mask[choice.pruned] = False
        kept = keep_mask.nonzero().flatten()
        self._finish_mlp(kept, stats.dense_out, choice.z_stats)
        self.report.channels_kept, self.report.channels_total = int(kept.numel()), n_channels
        return dense_output

    def _ffn_statistics(self, stats: ChannelStatistics) -> None:
        """The dense FFN over the pruned-attention output: the selector's statistics and the outputs."""
        mlp, norm, rt = self.layer.mlp, self.layer.post_attention_layernorm, self.runtime
        for sl in self._batches():
            with self.timer.phase("forward"):
                xn = norm(self.hidden[sl].to(rt.device, rt.dtype))
                z = mlp.act_fn(mlp.gate_proj(xn)) * mlp.up_proj(xn)
                y = mlp.down_proj(z)
            with self.timer.phase("statistics"):
                stats.add(xn, z, y)
            stats.dense_out.append(y)

    def _finish_mlp(self, kept: torch.Tensor, dense_out: list[torch.Tensor], z_stats) -> None:
        """Pruned FFN per batch, recovery of down_proj, then the layer output.

        The dense gate/up/down are sliced to the kept channels once and released, one at a time,
        before the pruned forward: from there on only the pruned FFN is in memory.
        """
        mlp, norm, rt = self.layer.mlp, self.layer.post_attention_layernorm, self.runtime
        prefix = LAYER_PREFIX.format(self.plan.layer) + "mlp."
        gate = _kept_rows(mlp.gate_proj, kept)  # compute-dtype copies for the pruned forward
        self._move_rows(mlp, prefix, ("gate_proj",), kept)
        up = _kept_rows(mlp.up_proj, kept)
        self._move_rows(mlp, prefix, ("up_proj",), kept)
        w_name = prefix + "down_proj.weight"
        w_kept = self.stored[w_name][:, kept.cpu()].to(rt.device, _at_least_float32(rt.dtype))
        old_b = self.stored.get(prefix + "down_proj.bias")
        inp = DownProjInput(w_kept, None if old_b is None else old_b.to(rt.device, torch.float64),
                            mlp.down_proj.bias, rt.dtype, self.report)
        with self.timer.phase("regression"):
            fit = self.parts.recovery.down_proj(
                inp, z_stats=z_stats, kept=kept,
                w_full=lambda: self.stored[w_name].to(rt.device, _at_least_float32(rt.dtype)))
        inp.w_kept = None  # `fit.w` holds it (or its refit) from here on
        del z_stats, w_kept
        self._release(mlp, prefix, ("down_proj",))
        forward = fit.forward_weights
        kept_out: list[torch.Tensor] = []  # the pruned FFN output per batch, or its input z_K
        for sl, y in zip(self._batches(), dense_out, strict=True):
            with self.timer.phase("forward"):
                xn = norm(self.hidden[sl].to(rt.device, rt.dtype))
                z = mlp.act_fn(F.linear(xn, *gate)) * F.linear(xn, *up)
                x = None if forward is None else F.linear(z, *forward)
            with self.timer.phase("regression"):
                t = None
                if self.targets is not None:
                    t = self.targets.out[sl].to(rt.device) - self.hidden[sl].to(rt.device)
                fit.observe(z, x, y, t)
            kept_out.append(z if x is None else x)
        dense_out.clear()
        del gate, up, forward
        with self.timer.phase("regression"):
            fit.finish(kept_out)
        self._set_linear(prefix + "down_proj", fit.w, fit.b)
        self.spec.intermediate_size, self.spec.down_bias = int(kept.numel()), fit.b is not None
        del fit.w
        self.weights_released()
        with self.timer.phase("forward"):
            for sl, x in zip(self._batches(), kept_out, strict=True):
                self._add_to_hidden(sl, fit.output(x))

    # -- reconstruction (docs/method.md "Reconstruction by gradient") -----------------------------

    def _reconstruction_windows(self) -> tuple[str, ...]:
        """The windows to reconstruct in this layer: those asked for whose submodule this layer prunes."""
        settings = self.parts.reconstruction
        if settings is None:
            return ()
        pruned = {"attention": self.plan.prunes_attention, "mlp": self.plan.prunes_mlp,
                  "layer": self.plan.prunes_attention or self.plan.prunes_mlp}
        return tuple(w for w in settings.windows if pruned[w])

    def _reconstruct(self, window: str, pruned_input: torch.Tensor, dense_output: torch.Tensor | None) -> None:
        """Train the window's kept weights from the closed form toward the dense window's output; keep them
        (output tensors and the layer's output in `hidden`) only if they beat the closed form on held-out
        sequences. `pruned_input` is the window's input on the pruned stream, `dense_output` the dense
        window's output on it (None when the settings learn from the dense stream)."""
        settings, rt = self.parts.reconstruction, self.runtime
        inputs, targets = self._training_pairs(window, pruned_input, dense_output)
        names, module = self._window_module(window)
        params = [module.get_parameter(n) for n in names]
        forward = self._window_forward(window, module)
        seed = settings.seed * 1_000_003 + len(WINDOWS) * self.plan.layer + WINDOWS.index(window)
        trainer = WindowTrainer(params, forward, settings, rt.device, seed, f"reconstruct:{self.plan.layer}")
        with self.timer.phase("reconstruction"):
            report = trainer.run(window, inputs, targets)
        del inputs, targets
        self.report.reconstruction = [*(self.report.reconstruction or []), report.to_dict()]
        if not report.kept:
            return
        prefix = LAYER_PREFIX.format(self.plan.layer)
        with torch.no_grad():
            for name, p in zip(names, params, strict=True):
                self.stored.pop(prefix + name, None)
                self.out[prefix + name] = p
                p.copy_(self.out[prefix + name])  # as written: the next layer sees the rounded weights
            with self.timer.phase("forward"):
                for sl in self._batches():
                    x = pruned_input[sl].to(rt.device, torch.float32)
                    self.hidden[sl] = (x + forward(x)).to(self.hidden.device)

    def _training_pairs(self, window: str, pruned_input: torch.Tensor, dense_output: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the window: from the pruned stream, or from the dense model's own stream."""
        if dense_output is not None:
            return pruned_input, dense_output
        d = self.dense_stream
        if window == "attention":
            return d.inp, d.mid - d.inp
        if window == "layer":
            return d.inp, d.out - d.inp
        return d.mid, d.out - d.mid

    def _dense_layer_output(self, layer_input: torch.Tensor) -> torch.Tensor:
        """What the dense layer adds to `layer_input` (one dense forward, before anything is pruned)."""
        output = layer_input.clone()
        with self.timer.phase("forward"):
            dense_forward(self.layer, output, self.runtime)
        return output.sub_(layer_input)

    def _window_module(self, window: str) -> tuple[list[str], torch.nn.Module]:
        """A float32 copy of the pruned layer's window (submodule and its norm) on the compute device, as
        written so far; returns its parameter names (relative to the layer) and the layer holding it."""
        config = copy.copy(self.layer.self_attn.config)
        config.layer_configs = list(config.layer_configs)
        config.layer_configs[self.plan.layer] = self.spec.to_dict()
        with torch.device("meta"):
            layer = adapter_of(config).layer_module(config, self.plan.layer)
        prefix = LAYER_PREFIX.format(self.plan.layer)
        state = {}
        for part in _WINDOW_PARTS[window]:
            for name, _ in layer.get_submodule(part).named_parameters(prefix=part):
                source = self.out[prefix + name] if prefix + name in self.out else self.stored[prefix + name]
                state[name] = source.to(self.runtime.device, torch.float32, copy=True)  # never an alias
        layer.load_state_dict(state, strict=False, assign=True)
        return list(state), layer

    def _window_forward(self, window: str, layer: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The window's contribution to the residual stream, as a function of its input."""
        if window == "mlp":
            return lambda x: layer.mlp(layer.post_attention_layernorm(x))
        cos, sin = (t.float() for t in self.runtime.position_embeddings)
        if window == "layer":
            return lambda x: layer(x, position_embeddings=(cos, sin)) - x
        return lambda x: layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=(cos, sin),
                                         attention_mask=None)[0]


_WINDOW_PARTS = {"attention": ("self_attn", "input_layernorm"), "mlp": ("mlp", "post_attention_layernorm"),
                 "layer": ("self_attn", "input_layernorm", "mlp", "post_attention_layernorm")}


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _kept_heads(keep_units: torch.Tensor, units: HeadUnits) -> torch.Tensor:
    return torch.repeat_interleave(keep_units, units.heads_per_unit).nonzero().flatten()


def _rows(head_idx: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a projection laid out head by head."""
    return (head_idx[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def _kept_rows(linear: torch.nn.Linear, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a projection restricted to the output rows `rows` (copies)."""
    return linear.weight[rows], None if linear.bias is None else linear.bias[rows]


__all__ = ["DenseTargets", "LayerJob", "LayerResult", "LayerRuntime", "LayerSpec", "MethodSwitches", "Timer",
           "build_layer", "dense_forward", "dense_forward_with_mid", "prune_layer"]
