"""The demo's multiple-choice scoring and sampled completions, on a tiny model."""

from __future__ import annotations

import pytest
import torch

from streamprune.demo.checks import (
    SAMPLING,
    ChoiceItem,
    choice_accuracy,
    choice_log_likelihoods,
    load_choice_items,
    sample_completion,
)
from streamprune.errors import StreamPruneError
from streamprune.loading import load_pruned, load_tokenizer

ITEMS = [ChoiceItem("The quick brown fox jumps over the", [" lazy dog", " moon", " sea and the sky"], 0),
         ChoiceItem("In mathematics, a matrix is a", [" rectangular array", " fish"], 1)]


@pytest.fixture(scope="module")
def tiny(models):
    folder = models("llama-gqa")
    return load_pruned(folder, dtype=torch.float32), load_tokenizer(folder)


def _one_by_one(model, tokenizer, context: str, choice: str) -> float:
    """log p(choice | context) from one unpadded forward of context + choice."""
    n_context = len(tokenizer(context)["input_ids"])
    ids = torch.tensor([tokenizer(context + choice)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return float(logp[torch.arange(len(targets)), targets][n_context - 1:].sum())


def test_batched_padded_scores_equal_one_forward_per_choice(tiny):
    model, tokenizer = tiny
    scores = choice_log_likelihoods(model, tokenizer, ITEMS, batch_size=3)
    for item, row in zip(ITEMS, scores, strict=True):
        assert len(row) == len(item.choices)
        for choice, got in zip(item.choices, row, strict=True):
            assert got == pytest.approx(_one_by_one(model, tokenizer, item.context, choice), abs=1e-4)


def test_accuracy_counts_the_highest_likelihood_choice(tiny):
    model, tokenizer = tiny
    scores = choice_log_likelihoods(model, tokenizer, ITEMS)
    expected = sum(max(range(len(s)), key=s.__getitem__) == item.answer for s, item in zip(scores, ITEMS, strict=True))
    assert choice_accuracy(model, tokenizer, ITEMS) == expected


def test_item_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "items.jsonl"
    bad.write_text('{"context": "a", "choices": [" b", " c"], "answer": 2}\n')
    with pytest.raises(StreamPruneError, match="line 1: answer 2 is not one of the choices"):
        load_choice_items(bad)
    bad.write_text('{"context": "a"}\n')
    with pytest.raises(StreamPruneError, match="line 1: not a multiple-choice item"):
        load_choice_items(bad)


def test_completion_is_seeded_sampled_and_timed(tiny, monkeypatch):
    model, tokenizer = tiny
    first = sample_completion(model, tokenizer, "Once upon a time", max_new_tokens=12, seed=3)
    again = sample_completion(model, tokenizer, "Once upon a time", max_new_tokens=12, seed=3)
    other = sample_completion(model, tokenizer, "Once upon a time", max_new_tokens=12, seed=4)
    assert first.text == again.text and first.text != other.text
    assert 0 < first.new_tokens <= 12 and first.tokens_per_second > 0
    seen = {}
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.update(kw) or generate(**kw))
    sample_completion(model, tokenizer, "Once upon a time", max_new_tokens=4)
    assert {k: seen[k] for k in SAMPLING} == {"do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                              "repetition_penalty": 1.1}
