"""The state of one run: its staging folder, its resumable progress, and Ctrl-C handling."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .checkpoint import CheckpointReader, read_json, write_json
from .errors import StreamPruneError
from .options import PruneOptions

STATE_NAME = "state.json"
FORMAT_VERSION = 1


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


@dataclass
class RunState:
    """`state.json` in the staging folder: how far each pass got, and what it decided.

    Saved after every layer, so a killed run resumes from the last completed one. `fingerprint`
    identifies the input and the result-changing options; a different one refuses to resume.
    """

    path: Path
    fingerprint: dict
    scores: list[float] = field(default_factory=list)  # pass 1: cos(input, output) per dense layer
    pass1_seconds: list[dict] = field(default_factory=list)
    dense_scores_reused: bool = False  # pass 1 came from a shared cache
    allocation: dict | None = None  # the solved per-layer plans (allocation summary and plans)
    pass2_done: int = 0  # layers pruned and written
    layer_specs: list[dict] = field(default_factory=list)
    layer_reports: list[dict] = field(default_factory=list)
    hidden_file: str | None = None  # the latest hidden-state checkpoint in the staging folder

    @classmethod
    def open(cls, staging: Path, fingerprint: dict, restart: bool) -> RunState:
        """The saved state of an unfinished run with this fingerprint, or a fresh staging folder."""
        path = staging / STATE_NAME
        if staging.is_dir() and path.is_file() and not restart:
            saved = read_json(path)
            if saved.get("fingerprint") != fingerprint:
                raise StreamPruneError(
                    f"{staging} holds an unfinished run with different options or input; rerun with the "
                    "same options to resume, or pass --restart to discard it"
                )
            known = {f.name for f in fields(cls)} - {"path"}
            return cls(path=path, **{k: v for k, v in saved.items() if k in known})
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        state = cls(path=path, fingerprint=fingerprint)
        state.save()
        return state

    def save(self) -> None:
        data = asdict(self)
        del data["path"]
        write_json(self.path, data)


class StopFlag:
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
