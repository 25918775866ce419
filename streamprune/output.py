"""The output format: a Hugging Face model folder, assembled in a staging folder and published by rename.

The streaming loop writes each pruned layer as its own shard through `ShardWriter`; when every layer
is done, `HFFolderOutput.finalize` writes the config (the family's stock config when all layers keep
one shape, else StreamPrune's per-layer config plus its modeling files), copies the tokenizer and
other auxiliary files, writes the index, checks every tensor against the config, and renames the
staging folder to OUT_DIR. Nothing named OUT_DIR exists before that rename, so a folder that looks
complete is complete. Other formats (the GGUF export) read the published folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from .architecture import ModelShape
from .checkpoint import CheckpointReader, ShardWriter, copy_aux_files, read_json, write_json
from .errors import StreamPruneError
from .faults import fault_point
from .modeling import AUTO_MAP, REMOTE_CODE_FILES
from .options import fields as option_fields
from .run_state import STATE_NAME

REPORT_NAME = "streamprune_report.json"
SCRATCH_FILES = (STATE_NAME, "calibration.safetensors")


class HFFolderOutput:
    """OUT_DIR as a Hugging Face folder: sharded safetensors, index, config, tokenizer, report."""

    def __init__(self, reader: CheckpointReader, shape: ModelShape, staging: Path, out_dir: Path):
        self.reader, self.shape, self.staging, self.out_dir = reader, shape, staging, out_dir
        self.adapter = shape.adapter

    def shard_writer(self) -> ShardWriter:
        """One shard per decoder layer, then one per non-layer tensor."""
        non_layer = self.adapter.non_layer_tensor_names(self.shape)
        return ShardWriter(self.staging, self.shape.num_layers + len(non_layer))

    def finalize(self, writer: ShardWriter, specs: list[dict], report: dict) -> None:
        config, remote = self.output_config(specs)
        write_json(self.staging / "config.json", config)
        if remote:
            for src in REMOTE_CODE_FILES:
                shutil.copy2(src, self.staging / src.name)
        copy_aux_files(self.reader.model_dir, self.staging)
        self.verify(writer.write_index(), specs)
        write_json(self.staging / REPORT_NAME, report)
        for scratch in self.staging.glob("hidden-*.safetensors"):
            scratch.unlink()
        fault_point("finalize")
        for name in SCRATCH_FILES:
            (self.staging / name).unlink(missing_ok=True)
        self.publish()

    def output_config(self, specs: list[dict]) -> tuple[dict, bool]:
        """(config, needs remote code): the stock family config when every layer has one shape and the
        family's native biases; else StreamPrune's per-layer config."""
        dense = self.shape.dense_layer_spec()
        flags = ("qkv_bias", "o_bias", "mlp_bias", "down_bias")
        homogeneous = all(s == specs[0] for s in specs) and all(specs[0][f] == dense[f] for f in flags)
        if homogeneous:
            cfg = dict(self.reader.config)
            cfg.update(num_attention_heads=specs[0]["num_attention_heads"],
                       num_key_value_heads=specs[0]["num_key_value_heads"],
                       intermediate_size=specs[0]["intermediate_size"], head_dim=self.shape.head_dim)
            return cfg, False
        cfg = self.adapter.engine_config(self.reader.config, self.shape, specs).to_dict()
        cfg.update(architectures=["StreamPruneForCausalLM"], auto_map=dict(AUTO_MAP))
        cfg["dtype"] = str(self.reader.storage_dtype()).removeprefix("torch.")
        return cfg, True

    def verify(self, shapes: dict[str, tuple[int, ...]], specs: list[dict]) -> None:
        """Every tensor the new config implies is in the index with the expected shape, and no others."""
        expected: dict[str, tuple[int, ...]] = {}
        for i, spec in enumerate(specs):
            expected.update(self.adapter.expected_layer_shapes(self.shape, i, spec))
        for name in self.adapter.non_layer_tensor_names(self.shape):
            expected[name] = self.reader.shape(name)
        if shapes != expected:
            missing = sorted(set(expected) - set(shapes))[:3]
            wrong = sorted(n for n in set(expected) & set(shapes) if expected[n] != shapes[n])[:3]
            raise StreamPruneError(f"output verification failed (missing {missing}, wrong shape {wrong}); "
                                   "rerun with --restart")

    def publish(self) -> None:
        """Move the staging folder into place; an existing OUT_DIR is removed only now (--overwrite)."""
        publish_folder(self.staging, self.out_dir)


def publish_folder(staging: Path, out_dir: Path) -> None:
    """Rename a complete staging folder to `out_dir`, replacing an existing one only at this moment
    (the other formats, e.g. the DeciLM export, publish the same way)."""
    if out_dir.exists():
        trash = out_dir.parent / f".{out_dir.name}.streamprune-old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(out_dir, trash)
        os.replace(staging, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


def finished_run_differences(out_dir: Path, fingerprint: dict) -> list[str] | None:
    """How the finished run in OUT_DIR differs from a run with `fingerprint` (run_state.run_fingerprint):
    [] when it is the same run (same input checkpoint, same result-changing options), e.g. ['input checkpoint',
    'nsamples 8 -> 16'] when not, None when OUT_DIR holds no report with a fingerprint (not a streamprune
    output, or one written before reports recorded it)."""
    try:
        done = json.loads((out_dir / REPORT_NAME).read_text(encoding="utf-8"))["fingerprint"]
        old_options, new_options = done["options"], fingerprint["options"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    diffs = [] if done.get("format") == fingerprint["format"] else ["report format"]
    diffs += [] if done.get("model") == fingerprint["model"] else ["input checkpoint"]
    # An option added after that run was written is absent from its report; a new option's default keeps
    # the old result, so absent matches the default (a run from before --channel-multiple is still complete).
    old_options = {**_option_defaults(), **old_options}
    return diffs + [f"{k} {old_options.get(k)} -> {v}" for k, v in new_options.items() if old_options.get(k) != v]


def _option_defaults() -> dict:
    return {f.name: f.default for f in option_fields() if f.default is not dataclasses.MISSING}


def read_report(out_dir: str | Path) -> dict:
    path = Path(out_dir) / REPORT_NAME
    if not path.is_file():
        raise StreamPruneError(f"{out_dir} has no {REPORT_NAME}; is it a streamprune output folder?")
    return read_json(path)
