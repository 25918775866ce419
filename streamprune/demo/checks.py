"""The demo's quick checks on a loaded model: multiple-choice items by log-likelihood, and sampling.

Both load the whole model (the demo's is small); perplexity, KL and agreement stay layer-streamed in
`evaluation.py`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import StreamPruneError

DEMO_CHOICES = Path(__file__).parents[1] / "data" / "demo_choices.jsonl"
PROMPT = "Write a short paragraph about why people enjoy walking by the sea."
# How people usually sample from a chat model (the defaults of common chat front ends).
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}


@dataclass
class ChoiceItem:
    context: str
    choices: list[str]
    answer: int


@dataclass
class Completion:
    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def load_choice_items(path: Path = DEMO_CHOICES) -> list[ChoiceItem]:
    """The items of a JSON-lines file: {"context": ..., "choices": [...], "answer": index}."""
    items = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            item = ChoiceItem(str(row["context"]), [str(c) for c in row["choices"]], int(row["answer"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StreamPruneError(f"{path} line {number}: not a multiple-choice item ({exc})") from None
        if not 0 <= item.answer < len(item.choices):
            raise StreamPruneError(f"{path} line {number}: answer {item.answer} is not one of the choices")
        items.append(item)
    return items


def _encode_pairs(tokenizer, items: list[ChoiceItem]) -> tuple[list[list[int]], list[int]]:
    """Token ids of every context + choice, and where each choice's tokens start.

    The context is encoded on its own and the choice's ids are what the full string adds after it, so
    a merge across the boundary (rare: choices start with a space) is charged to the choice.
    """
    sequences, starts = [], []
    for item in items:
        context = tokenizer(item.context)["input_ids"]
        for choice in item.choices:
            full = tokenizer(item.context + choice)["input_ids"]
            common = next((i for i, (a, b) in enumerate(zip(context, full, strict=False)) if a != b),
                          min(len(context), len(full)))
            sequences.append(full)
            starts.append(max(common, 1))  # the first token has no prediction
    return sequences, starts


@torch.no_grad()
def choice_log_likelihoods(model, tokenizer, items: list[ChoiceItem], batch_size: int = 32,
                           quiet: bool = True, desc: str = "multiple choice") -> list[list[float]]:
    """Sum of log p(choice tokens | context) for every choice of every item (right-padded batches)."""
    sequences, starts = _encode_pairs(tokenizer, items)
    device = next(model.parameters()).device
    scores: list[float] = []
    for lo in tqdm(range(0, len(sequences), batch_size), desc=desc, unit="batch", disable=quiet):
        batch, first = sequences[lo: lo + batch_size], starts[lo: lo + batch_size]
        width = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).cpu()
        for row, seq in enumerate(batch):
            positions = torch.arange(first[row], len(seq))
            scores.append(float(logp[row, positions - 1, torch.tensor(seq)[positions]].sum()))
    out, k = [], 0
    for item in items:
        out.append(scores[k: k + len(item.choices)])
        k += len(item.choices)
    return out


def choice_accuracy(model, tokenizer, items: list[ChoiceItem], quiet: bool = True,
                    desc: str = "multiple choice") -> int:
    """How many items the model answers right (the choice with the highest log-likelihood)."""
    scores = choice_log_likelihoods(model, tokenizer, items, quiet=quiet, desc=desc)
    return sum(max(range(len(s)), key=s.__getitem__) == item.answer for s, item in zip(scores, items, strict=True))


class _TokenProgress:
    """A `generate` streamer that only advances a progress bar (the first call is the prompt)."""

    def __init__(self, bar: tqdm):
        self.bar, self.prompt_seen = bar, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.bar.update(1)
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()


def prompt_ids(tokenizer, prompt: str = PROMPT) -> torch.Tensor:
    """The prompt as a chat turn when the tokenizer has a chat template (instruct models), else plain text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return torch.as_tensor(ids).reshape(1, -1)


@torch.no_grad()
def sample_completion(model, tokenizer, prompt: str = PROMPT, max_new_tokens: int = 64, seed: int = 0,
                      quiet: bool = True, desc: str = "generation") -> Completion:
    """One seeded sampled completion (SAMPLING settings), timed: prompt processing plus every new token."""
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt).to(device)
    torch.manual_seed(seed)
    bar = tqdm(total=max_new_tokens, desc=desc, unit="token", disable=quiet)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         pad_token_id=pad, streamer=_TokenProgress(bar), **SAMPLING)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return Completion(tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.numel()), seconds)
