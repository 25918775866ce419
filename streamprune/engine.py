"""The streaming loop: prune a checkpoint one decoder layer at a time.

    pass 1 (dense): embed calibration ids, run each dense layer, record cos(input, output) per layer
    allocation:     per-layer ratios solved to hit the total-parameter target
    pass 2 (prune): embed again, then per layer: read -> score -> select -> regress -> write shard

Only one layer's weights and the calibration hidden states are ever in memory. Work happens in a
staging folder next to OUT_DIR with a small state file, so a killed run resumes from the last
completed layer and OUT_DIR appears (by rename) only once every shard is written and verified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .allocation import Allocation, head_units, solve_allocation
from .architecture import (
    LAYER_PREFIX,
    ModelShape,
    engine_config,
    expected_layer_shapes,
    layer_tensor_names,
    non_layer_tensor_names,
    read_shape,
)
from .checkpoint import (
    INDEX_NAME,
    CheckpointReader,
    ShardWriter,
    copy_atomically,
    copy_aux_files,
    read_json,
    write_json,
)
from .errors import StreamPruneError
from .faults import fault_point
from .hub import resolve_model_dir
from .layer_pruning import (
    DenseTargets,
    LayerRuntime,
    Timer,
    build_layer,
    dense_forward,
    dense_forward_with_mid,
    prune_layer,
)
from .memory import peak_rss_mb, return_freed_memory_promptly
from .modeling import AUTO_MAP, REMOTE_CODE_FILES
from .options import PAPER_METHOD, PruneOptions

REPORT_NAME = "streamprune_report.json"
STATE_NAME = "state.json"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Devices, folders, state
# ----------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto` (the CLI default): the first CUDA GPU when one is available, else the CPU."""
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StreamPruneError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise StreamPruneError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StreamPruneError(f"--device {name} asked for CUDA, but no CUDA GPU is available; use --device cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise StreamPruneError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        device = torch.device("cuda", index)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on CUDA (V100s have no bfloat16) and float32 on CPU (fast fp16 kernels are rare)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise StreamPruneError(f"unknown --dtype {name!r}; use auto, float32, float16 or bfloat16")
    return _DTYPES[name]


def staging_dir_for(out_dir: Path) -> Path:
    """Staging lives beside OUT_DIR (same filesystem, so the final rename is atomic)."""
    return out_dir.parent / f".{out_dir.name}.streamprune-partial"


def check_folders(model_dir: Path, out_dir: Path, overwrite: bool) -> None:
    model_res, out_res = model_dir.resolve(), out_dir.resolve()
    if out_res == model_res or model_res in out_res.parents:
        raise StreamPruneError("OUT_DIR must not be MODEL_DIR or inside it; choose a folder elsewhere")
    if out_res in model_res.parents:
        raise StreamPruneError("OUT_DIR must not contain MODEL_DIR; choose a folder elsewhere")
    if out_dir.exists() and not out_dir.is_dir():
        raise StreamPruneError(f"OUT_DIR {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise StreamPruneError(f"OUT_DIR {out_dir} is not empty; pass --overwrite to replace it")


def model_fingerprint(reader: CheckpointReader) -> str:
    """Cheap identity of the input checkpoint: config, index and shard sizes / mtimes."""
    h = hashlib.sha256(json.dumps(reader.config, sort_keys=True).encode())
    for file in sorted(set(reader.weight_map.values())):
        st = (reader.model_dir / file).stat()
        h.update(f"{file}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def run_fingerprint(reader: CheckpointReader, options: PruneOptions) -> dict:
    return {"format": FORMAT_VERSION, "model": model_fingerprint(reader), "options": options.result_options()}


class RunState:
    """`state.json` in the staging folder: how far each pass got, and what it decided."""

    def __init__(self, staging: Path, fingerprint: dict):
        self.path = staging / STATE_NAME
        self.data = {"fingerprint": fingerprint, "scores": [], "pass2_done": 0, "layer_specs": [],
                     "layer_reports": [], "allocation": None, "hidden_file": None, "timings": {}}

    @classmethod
    def open(cls, staging: Path, fingerprint: dict, restart: bool) -> RunState:
        state = cls(staging, fingerprint)
        if staging.is_dir() and state.path.is_file() and not restart:
            saved = read_json(state.path)
            if saved.get("fingerprint") != fingerprint:
                raise StreamPruneError(
                    f"{staging} holds an unfinished run with different options or input; rerun with the "
                    "same options to resume, or pass --restart to discard it"
                )
            state.data = saved
            return state
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        state.save()
        return state

    def save(self) -> None:
        write_json(self.path, self.data)


class _StopFlag:
    """Ctrl-C sets a flag; the loop stops at the next layer boundary with everything resumable."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C handling alone
            self._old = None
        return self

    def _handle(self, *_):
        if self.requested:  # a second Ctrl-C aborts at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class LayerPrefetcher:
    """Reads the next layer on a background thread while the current one is computed.

    The caller says when to start (`read_ahead`). On a GPU the pruning pass starts it as soon as the
    layer is on the device, to overlap the whole layer. On CPU the layer shares host memory with
    the read-ahead copy, so the pass starts it once the layer's weights are released (only its
    output and activations remain): the copy then never adds to the layer's peak, and it still
    overlaps the output write and the hidden-state checkpoint. At most two layers are in host memory.
    Safetensors reads and torch copies release the GIL, so one worker thread is enough.
    """

    def __init__(self, read_layer, num_layers: int, enabled: bool = True):
        self.read_layer, self.num_layers, self.enabled = read_layer, num_layers, enabled
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamprune-read") if enabled else None
        self._pending: dict[int, Future] = {}

    def read_ahead(self, i: int) -> None:
        """Start reading layer i in the background (no-op when disabled, past the end or started)."""
        if self._pool is not None and i < self.num_layers and i not in self._pending:
            self._pending[i] = self._pool.submit(self.read_layer, i)

    def get(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors: the read-ahead result if one was started, else a read now."""
        future = self._pending.pop(i, None)
        return future.result() if future is not None else self.read_layer(i)

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pool.shutdown(wait=True)
        self._pending.clear()


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------


@dataclass
class PruneResult:
    out_dir: Path
    report: dict
    allocation: Allocation | None = None
    layer_specs: list[dict] = field(default_factory=list)


class StreamingPruner:
    """Prunes MODEL_DIR into OUT_DIR layer by layer. Use `run()`; see the module docstring."""

    def __init__(self, model_dir: str | Path, out_dir: str | Path, options: PruneOptions, *,
                 overwrite: bool = False, restart: bool = False, quiet: bool = False,
                 shared_cache: str | Path | None = None):
        options.validate()
        self.model_dir, self.out_dir = resolve_model_dir(model_dir), Path(out_dir)
        self.options, self.overwrite, self.restart, self.quiet = options, overwrite, restart, quiet
        self.shared_cache = None if shared_cache is None else Path(shared_cache)
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        check_folders(self.model_dir, self.out_dir, overwrite)
        self.reader = CheckpointReader(self.model_dir)
        self.shape: ModelShape = read_shape(self.reader.config)
        self._check_tensor_shapes()
        self.dense_config = engine_config(self.reader.config, self.shape)
        self.dense_config._attn_implementation = "sdpa"
        self.storage_dtype = self.reader.storage_dtype()
        self.staging = staging_dir_for(self.out_dir)
        self.units = head_units(self.shape, options.gqa_mode)
        self.timer = Timer(self.device)
        self.stop = _StopFlag()

    # -- checks ---------------------------------------------------------------------------------

    def _check_tensor_shapes(self) -> None:
        """Every tensor the config implies must exist with the implied shape (headers only)."""
        spec = self.shape.dense_layer_spec()
        for i in range(self.shape.num_layers):
            for name, want in expected_layer_shapes(self.shape, i, spec).items():
                got = self.reader.shape(name)
                if got != want:
                    raise StreamPruneError(f"tensor {name} has shape {list(got)} but config.json implies {list(want)}")
        emb = self.reader.shape("model.embed_tokens.weight")
        if emb != (self.shape.vocab_size, self.shape.hidden_size):
            raise StreamPruneError(f"model.embed_tokens.weight has shape {list(emb)}, config.json implies "
                                   f"{[self.shape.vocab_size, self.shape.hidden_size]}")
        for name in non_layer_tensor_names(self.shape):
            self.reader.shape(name)

    # -- calibration ----------------------------------------------------------------------------

    # -- work shared between runs of one model (batch jobs at several ratios) --------------------

    def _shared_key(self) -> str:
        """Identity of everything the calibration ids and the dense pass depend on (not the ratio)."""
        o = self.options
        key = {"model": model_fingerprint(self.reader), "calib": o.calib, "nsamples": o.nsamples,
               "seqlen": o.seqlen, "seed": o.seed, "device": self.device.type, "dtype": str(self.dtype)}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def _shared_path(self, kind: str) -> Path | None:
        if self.shared_cache is None:
            return None
        self.shared_cache.mkdir(parents=True, exist_ok=True)
        suffix = "safetensors" if kind == "calibration" else "json"
        return self.shared_cache / f"{kind}-{self._shared_key()}.{suffix}"

    def _reuse_dense_scores(self, state: RunState) -> None:
        path = self._shared_path("dense-scores")
        if path is not None and path.is_file() and not state.data["scores"]:
            state.data["scores"] = read_json(path)["scores"]
            state.data["dense_scores_reused"] = True
            state.save()

    def _share_dense_scores(self, scores: list[float]) -> None:
        path = self._shared_path("dense-scores")
        if path is not None and not path.is_file():
            write_json(path, {"scores": scores})

    def _calibration_ids(self) -> torch.Tensor:
        """Token ids (nsamples, seqlen), cached in the staging folder so a resume uses the same ones."""
        path = self.staging / "calibration.safetensors"
        if path.is_file():
            return load_file(str(path))["input_ids"]
        shared = self._shared_path("calibration")
        if shared is not None and shared.is_file():
            copy_atomically(shared, path)
            return load_file(str(path))["input_ids"]
        ids = self._make_calibration_ids()
        save_file({"input_ids": ids.contiguous()}, str(path))
        if shared is not None:
            copy_atomically(path, shared)
        return ids

    def _make_calibration_ids(self) -> torch.Tensor:
        from .calibration import CalibrationError, generate_self_calibration, load_calibration

        o = self.options
        if o.calib == "random":  # benchmarks on tokenizer-less random checkpoints; no text needed
            gen = torch.Generator().manual_seed(o.seed)
            return torch.randint(0, self.shape.vocab_size, (o.nsamples, o.seqlen), generator=gen)
        tokenizer = self._tokenizer()
        try:
            if o.calib == "self":
                ids = generate_self_calibration(self.model_dir, tokenizer, o.nsamples, o.seqlen, o.seed,
                                                device=str(self.device), quiet=self.quiet)
            else:
                ids = load_calibration(o.calib, tokenizer, o.nsamples, o.seqlen, o.seed)
        except CalibrationError as exc:
            raise StreamPruneError(str(exc)) from None
        return ids

    def _tokenizer(self):
        from .loading import load_tokenizer

        return load_tokenizer(self.model_dir)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Calibration hidden states (nsamples, seqlen, C), float32 on the compute device."""
        weight = self.reader.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
        if int(ids.max()) >= weight.shape[0]:
            raise StreamPruneError("calibration token ids exceed the embedding size; tokenizer and model disagree")
        hidden = weight[ids].to(self.device, torch.float32)
        del weight
        return hidden

    def _runtime(self, hidden: torch.Tensor) -> LayerRuntime:
        rotary = LlamaRotaryEmbedding(self.dense_config).to(self.device)
        positions = torch.arange(hidden.shape[1], device=self.device)[None, :]
        probe = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = rotary(probe, positions)
        return LayerRuntime(self.device, self.dtype, self.options.batch_size, (cos, sin))

    # -- hidden-state checkpoints ---------------------------------------------------------------

    def _save_hidden(self, state: RunState, hidden: torch.Tensor, tag: str,
                     dense: torch.Tensor | None = None) -> None:
        name = f"hidden-{tag}.safetensors"
        tmp = self.staging / (name + ".tmp")
        tensors = {"hidden": hidden.to("cpu").contiguous()}
        if dense is not None:  # the dense model's stream, kept for least squares with target "dense"
            tensors["dense"] = dense.to("cpu").contiguous()
        save_file(tensors, str(tmp))
        os.replace(tmp, self.staging / name)
        old, state.data["hidden_file"] = state.data["hidden_file"], name
        state.save()
        if old and old != name:
            (self.staging / old).unlink(missing_ok=True)

    def _load_hidden(self, state: RunState, key: str = "hidden") -> torch.Tensor:
        return load_file(str(self.staging / state.data["hidden_file"]))[key].to(self.device)

    def _check_finite(self, hidden: torch.Tensor, layer: int) -> None:
        if not torch.isfinite(hidden).all():
            raise StreamPruneError(
                f"non-finite hidden states after layer {layer} (overflow in {str(self.dtype)[6:]}); "
                "rerun with --dtype float32"
            )

    def _check_stop(self, layer: int, phase: str) -> None:
        if self.stop.requested:
            raise StreamPruneError(
                f"interrupted after layer {layer} of {phase}; run the same command again to resume"
            )

    # -- passes ---------------------------------------------------------------------------------

    def _read_layer(self, i: int) -> dict[str, torch.Tensor]:
        return self.reader.read(layer_tensor_names(i, self.shape.dense_layer_spec()))

    def _layer_tensors(self, prefetcher: LayerPrefetcher, i: int) -> dict[str, torch.Tensor]:
        """The layer's tensors; 'read' is the time compute waited for the disk (near 0 when prefetch hides it)."""
        with self.timer.phase("read"):
            return prefetcher.get(i)

    def _phase_delta(self, before: dict[str, float]) -> dict[str, float]:
        return {k: v - before.get(k, 0.0) for k, v in self.timer.seconds.items() if v - before.get(k, 0.0) > 0}

    def _pass1_scores(self, state: RunState, ids: torch.Tensor) -> list[float]:
        """Dense pass: s_l = mean over tokens of cos(x_l, y_l)."""
        scores = state.data["scores"]
        L = self.shape.num_layers
        if len(scores) == L:
            return scores
        hidden = self._load_hidden(state) if scores else self._embed(ids)
        runtime = self._runtime(hidden)
        bar = tqdm(range(len(scores), L), desc="pass 1/2 (dense scores)", disable=self.quiet, unit="layer",
                   initial=len(scores), total=L)
        prefetcher = LayerPrefetcher(self._read_layer, L, self.options.prefetch)
        try:
            for i in bar:
                fault_point(f"pass1:{i}")
                before = dict(self.timer.seconds)
                layer = build_layer(self.dense_config, i, self._layer_tensors(prefetcher, i), runtime, consume=True)
                prefetcher.read_ahead(i + 1)
                with self.timer.phase("dense_forward"):
                    scores.append(dense_forward(layer, hidden, runtime))
                del layer
                self._check_finite(hidden, i)
                state.data.setdefault("pass1_seconds", []).append(self._phase_delta(before))
                self._save_hidden(state, hidden, f"p1-{i:05d}")
                self._check_stop(i, "pass 1")
        finally:
            prefetcher.close()
        return scores

    def _pass2_prune(self, state: RunState, ids: torch.Tensor, allocation: Allocation,
                     writer: ShardWriter) -> None:
        done = state.data["pass2_done"]
        L = self.shape.num_layers
        if done == L:  # killed after the last layer (e.g. while finalizing): nothing left to compute
            return
        hidden = self._load_hidden(state) if done else self._embed(ids)
        dense_stream = None
        if self.options.switches().dense_target:
            dense_stream = self._load_hidden(state, "dense") if done else hidden.clone()
        runtime = self._runtime(hidden)
        bar = tqdm(range(done, L), desc="pass 2/2 (prune)", disable=self.quiet, unit="layer", initial=done, total=L)
        prefetcher = LayerPrefetcher(self._read_layer, L, self.options.prefetch)
        try:
            for i in bar:
                before = dict(self.timer.seconds)
                self._prune_one(i, prefetcher, hidden, runtime, allocation, writer, state, dense_stream)
                state.data["layer_reports"][-1]["seconds"] = self._phase_delta(before)
                dense = state.data.get("pass1_seconds", [])
                if i < len(dense):
                    state.data["layer_reports"][-1]["seconds"]["pass1_dense_forward"] = dense[i].get("dense_forward")
                state.data["pass2_done"] = i + 1
                self._save_hidden(state, hidden, f"p2-{i:05d}", dense_stream)
                self._check_stop(i, "pass 2")
        finally:
            prefetcher.close()

    def _prune_one(self, i, prefetcher, hidden, runtime, allocation, writer, state, dense=None) -> None:
        plan = allocation.plans[i]
        stored = self._layer_tensors(prefetcher, i)
        dense_spec = self.shape.dense_layer_spec()
        exact = _holds_exactly(runtime.dtype, self.storage_dtype)
        with self.timer.phase("build"):  # when exact, the checkpoint copy is freed tensor by tensor
            layer = build_layer(self.dense_config, i, stored, runtime, consume=exact)
        if exact:  # the layer's own parameters are the stored values: no second copy of the layer
            prefix = LAYER_PREFIX.format(i)
            stored = {prefix + k: v for k, v in layer.state_dict().items()}
        targets = None
        if dense is not None:  # advance the dense stream first: its states are this layer's targets
            with self.timer.phase("dense_forward"):
                targets = DenseTargets(dense_forward_with_mid(layer, dense, runtime), dense)
        read_next = lambda: prefetcher.read_ahead(i + 1)  # noqa: E731
        if runtime.device.type != "cpu":  # the layer lives in device memory: overlap its whole compute
            read_next()
        result = prune_layer(layer, stored, hidden, plan, self.units, dense_spec, self.options.switches(),
                             runtime, self.timer, self.storage_dtype, weights_released=read_next, targets=targets)
        del layer, stored
        self._check_finite(hidden, i)
        fault_point(f"pass2:{i}")
        with self.timer.phase("write"):
            writer.write(i + 1, result.tensors)
        spec = result.spec.to_dict()
        report = result.report.to_dict()
        report.update(plan_ratio=plan.ratio, score=plan.score, params_before=_layer_params(self.shape, dense_spec),
                      params_after=_layer_params(self.shape, spec))
        state.data["layer_specs"].append(spec)
        state.data["layer_reports"].append(report)

    def _copy_non_layer(self, writer: ShardWriter) -> None:
        """Embeddings, final norm and lm_head, each in its own shard, one tensor in memory at a time."""
        L = self.shape.num_layers
        for k, name in enumerate(non_layer_tensor_names(self.shape)):
            if not writer.exists(L + 1 + k):
                with self.timer.phase("copy"):
                    writer.write(L + 1 + k, self.reader.read([name]))

    # -- output ---------------------------------------------------------------------------------

    def _output_config(self, specs: list[dict]) -> tuple[dict, bool]:
        """Stock family config when every layer has one shape and native biases; else StreamPrune's."""
        dense = self.shape.dense_layer_spec()
        flags = ("qkv_bias", "o_bias", "mlp_bias", "down_bias")
        homogeneous = all(s == specs[0] for s in specs) and all(specs[0][f] == dense[f] for f in flags)
        if homogeneous:
            cfg = dict(self.reader.config)
            cfg.update(num_attention_heads=specs[0]["num_attention_heads"],
                       num_key_value_heads=specs[0]["num_key_value_heads"],
                       intermediate_size=specs[0]["intermediate_size"], head_dim=self.shape.head_dim)
            return cfg, False
        cfg = engine_config(self.reader.config, self.shape, specs).to_dict()
        cfg.update(architectures=["StreamPruneForCausalLM"], auto_map=dict(AUTO_MAP))
        cfg["dtype"] = str(self.reader.storage_dtype()).removeprefix("torch.")
        return cfg, True

    def _finalize(self, state: RunState, writer: ShardWriter, report: dict) -> None:
        specs = state.data["layer_specs"]
        config, remote = self._output_config(specs)
        write_json(self.staging / "config.json", config)
        if remote:
            for src in REMOTE_CODE_FILES:
                shutil.copy2(src, self.staging / src.name)
        copy_aux_files(self.model_dir, self.staging)
        shapes = writer.write_index()
        self._verify(shapes, specs)
        write_json(self.staging / REPORT_NAME, report)
        for scratch in self.staging.glob("hidden-*.safetensors"):
            scratch.unlink()
        fault_point("finalize")
        for name in (STATE_NAME, "calibration.safetensors"):
            (self.staging / name).unlink(missing_ok=True)
        self._publish()

    def _verify(self, shapes: dict[str, tuple[int, ...]], specs: list[dict]) -> None:
        """Every tensor the new config implies is in the index with the expected shape, and no others."""
        expected: dict[str, tuple[int, ...]] = {}
        for i, spec in enumerate(specs):
            expected.update(expected_layer_shapes(self.shape, i, spec))
        for name in non_layer_tensor_names(self.shape):
            expected[name] = self.reader.shape(name)
        if shapes != expected:
            missing = sorted(set(expected) - set(shapes))[:3]
            wrong = sorted(n for n in set(expected) & set(shapes) if expected[n] != shapes[n])[:3]
            raise StreamPruneError(f"output verification failed (missing {missing}, wrong shape {wrong}); "
                                   "rerun with --restart")

    def _publish(self) -> None:
        """Move the staging folder into place; an existing OUT_DIR is removed only now (--overwrite)."""
        if self.out_dir.exists():
            trash = self.out_dir.parent / f".{self.out_dir.name}.streamprune-old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.out_dir, trash)
            os.replace(self.staging, self.out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.staging, self.out_dir)

    # -- entry point ----------------------------------------------------------------------------

    def run(self) -> PruneResult:
        return_freed_memory_promptly()
        try:
            return self._run()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise StreamPruneError(
                f"disk full while writing under {self.staging.parent}; free space and run the same command "
                "again to resume"
            ) from None

    def _run(self) -> PruneResult:
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        state = RunState.open(self.staging, run_fingerprint(self.reader, self.options), self.restart)
        L = self.shape.num_layers
        non_layer = non_layer_tensor_names(self.shape)
        writer = ShardWriter(self.staging, L + len(non_layer))
        with self.stop, torch.inference_mode(False), torch.no_grad():
            with self.timer.phase("calibration"):  # wall time of each step, for the report (and the demo)
                ids = self._calibration_ids()
            o = self.options
            need_scores = not o.uniform and o.ratio > 0
            if need_scores:
                self._reuse_dense_scores(state)
                with self.timer.phase("pass1"):
                    scores = self._pass1_scores(state, ids)
                self._share_dense_scores(scores)
            else:
                scores = None
            if state.data["allocation"] is None:
                allocation = solve_allocation(self.shape, self.reader.parameter_count(), o.ratio, scores,
                                              o.alpha, o.num_pruned_layers, o.gqa_mode, o.regression,
                                              o.attention_scale)
                state.data["allocation"] = {"summary": allocation.to_dict(),
                                            "plans": [asdict(p) for p in allocation.plans]}
                state.data["hidden_file"] = None  # pass 2 starts from the embeddings again
                state.save()
            allocation = _allocation_from_state(state.data["allocation"])
            with self.timer.phase("pass2"):
                self._pass2_prune(state, ids, allocation, writer)
            self._copy_non_layer(writer)
        report = self._report(state, allocation, time.perf_counter() - started)
        self._finalize(state, writer, report)
        return PruneResult(self.out_dir, report, allocation, state.data["layer_specs"])

    def _report(self, state: RunState, allocation: Allocation, seconds: float) -> dict:
        after = self.reader.parameter_count() - sum(
            r["params_before"] - r["params_after"] for r in state.data["layer_reports"])
        report = {
            "streamprune_version": _version(),
            "model_dir": str(self.model_dir),
            "family": self.shape.family,
            "options": asdict(self.options),
            "device": str(self.device),
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            "gqa_unit": "kv-group" if self.units.kv_heads_per_unit and self.shape.is_gqa else "head",
            "allocation": allocation.to_dict(),
            "params_before": self.reader.parameter_count(),
            "params_after": after,
            "achieved_ratio": 1 - after / self.reader.parameter_count(),
            "dense_scores_reused": bool(state.data.get("dense_scores_reused")),
            "layers": state.data["layer_reports"],
            "timings_seconds": {"total_this_process": seconds, **dict(self.timer.seconds)},
            "peak_rss_mb": peak_rss_mb(),
        }
        if self.device.type == "cuda":
            report["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return report


def _holds_exactly(compute: torch.dtype, storage: torch.dtype) -> bool:
    """Whether every value of `storage` dtype survives a round trip through `compute` dtype."""
    wider = {torch.float32: {torch.float16, torch.bfloat16, torch.float32},
             torch.float64: {torch.float16, torch.bfloat16, torch.float32, torch.float64}}
    return compute == storage or storage in wider.get(compute, set())


def _allocation_from_state(saved: dict) -> Allocation:
    from .allocation import LayerPlan

    s = saved["summary"]
    return Allocation([LayerPlan(**p) for p in saved["plans"]], s["params_before"], s["params_after"],
                      s["target_ratio"], s["base_ratio"], s["alpha"], s["pruned_layers"])


def _layer_params(shape: ModelShape, spec: dict) -> int:
    total = 0
    for dims in expected_layer_shapes(shape, 0, spec).values():
        n = 1
        for d in dims:
            n *= d
        total += n
    return total


def _version() -> str:
    from . import __version__

    return __version__


def read_report(out_dir: str | Path) -> dict:
    path = Path(out_dir) / REPORT_NAME
    if not path.is_file():
        raise StreamPruneError(f"{out_dir} has no {REPORT_NAME}; is it a streamprune output folder?")
    return read_json(path)


def prune(model_dir: str | Path, out_dir: str | Path, ratio: float, *, overwrite: bool = False,
          restart: bool = False, quiet: bool = False, shared_cache: str | Path | None = None,
          **options) -> PruneResult:
    """Python API mirroring `streamprune run`: keyword options are `PruneOptions` fields.

    `ratio` may be 0 (the model passes through the engine unchanged, a self-check). `shared_cache` is a
    folder where runs of the same model and calibration settings share the tokenized
    calibration set and the dense pass's layer scores (see `streamprune batch`).
    """
    return StreamingPruner(model_dir, out_dir, PruneOptions(ratio=ratio, **options), overwrite=overwrite,
                           restart=restart, quiet=quiet, shared_cache=shared_cache).run()


__all__ = ["INDEX_NAME", "PAPER_METHOD", "PruneOptions", "PruneResult", "StreamingPruner", "prune", "read_report"]
