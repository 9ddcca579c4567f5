"""Library side of `packprep simulate`: read a document-length array, pack it with each strategy, compare.

Users run this before a long build to choose --seq-len and --strategy. Reading is one vectorised pass (np.load,
pyarrow); each strategy costs what `packprep.pack` costs (10M documents: about a second for ffd).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from packprep.pack import STRATEGIES, pack
from packprep.stats import plan_stats

ARROW_SUFFIXES = (".parquet", ".pq", ".arrow", ".feather", ".ipc")


def read_lengths(path: str | Path, column: str | None = None) -> np.ndarray:
    """Document lengths from a .npy file, a text file (one integer a line) or a Parquet / Arrow column.

    For Parquet / Arrow, `column` names the column (may be left out when the file has one column); a list column
    (e.g. input_ids) gives the lengths of its lists.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lengths file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if column is not None:
            raise ValueError(f"--column only applies to Parquet / Arrow files, not {path.name}")
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path} is not a readable .npy array ({e})") from None
    if suffix in ARROW_SUFFIXES:
        return _read_arrow_column(path, column)
    if column is not None:
        raise ValueError(f"--column only applies to Parquet / Arrow files, not {path.name}")
    return _read_text(path)


def _read_text(path: Path) -> np.ndarray:
    words = path.read_bytes().split()
    try:
        return np.array(words, dtype=np.int64) if words else np.zeros(0, np.int64)
    except ValueError:
        bad = next(i for i, w in enumerate(words) if not w.lstrip(b"+-").isdigit())
        raise ValueError(
            f"{path}: value {bad + 1} is {words[bad].decode(errors='replace')!r}, expected one integer length a line"
        ) from None


def _read_arrow_column(path: Path, column: str | None) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if path.suffix.lower() in (".parquet", ".pq"):
        column = _pick_column(pq.read_schema(path).names, column, path)
        values = pq.read_table(path, columns=[column]).column(column)
    else:
        try:
            table = pa.ipc.open_file(path).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_stream(path).read_all()
        column = _pick_column(table.column_names, column, path)
        values = table.column(column)
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        values = pc.list_value_length(values)  # token lists (e.g. input_ids): their lengths
    if not pa.types.is_integer(values.type):
        raise ValueError(f"column {column!r} of {path} holds {values.type}, expected integer lengths or token lists")
    if values.null_count:
        raise ValueError(f"column {column!r} of {path} has {values.null_count} missing values")
    return values.to_numpy()


def _pick_column(names: list[str], column: str | None, path: Path) -> str:
    if column is None:
        if len(names) != 1:
            raise ValueError(f"{path} has {len(names)} columns ({', '.join(names)}); pick one with --column")
        return names[0]
    if column not in names:
        raise ValueError(f"{path} has no column {column!r}; columns: {', '.join(names)}")
    return column


def simulate(lengths, seq_len: int, strategies=STRATEGIES, seed: int = 0) -> dict:
    """Pack `lengths` with each strategy; plan_stats for each (+ "seconds"), and the input's summary.

    The JIT is warmed up on a tiny input first, so "seconds" is the packing time, not numba's compile/load time.
    """
    strategies = list(STRATEGIES) if strategies in ("all", None) else list(strategies)
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}, or all")
    results = []
    for strategy in strategies:
        pack([1], seq_len=seq_len, strategy=strategy)  # JIT warm-up (loads numba's cache)
        started = time.perf_counter()
        plan = pack(lengths, seq_len=seq_len, strategy=strategy, seed=seed)
        seconds = time.perf_counter() - started
        results.append({**plan_stats(plan, seq_len), "seconds": seconds})
    arr = np.asarray(lengths)
    return {
        "seq_len": int(seq_len),
        "docs": int(arr.size),
        "tokens": int(arr.sum()),
        "max_length": int(arr.max()) if arr.size else 0,
        "mean_length": float(arr.mean()) if arr.size else 0.0,
        "seed": seed,
        "strategies": results,
    }


def render(result: dict):
    """A rich Table of simulate()'s result; "steps" is the step reduction versus padding (strategy none)."""
    from rich import box
    from rich.table import Table

    title = f"{result['docs']:,} documents, {result['tokens']:,} tokens, seq_len {result['seq_len']}"
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True, caption_justify="left")
    for name in ("strategy", "rows", "eff.", "rows/LB", "docs/row", "max", "split", "steps", "time"):
        table.add_column(name, justify="left" if name == "strategy" else "right", no_wrap=True)
    for s in result["strategies"]:
        table.add_row(
            s["strategy"], f"{s['rows']:,}", f"{s['efficiency']:.1%}", f"{s['rows_over_lb']:.4f}",
            f"{s['docs_per_row_mean']:.1f}", f"{s['docs_per_row_max']}", f"{s['split_docs']:,}",
            f"{s['steps_reduction']:.1f}x", f"{s['seconds']:.2f}s",
        )
    if result["strategies"]:
        s = result["strategies"][0]
        table.caption = (
            f"lower bound (LB) {s['lower_bound']:,} rows; padding (one document a row) needs {s['padded_rows']:,}; "
            "eff. = tokens / (rows x seq_len); max = most docs in a row; split = documents cut across rows; "
            "steps = padded rows / rows (fewer optimizer steps for the same tokens)"
        )
    return table
