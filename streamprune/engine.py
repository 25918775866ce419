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
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import shared_cache
from .allocation import Allocation, LayerPlan, head_units, solve_allocation
from .architecture import EMBEDDING, ModelShape, read_shape
from .checkpoint import (
    INDEX_NAME,
    CheckpointReader,
    ShardWriter,
    copy_atomically,
    read_json,
    write_json,
)
from .devices import free_memory_bytes, resolve_device, resolve_dtype
from .errors import StreamPruneError
from .faults import fault_point
from .hub import resolve_model_dir
from .layer_pruning import (
    LayerPruner,
    LayerRuntime,
    LayerWork,
    Timer,
    build_layer,
    dense_forward,
)
from .memory import peak_rss_mb, return_freed_memory_promptly
from .method_parts import MethodParts
from .options import PAPER_METHOD, PruneOptions
from .output import HFFolderOutput, finished_run_differences, read_report
from .prefetch import LayerPrefetcher
from .reconstruction import GradientReconstruction, ReconstructionMemory, WindowSizes, reconstruction_memory
from .run_state import (
    RunState,
    StopFlag,
    check_folders,
    model_fingerprint,
    run_fingerprint,
    staging_dir_for,
)
from .split_search import SplitRule

# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------


@dataclass
class PruneResult:
    """`already_complete`: OUT_DIR already held this run (same input and options) and was left as it was;
    then `report` is the one in OUT_DIR and `allocation` / `layer_specs` are not filled in."""

    out_dir: Path
    report: dict
    allocation: Allocation | None = None
    layer_specs: list[dict] = field(default_factory=list)
    already_complete: bool = False


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
        self.reader = CheckpointReader(self.model_dir)
        self.fingerprint = run_fingerprint(self.reader, options)
        self.already_complete = self._check_finished_run(overwrite)
        check_folders(self.model_dir, self.out_dir, overwrite or self.already_complete)
        self.shape: ModelShape = read_shape(self.reader.config)
        self.adapter = self.shape.adapter
        self._check_tensor_shapes()
        self.dense_config = self.adapter.engine_config(self.reader.config, self.shape)
        self.dense_config._attn_implementation = "sdpa"
        self.storage_dtype = self.reader.storage_dtype()
        self.staging = staging_dir_for(self.out_dir)
        self.output = HFFolderOutput(self.reader, self.shape, self.staging, self.out_dir)
        self.units = head_units(self.shape, options.gqa_mode)
        options.allocation_settings().check(self.shape)  # before the dense pass, not after it
        self.timer = Timer(self.device)
        self.stop = StopFlag()

    # -- checks ---------------------------------------------------------------------------------

    def _check_finished_run(self, overwrite: bool) -> bool:
        """True when OUT_DIR already holds this very run (a retried command: nothing to do); a finished run
        with other options or input is refused unless --overwrite (which also redoes an identical one)."""
        diffs = None if overwrite else finished_run_differences(self.out_dir, self.fingerprint)
        if diffs:
            raise StreamPruneError(f"OUT_DIR {self.out_dir} holds a finished run with other options or input "
                                   f"({', '.join(diffs[:3])}); pass --overwrite to replace it")
        return diffs == []

    def _check_tensor_shapes(self) -> None:
        """Every tensor the config implies must exist with the implied shape (headers only)."""
        spec = self.shape.dense_layer_spec()
        for i in range(self.shape.num_layers):
            for name, want in self.adapter.expected_layer_shapes(self.shape, i, spec).items():
                got = self.reader.shape(name)
                if got != want:
                    raise StreamPruneError(f"tensor {name} has shape {list(got)} but config.json implies {list(want)}")
        emb = self.reader.shape(EMBEDDING)
        if emb != (self.shape.vocab_size, self.shape.hidden_size):
            raise StreamPruneError(f"{EMBEDDING} has shape {list(emb)}, config.json implies "
                                   f"{[self.shape.vocab_size, self.shape.hidden_size]}")
        for name in self.adapter.non_layer_tensor_names(self.shape):
            self.reader.shape(name)

    # -- calibration ----------------------------------------------------------------------------

    # -- work shared between runs of one model (batch jobs at several ratios) --------------------

    def _shared_key(self) -> str:
        return shared_cache.entry_key(model_fingerprint(self.reader), self.options, self.device.type, str(self.dtype))

    def _shared_path(self, kind: str) -> Path | None:
        if self.shared_cache is None:
            return None
        return shared_cache.entry_path(self.shared_cache, kind, self._shared_key())

    def _reuse_dense_scores(self, state: RunState) -> None:
        path = self._shared_path("dense-scores")
        if path is not None and path.is_file() and not state.scores:
            state.scores = read_json(path)["scores"]
            state.dense_scores_reused = True
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
        with shared_cache.locked(shared):  # concurrent runs of the same entry: one computes, the others copy
            if shared is not None and shared.is_file():
                copy_atomically(shared, path)
                return load_file(str(path))["input_ids"]
            ids = self._make_calibration_ids()
            save_file({"input_ids": ids.contiguous()}, str(path))
            if shared is not None:
                copy_atomically(path, shared)
        return ids

    def _make_calibration_ids(self) -> torch.Tensor:
        from .calibration import CalibrationError, calibration_ids

        o = self.options
        try:  # the tokenizer is loaded only when a source needs one (not for --calib random)
            return calibration_ids(o.calib, None, o.nsamples, o.seqlen, o.seed, self.model_dir,
                                   device=str(self.device), quiet=self.quiet)
        except CalibrationError as exc:
            raise StreamPruneError(str(exc)) from None

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Calibration hidden states (nsamples, seqlen, C), float32 on the compute device."""
        weight = self.reader.read([EMBEDDING])[EMBEDDING]
        return self.adapter.embed(weight, ids).to(self.device)

    def _runtime(self, hidden: torch.Tensor) -> LayerRuntime:
        tables = self.adapter.rotary_tables(self.dense_config, hidden.shape[1], self.device, self.dtype)
        return LayerRuntime(self.device, self.dtype, self.options.batch_size, tables)

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
        old, state.hidden_file = state.hidden_file, name
        state.save()
        if old and old != name:
            (self.staging / old).unlink(missing_ok=True)

    def _load_hidden(self, state: RunState, key: str = "hidden") -> torch.Tensor:
        return load_file(str(self.staging / state.hidden_file))[key].to(self.device)

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
        return self.adapter.read_layer(self.reader, i, self.shape.dense_layer_spec())

    def _layer_tensors(self, prefetcher: LayerPrefetcher, i: int) -> dict[str, torch.Tensor]:
        """The layer's tensors; 'read' is the time compute waited for the disk (near 0 when prefetch hides it)."""
        with self.timer.phase("read"):
            return prefetcher.get(i)

    def _phase_delta(self, before: dict[str, float]) -> dict[str, float]:
        return {k: v - before.get(k, 0.0) for k, v in self.timer.seconds.items() if v - before.get(k, 0.0) > 0}

    def _pass1_scores(self, state: RunState, ids: torch.Tensor) -> list[float]:
        """Dense pass: s_l = mean over tokens of cos(x_l, y_l)."""
        scores = state.scores
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
                state.pass1_seconds.append(self._phase_delta(before))
                self._save_hidden(state, hidden, f"p1-{i:05d}")
                self._check_stop(i, "pass 1")
        finally:
            prefetcher.close()
        return scores

    def _pass2_prune(self, state: RunState, ids: torch.Tensor, allocation: Allocation,
                     writer: ShardWriter) -> None:
        done = state.pass2_done
        L = self.shape.num_layers
        if done == L:  # killed after the last layer (e.g. while finalizing): nothing left to compute
            return
        hidden = self._load_hidden(state) if done else self._embed(ids)
        dense_stream = None
        if self.options.keeps_dense_stream():
            dense_stream = self._load_hidden(state, "dense") if done else hidden.clone()
        pruner = self._layer_pruner(self._runtime(hidden))
        bar = tqdm(range(done, L), desc="pass 2/2 (prune)", disable=self.quiet, unit="layer", initial=done, total=L)
        prefetcher = LayerPrefetcher(self._read_layer, L, self.options.prefetch)
        try:
            for i in bar:
                before = dict(self.timer.seconds)
                spec, report = self._prune_one(pruner, allocation.plans[i], prefetcher, writer, hidden, dense_stream)
                report["seconds"] = self._phase_delta(before)  # the layer's whole step: read, prune, write
                if i < len(state.pass1_seconds):
                    report["seconds"]["pass1_dense_forward"] = state.pass1_seconds[i].get("dense_forward")
                state.layer_specs.append(spec)
                state.layer_reports.append(report)
                state.pass2_done = i + 1
                self._save_hidden(state, hidden, f"p2-{i:05d}", dense_stream)
                self._check_stop(i, "pass 2")
        finally:
            prefetcher.close()

    def _layer_pruner(self, runtime: LayerRuntime) -> LayerPruner:
        """The per-layer pruner of this run: the method parts are built here, once."""
        o = self.options
        split = SplitRule(search=o.split == "search", samples=o.split_samples, allocation=o.allocation_settings())
        return LayerPruner(self.dense_config, self.shape, self.units, MethodParts.from_switches(o.switches()),
                           runtime, self.timer, self.storage_dtype, split)

    def _prune_one(self, pruner: LayerPruner, plan: LayerPlan, prefetcher: LayerPrefetcher, writer: ShardWriter,
                   hidden: torch.Tensor, dense: torch.Tensor | None) -> tuple[dict, dict]:
        """Read, prune and write one layer (`hidden` and `dense` advance in place); returns its sizes and its
        entry of the run report."""
        i = plan.layer
        work = LayerWork(plan, self._layer_tensors(prefetcher, i), hidden, dense,
                         read_next=lambda: prefetcher.read_ahead(i + 1))
        result = pruner.prune(work)
        del work
        self._check_finite(hidden, i)
        fault_point(f"pass2:{i}")
        with self.timer.phase("write"):
            writer.write(i + 1, result.tensors)
        return result.spec.to_dict(), result.report.to_dict()

    def reconstruction_memory(self, allocation: Allocation) -> ReconstructionMemory | None:
        """The largest per-layer peak of the reconstruction windows under this allocation (None when off)."""
        settings = self.options.reconstruction()
        if settings is None:
            return None
        s, u, part = self.shape, self.units, GradientReconstruction(settings)
        compute_bytes = torch.empty((), dtype=self.dtype).element_size()
        worst = None
        for plan in allocation.plans:
            removed_units = plan.prune_units_per_bucket * u.num_buckets
            sizes = WindowSizes(s.hidden_size, s.num_heads - removed_units * u.heads_per_unit,
                                s.num_kv_heads - removed_units * u.kv_heads_per_unit, s.head_dim,
                                s.intermediate_size - plan.prune_channels, 3 * s.hidden_size * s.intermediate_size)
            windows = part.windows(plan)  # the rule the reconstruction itself follows
            memory = reconstruction_memory(sizes, replace(settings, windows=windows), self.options.nsamples,
                                           self.options.seqlen, compute_bytes, self.options.switches().dense_target)
            if worst is None or memory.device_bytes > worst.device_bytes:
                worst = memory
        return worst

    def _check_reconstruction_fits(self, allocation: Allocation) -> None:
        """Refuse, in one line and before pass 2, a reconstruction whose estimated peak exceeds the memory
        the compute device has free."""
        memory = self.reconstruction_memory(allocation)
        if memory is None or not memory.device_bytes:
            return
        free = free_memory_bytes(self.device)
        if memory.device_bytes > free:
            raise StreamPruneError(
                f"--reconstruct needs about {memory.device_bytes / 2**30:.1f} GiB on {self.device} for the "
                f"{memory.window} window ({memory.describe()}) but {free / 2**30:.1f} GiB is free; lower "
                "--reconstruct-batch or --nsamples, use --reconstruct-inputs pruned, or --reconstruct off")

    def _copy_non_layer(self, writer: ShardWriter) -> None:
        """Embeddings, final norm and lm_head, each in its own shard, one tensor in memory at a time."""
        L = self.shape.num_layers
        for k, name in enumerate(self.adapter.non_layer_tensor_names(self.shape)):
            if not writer.exists(L + 1 + k):
                with self.timer.phase("copy"):
                    writer.write(L + 1 + k, self.reader.read([name]))

    # -- entry point ----------------------------------------------------------------------------

    def run(self) -> PruneResult:
        if self.already_complete:  # read only: neither OUT_DIR nor a staging folder is touched
            return PruneResult(self.out_dir, read_report(self.out_dir), already_complete=True)
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
        state = RunState.open(self.staging, self.fingerprint, self.restart)
        writer = self.output.shard_writer()
        with self.stop, torch.inference_mode(False), torch.no_grad():
            with self.timer.phase("calibration"):  # wall time of each step, for the report (and the demo)
                ids = self._calibration_ids()
            o = self.options
            need_scores = not o.uniform and o.ratio > 0
            if need_scores:
                with shared_cache.locked(self._shared_path("dense-scores")):  # one dense pass per entry
                    self._reuse_dense_scores(state)
                    with self.timer.phase("pass1"):
                        scores = self._pass1_scores(state, ids)
                    self._share_dense_scores(scores)
            else:
                scores = None
            if state.allocation is None:
                allocation = solve_allocation(self.shape, self.reader.parameter_count(), o.ratio, scores,
                                              o.allocation_settings())
                state.allocation = {"summary": allocation.to_dict(),
                                            "plans": [asdict(p) for p in allocation.plans]}
                state.hidden_file = None  # pass 2 starts from the embeddings again
                state.save()
            allocation = _allocation_from_state(state.allocation)
            self._check_reconstruction_fits(allocation)
            with self.timer.phase("pass2"):
                self._pass2_prune(state, ids, allocation, writer)
            self._copy_non_layer(writer)
        report = self._report(state, allocation, time.perf_counter() - started)
        self.output.finalize(writer, state.layer_specs, report)
        return PruneResult(self.out_dir, report, allocation, state.layer_specs)

    def _report(self, state: RunState, allocation: Allocation, seconds: float) -> dict:
        after = self.reader.parameter_count() - sum(
            r["params_before"] - r["params_after"] for r in state.layer_reports)
        report = {
            "streamprune_version": _version(),
            "model_dir": str(self.model_dir),
            "family": self.shape.family,
            "options": asdict(self.options),
            "fingerprint": self.fingerprint,  # a rerun with the same one is "already complete"
            "device": str(self.device),
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            "gqa_unit": "kv-group" if self.units.kv_heads_per_unit and self.shape.is_gqa else "head",
            "allocation": allocation.to_dict(),
            "params_before": self.reader.parameter_count(),
            "params_after": after,
            "achieved_ratio": 1 - after / self.reader.parameter_count(),
            "dense_scores_reused": state.dense_scores_reused,
            "shared_cache_key": None if self.shared_cache is None else self._shared_key(),
            "layers": state.layer_reports,
            "timings_seconds": {"total_this_process": seconds, **dict(self.timer.seconds)},
            "peak_rss_mb": peak_rss_mb(),
        }
        if self.device.type == "cuda":
            report["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return report


def _allocation_from_state(saved: dict) -> Allocation:
    s = saved["summary"]
    return Allocation([LayerPlan(**p) for p in saved["plans"]], s["params_before"], s["params_after"],
                      s["target_ratio"], s["base_ratio"], s["alpha"], s["pruned_layers"],
                      s["attention_scale"])  # resolved by solve_allocation; the fingerprint pins the version


def _version() -> str:
    from . import __version__

    return __version__


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
