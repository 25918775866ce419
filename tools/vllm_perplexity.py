"""Perplexity in vLLM of exported DeciLM folders next to `streamprune eval` of their source folders.

Both sides score exactly the same token ids: the text is tokenized once with the source folder's
tokenizer and cut into `streamprune eval`'s windows (consecutive, non-overlapping, --seqlen tokens);
vLLM scores each window as one prompt (prompt log-probs, float32 by default), all models in one vLLM
process (tools/vllm_logprobs.py, run by the vLLM venv's python).

    python tools/vllm_perplexity.py --model dense=SRC:DECILM_DIR --model p20=SRC20:DECILM20 \\
        --text streamprune/data/demo_eval.txt --max-windows 100 --vllm-python /work/vllm-venv/bin/python
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

TOOLS = Path(__file__).resolve().parent


def streamprune_perplexity(model_dir: str, windows, dtype: str) -> dict:
    from streamprune.evaluation import EvalSettings, evaluate

    result = evaluate(model_dir, windows, settings=EvalSettings(dtype=dtype, batch_size=8))
    return {"perplexity": result.perplexity, "tokens": result.tokens, "seconds": result.seconds}


def vllm_perplexities(folders: list[str], windows, vllm_python: str, dtype: str) -> list[dict]:
    prompts = windows.tolist()
    request = {"dtype": dtype, "max_model_len": windows.shape[1] + 8,
               "models": [{"path": str(Path(f).resolve()), "prompts": prompts, "max_tokens": 1} for f in folders]}
    with tempfile.TemporaryDirectory() as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        env = {**os.environ, "PYTHONPATH": "", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        subprocess.run([vllm_python, str(TOOLS / "vllm_logprobs.py"), str(req), str(res)], check=True, env=env)
        models = json.loads(res.read_text())["models"]
    out = []
    for model in models:
        values = [lp for r in model["results"] for lp in r["prompt_logprobs"]]
        out.append({"perplexity": math.exp(-math.fsum(values) / len(values)), "tokens": len(values),
                    "seconds": model["seconds"]})
    return out


@click.command()
@click.option("--model", "models", multiple=True, required=True, help="NAME=SOURCE_DIR:DECILM_DIR (repeatable).")
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--seqlen", type=int, default=128, show_default=True)
@click.option("--max-windows", type=int, default=100, show_default=True)
@click.option("--dtype", default="float32", show_default=True, help="Both sides compute in this dtype.")
@click.option("--vllm-python", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False))
def main(models, text_file, seqlen, max_windows, dtype, vllm_python, json_path) -> None:
    from streamprune.evaluation import text_windows
    from streamprune.loading import load_tokenizer

    pairs = []
    for spec in models:
        name, _, rest = spec.partition("=")
        source, _, decilm = rest.partition(":")
        pairs.append((name, source, decilm))
    text = Path(text_file).read_text()
    windows = text_windows(text, load_tokenizer(pairs[0][1]), seqlen, max_windows)
    started = time.perf_counter()
    served = vllm_perplexities([d for _, _, d in pairs], windows, vllm_python, dtype)
    rows = []
    for (name, source, decilm), vllm in zip(pairs, served, strict=True):
        ours = streamprune_perplexity(source, windows, dtype)
        assert ours["tokens"] == vllm["tokens"]
        rows.append({"model": name, "source": source, "decilm": decilm, "streamprune_eval": ours["perplexity"],
                     "vllm": vllm["perplexity"], "relative_difference": vllm["perplexity"] / ours["perplexity"] - 1,
                     "tokens": ours["tokens"], "vllm_seconds": vllm["seconds"]})
    print("| model | `streamprune eval` | vLLM | relative difference | predicted tokens |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['streamprune_eval']:.4f} | {r['vllm']:.4f} | {r['relative_difference']:+.2e} | "
              f"{r['tokens']:,} |")
    if json_path:
        Path(json_path).write_text(json.dumps({"rows": rows, "text": text_file, "seqlen": seqlen, "dtype": dtype,
                                               "windows": int(windows.shape[0]),
                                               "seconds": time.perf_counter() - started,
                                               "argv": sys.argv[1:]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
