"""The batch manifest: one job per row, every row checked before anything runs.

A CSV file whose header holds at least `model_dir,out_dir,ratio`, or a YAML (or JSON) list of
mappings with the same keys. Any other key is a PruneOptions field, spelled like the field or like
`streamprune run`'s flag (`gqa_mode` or `gqa-mode`, `num_pruned_layers` or `layers`, `greedy: false`
or `no-greedy: true`). Names, types, defaults and allowed values all come from the options schema
(streamprune/options.py); this module only reads cells and reports problems, one line naming every
bad row.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..calibration import FILE_SUFFIXES as CALIB_FILE_SUFFIXES
from ..calibration import split_sources
from ..errors import StreamPruneError
from ..options import PruneOptions, cli_flag, plain_type
from ..options import fields as option_fields
from .jobs import Job

_TRUE, _FALSE = {"true", "yes", "1"}, {"false", "no", "0"}
_REQUIRED = ("model_dir", "out_dir", "ratio")
MAX_ERRORS = 5  # bad rows named in the one-line validation error

OPTION_TYPES = {f.name: plain_type(f) for f in option_fields()}


# Not pruning options: the GGUF file `run --gguf` writes after pruning, and its weight type; the DeciLM folder
# `run --decilm` writes, and its FFN multiple.
GGUF_KEYS = ("gguf", "gguf_outtype", "decilm", "decilm_ffn_multiple")
GGUF_OUTTYPES = ("f32", "f16", "q8_0")  # streamprune.export_gguf.OUTTYPES (checked equal by a test)


def _aliases() -> dict[str, tuple[str, bool]]:
    """Manifest key -> (field, negated): field names, dashed names and the CLI's own flags (layers, no-greedy)."""
    aliases = {"model_dir": ("model_dir", False), "model-dir": ("model_dir", False),
               "out_dir": ("out_dir", False), "out-dir": ("out_dir", False)}
    for name in GGUF_KEYS:
        aliases[name] = aliases[name.replace("_", "-")] = (name, False)
    for f in option_fields():
        for name in (f.name, f.name.replace("_", "-")):
            aliases[name] = (f.name, False)
        flag = cli_flag(f).lstrip("-")
        negated = f.default is True  # spelled --no-greedy, --no-prefetch, ...
        aliases[flag] = aliases[flag.replace("-", "_")] = (f.name, negated)
        if negated:
            aliases[f"no-{f.name.replace('_', '-')}"] = aliases[f"no_{f.name}"] = (f.name, True)
    return aliases


ALIASES = _aliases()
VALID_KEYS = ", ".join(["model_dir", "out_dir"] + [f.name for f in option_fields()] + list(GGUF_KEYS))


class _RowError(ValueError):
    """A problem with one value of one row; collected so that one message names every bad row."""


def _unknown_key_message(key: str, source: str) -> str:
    close = difflib.get_close_matches(key, list(ALIASES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"unknown column {key!r} in {source}{hint}; valid columns: {VALID_KEYS} "
            "(the run command's spellings such as gqa-mode, layers or no-greedy work too)")


def _canonical_keys(keys: Iterable[str], source: str) -> dict[str, tuple[str, bool]]:
    """Map each manifest key to its field; unknown or repeated keys are errors."""
    mapping: dict[str, tuple[str, bool]] = {}
    seen: dict[str, str] = {}
    for key in keys:
        norm = str(key).strip().lower()
        if norm not in ALIASES:
            raise StreamPruneError(_unknown_key_message(str(key), source))
        name = ALIASES[norm][0]
        if name in seen:
            raise StreamPruneError(f"{source} gives {name} twice (as {seen[name]!r} and {key!r})")
        seen[name] = str(key)
        mapping[key] = ALIASES[norm]
    return mapping


def _convert(value: object, kind: type, key: str) -> object:
    """A cell (CSV text or a YAML scalar) as the option's type."""
    if kind is bool:
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in _TRUE | _FALSE:
            return value if isinstance(value, bool) else text in _TRUE
        raise _RowError(f"{key} must be true/false, yes/no or 1/0, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not str(value).strip().lstrip("+-").isdigit():
            raise _RowError(f"{key} must be a whole number, got {value!r}")
        return int(str(value).strip())
    if kind is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(str(value).strip())
        except ValueError:
            raise _RowError(f"{key} must be a number, got {value!r}") from None
    return str(value).strip()


def _resolve(base: Path, value: str) -> str:
    return os.path.abspath(base / Path(value).expanduser())


def _calib_path(base: Path, calib: str) -> str:
    """Calibration files are relative to the manifest, also inside a mixture A+B; dataset specs, 'self' and
    'builtin' are left alone."""
    parts = split_sources(calib, base)
    if len(parts) > 1:
        return "+".join(_calib_path(base, part) for part in parts)
    looks_like_file = Path(calib).suffix.lower() in CALIB_FILE_SUFFIXES or (base / calib).exists()
    return _resolve(base, calib) if calib not in ("self", "builtin") and looks_like_file else calib


def _parse_row(row: dict, keys: dict[str, tuple[str, bool]], number: int, base: Path) -> Job:
    values: dict[str, object] = {}
    for key, raw in row.items():
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            continue  # empty cell: the option's default
        name, negated = keys[key]
        if name in ("model_dir", "out_dir", "gguf", "decilm"):
            values[name] = _resolve(base, str(raw).strip())
            continue
        if name == "gguf_outtype":
            values[name] = _gguf_outtype(raw)
            continue
        if name == "decilm_ffn_multiple":
            values[name] = _ffn_multiple(raw)
            continue
        value = _convert(raw, OPTION_TYPES[name], str(key))
        values[name] = (not value) if negated else value
    missing = [k for k in _REQUIRED if k not in values]
    if missing:
        raise _RowError(f"missing {', '.join(missing)}")
    if "calib" in values:
        values["calib"] = _calib_path(base, str(values["calib"]))
    model_dir, out_dir = str(values.pop("model_dir")), str(values.pop("out_dir"))
    gguf = {k: values.pop(k) for k in GGUF_KEYS if k in values}
    _check_options(values)
    return Job(number, model_dir, out_dir, values, **gguf)


def _ffn_multiple(raw: object) -> int:
    value = _convert(raw, int, "decilm_ffn_multiple")
    if value < 1 or value % 256:
        raise _RowError(f"decilm_ffn_multiple must be a multiple of 256, got {raw!r}")
    return value


def _gguf_outtype(raw: object) -> str:
    value = str(raw).strip().lower()
    if value not in GGUF_OUTTYPES:
        raise _RowError(f"gguf_outtype must be one of {', '.join(GGUF_OUTTYPES)}, got {raw!r}")
    return value


def _check_options(values: dict) -> None:
    try:
        PruneOptions(**values).validate()
    except StreamPruneError as exc:
        raise _RowError(str(exc).replace("--", "")) from None


def _csv_rows(path: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheets often add a BOM
        reader = csv.DictReader(fh, skipinitialspace=True)
        header = [h for h in (reader.fieldnames or []) if h is not None]
        rows = []
        for row in reader:
            if None in row:
                raise StreamPruneError(f"{path.name} line {reader.line_num} has more cells than the header")
            cells = [str(v or "").strip() for v in row.values()]
            if any(cells) and not cells[0].startswith("#"):  # blank lines and '#' comment rows
                rows.append((f"line {reader.line_num}", row))
    return header, rows


def _mapping_rows(path: Path) -> list[tuple[str, dict]]:
    data = _load_structured(path)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise StreamPruneError(f"{path.name} must be a list of mappings, one per job (see `streamprune batch -h`)")
    return [("", r) for r in data]


def _load_structured(path: Path) -> object:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise StreamPruneError(f"{path.name} is not valid JSON ({exc})") from None
    try:
        import yaml
    except ImportError:
        raise StreamPruneError("a YAML manifest needs PyYAML: pip install pyyaml (or use a CSV manifest)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StreamPruneError(f"{path.name} is not valid YAML ({' '.join(str(exc).split())})") from None


def load_manifest(path: str | Path) -> list[Job]:
    """Parse and validate every row; raises one StreamPruneError naming all bad rows."""
    path = Path(path)
    if not path.is_file():
        raise StreamPruneError(f"manifest {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        header, rows = _csv_rows(path)
        keys = _canonical_keys(header, path.name)
        _check_header(keys, path.name)
    elif suffix in (".yaml", ".yml", ".json"):
        rows = _mapping_rows(path)
        keys = _canonical_keys({k for _, r in rows for k in r}, path.name)
    else:
        raise StreamPruneError(f"manifest {path.name}: use a .csv, .yaml/.yml or .json file")
    if not rows:
        raise StreamPruneError(f"manifest {path.name} lists no jobs")
    jobs = _parse_rows(rows, keys, path)
    _check_distinct_outputs(jobs, path.name)
    return jobs


def _check_header(keys: dict[str, tuple[str, bool]], source: str) -> None:
    missing = [k for k in _REQUIRED if k not in {name for name, _ in keys.values()}]
    if missing:
        raise StreamPruneError(f"{source} has no {', '.join(missing)} column; the header needs at least "
                               "model_dir,out_dir,ratio")


def _parse_rows(rows: list[tuple[str, dict]], keys: dict, path: Path) -> list[Job]:
    jobs, errors = [], []
    base = path.resolve().parent
    for number, (where, row) in enumerate(rows, start=1):
        try:
            jobs.append(_parse_row(row, keys, number, base))
        except _RowError as exc:
            errors.append(f"job {number}{f' ({where})' if where else ''}: {exc}")
    if errors:
        more = f"; and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise StreamPruneError(f"invalid manifest {path.name}: {'; '.join(errors[:MAX_ERRORS])}{more}")
    return jobs


def _check_distinct_outputs(jobs: list[Job], source: str) -> None:
    """Two jobs writing one folder would overwrite (or, on Ray, corrupt) each other's output."""
    first: dict[str, int] = {}
    for job in jobs:
        for path in filter(None, (job.out_dir, job.gguf, job.decilm)):
            if path in first:
                raise StreamPruneError(f"invalid manifest {source}: jobs {first[path]} and {job.number} "
                                       f"both write {path}; give every job its own out_dir, gguf and decilm")
            first[path] = job.number
