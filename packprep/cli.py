"""`packprep` command line: a thin typer shell over the library (parse options, call, print).

User errors (ValueError, FileNotFoundError, ImportError) reach the user as one red line on stderr and exit code 1.
"""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    name="packprep",
    help="Pack tokenized documents into fixed-length rows for LLM training (and train on them).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def user_errors(fn):
    """Turn user errors into one red line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, ImportError, FileExistsError, OSError) as e:
            err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _print_version(value: bool) -> None:
    if value:  # an eager option's callback: runs before click asks for a command
        from packprep import __version__

        console.print(f"packprep {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """packprep: tokenize, bin-pack and shard corpora for packed (varlen) LLM training."""


# Commands are added below, one section per area (simulate: packing; build/inspect/verify: pipeline; train: trainer).

# --- build / inspect / verify: pipeline ----------------------------------------------------------------------------


def _field_docs() -> dict[str, str]:
    """Field docstrings of BuildConfig (the attribute docstrings below each field) as --help text."""
    import ast
    import inspect

    from packprep import config

    tree = ast.parse(inspect.getsource(config.BuildConfig))
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


_FIELD_DOCS = _field_docs()


@app.command()
@user_errors
def build(
    inputs: list[str] = typer.Argument(None, help=_FIELD_DOCS["inputs"], show_default=False),
    out: str = typer.Option(None, "--out", "-o", help=_FIELD_DOCS["out"] + " [default: packprep_out]"),
    tokenizer: str = typer.Option(None, help=_FIELD_DOCS["tokenizer"] + " [default: builtin]"),
    seq_len: int = typer.Option(None, help=_FIELD_DOCS["seq_len"] + " [default: 4096]"),
    strategy: str = typer.Option(None, help=_FIELD_DOCS["strategy"] + " [default: ffd]"),
    long_docs: str = typer.Option(None, help=_FIELD_DOCS["long_docs"] + " [default: truncate]"),
    workers: int = typer.Option(None, help=_FIELD_DOCS["workers"]),
    seed: int = typer.Option(None, help=_FIELD_DOCS["seed"] + " [default: 0]"),
    shuffle: bool = typer.Option(None, "--shuffle/--no-shuffle", help=_FIELD_DOCS["shuffle"] + " [default: shuffle]"),
    format: str = typer.Option(None, "--format", help=_FIELD_DOCS["format"] + " [default: auto]"),
    text_field: str = typer.Option(None, help=_FIELD_DOCS["text_field"]),
    prompt_field: str = typer.Option(None, help=_FIELD_DOCS["prompt_field"]),
    completion_field: str = typer.Option(None, help=_FIELD_DOCS["completion_field"]),
    messages_field: str = typer.Option(None, help=_FIELD_DOCS["messages_field"]),
    shard_rows: int = typer.Option(None, help=_FIELD_DOCS["shard_rows"]),
    on_error: str = typer.Option(None, help=_FIELD_DOCS["on_error"] + " [default: raise]"),
    overwrite: bool = typer.Option(None, "--overwrite", help=_FIELD_DOCS["overwrite"]),
    executor: str = typer.Option(None, help=_FIELD_DOCS["executor"] + " [default: local]"),
    ray_address: str = typer.Option(None, help=_FIELD_DOCS["ray_address"]),
    config: str = typer.Option(None, "--config", help="TOML or YAML file with the same keys (flags win)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output, only the summary."),
) -> None:
    """Tokenize, pack and shard a corpus (no INPUT: the embedded default corpus, offline, in seconds)."""
    from packprep.build import build as run_build
    from packprep.config import merge
    from packprep.report import Progress, summary_table

    cfg = merge(config, inputs=tuple(inputs or ()), out=out, tokenizer=tokenizer, seq_len=seq_len,
                strategy=strategy, long_docs=long_docs, workers=workers, seed=seed, shuffle=shuffle, format=format,
                text_field=text_field, prompt_field=prompt_field, completion_field=completion_field,
                messages_field=messages_field, shard_rows=shard_rows, on_error=on_error, overwrite=overwrite,
                executor=executor, ray_address=ray_address)
    result = run_build(cfg, progress=Progress(err_console, enabled=not quiet))
    if result.already_built:
        console.print(f"{result.out} already holds this build (same settings and inputs): nothing to do",
                      highlight=False)
    else:
        console.print(summary_table(result.manifest, title=f"packprep build -> {result.out}"))
    console.print(f"shards: {result.out}/  (datasets.load_from_disk({str(result.out)!r}) opens them)\n"
                  f"next:   packprep inspect {result.out}   |   packprep verify {result.out}   |   "
                  f"packprep train {result.out} --model tiny", highlight=False)


@app.command()
@user_errors
def inspect(
    out: str = typer.Argument("packprep_out", help="A packprep output folder."),
    plot: str = typer.Option(None, "--plot", help="Write length / row fill / docs-per-row histograms to this PNG."),
) -> None:
    """Summarise a build from its manifest (and plot its histograms)."""
    from packprep.report import load_manifest, summary_table
    from packprep.report import plot as make_plot

    manifest = load_manifest(out)
    console.print(summary_table(manifest, title=f"packprep inspect {out}"))
    tok = manifest["tokenizer"]
    console.print(f"tokenizer {tok['name']} (sha256 {tok['sha256'][:12]}..., vocab {tok['vocab_size']:,}); "
                  f"shards: " + ", ".join(f"{s['file']} ({s['rows']:,} rows)" for s in manifest["shards"]),
                  highlight=False)
    if plot:
        console.print(f"plot: {make_plot(out, plot)}", highlight=False)


@app.command()
@user_errors
def verify(out: str = typer.Argument("packprep_out", help="A packprep output folder.")) -> None:
    """Check a build: checksums, offsets vs input_ids, rows <= seq_len, document accounting (exit 0: all hold)."""
    from packprep.verify import verify as run_verify

    report = run_verify(out)
    for name, passed, detail in report.checks:
        console.print(f"{'[green]ok[/green]  ' if passed else '[red]FAIL[/red]'} {escape(name)}" + ("" if passed else
                      f": {escape(detail)}"), highlight=False, soft_wrap=True)
    if not report.ok:
        err_console.print(f"[red]error:[/red] {out}: {len(report.failures)} check(s) failed", highlight=False)
        raise typer.Exit(1)
    console.print(f"{out}: all {len(report.checks)} checks passed", highlight=False)

# --- simulate: packing ---------------------------------------------------------------------------------------------


@app.command()
@user_errors
def simulate(
    lengths: str = typer.Argument(..., help="Lengths file: .npy, text (one integer a line), Parquet/Arrow."),
    seq_len: int = typer.Option(..., "--seq-len", help="Tokens per packed row."),
    strategy: str = typer.Option("all", help="ffd | bfd | b2f | greedy | random | none | all (compare them)."),
    column: str = typer.Option(None, help="Parquet/Arrow column with the lengths (or token lists)."),
    seed: int = typer.Option(0, help="Seed of the random strategy."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Compare packing strategies on a length array (rows, efficiency, rows/lower bound, steps saved vs padding)."""
    import json

    from packprep.simulate import read_lengths, render, simulate

    result = simulate(read_lengths(lengths, column), seq_len, strategy if strategy == "all" else [strategy], seed)
    if json_out:
        print(json.dumps(result))
    else:
        console.print(render(result))

# --- train: trainer ------------------------------------------------------------------------------------------------


@app.command()
@user_errors
def train(
    shards: str = typer.Argument(..., help="packprep output folder (from `packprep build`)."),
    model: str = typer.Option("tiny", help="tiny | small (random Llama) | a local model folder | a hub name."),
    steps: int = typer.Option(100, help="Optimizer steps in total (a resumed run continues up to this step)."),
    batch_tokens: int = typer.Option(8192, help="Token budget of one micro-batch per rank (>= the build's seq_len)."),
    lr: float = typer.Option(3e-4, help="Peak learning rate (AdamW; linear warmup, cosine to 10%)."),
    warmup: int = typer.Option(10, help="Warmup steps."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step on each rank."),
    device: str = typer.Option("auto", help="cpu | cuda | auto."),
    attn: str = typer.Option("auto", help="Attention backend: auto | flash_attn | torch | sdpa."),
    bf16: bool = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (default: on for cuda, off for cpu)."),
    seed: int = typer.Option(0, help="Seed of the data order and of the preset models' weights."),
    ckpt: str = typer.Option(None, help="Checkpoint folder (last.pt)."),
    ckpt_every: int = typer.Option(0, help="Steps between checkpoints (0: only at the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <ckpt>/last.pt."),
    stop_at: int = typer.Option(0, help="Stop (and checkpoint) after this step; the schedule still spans --steps."),
    log_every: int = typer.Option(1, help="Steps between log lines."),
) -> None:
    """Train a causal LM on packed shards with per-document (varlen) attention; run under torchrun for DDP."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ImportError('packprep train needs torch: pip install "packprep[train]"') from None
    from trainer.train import TrainConfig
    from trainer.train import train as run_training

    cfg = TrainConfig(shards=shards, model=model, steps=steps, batch_tokens=batch_tokens, lr=lr, warmup_steps=warmup,
                      grad_accum=grad_accum, device=device, attn=attn, bf16=bf16, seed=seed, ckpt=ckpt,
                      ckpt_every=ckpt_every, resume=resume, stop_at=stop_at, log_every=log_every)
    run_training(cfg, echo=lambda line: console.print(line, highlight=False))


# --- export: other training stacks ---------------------------------------------------------------------------------


@app.command("export")
@user_errors
def export_command(
    build: str = typer.Argument(..., help="A finished packprep build folder."),
    to: str = typer.Option(..., "--to", help="megatron | nemo | olmo | mds | litdata."),
    out: str = typer.Option(..., "--out", help="Output folder (rerun the same command to resume)."),
    nemo_container: str = typer.Option("parquet", help="nemo only: parquet (current Megatron-Bridge) | npy "
                                                        "(Megatron-Bridge <= 0.3, NeMo 2)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace whatever OUT holds."),
) -> None:
    """Write a build in another training stack's own format (see the README's "Feed other stacks")."""
    from packprep.exports import export

    options = {"container": nemo_container} if to == "nemo" and nemo_container != "parquet" else {}
    m = export(build, to, out, overwrite=overwrite, echo=lambda line: console.print(line, highlight=False), **options)
    console.print(f"{m['format']}: {m['counts']['documents']:,} documents, {m['counts']['rows']:,} rows, "
                  f"{m['counts']['tokens']:,} tokens -> {out} ({len(m['files'])} files)", highlight=False)


def run() -> None:
    """The `packprep` console script: the typer app, then a fast exit. After a build the interpreter's own teardown
    (freeing numba's LLVM state, the tokenizer, every module) takes ~0.4 s; every output is already written,
    fsynced and renamed by then, so the atexit handlers run (Ray, logging), the streams are flushed and the
    process ends with os._exit."""
    import atexit
    import os

    try:
        app()
        code = 0
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            raise  # sys.exit("message"): let Python print it
        code = e.code or 0
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
