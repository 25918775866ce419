"""Perplexity of an exported GGUF in llama.cpp next to `streamprune eval` of its folder, on the same windows.

Both sides score exactly the same token ids: the text is tokenized once with the folder's tokenizer and
cut into `streamprune eval`'s windows (consecutive, non-overlapping, `--seqlen` tokens); llama.cpp
evaluates each window from an empty KV cache and the next-token NLL is computed from its logits.

    python tools/gguf_perplexity.py MODEL_DIR MODEL.gguf --text /work/data/eval/books.txt --max-windows 40
"""

from __future__ import annotations

import json
import math
import time

import click
import numpy as np

KV_TYPES = {"f16": 1, "f32": 0}  # GGML_TYPE_F16 (llama.cpp's default KV cache), GGML_TYPE_F32


def llama_cpp_nll(gguf_path: str, windows: np.ndarray, threads: int, kv_type: str = "f16") -> tuple[float, int]:
    """Summed next-token NLL (float64) and the number of predicted tokens, from llama.cpp's logits."""
    from llama_cpp import Llama

    seqlen = windows.shape[1]
    llm = Llama(model_path=gguf_path, n_ctx=seqlen, n_batch=seqlen, logits_all=True, n_threads=threads,
                type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type], verbose=False)
    total, count = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window.tolist())
        logits = np.asarray(llm.scores[: seqlen - 1], dtype=np.float64)
        peak = logits.max(axis=1, keepdims=True)
        log_norm = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
        total += float((log_norm - logits[np.arange(seqlen - 1), window[1:]]).sum())
        count += seqlen - 1
    return total, count


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("gguf_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--seqlen", type=int, default=128, show_default=True)
@click.option("--max-windows", type=int, default=40, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--kv-type", type=click.Choice(list(KV_TYPES)), default="f16", show_default=True,
              help="llama.cpp's KV cache type (f16 is its default).")
@click.option("--skip-transformers", is_flag=True, help="Only llama.cpp (the folder is still used to tokenize).")
def main(model_dir: str, gguf_path: str, text_file: str, seqlen: int, max_windows: int, threads: int,
         kv_type: str, skip_transformers: bool) -> None:
    import torch

    from streamprune.evaluation import EvalSettings, evaluate, text_windows
    from streamprune.loading import load_tokenizer

    torch.set_num_threads(threads)
    text = open(text_file, encoding="utf-8").read()
    windows = text_windows(text, load_tokenizer(model_dir), seqlen, max_windows)
    started = time.perf_counter()
    nll_sum, count = llama_cpp_nll(gguf_path, windows.numpy(), threads, kv_type)
    result = {"model_dir": model_dir, "gguf": gguf_path, "kv_type": kv_type, "text": text_file,
              "windows": len(windows), "seqlen": seqlen,
              "tokens": count, "llama_cpp_ppl": math.exp(nll_sum / count),
              "llama_cpp_seconds": time.perf_counter() - started}
    if not skip_transformers:
        ours = evaluate(model_dir, windows, settings=EvalSettings(dtype="float32", quiet=True))
        assert ours.tokens == count, (ours.tokens, count)
        result["streamprune_eval_ppl"] = ours.perplexity
        result["relative_difference"] = result["llama_cpp_ppl"] / ours.perplexity - 1
    click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
