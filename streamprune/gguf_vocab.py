"""A model folder's tokenizer as llama.cpp's GGUF vocabulary keys.

Two kinds are carried, the ones LLaMA-family checkpoints ship:

- byte-level BPE in ``tokenizer.json`` (Llama-3, Qwen2, SmolLM2, GPT-2 style): llama.cpp's ``gpt2``
  tokenizer model with the merges, plus the name of the pre-tokenizer (the regex that splits text
  before BPE). llama.cpp knows pre-tokenizers only by name, so the name is chosen by recognising the
  tokenizer.json's own pre-tokenizer; an unrecognised one is refused rather than guessed, because a
  wrong regex tokenizes some text differently and the model then sees other tokens than it was
  trained on.
- SentencePiece ``tokenizer.model`` (LLaMA-1/2, Mistral): llama.cpp's ``llama`` tokenizer model with
  the pieces, their scores and types, read with the ``sentencepiece`` package.

Special tokens, whether BOS/EOS are added, and the chat template come from the tokenizer as
transformers loads it, so llama.cpp encodes a prompt the way transformers does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StreamPruneError

# tokenizer.json Split patterns -> llama.cpp pre-tokenizer names whose regex is the same split
# (llama-vocab.cpp: "llama-bpe" -> LLAMA3, "qwen2" -> QWEN2; the case-insensitive group is spelled out there).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}

# gguf.TokenType values (kept as ints so this module imports without gguf for error paths).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GGUFVocab:
    """Everything the tokenizer.* keys of a GGUF file need."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def read_vocab(model_dir: Path, vocab_size: int) -> GGUFVocab:
    """The folder's tokenizer, padded with unused tokens to `vocab_size` (the embedding's rows)."""
    from .loading import load_tokenizer

    tokenizer_json = model_dir / "tokenizer.json"
    data = _read_tokenizer_json(tokenizer_json) if tokenizer_json.is_file() else None
    if data is not None and _is_byte_level_bpe(data):
        vocab = _byte_level_bpe(data)
    elif (model_dir / "tokenizer.model").is_file():
        vocab = _sentencepiece(model_dir / "tokenizer.model")
    elif data is not None:
        kind = data.get("model", {}).get("type")
        raise StreamPruneError(
            f"cannot export the tokenizer of {model_dir}: tokenizer.json holds a {kind} model that is not "
            "byte-level BPE, and there is no SentencePiece tokenizer.model"
        )
    else:
        raise StreamPruneError(f"{model_dir} has no tokenizer.json or tokenizer.model to export")
    if len(vocab.tokens) > vocab_size:
        raise StreamPruneError(
            f"the tokenizer has {len(vocab.tokens)} tokens but the embedding only {vocab_size} rows"
        )
    _pad(vocab, vocab_size)
    _add_behaviour(vocab, load_tokenizer(model_dir), vocab_size)
    return vocab


def _read_tokenizer_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StreamPruneError(f"{path} is not valid JSON ({exc})") from None


def _is_byte_level_bpe(data: dict) -> bool:
    model, decoder = data.get("model") or {}, data.get("decoder") or {}
    return model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel"


def _byte_level_bpe(data: dict) -> GGUFVocab:
    model = data["model"]
    by_id: dict[int, str] = {int(i): tok for tok, i in model["vocab"].items()}
    types = {i: NORMAL for i in by_id}
    for added in data.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = CONTROL if added.get("special") else USER_DEFINED
    size = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    token_types = [types.get(i, UNUSED) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return GGUFVocab(model="gpt2", pre=_pre_tokenizer_name(data), tokens=tokens, token_types=token_types,
                     merges=merges)


def _pre_tokenizer_name(data: dict) -> str:
    """llama.cpp's name for the tokenizer.json's pre-tokenizer, recognised from its structure."""
    normalizer = data.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise StreamPruneError(f"cannot export a byte-level tokenizer with a {normalizer.get('type')} normalizer; "
                               "llama.cpp would tokenize text differently")
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("behavior") == "Isolated":
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == r"\p{N}" and steps[1].get("use_regex", True):
            return "smollm"  # digits one by one, then GPT-2's regex
        if pattern in _SPLIT_PRE and not steps[1].get("use_regex", True):
            return _SPLIT_PRE[pattern]
    raise StreamPruneError(
        f"cannot export this byte-level tokenizer: its pre-tokenizer ({json.dumps(pre)[:160]}) is not one "
        "llama.cpp knows by name (GPT-2, Llama-3, Qwen2, SmolLM), so llama.cpp would split text differently"
    )


def _sentencepiece(path: Path) -> GGUFVocab:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise StreamPruneError(
            "exporting a SentencePiece tokenizer (tokenizer.model) needs the sentencepiece package: "
            "pip install sentencepiece"
        ) from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise StreamPruneError(f"cannot read {path} ({exc})") from None
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        types.append(_piece_type(sp, i))
    return GGUFVocab(model="llama", pre=None, tokens=tokens, token_types=types, scores=scores)


def _piece_type(sp, i: int) -> int:
    if sp.IsUnknown(i):
        return UNKNOWN
    if sp.IsControl(i):
        return CONTROL
    if sp.IsUnused(i):
        return UNUSED
    if sp.IsByte(i):
        return BYTE
    return NORMAL


def _pad(vocab: GGUFVocab, vocab_size: int) -> None:
    """Name the embedding rows the tokenizer never produces, so llama.cpp sees one token per row."""
    for i in range(len(vocab.tokens), vocab_size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.token_types.append(UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)


def _add_behaviour(vocab: GGUFVocab, tokenizer, vocab_size: int) -> None:
    """Special ids, BOS/EOS addition and the chat template, as transformers' tokenizer has them."""
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            vocab.special_ids[kind] = token_id
    # Observed rather than read from flags: tokenizers set this in post-processors, configs or code.
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos, eos = vocab.special_ids.get("bos"), vocab.special_ids.get("eos")
    vocab.add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    vocab.add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    template = getattr(tokenizer, "chat_template", None)
    vocab.chat_template = template if isinstance(template, str) else None
