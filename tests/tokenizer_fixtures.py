"""Tiny offline tokenizers for tests (no Hub access).

`make_tiny_tokenizer` builds a byte-level BPE tokenizer shaped like LLaMA's:
``<unk>`` = 0, ``<s>`` (BOS) = 1, ``</s>`` (EOS) = 2, then the 256 byte symbols, then BPE merges
trained on a small built-in English corpus. Byte-level means any text (unicode, emoji, code) encodes
without out-of-vocabulary tokens. Like LLaMA, encoding with ``add_special_tokens=True`` prepends BOS.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# Specials plus the 256 byte symbols: the smallest byte-level vocabulary possible.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

_CORPUS = """\
The quick brown fox jumps over the lazy dog. Structured pruning removes whole attention heads and
feed-forward channels from a transformer, so the pruned model is smaller and faster on any hardware.
Calibration data is a small sample of ordinary text that is run through the model to measure which
heads and channels matter most. Large language models are trained on web pages, books, code, and
encyclopedia articles; a few hundred sequences of such text are usually enough for calibration.
Layer streaming keeps only one decoder layer in memory at a time, which lets a laptop prune a model
that is far larger than its memory. The engine records activations, scores every group of weights,
drops the least important ones, and writes the smaller layer back to disk before loading the next.
Once upon a time there was a little village by the sea where fishermen mended their nets every
morning and children played on the sand until the sun went down behind the distant hills.
In mathematics, a matrix is a rectangular array of numbers arranged in rows and columns; matrix
multiplication is the most important operation in neural network inference and training.
Weather today: cloudy with occasional showers in the morning, clearing in the afternoon, with a
light breeze from the west and temperatures between twelve and eighteen degrees.
def add(a, b):
    return a + b
print("hello, world!")  # numbers 0 1 2 3 4 5 6 7 8 9 and symbols @ # $ % ^ & * ( ) [ ] { }
"""


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    # Training takes a few milliseconds, but tests call this a lot; cache the serialized result and
    # rebuild a fresh object per call so one test mutating its tokenizer cannot leak into another.
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer)
    # LLaMA semantics: a plain encode prepends BOS and never appends EOS.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tok.to_str()


def make_tiny_tokenizer(vocab_size: int = 256, *, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with BOS/EOS/UNK like LLaMA.

    ``len(tokenizer)`` is ``max(vocab_size, MIN_VOCAB_SIZE)`` (259) for sizes the built-in corpus can
    support (up to ~790); a larger request stops when the corpus runs out of merges.
    ``add_bos=False`` keeps the BOS token defined but never prepends it (Qwen / GPT-2 style encoding).
    """
    tok = Tokenizer.from_str(_trained_tokenizer_json(max(vocab_size, MIN_VOCAB_SIZE)))
    if not add_bos:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=2048,
    )


def save_tiny_tokenizer(dest: str | Path, vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """Build the tiny tokenizer, ``save_pretrained`` it to ``dest`` and return it."""
    tokenizer = make_tiny_tokenizer(vocab_size)
    tokenizer.save_pretrained(str(dest))
    return tokenizer
