"""Prune one decoder layer on the calibration hidden states it receives (docs/method.md "Head scoring",
"Channel scoring" and "Recovery").

`LayerPruner` is built once per run and prunes one layer per `prune` call (trying each candidate split with
`--split search`); each prune is a `LayerJob`, which runs the method parts (method_parts.py) on the layer.

Order inside a layer follows docs/method.md "Calibration propagation": attention is scored, pruned and
recovered first; the FFN is then scored on the hidden states the *pruned* attention produces. The hidden-state buffer
is updated in place, batch by batch, so the layer's output becomes the next layer's input.
"""

from __future__ import annotations

import copy
import time
from collections import ChainMap, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from .allocation import HeadUnits, LayerPlan
from .architecture import LAYER_PREFIX, ModelShape, adapter_of
from .least_squares import CrossMoments
from .method_parts import ChannelChoice, ChannelStatistics, DownProjInput, HeadProblem, LayerReport, MethodParts
from .modeling import StreamPruneConfig, StreamPruneDecoderLayer
from .reconstruction import TrainedWindow, WindowProblem
from .scoring import MomentAccumulator
from .split_search import SplitRule, SplitTrial, SplitTrials


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
    report: LayerReport  # the layer's entry of the run report once LayerPruner.prune has completed it


def layer_parameter_count(shape: ModelShape, spec: dict) -> int:
    """Parameters of one decoder layer of these sizes (`spec`: a LayerSpec as a dict)."""
    total = 0
    for dims in shape.adapter.expected_layer_shapes(shape, 0, spec).values():
        n = 1
        for d in dims:
            n *= d
        total += n
    return total


def _nothing() -> None:
    pass


@dataclass
class LayerWork:
    """One layer to prune: its plan, its checkpoint tensors at full name (consumed), its calibration hidden states
    (overwritten with the pruned layer's output) and, when pass 2 carries it, the dense model's stream (advanced
    in place through the dense layer). `read_next` is called once no weight of the layer is held any more, only
    its output tensors and activations: the engine starts reading the next layer there, so the read-ahead copy
    never coincides with the layer's memory peak."""

    plan: LayerPlan
    stored: dict[str, torch.Tensor]
    hidden: torch.Tensor
    dense: torch.Tensor | None = None
    read_next: Callable[[], None] = _nothing


@dataclass
class LayerPruner:
    """Prunes the decoder layers of one run, one `prune` call per layer (docs/architecture.md).

    Built once per run; holds what every layer shares: the dense model's config and shape, the head units, the
    method parts, the runtime, the timer, the checkpoint's dtype (every output tensor is cast to it) and the rule
    for splitting a layer's budget between heads and channels (a fixed split, or `--split search`).
    """

    config: StreamPruneConfig  # the dense model's, as the engine builds layers from
    shape: ModelShape
    units: HeadUnits
    parts: MethodParts
    runtime: LayerRuntime
    timer: Timer
    out_dtype: torch.dtype
    split: SplitRule

    @torch.no_grad()
    def prune(self, work: LayerWork) -> LayerResult:
        """Prune `work.plan.layer` per its plan (or the best split of its budget), overwrite `work.hidden` with the
        pruned layer's output; returns its tensors, its sizes and its entry of the run report.

        `work.stored` is consumed: each dense weight is released as soon as its pruned version is in the output,
        so the dense layer and the pruned one are never both whole in memory. Weights are sliced and rescaled
        from tensors at least as precise as the checkpoint (the layer's own parameters when the compute dtype
        holds the stored values exactly, so no second copy of the layer is kept) and cast to `out_dtype` one
        tensor at a time.
        """
        candidates = self.split.candidates(work.plan, self.shape)
        if len(candidates) > 1:
            result, trials = self._prune_best_split(work, candidates)
        else:
            result, trials = self._prune_as_planned(work), None
        self._complete_report(result, work.plan, trials)
        return result

    def _complete_report(self, result: LayerResult, plan: LayerPlan, trials: list[SplitTrial] | None) -> None:
        r = result.report
        r.plan_ratio, r.score = plan.ratio, plan.score
        r.params_before = layer_parameter_count(self.shape, self.shape.dense_layer_spec())
        r.params_after = layer_parameter_count(self.shape, result.spec.to_dict())
        r.split_trials = None if trials is None else [t.to_dict() for t in trials]

    def _prune_as_planned(self, work: LayerWork) -> LayerResult:
        """Build the layer from `work.stored`, advance the dense stream through it, prune it per `work.plan`."""
        layer, weights = self._build(work.plan.layer, work.stored)
        dense = self._dense_targets(layer, work.dense)
        if self.runtime.device.type != "cpu":  # the layer lives in device memory: overlap its whole compute
            work.read_next()
        return self._prune_built(layer, replace(work, stored=weights), dense)

    def _prune_built(self, layer: StreamPruneDecoderLayer, work: LayerWork, dense: DenseTargets | None
                     ) -> LayerResult:
        """Every prune goes through here, a split-search candidate's too: `work.stored` are the weights `layer`
        was built from, `dense` the dense model's states for this layer (None when pass 2 carries none)."""
        return LayerJob(self, layer, work, dense).run()

    def _prune_best_split(self, work: LayerWork, candidates: list[LayerPlan]
                          ) -> tuple[LayerResult, list[SplitTrial]]:
        """`--split search` (split_search.py): prune the layer once per candidate split of its budget, keep the
        one nearest the dense layer's output. Costs one dense forward plus one layer prune per candidate, on all
        calibration sequences or, with `--split-samples`, on an evenly spaced subset followed by one prune of the
        chosen split on all of them."""
        rows = self.split.trial_rows(work.hidden.shape[0])
        if rows is not None:
            dense = None if work.dense is None else work.dense[rows]
            subset = LayerWork(work.plan, work.stored, work.hidden[rows], dense)
            tried = self._try_splits(subset, candidates)
            plan, trials = tried.best.plan, tried.trials
            del tried, subset, dense  # the subset's results: only the chosen plan is pruned again, on all sequences
            return self._prune_as_planned(replace(work, plan=plan)), trials
        on_cpu = self.runtime.device.type == "cpu"
        if not on_cpu:  # the weights go to the device per candidate: overlap the next read with all of it
            work.read_next()
        tried = self._try_splits(work, candidates)
        work.stored.clear()
        if on_cpu:
            work.read_next()
        return tried.best.result, tried.trials

    def _try_splits(self, work: LayerWork, candidates: list[LayerPlan]) -> SplitTrials[LayerResult]:
        """Prune every candidate on a copy of `work.hidden` (then overwritten with the kept candidate's output).
        `work.stored` is copied for each prune, never consumed; `work.dense` is advanced."""
        layer = self._build(work.plan.layer, _copy(work.stored))[0]
        dense = self._dense_targets(layer, work.dense)
        reference = work.hidden.clone()
        with self.timer.phase("dense_forward"):
            dense_forward(layer, reference, self.runtime)
        del layer
        tried: SplitTrials[LayerResult] = SplitTrials(reference, self.runtime.batches(work.hidden.shape[0]))
        for plan in candidates:
            tried.add(plan, *self._prune_copy(work, plan, dense))
        work.hidden.copy_(tried.best.states)
        return tried

    def _prune_copy(self, work: LayerWork, plan: LayerPlan, dense: DenseTargets | None
                    ) -> tuple[torch.Tensor, LayerResult]:
        """Prune copies of the layer's weights and states per `plan`; returns the states (now the pruned layer's
        output) and the result."""
        states = work.hidden.clone()
        layer, weights = self._build(plan.layer, _copy(work.stored))
        return states, self._prune_built(layer, LayerWork(plan, weights, states), dense)

    def _build(self, layer_idx: int, stored: dict[str, torch.Tensor]
               ) -> tuple[StreamPruneDecoderLayer, dict[str, torch.Tensor]]:
        """The layer module and the weights the job slices from (its own parameters when those hold the stored
        values exactly: then the checkpoint copy is consumed, so no second copy is kept)."""
        exact = _holds_exactly(self.runtime.dtype, self.out_dtype)
        with self.timer.phase("build"):
            layer = build_layer(self.config, layer_idx, stored, self.runtime, consume=exact)
        if exact:
            prefix = LAYER_PREFIX.format(layer_idx)
            stored = {prefix + k: v for k, v in layer.state_dict().items()}
        return layer, stored

    def _dense_targets(self, layer: StreamPruneDecoderLayer, dense: torch.Tensor | None) -> DenseTargets | None:
        """Advance the dense stream through the dense layer (in place); its states are this layer's targets.
        The layer's input on the dense stream is kept too when reconstruction learns from it."""
        if dense is None:
            return None
        inp = dense.clone() if self.parts.reconstruction.keeps_dense_input else None
        with self.timer.phase("dense_forward"):
            return DenseTargets(dense_forward_with_mid(layer, dense, self.runtime), dense, inp)


def _copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tensors.items()}  # each prune consumes its copy


def _holds_exactly(compute: torch.dtype, storage: torch.dtype) -> bool:
    """Whether every value of `storage` dtype survives a round trip through `compute` dtype."""
    wider = {torch.float32: {torch.float16, torch.bfloat16, torch.float32},
             torch.float64: {torch.float16, torch.bfloat16, torch.float32, torch.float64}}
    return compute == storage or storage in wider.get(compute, set())


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


class LayerJob:
    """One layer being pruned by a LayerPruner: the module, its weights, its calibration states, its plan.

    Order (docs/method.md "Calibration propagation"): attention is scored, pruned and recovered first; the
    FFN is then scored on the hidden states the *pruned* attention produces. `hidden` is updated in place, batch
    by batch, so the layer's output becomes the next layer's input. The reconstruction part then trains the
    windows it asks for, each on that window's input as the job kept it.
    """

    def __init__(self, pruner: LayerPruner, layer: StreamPruneDecoderLayer, work: LayerWork,
                 dense: DenseTargets | None):
        self.pruner, self.layer = pruner, layer
        self.stored, self.hidden, self.plan = work.stored, work.hidden, work.plan
        self.weights_released = work.read_next
        self.units, self.parts, self.runtime, self.timer = pruner.units, pruner.parts, pruner.runtime, pruner.timer
        self.dense_stream = dense  # the dense model's states for this layer, when pass 2 carries them
        # Least squares to the dense model's states (--target dense) uses them; other recoveries do not.
        self.targets = dense if self.parts.recovery.dense_target else None
        self.out = _Output(pruner.out_dtype)
        self.spec = LayerSpec(**pruner.shape.dense_layer_spec())
        self.report = LayerReport(work.plan.layer)

    def run(self) -> LayerResult:
        prefix = LAYER_PREFIX.format(self.plan.layer)
        windows = self.parts.reconstruction.windows(self.plan)  # () without reconstruction
        from_pruned = self.parts.reconstruction.learns_from_pruned_stream
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
        if self.plan.prunes_attention:
            with self.timer.phase("scoring"):
                problem = HeadProblem(moments.covariance(), moments.mean(), w_o, b_o, self.plan, units, head_dim,
                                      self.report, cross)
                del moments  # the float64 Gram: only its covariance is needed from here on
                keep_units = self.parts.heads.keep_units(problem)
            with self.timer.phase("regression"):
                new_w_o, new_b_o = self.parts.recovery.o_proj(problem, keep_units)
            del problem
        else:  # every unit kept: o_proj as it is
            keep_units = torch.ones(units.num_units, dtype=torch.bool)
            new_w_o, new_b_o = w_o, b_o
        heads = _kept_heads(keep_units, units)
        n_kv_kept = self._write_qkv(attn, prefix, heads, keep_units, head_dim)
        cols = _rows(heads, head_dim).to(rt.device)
        del w_o
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
        with self.timer.phase("pca"):
            self.parts.channels.prepare(stats)
        with self.timer.phase("scoring"):
            choice = self.parts.channels.choose(mlp, stats, self.plan.prune_channels)
        keep_mask = torch.ones(n_channels, dtype=torch.bool, device=choice.pruned.device)
        keep_mask[choice.pruned] = False
        kept = keep_mask.nonzero().flatten()
        self._finish_mlp(kept, stats.dense_out, choice)
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

    def _finish_mlp(self, kept: torch.Tensor, dense_out: list[torch.Tensor], choice: ChannelChoice) -> None:
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
        w_dense = self.stored[prefix + "down_proj.weight"]
        w_kept = w_dense[:, kept.cpu()].to(rt.device, _at_least_float32(rt.dtype))
        old_b = self.stored.get(prefix + "down_proj.bias")
        inp = DownProjInput(w_kept, None if old_b is None else old_b.to(rt.device, torch.float64),
                            mlp.down_proj.bias, rt.dtype, self.report, w_dense, kept, choice.z_stats)
        choice.z_stats = None  # handed to the recovery: freed with `inp.drop_dense()` once the fit is built
        with self.timer.phase("regression"):
            fit = self.parts.recovery.down_proj(inp)
        inp.drop_dense()  # `fit.w` holds the kept columns (or their refit) from here on
        del w_kept, w_dense
        self._release(mlp, prefix, ("down_proj",))
        keeps_z = fit.keeps_intermediate
        forward = () if keeps_z else fit.forward_weights()
        kept_out: list[torch.Tensor] = []  # the pruned FFN output per batch, or its input z_K
        for sl, y in zip(self._batches(), dense_out, strict=True):
            with self.timer.phase("forward"):
                xn = norm(self.hidden[sl].to(rt.device, rt.dtype))
                z = mlp.act_fn(F.linear(xn, *gate)) * F.linear(xn, *up)
                x = None if keeps_z else F.linear(z, *forward)
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

    def _reconstruct(self, window: str, pruned_input: torch.Tensor, dense_output: torch.Tensor | None) -> None:
        """Hand the window to the reconstruction part; keep what it trained (output tensors and the layer's
        output in `hidden`) only if it beat the closed form on held-out sequences. `pruned_input` is the window's
        input on the pruned stream, `dense_output` the dense window's output on it (None when the part learns
        from the dense stream)."""
        problem = WindowProblem(window, self.plan.layer, self._pruned_config(), ChainMap(self.out, self.stored),
                                self.runtime, pruned_input, dense_output, self.dense_stream)
        with self.timer.phase("reconstruction"):
            trained = self.parts.reconstruction.train(problem)
        del problem
        self.report.reconstruction = [*(self.report.reconstruction or []), trained.report.to_dict()]
        if trained.report.kept:
            self._keep_trained(trained, pruned_input)

    def _keep_trained(self, trained: TrainedWindow, pruned_input: torch.Tensor) -> None:
        rt, prefix = self.runtime, LAYER_PREFIX.format(self.plan.layer)
        with torch.no_grad():
            for name, p in trained.parameters.items():
                self.stored.pop(prefix + name, None)
                self.out[prefix + name] = p
                p.copy_(self.out[prefix + name])  # as written: the next layer sees the rounded weights
            with self.timer.phase("forward"):
                for sl in self._batches():
                    x = pruned_input[sl].to(rt.device, torch.float32)
                    self.hidden[sl] = (x + trained.forward(x)).to(self.hidden.device)

    def _pruned_config(self) -> StreamPruneConfig:
        """The model config with this layer's entry at its sizes so far (the window modules are built from it)."""
        config = copy.copy(self.pruner.config)
        config.layer_configs = list(config.layer_configs)
        config.layer_configs[self.plan.layer] = self.spec.to_dict()
        return config

    def _dense_layer_output(self, layer_input: torch.Tensor) -> torch.Tensor:
        """What the dense layer adds to `layer_input` (one dense forward, before anything is pruned)."""
        output = layer_input.clone()
        with self.timer.phase("forward"):
            dense_forward(self.layer, output, self.runtime)
        return output.sub_(layer_input)


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


__all__ = ["DenseTargets", "LayerJob", "LayerPruner", "LayerResult", "LayerRuntime", "LayerSpec", "LayerWork", "Timer",
           "build_layer", "dense_forward", "dense_forward_with_mid", "layer_parameter_count"]
