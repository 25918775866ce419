"""Gradient reconstruction of a pruned submodule (docs/method.md "Reconstruction by gradient").

The closed-form recovery refits one matrix per sub-layer (o_proj, down_proj) by least squares. What it
cannot fix is everything before that matrix: the kept q/k/v rows, the gate/up rows and the norms still
hold their dense values although their job has changed. Reconstruction optimises *all* kept weights of
one submodule (a "window": the attention with its input norm, or the MLP with its post-attention norm),
starting from the closed-form solution, so that the submodule's output on the calibration inputs comes
close to the dense submodule's output on the same inputs:

    min_theta  1/|T| sum_t sum_d  w_d (f_theta(x_t) - y_t)_d^2,   w_d = 1 / mean_t (x_t + y_t)_d^2

where y is the dense submodule's output and x + y the dense residual stream after it. The weights w
are those the split search uses (split_search.py): LLaMA-family models carry a few "massive activation"
dimensions that the next RMSNorm divides away, and an unweighted error is dominated by them.

Every `val_every`-th calibration sequence is held out. The weights with the lowest held-out error over
the epochs are kept, and where no epoch beats the closed form on the held-out sequences the closed form
stays (the window is then reported with `kept: false`). Nothing here holds more than the one window's
parameters, their gradients, the optimiser state and one copy of the best weights (kept on the host).

`GradientReconstruction` is the method part (method_parts.Reconstruction) that layer_pruning.LayerJob hands each
window to, as a `WindowProblem`; it returns a `TrainedWindow` the job keeps or drops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from . import split_search
from .architecture import LAYER_PREFIX, adapter_of
from .faults import fault_point

if TYPE_CHECKING:
    from .allocation import LayerPlan
    from .layer_pruning import DenseTargets, LayerRuntime
    from .modeling import StreamPruneConfig

WINDOWS = ("attention", "mlp", "layer")  # "layer": the whole decoder layer as one window


@dataclass(frozen=True)
class ReconstructionSettings:
    """What the user chose (options.py holds the defaults); one instance per run."""

    windows: tuple[str, ...]  # subset of WINDOWS, run in that order
    inputs: str  # "dense": the dense model's stream (its own inputs and outputs); "pruned": the pruned stream
    epochs: int
    lr: float
    batch: int  # calibration sequences per optimiser step
    val_every: int  # every val_every-th sequence is held out for validation
    seed: int
    optimizer: str = "adam"  # "adam" or "rmsprop"
    anchor: float = 0.0  # decoupled decay toward the closed form, per unit of learning rate (0: none)

    @property
    def attention(self) -> bool:
        return "attention" in self.windows

    @property
    def mlp(self) -> bool:
        return "mlp" in self.windows


@dataclass
class WindowReport:
    """One window's errors (relative: weighted squared error / weighted square of the dense output)."""

    window: str
    train_before: float
    val_before: float
    train_after: float
    val_after: float
    best_epoch: int  # 0: no epoch beat the closed form on the held-out sequences
    kept: bool
    steps: int
    non_finite: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def split_rows(n: int, val_every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) sequence indices: every val_every-th sequence validates (evenly spaced, so each
    source of a calibration mixture keeps its share). With fewer than two sequences both are all rows."""
    rows = torch.arange(n)
    if n < 2 or val_every < 2:
        return rows, rows
    val = rows % val_every == val_every - 1
    if not val.any():
        val[-1] = True
    return rows[~val], rows[val]


def dimension_weights(inputs: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """w_d = 1 / mean over tokens of (input + target)_d^2: the dense residual stream after the window.

    split_search.dimension_weights gives 1 / sum over tokens; the token count is its numerator here, so the
    weights are the same bytes as when this module divided the count by the sum itself.
    """
    count = len(rows) * inputs.shape[1]
    streams = (inputs[chunk].double() + targets[chunk].double() for chunk in rows.split(8))
    return split_search.dimension_weights(streams, numerator=count).float()


class WindowTrainer:
    """Adam (or RMSprop) with cosine decay over `settings.epochs` epochs of shuffled calibration sequences, and
    optionally a decoupled decay of the weights toward their starting (closed-form) values: after each step
    theta <- theta - lr_t * anchor * (theta - theta_0), AdamW's weight decay centred on the closed form
    instead of on zero.

    `forward(x)` is the pruned submodule (its parameters are `params`), `inputs` and `targets` are
    (sequences, tokens, hidden) float32 tensors on any device; each step moves one batch to `device`.
    After `run`, the parameters hold the best epoch's weights when the report says `kept`; otherwise they
    hold whatever training left and the caller keeps the closed form it started from (no second copy of
    the starting weights is held for that).
    """

    def __init__(self, params: list[torch.nn.Parameter], forward: Callable[[torch.Tensor], torch.Tensor],
                 settings: ReconstructionSettings, device: torch.device, seed: int, fault: str = ""):
        self.params, self.forward, self.settings, self.device = params, forward, settings, device
        self.seed, self.fault = seed, fault

    def run(self, window: str, inputs: torch.Tensor, targets: torch.Tensor) -> WindowReport:
        s = self.settings
        train, val = split_rows(inputs.shape[0], s.val_every)
        weights = dimension_weights(inputs, targets, train).to(self.device)
        scale_train = self._target_scale(targets, train, weights)
        scale_val = self._target_scale(targets, val, weights)
        train_before = self.error(inputs, targets, train, weights) / scale_train
        val_before = self.error(inputs, targets, val, weights) / scale_val
        best_val, best_epoch, best = val_before, 0, None
        steps, non_finite = 0, False
        if s.epochs > 0 and s.lr > 0:
            for p in self.params:
                p.requires_grad_(True)
            optimiser = _optimiser(s.optimizer, self.params, s.lr)
            anchor = [p.detach().clone() for p in self.params] if s.anchor > 0 else None
            batches_per_epoch = math.ceil(len(train) / s.batch)
            total = s.epochs * batches_per_epoch
            generator = torch.Generator().manual_seed(self.seed)
            for epoch in range(1, s.epochs + 1):
                order = train[torch.randperm(len(train), generator=generator)]
                for chunk in order.split(s.batch):
                    lr = s.lr * 0.5 * (1 + math.cos(math.pi * steps / total))
                    _set_lr(optimiser, lr)
                    if not self._step(optimiser, inputs[chunk], targets[chunk], weights):
                        non_finite = True
                        break
                    if anchor is not None:
                        _pull_toward(self.params, anchor, min(lr * s.anchor, 1.0))
                    steps += 1
                if non_finite:
                    break
                fault_point(self.fault)  # crash tests: a kill in the middle of a layer's reconstruction
                val_error = self.error(inputs, targets, val, weights) / scale_val
                if val_error < best_val:
                    best_val, best_epoch = val_error, epoch
                    best = [p.detach().to("cpu", copy=True) for p in self.params]
            for p in self.params:
                p.requires_grad_(False)
        if best is not None:
            with torch.no_grad():
                for p, b in zip(self.params, best, strict=True):
                    p.copy_(b)
        train_after = self.error(inputs, targets, train, weights) / scale_train if best is not None else train_before
        return WindowReport(window, train_before, val_before, train_after, best_val, best_epoch, best is not None,
                            steps, non_finite)

    def _step(self, optimiser: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> bool:
        """One optimiser step on one batch; False (and no step) when the loss is not finite."""
        with torch.enable_grad():
            x, y = x.to(self.device, torch.float32), y.to(self.device, torch.float32)
            loss = _weighted_square(self.forward(x) - y, w).mean()
            if not torch.isfinite(loss):
                optimiser.zero_grad(set_to_none=True)
                return False
            loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        return True

    @torch.no_grad()
    def error(self, inputs: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, w: torch.Tensor) -> float:
        """Mean over the tokens of `rows` of sum_d w_d (f(x) - y)_d^2, accumulated in float64."""
        total, count = 0.0, 0
        for chunk in rows.split(self.settings.batch):
            x = inputs[chunk].to(self.device, torch.float32)
            y = targets[chunk].to(self.device, torch.float32)
            err = _weighted_square(self.forward(x) - y, w)
            total += float(err.double().sum())
            count += err.numel()
        return total / max(count, 1)

    def _target_scale(self, targets: torch.Tensor, rows: torch.Tensor, w: torch.Tensor) -> float:
        """Mean over tokens of sum_d w_d y_d^2: the error of a window that outputs zero."""
        total, count = 0.0, 0
        for chunk in rows.split(self.settings.batch):
            err = _weighted_square(targets[chunk].to(self.device, torch.float32), w)
            total += float(err.double().sum())
            count += err.numel()
        return max(total / max(count, 1), torch.finfo(torch.float32).tiny)


def _weighted_square(diff: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per token: sum_d w_d diff_d^2 (shape: batch x tokens)."""
    return (diff.square() * w).sum(-1)


def _optimiser(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam (beta 0.9, 0.999) or RMSprop (alpha 0.99, no momentum: Wanda++'s regional optimisation), eps 1e-8."""
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.99, eps=1e-8)
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)


@torch.no_grad()
def _pull_toward(params: list[torch.nn.Parameter], anchor: list[torch.Tensor], weight: float) -> None:
    """theta <- theta + weight * (theta_0 - theta) for every parameter."""
    for p, a in zip(params, anchor, strict=True):
        p.lerp_(a, weight)


def _set_lr(optimiser: torch.optim.Optimizer, lr: float) -> None:
    for group in optimiser.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------------------------
# The method part (method_parts.Reconstruction): what layer_pruning.LayerJob hands over, and gets back
# ----------------------------------------------------------------------------------------------


@dataclass
class WindowProblem:
    """One window of one pruned layer, as the reconstruction part sees it (LayerJob builds it)."""

    window: str
    layer: int
    config: StreamPruneConfig  # the model's, with this layer's entry at its pruned sizes so far
    weights: Mapping[str, torch.Tensor]  # full name -> the layer's weight as written so far (else dense)
    runtime: LayerRuntime
    pruned_input: torch.Tensor  # the window's input on the pruned stream
    dense_output: torch.Tensor | None  # the dense window's output on it: kept only to learn from the pruned stream
    dense_stream: DenseTargets | None  # the dense model's own stream: kept only to learn from it


@dataclass
class TrainedWindow:
    """A trained window: its report, its float32 parameters (names relative to the layer; the closed form
    stays unless `report.kept`) and the window's contribution to the residual stream, as a function."""

    report: WindowReport
    parameters: dict[str, torch.nn.Parameter]
    forward: Callable[[torch.Tensor], torch.Tensor]


class GradientReconstruction:
    """docs/method.md "Reconstruction by gradient": each pruned window's kept weights trained from the closed form
    toward the dense window's output, kept only where they beat it on held-out sequences."""

    def __init__(self, settings: ReconstructionSettings):
        self.settings = settings

    @property
    def keeps_dense_input(self) -> bool:
        return self.settings.inputs == "dense"

    @property
    def learns_from_pruned_stream(self) -> bool:
        return self.settings.inputs == "pruned"

    def windows(self, plan: LayerPlan) -> tuple[str, ...]:
        """The windows asked for whose submodule this layer prunes."""
        pruned = {"attention": plan.prunes_attention, "mlp": plan.prunes_mlp,
                  "layer": plan.prunes_attention or plan.prunes_mlp}
        return tuple(w for w in self.settings.windows if pruned[w])

    def train(self, problem: WindowProblem) -> TrainedWindow:
        inputs, targets = self._training_pairs(problem)
        names, module = _window_module(problem)
        params = [module.get_parameter(n) for n in names]
        forward = window_forward(problem.window, module, problem.runtime.position_embeddings)
        s, layer = self.settings, problem.layer
        seed = s.seed * 1_000_003 + len(WINDOWS) * layer + WINDOWS.index(problem.window)
        trainer = WindowTrainer(params, forward, s, problem.runtime.device, seed, f"reconstruct:{layer}")
        report = trainer.run(problem.window, inputs, targets)
        return TrainedWindow(report, dict(zip(names, params, strict=True)), forward)

    def _training_pairs(self, p: WindowProblem) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the window: from the pruned stream, or from the dense model's own stream."""
        if self.learns_from_pruned_stream:
            return p.pruned_input, p.dense_output
        d = p.dense_stream
        if p.window == "attention":
            return d.inp, d.mid - d.inp
        if p.window == "layer":
            return d.inp, d.out - d.inp
        return d.mid, d.out - d.mid


WINDOW_PARTS = {"attention": ("self_attn", "input_layernorm"), "mlp": ("mlp", "post_attention_layernorm"),
                 "layer": ("self_attn", "input_layernorm", "mlp", "post_attention_layernorm")}


def _window_module(p: WindowProblem) -> tuple[list[str], torch.nn.Module]:
    """A float32 copy of the pruned layer's window (submodule and its norm) on the compute device, as written so
    far; returns its parameter names (relative to the layer) and the layer module holding it."""
    with torch.device("meta"):
        layer = adapter_of(p.config).layer_module(p.config, p.layer)
    prefix = LAYER_PREFIX.format(p.layer)
    state = {}
    for part in WINDOW_PARTS[p.window]:
        for name, _ in layer.get_submodule(part).named_parameters(prefix=part):
            state[name] = p.weights[prefix + name].to(p.runtime.device, torch.float32, copy=True)  # never an alias
    layer.load_state_dict(state, strict=False, assign=True)
    return list(state), layer


def window_forward(window: str, layer: torch.nn.Module, position_embeddings: tuple[torch.Tensor, torch.Tensor]
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The window's contribution to the residual stream, as a function of its input."""
    if window == "mlp":
        return lambda x: layer.mlp(layer.post_attention_layernorm(x))
    cos, sin = (t.float() for t in position_embeddings)
    if window == "layer":
        return lambda x: layer(x, position_embeddings=(cos, sin)) - x
    return lambda x: layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=(cos, sin),
                                     attention_mask=None)[0]


__all__ = ["WINDOWS", "WINDOW_PARTS", "GradientReconstruction", "ReconstructionSettings", "TrainedWindow",
           "WindowProblem", "WindowReport", "WindowTrainer", "dimension_weights", "split_rows", "window_forward"]


# ----------------------------------------------------------------------------------------------
# Memory (docs/method.md "Reconstruction by gradient", memory): what one window adds to the engine
# ----------------------------------------------------------------------------------------------

FLOAT32 = 4
def bytes_per_trained_param(settings: ReconstructionSettings) -> int:
    """Device bytes per trainable parameter: the float32 weight and its gradient, the optimiser's state (Adam: two
    moments, RMSprop: one) and, with an anchor, a float32 copy of the closed-form weight."""
    state = 2 if settings.optimizer == "adam" else 1
    return FLOAT32 * (2 + state + (1 if settings.anchor > 0 else 0))


@dataclass(frozen=True)
class WindowSizes:
    """A pruned layer's sizes as reconstruction sees them."""

    hidden: int
    heads: int  # query heads kept
    kv_heads: int
    head_dim: int
    intermediate: int  # FFN channels kept
    dense_mlp_params: int  # the dense FFN, still resident (compute dtype) while the attention window trains

    def attention_params(self) -> int:
        c, d = self.hidden, self.head_dim
        return c * d * (2 * self.heads + 2 * self.kv_heads) + c  # q, o, k, v; the input norm (biases ignored)

    def mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate + self.hidden


@dataclass(frozen=True)
class ReconstructionMemory:
    """Peak bytes on the compute device while one layer's windows train (engine states included), and the
    host copy of the best weights. `parts` names each term of the larger window's peak."""

    device_bytes: int
    host_bytes: int
    window: str
    parts: dict

    def describe(self) -> str:
        gib = 2**30
        return ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in self.parts.items())


def stream_copies(settings: ReconstructionSettings, dense_target: bool) -> int:
    """(sequences x tokens x hidden) float32 tensors resident during a window: the pruned stream, the window's
    input on it, and either the dense window output on it (pruned inputs) or the dense stream's input, middle,
    output and the window's target on it (dense inputs)."""
    copies = 3 if settings.inputs == "pruned" else 6
    if dense_target and settings.inputs == "pruned":
        copies += 2  # --target dense keeps the dense stream and its middle states as well
    return copies


def activation_bytes(window: str, sizes: WindowSizes, batch: int, seqlen: int) -> int:
    """Tensors autograd keeps for one step's backward, doubled for the gradients flowing back."""
    tokens = batch * seqlen
    c, d = sizes.hidden, sizes.head_dim
    if window == "mlp":
        per_token = 2 * c + 4 * sizes.intermediate  # input, normed input, gate, up, act(gate), product
        return 2 * FLOAT32 * tokens * per_token
    per_token = 2 * c + d * (3 * sizes.heads + 5 * sizes.kv_heads) + c  # norm, q/k/v, rotated, repeated kv, output
    scores = batch * sizes.heads * seqlen * seqlen  # attention probabilities (the math kernel keeps them)
    return 2 * FLOAT32 * (tokens * per_token + scores)


def reconstruction_memory(sizes: WindowSizes, settings: ReconstructionSettings, nsamples: int, seqlen: int,
                          compute_bytes: int, dense_target: bool = False) -> ReconstructionMemory:
    """The larger of the windows' peaks. Each window holds its float32 weights with their gradient and the
    optimiser state (`bytes_per_trained_param`: 16 bytes a parameter with Adam), the calibration streams
    (`stream_copies`) and one step's activations; the attention window also overlaps the dense FFN, which is
    released only after it."""
    streams = stream_copies(settings, dense_target) * nsamples * seqlen * sizes.hidden * FLOAT32
    best: tuple[int, str, dict, int] | None = None
    for window in settings.windows:
        params = {"attention": sizes.attention_params(), "mlp": sizes.mlp_params(),
                  "layer": sizes.attention_params() + sizes.mlp_params()}[window]
        activations = sum(activation_bytes(w, sizes, settings.batch, seqlen)
                          for w in (("attention", "mlp") if window == "layer" else (window,)))
        parts = {"weights+grads+optimiser": bytes_per_trained_param(settings) * params, "streams": streams,
                 "activations": activations}
        if window == "attention":
            parts["dense FFN"] = sizes.dense_mlp_params * compute_bytes
        total = sum(parts.values())
        if best is None or total > best[0]:
            best = (total, window, parts, FLOAT32 * params)
    if best is None:
        return ReconstructionMemory(0, 0, "", {})
    total, window, parts, host = best
    return ReconstructionMemory(total, host, window, parts)
