"""sha256 of every output file of a matrix of pruning options, to prove a refactor changed no output.

Builds tiny random models (as the tests do), prunes each under a matrix of options (gradient reconstruction
and --split search included) through `streamprune.prune`, and prints one JSON object {case: {file: sha256}}
covering every safetensors shard and the config. Run it on the commit before a refactor and on the one
after, then compare:

    PYTHONPATH=/tmp/base python tools/check_identical_outputs.py > before.json   # the old checkout's package
    python tools/check_identical_outputs.py > after.json                          # this checkout's
    python tools/check_identical_outputs.py --compare before.json after.json

The run report is left out (it holds timings). One thread, float32, a calibration file of fixed text:
two runs of the same commit give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import click
import torch

REPO = Path(__file__).resolve().parents[1]
# tests/tiny_models.py builds the models. A PYTHONPATH picks the streamprune under test (an old checkout, for the
# "before" hashes), so this checkout then goes last instead of first; stderr names the package used.
if os.environ.get("PYTHONPATH"):
    sys.path.append(str(REPO))
else:
    sys.path.insert(0, str(REPO))

CALIB = {"nsamples": 8, "seqlen": 16, "dtype": "float32", "quiet": True}
RECON = {"nsamples": 20, "reconstruct_lr": 3e-4, "reconstruct_epochs": 2}
# case -> (model, ratio, options). GQA models so that --gqa-mode groups differs from heads.
CASES: dict[str, tuple[str, float, dict]] = {
    "defaults-0.2": ("llama", 0.2, {}),
    "defaults-0.5": ("llama", 0.5, {}),
    "paper": ("llama", 0.5, "paper"),  # PAPER_METHOD: nsamples 32 instead of 8
    "no-regression": ("llama", 0.5, {"regression": False}),
    "recovery-affine": ("llama", 0.5, {"recovery": "affine"}),
    "selection-refit": ("llama", 0.5, {"selection": "refit"}),
    "target-dense": ("llama", 0.5, {"target": "dense"}),
    "split-search": ("llama", 0.2, {"split": "search"}),
    "split-search-samples": ("llama", 0.2, {"split": "search", "split_samples": 4}),
    "split-search-samples-dense": ("llama", 0.2, {"split": "search", "split_samples": 4, "target": "dense"}),
    # Gradient reconstruction, with the tests' settings (tests/test_reconstruction.py RECON) at two epochs: every
    # case keeps some trained window, so its bytes differ from the closed form's.
    "reconstruct-both": ("llama", 0.5, {"reconstruct": "both", **RECON}),
    "reconstruct-mlp-pruned": ("llama", 0.5, {"reconstruct": "mlp", "reconstruct_inputs": "pruned", **RECON}),
    "reconstruct-layer": ("qwen2", 0.5, {"reconstruct": "layer", **RECON}),
    "reconstruct-layer-pruned-dense": ("llama", 0.5, {"reconstruct": "layer", "reconstruct_inputs": "pruned",
                                                      "target": "dense", **RECON}),
    "reconstruct-split-search": ("llama", 0.2, {"split": "search", "reconstruct": "both", **RECON}),
    "gqa-groups": ("llama", 0.5, {"gqa_mode": "groups"}),
    "uniform": ("llama", 0.5, {"uniform": True}),
    "attention-scale-1": ("llama", 0.2, {"attention_scale": 1.0}),
    "qwen2": ("qwen2", 0.5, {}),
    "mistral": ("mistral", 0.5, {}),
}
MODELS = {"llama": {"family": "llama", "kv_heads": 4}, "qwen2": {"family": "qwen2", "kv_heads": 4},
          "mistral": {"family": "mistral", "kv_heads": 2}}


def file_hashes(folder: Path) -> dict[str, str]:
    files = sorted(folder.glob("*.safetensors")) + [folder / "config.json"]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def options_for(spec: dict | str) -> dict:
    if spec == "paper":
        from streamprune.options import PAPER_METHOD

        return dict(PAPER_METHOD)
    return dict(spec)


def run_matrix(work: Path) -> dict[str, dict[str, str]]:
    import streamprune
    from tests.tiny_models import make_tiny_model, write_calib_text

    click.echo(f"streamprune from {Path(streamprune.__file__).parent}", err=True)

    calib = write_calib_text(work / "calib.txt")
    models = {name: make_tiny_model(work / name, **spec) for name, spec in MODELS.items()}
    hashes = {}
    for case, (model, ratio, spec) in CASES.items():
        out = work / "out" / case
        options = {**CALIB, **options_for(spec)}  # --paper's calibration size wins, as on the command line
        streamprune.prune(models[model], out, ratio, calib=str(calib), **options)
        hashes[case] = file_hashes(out)
        click.echo(f"{case}: {len(hashes[case])} files", err=True)
    return hashes


def compare(before: dict, after: dict) -> int:
    """Print one line per case; 0 when every file of every case is byte-identical."""
    bad = 0
    for case in sorted(set(before) | set(after)):
        same = before.get(case) == after.get(case)
        bad += not same
        n = len(after.get(case, {}))
        click.echo(f"{case:32s} {'identical' if same else 'DIFFERENT'} ({n} files)")
    click.echo("all identical" if not bad else f"{bad} case(s) differ")
    return 1 if bad else 0


@click.command()
@click.option("--compare", "files", nargs=2, type=click.Path(exists=True, dir_okay=False), default=None,
              help="Compare two earlier outputs of this script instead of running the matrix.")
def main(files: tuple[str, str] | None) -> None:
    if files:
        before, after = (json.loads(Path(f).read_text()) for f in files)
        sys.exit(compare(before, after))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        click.echo(json.dumps(run_matrix(Path(tmp)), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
