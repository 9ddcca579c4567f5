"""`packprep` command line: a thin typer shell over the library (parse options, call, print).

User errors (ValueError, FileNotFoundError, ImportError) reach the user as one red line on stderr and exit code 1.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from inspect import Parameter, Signature

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from packprep.config import STRATEGIES, BuildConfig, merge


class _Commands(TyperGroup):
    """The app's commands plus `train`, which is made by `train_command` when it is asked for."""

    def list_commands(self, ctx) -> list[str]:
        return [*super().list_commands(ctx), "train"]

    def get_command(self, ctx, name: str):
        return train_command() if name == "train" else super().get_command(ctx, name)


app = typer.Typer(
    name="packprep",
    cls=_Commands,
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
# `build` and `train` take their options from the config dataclasses' fields (`config_options`): each option, its
# default and its help text are declared once, in the field.


def config_options(cls, positional: str | None = None, short: dict[str, str] | None = None) -> list:
    """One typer parameter per field of the config dataclass `cls`, named after it (`warmup_steps` ->
    `--warmup-steps`, a bool -> `--x/--no-x`), with the field's default and help; a closed set (Literal) shows its
    choices and is checked by the dataclass (one red line, not a usage box). `positional` names the field taken
    as the command's argument (a tuple field takes any number)."""
    short = short or {}
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue  # a config-file key only (BuildConfig.sources)
        hint = hints[f.name]
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if _is_optional(hint) else hint
        default = None if f.default is dataclasses.MISSING else f.default
        kind, metavar = base, None
        if typing.get_origin(base) is typing.Literal:
            kind, metavar = str, "[" + "|".join(typing.get_args(base)) + "]"
        help = escape(f.metadata.get("doc", ""))  # plain text, not rich markup: "[default: ...]" stays
        if f.name == positional:
            many = typing.get_origin(base) is tuple
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            kind, default = (list[str], None) if many else (kind, default)
            info = typer.Argument(... if required else default, help=help, show_default=not many,
                                  metavar=f"{f.name.upper()}..." if many else None)
        else:
            flag = "--" + f.name.replace("_", "-")
            names = [f"{flag}/--no-{flag[2:]}"] if base is bool else [flag, *filter(None, [short.get(f.name)])]
            info = typer.Option(default, *names, help=help, show_default=default is not None, metavar=metavar)
        params.append(Parameter(f.name, Parameter.KEYWORD_ONLY, default=info, annotation=kind))
    return params


def _is_optional(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def config_command(target: typer.Typer, cls, action, *, name: str, help: str, extra: tuple = (), **kw) -> None:
    """Register command `name` on `target`: its options are `config_options(cls, **kw)` plus `extra` parameters;
    it builds `cls` from the given flags (over `--config FILE` when `extra` has `config`) and calls
    `action(cfg, **extra_values)` (user errors: one red line, exit 1)."""
    params = [*config_options(cls, **kw), *extra]
    names = {p.name for p in params[: len(params) - len(extra)]}

    def command(ctx: typer.Context, **values):
        # a flag left at its default does not override the config file
        flags = {k: v for k, v in values.items() if k in names and ctx.get_parameter_source(k).name != "DEFAULT"}
        if isinstance(flags.get("inputs"), list):
            flags["inputs"] = tuple(flags["inputs"])
        rest = {k: v for k, v in values.items() if k not in names}
        action(merge(rest.pop("config", None), cls, name, **flags), **rest)

    params.insert(0, Parameter("ctx", Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context))
    command.__signature__ = Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = help
    target.command(name)(user_errors(command))


# --- build / inspect / verify: pipeline ----------------------------------------------------------------------------


def _config_option(section: str):
    return Parameter("config", Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
        None, "--config", help=f"TOML or YAML file of the same keys (at the top or in a '{section}' table); flags win"))


def _build(cfg, quiet: bool = False) -> None:
    from packprep.build import build as run_build
    from packprep.report import Progress, summary_table

    result = run_build(cfg, progress=Progress(err_console, enabled=not quiet))
    if result.already_built:
        console.print(f"{result.out} already holds this build (same settings and inputs): nothing to do",
                      highlight=False)
    else:
        console.print(summary_table(result.manifest, title=f"packprep build -> {result.out}"))
    console.print(f"shards: {result.out}/  (datasets.load_from_disk({str(result.out)!r}) opens them)\n"
                  f"next:   packprep inspect {result.out}   |   packprep verify {result.out}   |   "
                  f"packprep train {result.out} --model tiny", highlight=False)


_QUIET = Parameter("quiet", Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
    False, "--quiet", "-q", help="No progress output, only the summary."))
config_command(app, BuildConfig, _build, name="build", positional="inputs", short={"out": "-o"},
               extra=(_config_option("build"), _QUIET),
               help="Tokenize, pack and shard a corpus (no INPUTS: the embedded default corpus, offline, in seconds).")


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
def verify(
    out: str = typer.Argument("packprep_out", help="A packprep output folder."),
    tokens: int = typer.Option(0, "--tokens", help="Also re-read N sampled documents from the inputs and compare "
                               "their tokens, loss mask and labels with transformers' tokenizer (needs transformers)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --tokens sample."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Tokenizer for --tokens (default: the build's)."),
) -> None:
    """Check a build: checksums, offsets vs input_ids, rows <= seq_len, document accounting (exit 0: all hold)."""
    from packprep.verify import verify as run_verify

    report = run_verify(out, tokens=tokens, seed=seed, tokenizer=tokenizer)
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
    strategy: str = typer.Option("all", help=" | ".join((*STRATEGIES, "all (compare them)."))),
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


def _train(cfg) -> None:
    from trainer.train import train as run_training

    run_training(cfg, echo=lambda line: console.print(line, highlight=False))


# --- export: other training stacks ---------------------------------------------------------------------------------


@app.command("export")
@user_errors
def export_command(
    build: str = typer.Argument(..., help="A finished packprep build: a folder or a URL (s3://bucket/build)."),
    to: str = typer.Option(..., "--to", help="megatron | nemo | olmo | mds | litdata | llamafactory."),
    out: str = typer.Option(..., "--out", help="Output folder or URL (rerun the same command to resume)."),
    nemo_container: str = typer.Option("parquet", help="nemo only: parquet (current Megatron-Bridge) | npy "
                                                        "(Megatron-Bridge <= 0.3, NeMo 2)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace whatever OUT holds."),
    work_dir: str = typer.Option(None, "--work-dir", help="A remote --out: the local folder the export is written "
                                 "in before upload (default: under the temp folder, named after the URL)."),
    storage_options: str = typer.Option(None, "--storage-options", help="JSON keyword arguments for the fsspec "
                                        "filesystems of a remote BUILD or --out (as in build)."),
) -> None:
    """Write a build in another training stack's own format (see the README's "Feed other stacks")."""
    from packprep import storage
    from packprep.exports import export

    storage.configure(storage_options)
    options = {"container": nemo_container} if to == "nemo" and nemo_container != "parquet" else {}
    m = export(build, to, out, overwrite=overwrite, work_dir=work_dir,
               echo=lambda line: console.print(line, highlight=False), **options)
    console.print(f"{m['format']}: {m['counts']['documents']:,} documents, {m['counts']['rows']:,} rows, "
                  f"{m['counts']['tokens']:,} tokens -> {out} ({len(m['files'])} files)", highlight=False)


@functools.cache
def train_command():
    """The `train` command, built on first use: TrainConfig lives with the trainer, which imports torch (seconds),
    so `packprep build` and `--help` of other commands never pay for it. Without torch: a command that says so."""
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    help = "Train a causal LM on packed shards with per-document (varlen) attention; run under torchrun for DDP."
    try:
        from trainer.train import TrainConfig
    except ImportError as e:  # torch or transformers missing (a build-only install)
        reason = str(e)

        @sub.command("train", help=help, context_settings={"ignore_unknown_options": True,
                                                          "allow_extra_args": True})
        @user_errors
        def train_unavailable() -> None:
            raise ImportError(f'packprep train cannot start ({reason}): pip install "packprep[train]"')
    else:
        config_command(sub, TrainConfig, _train, name="train", positional="shards", extra=(_config_option("train"),),
                       help=help)
    return typer.main.get_command(sub)


if __name__ == "__main__":  # pragma: no cover
    app()
