"""Prompt log-probs and greedy tokens from vLLM, for several model folders in one process.

Runs with the Python of a vLLM installation (its own venv: vLLM pins an older transformers), so it imports
nothing from streamprune. Used by tests/test_export_decilm.py and tools/vllm_perplexity.py:

    /work/vllm-venv/bin/python tools/vllm_logprobs.py REQUEST.json RESULT.json

REQUEST.json: {"dtype": "float32", "max_model_len": 256,
               "models": [{"path": DIR, "prompts": [[token ids], ...], "max_tokens": 8}, ...]}
RESULT.json:  {"models": [{"path": DIR, "seconds": s, "results": [{"prompt_logprobs": [float, ...],
               "tokens": [greedy ids], "token_logprobs": [float, ...]}, ...]}, ...]}

prompt_logprobs[i] is log p(prompt[i + 1] | prompt[:i + 1]), so a prompt of n tokens gives n - 1 values.
Models are loaded one after another (one engine at a time); loading vLLM itself is paid once.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time


def _logprob(entry: dict, token: int) -> float:
    return float(entry[token].logprob)


def run_model(spec: dict, dtype: str, max_model_len: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(model=spec["path"], dtype=dtype, trust_remote_code=True, max_model_len=max_model_len,
              enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=int(spec.get("max_tokens", 1)), prompt_logprobs=0,
                            logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]], params,
                           use_tqdm=False)
    results = []
    for ids, out in zip(spec["prompts"], outputs, strict=True):
        sample = out.outputs[0]
        results.append({
            "prompt_logprobs": [_logprob(entry, tok) for entry, tok in zip(out.prompt_logprobs[1:], ids[1:],
                                                                            strict=True)],
            "tokens": list(sample.token_ids),
            "token_logprobs": [_logprob(entry, tok) for entry, tok in zip(sample.logprobs, sample.token_ids,
                                                                           strict=True)],
        })
    del llm
    gc.collect()
    return {"path": spec["path"], "seconds": time.perf_counter() - started, "results": results}


def main(request_path: str, result_path: str) -> None:
    request = json.loads(open(request_path).read())
    dtype, max_len = request.get("dtype", "float32"), int(request.get("max_model_len", 256))
    models = [run_model(spec, dtype, max_len) for spec in request["models"]]
    tmp = f"{result_path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"models": models}, fh)
    os.replace(tmp, result_path)


if __name__ == "__main__":  # vLLM spawns worker processes, which re-import this file
    main(*sys.argv[1:3])
