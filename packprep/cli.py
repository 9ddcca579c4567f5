"""`packprep` command line: a thin typer shell over the library (parse options, call, print).

User errors (ValueError, FileNotFoundError, ImportError) reach the user as one red line on stderr and exit code 1.
"""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

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
            err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    """packprep: tokenize, bin-pack and shard corpora for packed (varlen) LLM training."""
    if version:
        from packprep import __version__

        console.print(f"packprep {__version__}")
        raise typer.Exit(0)


# Commands are added below, one section per area (simulate: packing; build/inspect/verify: pipeline; train: trainer).

# --- simulate: packing ---------------------------------------------------------------------------------------------


@app.command()
@user_errors
def simulate(
    lengths: str = typer.Argument(..., help="Lengths file: .npy, text (one integer a line), Parquet/Arrow."),
    seq_len: int = typer.Option(..., "--seq-len", help="Tokens per packed row."),
    strategy: str = typer.Option("all", help="ffd | bfd | greedy | random | none | all (compare them)."),
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
