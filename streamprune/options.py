"""The pruning options, declared once.

`PruneOptions` is the schema: each field carries its default, its help text, its command-line spelling,
its allowed values and whether it changes results or only speed. From it come `streamprune run`'s flags
(`cli.run_options`), the batch manifest's columns, types and checks (`batch/manifest.py`), the Python API
(`streamprune.prune(..., **options)`) and the run fingerprint that decides whether a run can resume.
Nothing else holds a default or a range for these options.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

from .errors import StreamPruneError

if typing.TYPE_CHECKING:
    from .allocation import AllocationSettings
    from .method_parts import MethodSwitches
    from .reconstruction import ReconstructionSettings


@dataclass(frozen=True)
class OptionInfo:
    """What the schema knows about one option beyond its type and default."""

    help: str
    flag: str | None = None  # command-line spelling when it is not --field-name (--layers, --no-greedy)
    choices: tuple[str, ...] | None = None
    low: float | None = None  # allowed range; `low_open` / `high_open` exclude the bound itself
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    speed_only: bool = False  # changes speed or memory, not the output (beyond float summation order)


def _option(default=dataclasses.MISSING, **info) -> typing.Any:
    return field(default=default, metadata={"info": OptionInfo(**info)})


@dataclass
class PruneOptions:
    """Everything that decides the output of `streamprune run`."""

    ratio: float = _option(
        help="Fraction of the model's TOTAL parameters to remove (0.2 = 20 %; 0 passes the model through "
             "unchanged).", low=0, high=1, high_open=True)
    calib: str = _option(
        "wikitext:wikitext-2-raw-v1:train",
        help="Calibration text: a .txt/.jsonl/.json/.parquet file, a datasets spec 'name[:config][:split]' "
             "(needs the Hub; offline, use builtin or a file), 'builtin' (about 33k tokens of public-domain English "
             "prose shipped with streamprune), 'self' to sample text from the model itself (loads the whole model; "
             "for models that fit in memory), 'random' (random token ids: speed benchmarks only, no tokenizer "
             "needed), or a mixture A+B that draws an equal share of the windows from each.")
    nsamples: int = _option(128, low=1,
                            help="Calibration sequences (the least-squares refit needs more tokens than channels).")
    seqlen: int = _option(128, low=2, help="Tokens per calibration sequence.")
    seed: int = _option(0, help="Seed for calibration sampling.")
    device: str = _option("auto", help="auto (the first CUDA GPU when one is present, else the CPU), cpu, cuda or "
                                       "cuda:N.")
    dtype: str = _option("auto", help="Compute dtype: auto (float16 on CUDA, float32 on CPU), float32, float16, "
                                      "bfloat16. Statistics are always accumulated in float64.")
    alpha: float | None = _option(None, help="Softmax temperature of the layer ratios [default: 10 below 35 %, "
                                             "else 7].")
    num_pruned_layers: int | None = _option(
        None, flag="--layers", low=1,
        help="Number of layers to prune (most redundant first) [default: 26/32 of the layers at 20 %, 30/32 at "
             "50 %, interpolated].")
    gqa_mode: str = _option(
        "heads", choices=("heads", "groups"),
        help="Grouped-query attention: prune the same number of query heads in every KV group (heads) or whole "
             "KV groups with their k/v heads (groups).")
    greedy: bool = _option(True, flag="--no-greedy", help="Ablation: skip the greedy head-swap search.")
    feature_space: bool = _option(
        True, flag="--no-feature-space",
        help="Ablation: score FFN channels by plain down-vector norms instead of the PCA basis.")
    uniform: bool = _option(False, help="Ablation: same ratio in every layer (skips the dense pass).")
    attention_scale: float | None = _option(
        None, low=0,
        help="A layer at ratio r prunes a share min(attention_scale * r, 1) of its attention heads and r of its "
             "FFN channels (0 keeps every head) [default: 0 below 35 %, else 0.75; the paper: 1].")
    channel_multiple: int = _option(
        1, low=1,
        help="Prune each layer's FFN to a multiple of N channels (e.g. 64, 128, 256: widths GPU kernels, tensor "
             "parallelism and DeciLM's ffn_mult take without padding; `export --format decilm --ffn-multiple 256` "
             "then pads nothing). The parameter target is met to within N channels' parameters; a layer left "
             "unpruned keeps its dense width. Attention heads are not affected: a head is already a block of "
             "head_dim (64 or 128) rows (docs/method.md \"Channel multiple\"). Measured on SmolLM2, 3 seeds: "
             "256 took held-out perplexity from 1.765x to 1.783x dense at 20 % and 6.28x to 6.38x at 50 %; 64 "
             "costs less than the seed spread (docs/results.md).")
    split: str = _option(
        "fixed", choices=("fixed", "search"),
        help="How each layer's budget is split between attention heads and FFN channels: fixed by "
             "--attention-scale, or search: the layer is pruned once per candidate split of the same budget "
             "(up to 5) and the one whose output is closest to the dense layer's is kept (better held-out "
             "quality at 20-50 % in docs/results.md; costs one extra prune of each layer per candidate).")
    split_samples: int = _option(
        0, low=0,
        help="Calibration sequences the --split search tries its candidates on: 0 for all of them, or an evenly "
             "spaced subset of that many, after which the chosen split is pruned once on all sequences (less time "
             "and memory per candidate).")
    regression: bool = _option(True, flag="--no-regression",
                               help="Ablation: no linear-regression recovery of o_proj / down_proj.")
    recovery: str = _option(
        "lstsq", choices=("lstsq", "affine"),
        help="Recovery of o_proj / down_proj: a least-squares refit of every kept weight (lstsq) or the paper's "
             "per-row a*y+b (affine).")
    damping: float = _option(0.1, low=0, low_open=True,  # measured: docs/results.md
                             help="Ridge of the least-squares recovery, relative to the mean diagonal of the Gram.")
    target: str = _option(
        "pruned", choices=("pruned", "dense"),
        help="What the least-squares recovery fits: each sub-layer's dense output on the pruned model's own "
             "hidden states (pruned), or the dense model's hidden states (dense: also corrects error carried in "
             "from earlier layers; one more dense forward per layer).")
    protect_lowest: float = _option(
        0.0, low=0, high=1, high_open=True,
        help="Never prune this fraction of the lowest-scored FFN channels (the official SlimLLM code uses 0.01).")
    selection: str = _option(
        "slimllm", choices=("slimllm", "refit"),
        help="How heads and FFN channels are chosen: SlimLLM's scores (Pearson similarity for heads, PCA feature "
             "space for channels) or by the error left after the least-squares refit (refit, optimal-brain-"
             "surgeon style).")
    reconstruct: str = _option(
        "off", choices=("off", "mlp", "attention", "both", "layer"),
        help="Gradient reconstruction after the closed form: train the kept weights of each pruned FFN (mlp), "
             "attention (attention) or both, one submodule at a time, or of the whole decoder layer at once "
             "(layer), toward the dense submodule's output; "
             "the closed form is kept where it is better on held-out calibration sequences "
             "(docs/method.md \"Reconstruction by gradient\"). Measured on SmolLM2 (3 seeds): at 50 % both took "
             "held-out perplexity from 6.28x to 5.94x dense at 4.5x the pruning time on a 2-core CPU; at 20 % "
             "nothing measurable on 128 sequences, but with --nsamples 512 --reconstruct mlp --reconstruct-epochs 4 "
             "1.73x -> 1.69x against the closed form on the same 512, better on every source and seed "
             "(docs/results.md). Worth it on a GPU, with as much calibration text as memory allows.")
    reconstruct_inputs: str = _option(
        "dense", choices=("dense", "pruned"),
        help="What reconstruction learns from: the dense model's own stream (the dense submodule's inputs and "
             "outputs; one more dense forward per layer) or the pruned stream's inputs with the dense "
             "submodule's outputs on them.")
    reconstruct_epochs: int = _option(8, low=0, help="Reconstruction epochs over the training sequences (0: none).")
    reconstruct_lr: float = _option(1e-3, low=0, help="Learning rate of the reconstruction (cosine decay to 0).")
    reconstruct_optimizer: str = _option(
        "adam", choices=("adam", "rmsprop"),
        help="Reconstruction optimiser: Adam, or RMSprop (Wanda++'s regional optimisation; one state tensor instead "
             "of two, so 12 instead of 16 bytes a trained parameter).")
    reconstruct_anchor: float = _option(
        0.0, low=0,
        help="Pull the trained weights back toward the closed form after every step: theta -= lr * anchor * "
             "(theta - theta_closed_form), AdamW's decay centred on the closed form (0: none; costs 4 bytes a "
             "trained parameter).")
    reconstruct_batch: int = _option(8, low=1, help="Calibration sequences per reconstruction step.")
    reconstruct_val_every: int = _option(
        5, low=0,
        help="Every Nth calibration sequence is held out to pick the best epoch and to fall back to the closed "
             "form (0 or 1: none held out, the training error decides).")
    batch_size: int = _option(8, low=1, speed_only=True,
                              help="Calibration sequences per forward (memory vs speed; results differ only by "
                                   "rounding).")
    prefetch: bool = _option(True, flag="--no-prefetch", speed_only=True,
                             help="Read each layer only when needed instead of overlapping the read with compute.")

    def switches(self) -> MethodSwitches:
        from .method_parts import MethodSwitches  # imports torch: not needed to build the command line

        # By name, so a method option is one PruneOptions field plus one MethodSwitches field; the reconstruction
        # settings are the one field assembled from several options.
        names = [f.name for f in dataclasses.fields(MethodSwitches) if f.name != "reconstruction"]
        return MethodSwitches(**{n: getattr(self, n) for n in names}, reconstruction=self.reconstruction())

    def allocation_settings(self) -> AllocationSettings:
        from .allocation import AllocationSettings  # imports torch: not needed to build the command line

        # By name, as switches(): an allocation option is one PruneOptions field plus one AllocationSettings field.
        return AllocationSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AllocationSettings)})

    def reconstruction(self) -> ReconstructionSettings | None:
        """The reconstruction settings, or None when --reconstruct is off."""
        if self.reconstruct == "off":
            return None
        from .reconstruction import WINDOWS, ReconstructionSettings

        windows = WINDOWS[:2] if self.reconstruct == "both" else (self.reconstruct,)
        return ReconstructionSettings(windows, self.reconstruct_inputs, self.reconstruct_epochs, self.reconstruct_lr,
                                      self.reconstruct_batch, self.reconstruct_val_every, self.seed,
                                      optimizer=self.reconstruct_optimizer, anchor=self.reconstruct_anchor)

    def keeps_dense_stream(self) -> bool:
        """Whether pass 2 carries the dense model's hidden states beside the pruned ones."""
        dense_inputs = self.reconstruct != "off" and self.reconstruct_inputs == "dense"
        return self.switches().dense_target or dense_inputs

    def validate(self) -> None:
        """Raise a one-line StreamPruneError naming the first option out of its allowed values."""
        check_options(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if self.split_samples and self.split != "search":
            raise StreamPruneError(f"--split-samples {self.split_samples} applies to --split search only; "
                                   "add --split search or drop --split-samples")

    def result_options(self) -> dict:
        """The options that decide the output (what a finished or resumable run must match)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in SPEED_ONLY}


# SlimLLM as published (docs/method.md "The paper's figures"): its calibration size, its per-row a*y+b
# recovery, its scores.
# `streamprune run --paper` and `prune(..., **PAPER_METHOD)` select it.
PAPER_METHOD = {"nsamples": 32, "recovery": "affine", "selection": "slimllm", "target": "pruned",
                "protect_lowest": 0.0, "attention_scale": 1.0, "split": "fixed",
                "reconstruct": "off"}


def info(f: dataclasses.Field) -> OptionInfo:
    return f.metadata["info"]


def fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(PruneOptions)


def cli_flag(f: dataclasses.Field) -> str:
    """`--layers`, `--no-greedy`, or `--field-name`."""
    return info(f).flag or "--" + f.name.replace("_", "-")


def plain_type(f: dataclasses.Field) -> type:
    """The type a value converts to: `float | None` -> float."""
    hint = typing.get_type_hints(PruneOptions)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def check_value(f: dataclasses.Field, value: object) -> str | None:
    """What is wrong with `value` for option `f` ('must be one of ...'), or None when it is allowed."""
    meta = info(f)
    if value is None:
        return None
    if meta.choices and value not in meta.choices:
        return f"must be one of {', '.join(meta.choices)}, got {value!r}"
    too_low = meta.low is not None and (value <= meta.low if meta.low_open else value < meta.low)
    too_high = meta.high is not None and (value >= meta.high if meta.high_open else value > meta.high)
    if too_low or too_high:
        return f"must be {describe_range(meta)}, got {value}"
    return None


def option_problem(name: str, value: object) -> str | None:
    """'--seqlen must be at least 2, got 1' when `value` is not allowed for option `name`, else None.

    For code that takes one option outside `PruneOptions` (calibration, evaluation), so its range
    is still written only here.
    """
    f = next(f for f in fields() if f.name == name)
    problem = check_value(f, value)
    return None if problem is None else f"{cli_flag(f)} {problem}"


def check_options(**values: object) -> None:
    """Raise a one-line StreamPruneError for the first of these options out of its range (commands that take
    a few schema options without building PruneOptions, such as `demo`)."""
    for name, value in values.items():
        problem = option_problem(name, value)
        if problem:
            raise StreamPruneError(problem)


def describe_range(meta: OptionInfo) -> str:
    """'at least 0 and below 1', 'above 0', ..."""
    parts = []
    if meta.low is not None:
        parts.append(f"{'above' if meta.low_open else 'at least'} {meta.low:g}")
    if meta.high is not None:
        parts.append(f"{'below' if meta.high_open else 'at most'} {meta.high:g}")
    return " and ".join(parts)


SPEED_ONLY = tuple(f.name for f in fields() if info(f).speed_only)
CHOICES = {f.name: info(f).choices for f in fields() if info(f).choices}
