"""Perplexity, KL divergence and top-1 agreement, computed layer by layer.

A model larger than memory is evaluated the way it is pruned: the evaluation windows' hidden states
stay on the host, and each decoder layer is read, applied to every window batch on the compute
device, and freed. With a reference (the dense model) both models advance in lockstep, so their
next-token distributions can be compared at the end without storing any logits.

Protocol (LLM-Pruner / SlimLLM): the whole text is tokenized once and cut into consecutive,
non-overlapping windows of `seqlen` tokens (default 128); the remainder is dropped. Each window is
scored independently; perplexity = exp(mean next-token NLL over all predicted positions).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .architecture import EMBEDDING, FINAL_NORM, folder_config
from .checkpoint import CheckpointReader
from .devices import resolve_device, resolve_dtype
from .errors import StreamPruneError
from .layer_pruning import LayerRuntime, build_layer
from .memory import peak_rss_mb, return_freed_memory_promptly
from .options import option_problem


@dataclass
class EvalResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    kl_from_reference: float | None = None
    top1_agreement: float | None = None
    reference_perplexity: float | None = None  # the reference's own perplexity on the same windows
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def text_windows(text: str, tokenizer, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """(windows, seqlen) ids: the tokenized text cut into consecutive non-overlapping windows."""
    problem = option_problem("seqlen", seqlen)
    if problem:
        raise StreamPruneError(problem)
    # verbose=False: the whole text is longer than the context on purpose; windows are cut below.
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise StreamPruneError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {seqlen}")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


class StreamedModel:
    """A model folder read one decoder layer at a time (dense or pruned)."""

    def __init__(self, model_dir: str | Path):
        self.reader = CheckpointReader(model_dir)
        self.config, self.shape = folder_config(self.reader.config)
        self.config._attn_implementation = "sdpa"
        self.adapter = self.shape.adapter

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.adapter.embed(self.reader.read([EMBEDDING])[EMBEDDING], ids)

    def layer(self, i: int, runtime: LayerRuntime):
        spec = self.config.layer_spec(i)
        return build_layer(self.config, i, self.adapter.read_layer(self.reader, i, spec), runtime, consume=True)

    def head(self, runtime: LayerRuntime) -> tuple[torch.Tensor, torch.Tensor]:
        """Final norm weight and lm_head weight (the embedding when tied) on the compute device."""
        name = self.adapter.output_weight_name(self.shape)
        t = self.reader.read([FINAL_NORM, name])
        return (t[FINAL_NORM].to(runtime.device, runtime.dtype), t[name].to(runtime.device, runtime.dtype))

    def log_probs(self, hidden: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Next-token log-probabilities (float32) from final hidden states."""
        norm_w, lm_w = head
        x = self.adapter.final_norm(hidden, norm_w, self.config.rms_norm_eps)
        return F.log_softmax(F.linear(x, lm_w).float(), dim=-1)


@dataclass(frozen=True)
class EvalSettings:
    """How models are streamed through the compute device: the same for every model of one evaluation."""

    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int = 8  # windows per forward
    quiet: bool = True  # no progress bar
    desc: str = "eval"  # the progress bar's label


@dataclass
class _Totals:
    """Sums over every predicted position, accumulated batch by batch (float64 sums of each batch)."""

    nll: float = 0.0
    reference_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    count: int = 0


def _runtime(model: StreamedModel, device: torch.device, dtype: torch.dtype, seqlen: int,
             batch_size: int) -> LayerRuntime:
    tables = model.adapter.rotary_tables(model.config, seqlen, device, dtype)
    return LayerRuntime(device, dtype, batch_size, tables)


@torch.no_grad()
def _advance(layer, hidden: torch.Tensor, runtime: LayerRuntime) -> None:
    for sl in runtime.batches(hidden.shape[0]):
        x = hidden[sl].to(runtime.device, runtime.dtype)
        hidden[sl] = layer(x, position_embeddings=runtime.position_embeddings).float().to(hidden.device)


@torch.no_grad()
def final_hidden_states(model_dir: str | Path, windows: torch.Tensor,
                        settings: EvalSettings = EvalSettings()) -> torch.Tensor:
    """The last decoder layer's output on `windows` (before the final norm), streamed layer by layer.

    Benchmarks that compare many pruned models with one reference compute this once and pass it to
    `evaluate(..., reference_hidden=...)` instead of re-running the reference every time.
    """
    dev = resolve_device(settings.device)
    model = StreamedModel(model_dir)
    runtime = _runtime(model, dev, resolve_dtype(settings.dtype, dev), windows.shape[1], settings.batch_size)
    hidden = model.embed(windows)
    for i in tqdm(range(model.num_layers), desc=settings.desc, unit="layer", disable=settings.quiet):
        _advance(model.layer(i, runtime), hidden, runtime)
    return hidden


@torch.no_grad()
def evaluate(model_dir: str | Path, windows: torch.Tensor, *, reference_dir: str | Path | None = None,
             reference_hidden: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
             settings: EvalSettings = EvalSettings()) -> EvalResult:
    """Layer-streamed perplexity of `model_dir` on `windows`, plus KL / agreement against a reference.

    `reference_hidden` (from `final_hidden_states` of `reference_dir` on the same windows) skips the
    reference's decoder layers; only its final norm and lm_head are read. `hidden` does the same for
    `model_dir` itself (the demo scores the dense model from the states it keeps as the reference).
    """
    start = time.perf_counter()
    return_freed_memory_promptly()
    dev = resolve_device(settings.device)
    cdtype = resolve_dtype(settings.dtype, dev)
    models = [StreamedModel(model_dir)] + ([StreamedModel(reference_dir)] if reference_dir else [])
    runtimes = [_runtime(m, dev, cdtype, windows.shape[1], settings.batch_size) for m in models]
    given = [hidden, reference_hidden][: len(models)]
    hiddens = [m.embed(windows) if h is None else h for m, h in zip(models, given, strict=True)]
    streamed = [(m, rt, h) for m, rt, h, g in zip(models, runtimes, hiddens, given, strict=True) if g is None]
    _stream_in_lockstep(streamed, settings)
    heads = [m.head(rt) for m, rt in zip(models, runtimes, strict=True)]
    totals = _Totals()
    for sl in runtimes[0].batches(windows.shape[0]):
        _score_batch(totals, windows[sl, 1:].to(dev), models, [h[sl] for h in hiddens], heads)
    return _result(totals, windows, time.perf_counter() - start, with_reference=reference_dir is not None)


def _stream_in_lockstep(streamed: list[tuple[StreamedModel, LayerRuntime, torch.Tensor]],
                        settings: EvalSettings) -> None:
    """Advance each model's hidden states through all its layers, layer i of every model before layer i + 1,
    so that at most one layer of each model is in memory at a time."""
    depth = max((m.num_layers for m, _, _ in streamed), default=0)
    for i in tqdm(range(depth), desc=settings.desc, unit="layer", disable=settings.quiet or not streamed):
        for m, rt, h in streamed:
            if i < m.num_layers:
                layer = m.layer(i, rt)
                _advance(layer, h, rt)
                del layer


def _score_batch(totals: _Totals, targets: torch.Tensor, models: list[StreamedModel], hiddens: list[torch.Tensor],
                 heads: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add one batch of windows: the model's NLL and, with a reference (models[1]), its NLL, KL and agreement."""
    logp = models[0].log_probs(hiddens[0], heads[0])[:, :-1]
    totals.nll += float(-logp.gather(-1, targets[..., None]).double().sum())
    totals.count += targets.numel()
    if len(models) > 1:
        ref = models[1].log_probs(hiddens[1], heads[1])[:, :-1]
        totals.reference_nll += float(-ref.gather(-1, targets[..., None]).double().sum())
        totals.kl += float((ref.exp() * (ref - logp)).sum(-1).double().sum())
        totals.agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())


def _result(totals: _Totals, windows: torch.Tensor, seconds: float, with_reference: bool) -> EvalResult:
    nll = totals.nll / totals.count
    result = EvalResult(perplexity=math.exp(nll), nll=nll, tokens=totals.count, windows=windows.shape[0],
                        seqlen=windows.shape[1], seconds=seconds, peak_rss_mb=peak_rss_mb())
    if with_reference:
        result.kl_from_reference, result.top1_agreement = totals.kl / totals.count, totals.agree / totals.count
        result.reference_perplexity = math.exp(totals.reference_nll / totals.count)
    return result


def load_eval_text(text_file: str | None, dataset: str | None) -> str:
    """The evaluation text: a local file, or a `datasets` spec joined with blank lines (LLM-Pruner style)."""
    if bool(text_file) == bool(dataset):
        raise StreamPruneError("pass exactly one of --text FILE or --dataset NAME")
    if text_file:
        path = Path(text_file)
        if not path.is_file():
            raise StreamPruneError(f"evaluation text {path} not found")
        return path.read_text(encoding="utf-8", errors="replace")
    from .calibration import CalibrationError, load_calibration_text

    try:
        return "\n\n".join(load_calibration_text(dataset))
    except CalibrationError as exc:
        raise StreamPruneError(str(exc)) from None
