"""Checkpoint I/O: lazy per-tensor reads from safetensors shards, and per-file atomic shard writes.

Nothing here ever holds more than the tensors asked for: the reader opens a shard only for the
tensors it is asked to return, and the writer writes each output shard as soon as it is complete.

Reads copy each tensor's bytes from the file into its own buffer with plain file reads, rather than
through safetensors' memory map: a memory-mapped tensor is only read from disk when first touched,
so a background read-ahead would read nothing, and its pages would count in the process's RSS
alongside the copies made from them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import StreamPruneError
from .faults import fault_point

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied verbatim from the input folder when present (tokenizer, chat template, generation).
AUX_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
    "chat_template.json",
)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StreamPruneError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StreamPruneError(f"{path} is not valid JSON ({exc})") from None


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically: a crash leaves the old file or the new one, never half of one. The
    temporary name is unique per process, so concurrent writers (batch jobs sharing a cache) never
    write into each other's temporary file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def copy_atomically(src: Path, dst: Path) -> None:
    """Copy through a per-process temporary name and rename, for files other processes may read."""
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


class CheckpointReader:
    """Reads config.json and single-file or sharded safetensors lazily, one tensor at a time."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise StreamPruneError(f"model folder {self.model_dir} does not exist")
        config_path = self.model_dir / "config.json"
        if not config_path.is_file():
            raise StreamPruneError(f"{self.model_dir} has no config.json; pass a Hugging Face model folder")
        self.config = read_json(config_path)
        self.weight_map = self._read_weight_map()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._spans: dict[str, tuple[int, int]] = {}  # name -> (start, end) byte offsets in its file
        self._scan_headers()

    def _read_weight_map(self) -> dict[str, str]:
        index = self.model_dir / INDEX_NAME
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise StreamPruneError(f"{index} has no weight_map")
            return weight_map
        if (self.model_dir / SINGLE_NAME).is_file():
            return {}  # filled from the file header in _scan_headers
        raise StreamPruneError(
            f"{self.model_dir} has no {SINGLE_NAME} or {INDEX_NAME}; only safetensors checkpoints are read"
        )

    def _scan_headers(self) -> None:
        """Read every shard's header (not its data) to learn shapes and catch missing or bad shards."""
        files = sorted(set(self.weight_map.values())) or [SINGLE_NAME]
        found: dict[str, str] = {}
        for file in files:
            path = self.model_dir / file
            if not path.is_file():
                raise StreamPruneError(f"shard {file} named in the index is missing from {self.model_dir}")
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():
                        found[name] = file
                        sl = handle.get_slice(name)
                        self._shapes[name] = tuple(sl.get_shape())
                        self._dtypes[name] = _torch_dtype(sl.get_dtype())
            except (SafetensorError, OSError) as exc:
                raise StreamPruneError(f"shard {file} is truncated or corrupt ({exc}); re-download it") from None
            self._spans.update(_data_spans(path))
        if not self.weight_map:
            self.weight_map = found
        for name, file in self.weight_map.items():
            if found.get(name) != file:
                raise StreamPruneError(f"the index names tensor {name} in {file}, but that shard lacks it")

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        self._require(name)
        return self._dtypes[name]

    def _require(self, name: str) -> None:
        if name not in self.weight_map:
            raise StreamPruneError(f"tensor {name} is missing from the checkpoint in {self.model_dir}")

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Load the named tensors into fresh CPU tensors (stored dtype), opening each shard once."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            self._require(name)
            by_file[self.weight_map[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            try:
                with open(self.model_dir / file, "rb", buffering=0) as fh:
                    for name in sorted(file_names, key=lambda n: self._spans[n][0]):  # front to back
                        out[name] = self._read_tensor(fh, name)
            except OSError as exc:
                raise StreamPruneError(f"reading {name} from {file} failed ({exc.strerror or exc})") from None
        return {name: out[name] for name in names}

    def _read_tensor(self, fh, name: str) -> torch.Tensor:
        start, end = self._spans[name]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        fh.seek(start)
        done = 0
        while done < len(view):  # raw reads may return fewer bytes than asked
            n = fh.readinto(view[done:])
            if not n:
                raise StreamPruneError(f"shard {Path(fh.name).name} is truncated; re-download it")
            done += n
        return buffer.view(self._dtypes[name]).reshape(self._shapes[name])

    def parameter_count(self) -> int:
        """Parameters as transformers counts them: a tied lm_head is not stored, so counted once."""
        total = 0
        for name, shape in self._shapes.items():
            if name == "lm_head.weight" and self.config.get("tie_word_embeddings"):
                continue
            total += _numel(shape)
        return total

    def storage_dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's decoder weights (what the pruned model is written in)."""
        return self._dtypes.get("model.layers.0.self_attn.q_proj.weight", torch.float32)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise StreamPruneError(f"unsupported tensor dtype {name} in checkpoint")
    return _DTYPES[name]


def _data_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte span of every tensor in a safetensors file, from its header (8-byte length +
    JSON); also the truncation check, since safetensors itself only notices a short file on read."""
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    base = 8 + header_len
    spans = {k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
             for k, v in header.items() if k != "__metadata__"}
    if path.stat().st_size < max((end for _, end in spans.values()), default=base):
        raise StreamPruneError(f"shard {path.name} is truncated; re-download it")
    return spans


def shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


class ShardWriter:
    """Writes output shards one file at a time into a staging folder, and the index at the end.

    Each decoder layer gets its own shard, and so does each non-layer tensor, so the writer never
    needs more than one layer (or the single largest tensor) in memory, and a resumed run can tell
    exactly which layers are complete from the files present.
    """

    def __init__(self, staging_dir: Path, total_shards: int):
        self.staging_dir = staging_dir
        self.total_shards = total_shards

    def path(self, shard_index: int) -> Path:
        return self.staging_dir / shard_name(shard_index, self.total_shards)

    def exists(self, shard_index: int) -> bool:
        return self.path(shard_index).is_file()

    def write(self, shard_index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write one shard via a temporary file and rename, so a crash never leaves half a shard."""
        final = self.path(shard_index)
        tmp = final.with_name(final.name + ".tmp")
        contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        try:
            save_file(contiguous, str(tmp), metadata={"format": "pt"})
            fault_point(f"write:{shard_index}")
            os.replace(tmp, final)
        except (OSError, SafetensorError) as exc:
            tmp.unlink(missing_ok=True)
            reason = getattr(exc, "strerror", None) or str(exc)
            raise StreamPruneError(
                f"writing {final.name} failed ({reason}); free disk space and run the same command again to resume"
            ) from None

    def write_index(self) -> dict[str, tuple[int, ...]]:
        """Index every shard present; returns name -> shape for verification."""
        weight_map, shapes, total_size = {}, {}, 0
        for i in range(1, self.total_shards + 1):
            with safe_open(str(self.path(i)), framework="pt") as handle:
                for name in handle.keys():
                    sl = handle.get_slice(name)
                    shapes[name] = tuple(sl.get_shape())
                    weight_map[name] = self.path(i).name
                    total_size += _numel(shapes[name]) * _DTYPE_SIZES[sl.get_dtype()]
        write_json(self.staging_dir / INDEX_NAME, {"metadata": {"total_size": total_size}, "weight_map": weight_map})
        return shapes


_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer and generation files; returns the names copied."""
    copied = []
    for name in AUX_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
