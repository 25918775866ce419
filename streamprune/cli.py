"""Command line: `streamprune run | eval | export | demo | report | batch`.

Every command turns a `StreamPruneError` (bad input, missing files, interruption) into a one-line
message on stderr and a non-zero exit; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import click

from .demo import DEMO_EVAL_WINDOWS, DEMO_NSAMPLES
from .errors import StreamPruneError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
OUTTYPE_CHOICES = ["f32", "f16", "q8_0"]  # streamprune.export_gguf.OUTTYPES (not imported: keeps --help fast)


def friendly_errors(func: Callable) -> Callable:
    """Run a command body; print one line per failure instead of a traceback unless --debug."""

    @functools.wraps(func)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            return func(*args, **kwargs)
        except StreamPruneError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE if "interrupted" not in str(exc) else EXIT_INTERRUPTED)
        except KeyboardInterrupt:
            click.echo("error: interrupted; run the same command again to resume", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:  # noqa: BLE001 - last resort: still one line, details on request
            if debug:
                traceback.print_exc()
            click.echo(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)", err=True)
            sys.exit(1)

    return click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")(wrapper)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="streamprune")
def main() -> None:
    """Layer-streaming SlimLLM structured pruning for LLaMA, Mistral and Qwen2 checkpoints."""


def _schema_option(f, default: object = dataclasses.MISSING) -> Callable:
    """One click option for one PruneOptions field, from the schema in options.py (the only place defaults,
    choices and help live; ranges are checked by PruneOptions.validate so the API and manifests agree).
    `default` replaces the schema's default for a command with its own (the demo's smaller calibration)."""
    from .options import cli_flag, info, plain_type

    meta, flag = info(f), cli_flag(f)
    default = f.default if default is dataclasses.MISSING else default
    if plain_type(f) is bool:
        if default is True:  # spelled --no-x: the flag turns the option off
            return click.option(flag, f.name, is_flag=True, flag_value=False, default=True, help=meta.help)
        return click.option(flag, f.name, is_flag=True, default=False, help=meta.help)
    kind = click.Choice(list(meta.choices)) if meta.choices else plain_type(f)
    if default is dataclasses.MISSING:
        return click.option(flag, f.name, type=kind, required=True, help=meta.help)
    return click.option(flag, f.name, type=kind, default=default, show_default=default is not None, help=meta.help)


def schema_option(name: str, default: object = dataclasses.MISSING) -> Callable:
    """The click option of one PruneOptions field, for commands that share it (eval and demo)."""
    from .options import fields

    return _schema_option(next(f for f in fields() if f.name == name), default)


def run_options(func: Callable) -> Callable:
    """`run`'s pruning options, generated from the PruneOptions schema (batch manifests use the same names)."""
    from .options import PAPER_METHOD, fields

    paper = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in PAPER_METHOD.items())
    options = [_schema_option(f) for f in fields()]
    options.append(click.option("--paper", is_flag=True,
                                help=f"SlimLLM exactly as published: {paper} (options given explicitly still win)."))
    for option in reversed(options):
        func = option(func)
    return func


def stop_with_parent() -> None:
    """When STREAMPRUNE_STOP_WITH_PARENT holds this process's parent id (`streamprune batch` sets it for its
    jobs), stop at the next layer boundary, as on Ctrl-C, once the parent is gone (kill -9, OOM, a closed
    terminal) rather than run on unwatched; a rerun of the batch resumes the job."""
    import os
    import signal
    import threading
    import time

    parent = os.getppid()
    if os.environ.get("STREAMPRUNE_STOP_WITH_PARENT") != str(parent):  # unset, or inherited from further up
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True, name="streamprune-parent-watch").start()


def apply_paper_preset(options: dict) -> dict:
    """Replace the method defaults by the paper's when --paper was given, keeping explicit options."""
    from .options import PAPER_METHOD

    if not options.pop("paper", False):
        return options
    ctx = click.get_current_context()
    for name, value in PAPER_METHOD.items():
        if ctx.get_parameter_source(name) != click.core.ParameterSource.COMMANDLINE:
            options[name] = value
    return options


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=str))
@run_options
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR (only once the new model is complete), "
                                               "even one that already holds this run.")
@click.option("--restart", is_flag=True, help="Discard an unfinished run of OUT_DIR instead of resuming it.")
@click.option("--shared-cache", default=None, type=click.Path(file_okay=False, path_type=str),
              help="Folder where runs of the same model and calibration settings share the tokenized "
                   "calibration set and the dense pass's layer scores (e.g. several ratios); runs at the same "
                   "time take turns, so each is computed once.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the summary line.")
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON on stdout.")
@click.option("--gguf", "gguf_path", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Also export the pruned model to this GGUF file for llama.cpp (see `streamprune export`).")
@click.option("--gguf-outtype", type=click.Choice(OUTTYPE_CHOICES), default="f16", show_default=True,
              help="Weight type of the --gguf file.")
@click.option("--decilm", "decilm_dir", default=None, type=click.Path(file_okay=False, path_type=str),
              help="Also export the pruned model to this DeciLM / Nemotron-NAS folder for vLLM "
                   "(see `streamprune export --format decilm`).")
@click.option("--decilm-ffn-multiple", type=int, default=None,
              help="Zero-pad the --decilm folder's FFN widths to this multiple of 256 and write ffn_mult.")
@friendly_errors
def run(model_dir: str, out_dir: str, overwrite: bool, restart: bool, shared_cache: str | None, quiet: bool,
        as_json: bool, gguf_path: str | None, gguf_outtype: str, decilm_dir: str | None,
        decilm_ffn_multiple: int | None, **options) -> None:
    """Prune MODEL_DIR into OUT_DIR, streaming one decoder layer at a time.

    An interrupted run (Ctrl-C, kill, power loss) resumes from the last finished layer when the same
    command is run again. OUT_DIR appears only when the pruned model is complete and verified. Run again
    once finished, the same command prints "already complete" and exits 0, leaving OUT_DIR as it is; other
    options or another input are refused unless --overwrite.
    """
    import json

    from .calibration import describe_source
    from .engine import StreamingPruner
    from .options import PruneOptions

    options = apply_paper_preset(options)
    stop_with_parent()
    pruner = StreamingPruner(model_dir, out_dir, PruneOptions(**options), overwrite=overwrite, restart=restart,
                             quiet=quiet, shared_cache=shared_cache)
    if decilm_dir is not None or decilm_ffn_multiple is not None:
        _check_decilm_options(decilm_dir, decilm_ffn_multiple)
    if pruner.already_complete:
        _already_complete(out_dir, pruner.run().report, as_json, gguf_path, gguf_outtype, decilm_dir,
                          decilm_ffn_multiple)
        return
    if gguf_path is not None:
        from .export_gguf import check_destination

        check_destination(gguf_path, overwrite)  # before an hour of pruning, not after
    if decilm_dir is not None:
        from .export_decilm import check_destination

        check_destination(decilm_dir, None, overwrite)
    result = pruner.run()
    r = result.report
    exported = _export_after_run(out_dir, gguf_path, gguf_outtype, overwrite) if gguf_path else None
    decilm = _decilm_after_run(out_dir, decilm_dir, decilm_ffn_multiple, overwrite) if decilm_dir else None
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"calibration: {describe_source(options['calib'])}, {options['nsamples']} x {options['seqlen']} tokens")
    click.echo(
        f"pruned {r['params_before']:,} -> {r['params_after']:,} parameters "
        f"({r['achieved_ratio']:.2%} removed, target {options['ratio']:.2%}) in "
        f"{r['timings_seconds']['total_this_process']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB -> {out_dir}"
    )
    if exported is not None:
        click.echo(_export_line(exported))
    if decilm is not None:
        click.echo(_decilm_line(decilm))


def _check_decilm_options(decilm_dir: str | None, ffn_multiple: int | None) -> None:
    from .export_decilm import check_ffn_multiple

    if decilm_dir is None:
        raise StreamPruneError("--decilm-ffn-multiple needs --decilm DEST")
    check_ffn_multiple(ffn_multiple)


def _decilm_after_run(out_dir: str, decilm_dir: str, ffn_multiple: int | None, overwrite: bool):
    from .export_decilm import export_decilm

    return export_decilm(out_dir, decilm_dir, ffn_multiple, overwrite=overwrite)


def _decilm_line(result) -> str:
    share = result.padding_bytes / result.bytes if result.bytes else 0.0
    return (f"exported {result.tensors} tensors (DeciLM, {result.bytes / 1e6:,.1f} MB, of which padding "
            f"{result.padding_bytes / 1e6:,.1f} MB = {share:.2%}) in {result.seconds:.1f} s, peak RSS "
            f"{result.peak_rss_mb:.0f} MB -> {result.path}")


def _already_complete(out_dir: str, report: dict, as_json: bool, gguf_path: str | None, outtype: str,
                      decilm_dir: str | None, ffn_multiple: int | None) -> None:
    """A retried command whose model is already in OUT_DIR: say so in one line (on stderr with --json, whose
    stdout stays the report) and exit 0. A requested export that is missing is still written (the first run
    may have been stopped during it, or the export added to the command since); one already there is left
    as it is, with a line saying so."""
    import json

    click.echo(f"already complete: {out_dir} holds this run (same input and options); nothing to do", err=as_json)
    if gguf_path is not None:
        if Path(gguf_path).is_file():
            line = _left_as_it_is(f"GGUF file {gguf_path}", f"streamprune export {out_dir} {gguf_path} --overwrite")
        else:
            line = _export_line(_export_after_run(out_dir, gguf_path, outtype, overwrite=False))
        click.echo(line, err=as_json)
    if decilm_dir is not None:
        if (Path(decilm_dir) / "config.json").is_file():  # a DeciLM folder appears complete, by a rename
            redo = f"streamprune export {out_dir} {decilm_dir} --format decilm --overwrite"
            line = _left_as_it_is(f"DeciLM folder {decilm_dir}", redo)
        else:
            line = _decilm_line(_decilm_after_run(out_dir, decilm_dir, ffn_multiple, overwrite=False))
        click.echo(line, err=as_json)
    if as_json:
        click.echo(json.dumps(report, indent=2))


def _left_as_it_is(what: str, redo: str) -> str:
    return f"{what} already exists; left as it is (`{redo}` writes it again)"


def _export_after_run(out_dir: str, gguf_path: str, outtype: str, overwrite: bool):
    from .export_gguf import export_gguf

    return export_gguf(out_dir, gguf_path, outtype, overwrite=overwrite)


def _export_line(result) -> str:
    return (f"exported {result.tensors} tensors ({result.outtype}, {result.bytes / 1e6:,.1f} MB) in "
            f"{result.seconds:.1f} s, peak RSS {result.peak_rss_mb:.0f} MB -> {result.path}")


@main.command(name="export")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@click.argument("dest", type=click.Path(path_type=str))
@click.option("--format", "fmt", type=click.Choice(["gguf", "decilm"]), default="gguf", show_default=True,
              help="gguf: one file for llama.cpp; decilm: a DeciLM / Nemotron-NAS folder for vLLM.")
@click.option("--outtype", type=click.Choice(OUTTYPE_CHOICES), default="f16", show_default=True,
              help="GGUF weight type: f32 (exact), f16 (half the size), q8_0 (8-bit blocks, about a quarter).")
@click.option("--ffn-multiple", type=int, default=None,
              help="decilm: zero-pad every FFN width to this multiple of 256 and write ffn_mult, for engines "
                   "that read only ffn_mult (SGLang, TensorRT-LLM, mlx-lm).")
@click.option("--overwrite", is_flag=True, help="Replace an existing DEST (only once the new one is complete).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@friendly_errors
def export_command(model_dir: str, dest: str, fmt: str, outtype: str, ffn_multiple: int | None, overwrite: bool,
                   quiet: bool) -> None:
    """Write MODEL_DIR (pruned by streamprune, or a dense LLaMA / Mistral / Qwen2 folder) as DEST for a serving engine.

    --format gguf (DEST a .gguf file): llama.cpp's `deci` architecture, which stores each layer's head
    counts and FFN width, so llama.cpp, llama-cpp-python, Ollama and LM Studio run the pruned model as
    it is. --format decilm (DEST a folder): NVIDIA's DeciLM / Nemotron-NAS layout, which vLLM serves with
    its own model code (`vllm serve DEST --trust-remote-code`: the folder carries only a configuration
    class). The model is read one layer at a time; DEST appears only when complete. Then, for example:

    \b
        llama-cli -m OUT.gguf -p "Once upon a time" -n 32
        vllm serve DEST --trust-remote-code
    """
    ctx = click.get_current_context()
    log = None if quiet else (lambda line: click.echo(line, err=True))
    if fmt == "decilm":
        if ctx.get_parameter_source("outtype") == click.core.ParameterSource.COMMANDLINE:
            raise StreamPruneError("--outtype is for --format gguf; a DeciLM folder keeps the model's own dtype")
        from .export_decilm import export_decilm

        click.echo(_decilm_line(export_decilm(model_dir, dest, ffn_multiple, overwrite=overwrite, log=log)))
        return
    if ffn_multiple is not None:
        raise StreamPruneError("--ffn-multiple is for --format decilm")
    from .export_gguf import export_gguf

    click.echo(_export_line(export_gguf(model_dir, dest, outtype, overwrite=overwrite, log=log)))


@main.command(name="eval")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--text", "text_file", default=None, help="Evaluation text file (e.g. WikiText-2 test).")
@click.option("--dataset", default=None, help="Or a datasets spec 'name[:config][:split]' (needs the Hub).")
@click.option("--seqlen", type=int, default=128, show_default=True, help="Window length (LLM-Pruner protocol).")
@click.option("--max-windows", type=int, default=None, help="Evaluate only the first N windows.")
@click.option("--reference", "reference_dir", default=None, type=click.Path(file_okay=False, path_type=str),
              help="Dense model folder: also report KL(dense || model) and top-1 agreement.")
@schema_option("device")
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, float16 or bfloat16.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Windows per forward.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def eval_command(model_dir: str, text_file: str | None, dataset: str | None, seqlen: int, max_windows: int | None,
                 reference_dir: str | None, device: str, dtype: str, batch_size: int, as_json: bool,
                 quiet: bool) -> None:
    """Perplexity of MODEL_DIR (dense or pruned), computed one decoder layer at a time.

    MODEL_DIR and --reference may also be Hugging Face Hub repo ids (org/name), read from the Hub cache.
    """
    import json

    from .evaluation import EvalSettings, evaluate, load_eval_text, text_windows
    from .hub import resolve_model_dir
    from .loading import load_tokenizer

    model_dir = resolve_model_dir(model_dir)
    reference_dir = resolve_model_dir(reference_dir, "--reference") if reference_dir else None
    text = load_eval_text(text_file, dataset)
    tokenizer = load_tokenizer(model_dir)
    windows = text_windows(text, tokenizer, seqlen, max_windows)
    settings = EvalSettings(device=device, dtype=dtype, batch_size=batch_size, quiet=quiet)
    result = evaluate(model_dir, windows, reference_dir=reference_dir, settings=settings)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    line = f"perplexity {result.perplexity:.3f} over {result.tokens:,} tokens ({result.windows} x {seqlen})"
    if result.kl_from_reference is not None:
        line += (f", KL {result.kl_from_reference:.4f}, top-1 agreement {result.top1_agreement:.2%} "
                 f"(reference perplexity {result.reference_perplexity:.3f})")
    click.echo(line)


@main.command(name="report")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--png", default=None, help="Where to write the figure [default: OUT_DIR/streamprune_report.png].")
@friendly_errors
def report_command(out_dir: str, png: str | None) -> None:
    """Show a pruned folder's run report as a table and render it as a PNG figure."""
    from .report import render_report

    table, path = render_report(out_dir, png)
    click.echo(table)
    click.echo(f"figure: {path}")


@main.command(name="batch")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: one job after another on this machine; ray: every job a Ray task "
                   "(pip install 'streamprune[ray]').")
@click.option("--ray-address", default=None,
              help="Ray cluster for --executor ray: 'auto' (a cluster started with `ray start` that this machine "
                   "belongs to) or 'ray://HEAD:10001' (Ray Client) [default: RAY_ADDRESS, else a private local "
                   "instance].")
@click.option("--gpus-per-job", type=click.FloatRange(min=0), default=0, show_default=True,
              help="GPUs each Ray task reserves; above 0 also runs jobs on --device cuda unless their row sets "
                   "a device.")
@click.option("--cpus-per-job", type=click.FloatRange(min=0), default=1, show_default=True,
              help="CPU cores each Ray task reserves (Ray also sets the job's thread count to it).")
@click.option("--shared-cache", default=None, type=click.Path(file_okay=False, path_type=str),
              help="Folder where jobs of one model share calibration ids and dense-pass scores "
                   "[default: MANIFEST's folder/.streamprune-cache].")
@click.option("--no-shared-cache", is_flag=True, help="Let every job tokenise and run the dense pass itself.")
@click.option("--overwrite", is_flag=True, help="Replace an OUT_DIR holding a finished run with other options.")
@click.option("--restart", is_flag=True, help="Discard unfinished runs instead of resuming them.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Also write the summary as JSON to this file.")
@friendly_errors
def batch_command(manifest: str, json_path: str | None, **settings) -> None:
    """Run the pruning jobs listed in MANIFEST, one after another or on Ray.

    MANIFEST is a CSV file with the header model_dir,out_dir,ratio and optionally more columns named
    after `run` options (calib, nsamples, seqlen, gqa-mode, layers, no-greedy, gguf, gguf-outtype, ...),
    or a YAML/JSON list of mappings with the same keys. Empty cells keep the default; booleans are true/false,
    yes/no or 1/0; relative paths are relative to MANIFEST's folder. Example jobs.csv:

    \b
        model_dir,out_dir,ratio,calib,nsamples,gqa-mode
        models/llama-7b,out/llama-7b-20,0.2,calib.txt,128,
        models/llama-7b,out/llama-7b-50,0.5,calib.txt,128,groups
        models/qwen2-7b,out/qwen2-7b-20,0.2,self,,

    \b
    The same as jobs.yaml:
        - {model_dir: models/llama-7b, out_dir: out/llama-7b-20, ratio: 0.2, calib: calib.txt, nsamples: 128}
        - {model_dir: models/llama-7b, out_dir: out/llama-7b-50, ratio: 0.5, calib: calib.txt, gqa-mode: groups}
        - {model_dir: models/qwen2-7b, out_dir: out/qwen2-7b-20, ratio: 0.2, calib: self}

    Each job runs in its own process with its output in OUT_DIR.log beside OUT_DIR; a failing job is
    reported and the others go on. Rerunning skips finished jobs and resumes interrupted ones. Jobs of
    one model share the ratio-independent work (calibration ids, dense-pass scores). A summary table
    follows; the exit code is 0 only if every job succeeded or was skipped.

    \b
    On a Ray cluster (every node with streamprune installed, paths on a shared filesystem):
        ray start --head                  # on the head node; `ray start --address HEAD:6379` on the others
        streamprune batch jobs.csv --executor ray --ray-address auto --gpus-per-job 1
    """
    from .batch import BatchSettings, batch_main

    sys.exit(batch_main(manifest, BatchSettings(json_path=json_path, **settings)))


@main.command(name="demo")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False, path_type=str),
              help="Where the converted demo model and the pruned copy live "
                   "[default: $STREAMPRUNE_CACHE, else ~/.cache/streamprune].")
@click.option("--model-dir", default=None,
              help="Use this model folder (or Hugging Face Hub repo id) instead of SmolLM2-135M-Instruct.")
@schema_option("ratio", default=0.2)
@schema_option("calib", default="builtin")
@schema_option("nsamples", default=DEMO_NSAMPLES)
@schema_option("seqlen")
@click.option("--eval-text", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Evaluation text [default: a public-domain novel shipped with streamprune, not used for "
                   "calibration].")
@click.option("--eval-windows", type=click.IntRange(min=0), default=DEMO_EVAL_WINDOWS, show_default=True,
              help="Evaluate on the first N windows of 128 tokens (0: the whole text).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens sampled per completion.")
@schema_option("device")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (the step lines and the result remain).")
@friendly_errors
def demo_command(cache_dir, model_dir, ratio, calib, nsamples, seqlen, eval_text, eval_windows, max_new_tokens,
                 device, quiet) -> None:
    """Prune a real small model (SmolLM2-135M-Instruct) by 20 % and compare it with the dense one.

    Every step is announced and timed; the result table, two sampled completions and a PNG figure
    (per-layer kept ratios, perplexity) follow.
    """
    from pathlib import Path

    import psutil

    from .demo import DEMO_NEEDS
    from .extras import require_all
    from .options import check_options
    from .progress import elapsed

    check_options(ratio=ratio, calib=calib, nsamples=nsamples, seqlen=seqlen)  # before the download and conversion
    require_all(*DEMO_NEEDS)  # a missing extra fails at once, before seconds of imports
    click.echo("-- start-up: loading torch and transformers")
    with elapsed("start-up", quiet):  # seconds on a small machine, before anything else can be shown
        from . import engine, evaluation  # noqa: F401
        from .demo import DemoSettings, run_demo
    settings = DemoSettings(ratio=ratio, calib=calib, nsamples=nsamples, seqlen=seqlen,
                            eval_text=Path(eval_text) if eval_text else None, eval_windows=eval_windows,
                            max_new_tokens=max_new_tokens, device=device, quiet=quiet)
    run_demo(model_dir=model_dir, cache_dir=Path(cache_dir) if cache_dir else None, settings=settings,
             echo=click.echo, command_started=psutil.Process().create_time())


if __name__ == "__main__":  # `python -m streamprune.cli` (as well as `python -m streamprune`)
    main()
