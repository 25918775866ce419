"""Calibration sources, token windows and self-generated samples (offline, tiny tokenizer and model)."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from streamprune import calibration
from streamprune.calibration import (
    CalibrationError,
    SelfSampling,
    adds_bos,
    build_calibration_ids,
    describe_source,
    generate_self_calibration,
    load_calibration,
    load_calibration_text,
    parse_dataset_spec,
    token_stream,
)
from streamprune.errors import StreamPruneError
from tests.tokenizer_fixtures import BOS_ID, EOS_ID, make_tiny_tokenizer

DOCS = [
    "Structured pruning removes whole attention heads and feed-forward channels from a transformer.",
    "Once upon a time there was a little village by the sea where fishermen mended their nets.",
    "In mathematics, a matrix is a rectangular array of numbers arranged in rows and columns.",
    "Unicode is fine too: naïve café, 漢字, emoji 😀, and code like print('hi') # done.",
] * 5
NSAMPLES, SEQLEN = 6, 24


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def tok_no_bos():
    return make_tiny_tokenizer(add_bos=False)


def _write(path, content: str):
    path.write_text(content, encoding="utf-8")
    return path


def _write_parquet(path, columns: dict):
    pq.write_table(pa.table(columns), path)
    return path


# ----------------------------------------------------------------------------------------------------
# Tokenizer fixture sanity (other tests rely on it)


def test_tiny_tokenizer_is_byte_level_llama_like(tok, tmp_path):
    text = "Ünïcode 漢字 😀\n\ttabs and CODE();"
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS_ID and EOS_ID not in ids and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(make_tiny_tokenizer(512)) == 512
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------------------------------
# File formats


def test_txt_is_one_document(tmp_path):
    text = "First paragraph.\n\nSecond paragraph.\n"
    assert load_calibration_text(str(_write(tmp_path / "c.txt", text))) == [text]


def test_jsonl_text_field_and_only_string_field(tmp_path):
    rows = [{"text": "alpha", "id": 1}, {"text": ""}, {"text": None}, {"body": "beta", "n": 2}, "gamma"]
    path = _write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_calibration_text(str(path)) == ["alpha", "beta", "gamma"]


# The last case is JSON lines inside a .json file (the datasets json loader accepts it too).
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (json.dumps(["alpha", "beta"]), ["alpha", "beta"]),
        (json.dumps([{"text": "alpha", "meta": 3}, {"text": "beta", "meta": 4}]), ["alpha", "beta"]),
        (json.dumps({"text": "alpha"}), ["alpha"]),
        (json.dumps({"text": "alpha"}) + "\n" + json.dumps({"text": "beta"}), ["alpha", "beta"]),
    ],
)
def test_json_variants(tmp_path, content, expected):
    assert load_calibration_text(str(_write(tmp_path / "c.json", content))) == expected


def test_parquet_text_column_or_only_string_column(tmp_path):
    columns = {"text": ["alpha", None, "beta"], "label": ["x", "y", "z"]}
    with_text = _write_parquet(tmp_path / "a.parquet", columns)
    only_string = _write_parquet(tmp_path / "b.parquet", {"body": ["gamma"], "n": [1]})
    assert load_calibration_text(str(with_text)) == ["alpha", "beta"]
    assert load_calibration_text(str(only_string)) == ["gamma"]


def test_every_format_gives_the_same_ids(tmp_path, tok):
    sources = [
        _write(tmp_path / "c.jsonl", "\n".join(json.dumps({"text": d}) for d in DOCS)),
        _write(tmp_path / "c.json", json.dumps(DOCS)),
        _write_parquet(tmp_path / "c.parquet", {"text": DOCS}),
    ]
    results = [load_calibration(str(s), tok, NSAMPLES, SEQLEN, seed=3) for s in sources]
    for ids in results[1:]:
        assert torch.equal(ids, results[0])


# ----------------------------------------------------------------------------------------------------
# Token stream and windows


def test_token_stream_puts_eos_between_documents_only(tok):
    a, b = (tok(t, add_special_tokens=False)["input_ids"] for t in ("hello world", "second doc"))
    stream = token_stream(["hello world", "", "second doc"], tok).tolist()
    assert stream == a + [EOS_ID] + b
    assert BOS_ID not in stream


def test_long_document_does_not_warn_about_model_max_length(tok, caplog):
    with caplog.at_level(logging.WARNING):
        stream = token_stream([" ".join(DOCS) * 30], tok)
    assert len(stream) > tok.model_max_length
    assert "sequence length" not in caplog.text


def test_windows_shape_dtype_bos_and_vocab(tok):
    ids = build_calibration_ids(DOCS, tok, NSAMPLES, SEQLEN, seed=0)
    assert ids.shape == (NSAMPLES, SEQLEN) and ids.dtype == torch.long
    assert (ids[:, 0] == BOS_ID).all() and not (ids[:, 1:] == BOS_ID).any()
    assert int(ids.min()) >= 0 and int(ids.max()) < len(tok)


def test_windows_are_contiguous_slices_of_the_stream(tok):
    stream = token_stream(DOCS, tok).tolist()
    ids = build_calibration_ids(DOCS, tok, NSAMPLES, SEQLEN, seed=1)
    for row in ids.tolist():
        body = row[1:]
        assert any(stream[i : i + len(body)] == body for i in range(len(stream) - len(body) + 1))


def test_without_bos_windows_are_all_text(tok_no_bos):
    assert tok_no_bos.bos_token_id == BOS_ID and not adds_bos(tok_no_bos)
    ids = build_calibration_ids(DOCS, tok_no_bos, NSAMPLES, SEQLEN, seed=0)
    assert ids.shape == (NSAMPLES, SEQLEN) and not (ids == BOS_ID).any()


def test_deterministic_per_seed_and_different_across_seeds(tok):
    first = build_calibration_ids(DOCS, tok, NSAMPLES, SEQLEN, seed=7)
    assert torch.equal(first, build_calibration_ids(DOCS, tok, NSAMPLES, SEQLEN, seed=7))
    assert not torch.equal(first, build_calibration_ids(DOCS, tok, NSAMPLES, SEQLEN, seed=8))


def test_just_enough_text_works_with_overlap_warning(tok, caplog):
    stream_len = len(token_stream(["a short text"], tok))
    with caplog.at_level(logging.WARNING, logger="streamprune.calibration"):
        ids = build_calibration_ids(["a short text"], tok, 4, stream_len + 1, seed=0)
    assert ids.shape == (4, stream_len + 1)
    assert (ids == ids[0]).all()  # the only possible window, drawn four times
    assert "overlap" in caplog.text


def test_too_short_text_names_the_counts(tok):
    stream_len = len(token_stream(["a short text"], tok))
    with pytest.raises(CalibrationError, match=rf"has {stream_len} tokens.*needs {stream_len + 1} after BOS"):
        build_calibration_ids(["a short text"], tok, 4, stream_len + 2, seed=0)


# ----------------------------------------------------------------------------------------------------
# Errors


def test_calibration_error_is_a_value_error_and_a_streamprune_error():
    assert issubclass(CalibrationError, ValueError) and issubclass(CalibrationError, StreamPruneError)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.txt", None, "not found"),
    ("missing.csv", None, "not found"),
    ("empty.txt", "", "contains no text"),
    ("blank.txt", " \n\n\t\n", "contains no text"),
    ("empty.jsonl", "", "contains no text"),
    ("data.csv", "text\nhello\n", "unknown calibration file type '.csv'"),
    ("bad.jsonl", '{"text": "ok"}\n{oops\n', "line 2 is not valid JSON"),
    ("fields.jsonl", '{"a": "x", "b": "y"}\n', "no 'text' field and 2 string fields"),
    ("numbers.json", "[1, 2]", "row 1 is a int"),
])
def test_file_errors(tmp_path, tok, name, content, message):
    path = tmp_path / name
    if content is not None:
        _write(path, content)
    with pytest.raises(CalibrationError, match=message):
        load_calibration(str(path), tok, 2, 8, seed=0)


def test_folder_and_bad_parquet(tmp_path):
    with pytest.raises(CalibrationError, match="is a folder"):
        load_calibration_text(str(tmp_path))
    no_text = _write_parquet(tmp_path / "n.parquet", {"a": ["x"], "b": ["y"]})
    with pytest.raises(CalibrationError, match="no 'text' column"):
        load_calibration_text(str(no_text))
    with pytest.raises(CalibrationError, match="not a readable parquet"):
        load_calibration_text(str(_write(tmp_path / "junk.parquet", "not parquet")))


@pytest.mark.parametrize(("nsamples", "seqlen", "message"), [
    (0, 16, "--nsamples must be at least 1, got 0"),
    (-3, 16, "--nsamples must be at least 1"),
    (4, 1, "--seqlen must be at least 2, got 1"),
])
def test_size_errors_come_before_loading(tok, nsamples, seqlen, message):
    with pytest.raises(CalibrationError, match=message):
        load_calibration("does-not-matter.txt", tok, nsamples, seqlen, seed=0)


def test_self_is_not_a_text_source():
    with pytest.raises(CalibrationError, match="not a text source"):
        load_calibration_text("self")


def test_unreachable_dataset_fails_fast_offline(monkeypatch, tok):
    import datasets
    import huggingface_hub

    # The Hub libraries read these at import time; patch both the environment and the parsed flags.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(CalibrationError) as info:
        load_calibration("no-such-owner/no-such-dataset:default:train", tok, 2, 8, seed=0)
    message = str(info.value)
    assert "no-such-owner/no-such-dataset" in message and "offline mode" in message
    assert "--calib builtin" in message and "local .txt" in message and "\n" not in message


def _online_mode(monkeypatch):
    import datasets
    import huggingface_hub

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)


def test_unreachable_hub_fails_at_once_naming_the_offline_choices(monkeypatch, tok):
    import time

    _online_mode(monkeypatch)
    monkeypatch.setattr(calibration, "hub_reachable", lambda: False)
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: pytest.fail("load_dataset would retry for 30 s"))
    started = time.perf_counter()
    with pytest.raises(CalibrationError) as info:
        load_calibration("wikitext:wikitext-2-raw-v1:train", tok, 2, 8, seed=0)
    assert time.perf_counter() - started < 1
    message = str(info.value)
    assert message.startswith("cannot reach the Hugging Face Hub to load dataset 'wikitext:wikitext-2-raw-v1:train'")
    assert "--calib builtin" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message


def test_offline_mode_does_not_probe_the_hub(monkeypatch, tok):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(calibration, "hub_reachable", lambda: pytest.fail("probed the Hub in offline mode"))
    with pytest.raises(CalibrationError, match="--calib builtin"):
        load_calibration("no-such-owner/no-such-dataset", tok, 2, 8, seed=0)


def test_hub_probe_is_one_quick_request(monkeypatch):
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once, no network
    started = time.perf_counter()
    assert calibration.hub_reachable(timeout=2) is False
    assert time.perf_counter() - started < 2.5


# ----------------------------------------------------------------------------------------------------
# datasets specs (load_dataset replaced by an in-memory Dataset: no network)


@pytest.mark.parametrize(("spec", "expected"), [
    ("wikitext", ("wikitext", None, "train")),
    ("wikitext:wikitext-2-raw-v1", ("wikitext", "wikitext-2-raw-v1", "train")),
    ("wikitext:wikitext-2-raw-v1:validation", ("wikitext", "wikitext-2-raw-v1", "validation")),
    ("allenai/c4:en:train[:1000]", ("allenai/c4", "en", "train[:1000]")),
    ("allenai/c4:validation", ("allenai/c4", None, "validation")),
    ("c4:train[10%:20%]", ("c4", None, "train[10%:20%]")),
])
def test_parse_dataset_spec(spec, expected):
    assert parse_dataset_spec(spec) == expected


def test_bad_dataset_spec():
    with pytest.raises(CalibrationError, match="bad datasets spec"):
        parse_dataset_spec("a:b:c:d")


def _fake_load_dataset(monkeypatch, columns: dict) -> list:
    import datasets

    calls = []

    def fake(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict(columns)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return calls


def test_dataset_documents_and_spec_passed_through(monkeypatch):
    calls = _fake_load_dataset(monkeypatch, {"text": ["alpha", "", "beta"], "url": ["u1", "u2", "u3"]})
    assert load_calibration_text("allenai/c4:en:validation[:3]") == ["alpha", "beta"]
    assert calls == [("allenai/c4", "en", "validation[:3]")]


def test_wikitext_lines_are_one_stream(monkeypatch):
    _fake_load_dataset(monkeypatch, {"text": [" = Title = \n", "", " First line .\n", " Second .\n"]})
    assert load_calibration_text("wikitext:wikitext-2-raw-v1") == [" = Title = \n First line .\n Second .\n"]


# ----------------------------------------------------------------------------------------------------
# describe_source


def test_describe_source(tmp_path):
    path = _write(tmp_path / "wiki.txt", "x" * 1_200_000)
    assert describe_source(str(path)) == "file wiki.txt (1.2 MB)"
    assert describe_source(str(_write(tmp_path / "s.txt", "abc"))) == "file s.txt (3 B)"
    assert describe_source(str(tmp_path / "gone.jsonl")) == "file gone.jsonl (missing)"
    assert describe_source("wikitext:wikitext-2-raw-v1") == "datasets wikitext wikitext-2-raw-v1 split train"
    assert describe_source("self") == "self-generated samples from the model"


# ----------------------------------------------------------------------------------------------------
# Self-generated calibration


def _save_tiny_llama(path, tokenizer, extra_vocab: int = 0):
    config = LlamaConfig(
        vocab_size=len(tokenizer) + extra_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tok):
    # 13 padding rows past the tokenizer, as real checkpoints pad the embedding to a round size.
    return _save_tiny_llama(tmp_path_factory.mktemp("llama"), tok, extra_vocab=13)


def test_self_calibration_shape_dtype_determinism(tiny_llama, tok):
    in_pairs = SelfSampling(batch_size=2)
    ids = generate_self_calibration(tiny_llama, tok, nsamples=5, seqlen=12, seed=0, sampling=in_pairs)
    assert ids.shape == (5, 12) and ids.dtype == torch.long and ids.device.type == "cpu"
    assert (ids[:, 0] == BOS_ID).all() and not (ids[:, 1:] == BOS_ID).any()
    assert int(ids.max()) < len(tok)  # never the embedding's padding rows
    assert torch.equal(ids, generate_self_calibration(tiny_llama, tok, 5, 12, seed=0, sampling=in_pairs))
    assert not torch.equal(ids, generate_self_calibration(tiny_llama, tok, 5, 12, seed=1, sampling=in_pairs))
    assert len({tuple(row) for row in ids.tolist()}) > 1  # samples differ from each other


def test_self_calibration_random_first_token_without_bos(tiny_llama, tok_no_bos):
    ids = generate_self_calibration(tiny_llama, tok_no_bos, nsamples=6, seqlen=8, seed=0)
    assert ids.shape == (6, 8)
    specials = set(tok_no_bos.all_special_ids)
    assert not specials & set(ids[:, 0].tolist())
    assert len(set(ids[:, 0].tolist())) > 1
    assert torch.equal(ids, generate_self_calibration(tiny_llama, tok_no_bos, 6, 8, seed=0))


def test_self_calibration_errors(tmp_path, tiny_llama, tok):
    with pytest.raises(CalibrationError, match="temperature must be > 0"):
        generate_self_calibration(tiny_llama, tok, 2, 8, seed=0, sampling=SelfSampling(temperature=0.0))
    with pytest.raises(CalibrationError, match="--nsamples must be at least 1"):
        generate_self_calibration(tiny_llama, tok, 0, 8, seed=0)
    with pytest.raises(CalibrationError, match="cannot load the model"):
        generate_self_calibration(tmp_path / "nope", tok, 2, 8, seed=0)


def test_self_calibration_samples_every_sequence_at_once_with_a_progress_bar(tiny_llama, tok, monkeypatch, capsys):
    """One batch by default: seqlen - 1 decoding steps in all, each for every sample (the KV cache holds the rest)."""
    batches: list[int] = []
    load = calibration._load_model

    def counting_model(model_dir, device):
        model = load(model_dir, device)
        model.register_forward_pre_hook(lambda module, args, kwargs: batches.append(kwargs["input_ids"].shape),
                                        with_kwargs=True)
        return model

    monkeypatch.setattr(calibration, "_load_model", counting_model)
    ids = generate_self_calibration(tiny_llama, tok, nsamples=6, seqlen=9, seed=0, sampling=SelfSampling(quiet=False))
    assert ids.shape == (6, 9)
    assert batches == [torch.Size([6, 1])] * 8
    assert "calibration (sampling from the model)" in capsys.readouterr().err
    # Batching only changes the order of the random draws, never the kind of sample.
    split = generate_self_calibration(tiny_llama, tok, nsamples=6, seqlen=9, seed=0,
                                      sampling=SelfSampling(batch_size=2))
    assert split.shape == ids.shape and (split[:, 0] == BOS_ID).all()


# ----------------------------------------------------------------------------------------------------
# Mixtures "A+B"


def test_mixture_draws_equal_shares_in_order(tmp_path, tiny_llama, tok):
    a = _write(tmp_path / "a.txt", "\n\n".join(DOCS[:2] * 10))
    b = _write(tmp_path / "b.txt", "\n\n".join(DOCS[2:4] * 10))
    ids = calibration.calibration_ids(f"{a}+{b}+self", tok, 7, SEQLEN, seed=4, model_dir=tiny_llama)
    assert ids.shape == (7, SEQLEN)
    assert torch.equal(ids[:3], load_calibration(str(a), tok, 3, SEQLEN, seed=4))
    assert torch.equal(ids[3:5], load_calibration(str(b), tok, 2, SEQLEN, seed=4))
    assert torch.equal(ids[5:], generate_self_calibration(tiny_llama, tok, 2, SEQLEN, seed=4))
    assert describe_source(f"{a} + {b}").startswith("file a.txt (") and " + file b.txt (" in describe_source(f"{a}+{b}")


def test_a_file_named_with_a_plus_is_one_source(tmp_path, tok):
    path = _write(tmp_path / "wiki+news.txt", "\n\n".join(DOCS))
    assert calibration.split_sources(str(path)) == [str(path)]
    assert torch.equal(calibration.calibration_ids(str(path), tok, 2, SEQLEN, seed=0),
                       load_calibration(str(path), tok, 2, SEQLEN, seed=0))


@pytest.mark.parametrize("spec, nsamples, message", [
    ("builtin+", 4, "calibration mixture 'builtin+' has an empty part; write it as SOURCE+SOURCE"),
    ("builtin+builtin+builtin", 2, "--nsamples 2 is fewer than the 3 calibration sources mixed; use at least 3"),
])
def test_mixture_errors_are_one_line(tok, spec, nsamples, message):
    with pytest.raises(CalibrationError) as err:
        calibration.calibration_ids(spec, tok, nsamples, SEQLEN, seed=0)
    assert str(err.value) == message


def test_mixture_shares():
    assert calibration.mixture_shares(7, 3) == [3, 2, 2]
    assert calibration.mixture_shares(128, 2) == [64, 64]
    assert calibration.mixture_shares(5, 1) == [5]


def test_self_calibration_refuses_a_model_larger_than_free_memory(tiny_llama, tok, monkeypatch):
    monkeypatch.setattr("streamprune.devices.free_memory_bytes", lambda device: 1000)
    with pytest.raises(CalibrationError) as err:
        generate_self_calibration(tiny_llama, tok, 2, 8, seed=0)
    message = str(err.value)
    assert message.startswith("--calib self loads the whole model (")
    assert "GB on cpu), but only 0.0 GB is free" in message
    assert "\n" not in message and "use a text source" in message


def test_random_ids_need_no_tokenizer(tmp_path):
    from tests.tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "m", layers=1, tokenizer=False)
    ids = calibration.calibration_ids("random", None, 6, 16, seed=3, model_dir=model)
    expected = torch.randint(0, 320, (6, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ids, expected)
    assert calibration.describe_source("random") == "random token ids"
    with pytest.raises(CalibrationError, match="--calib random needs the model folder"):
        calibration.calibration_ids("random", None, 6, 16, seed=3)
