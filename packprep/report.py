"""Reporting: stage progress (rich bars on a terminal, periodic log lines otherwise), the summary table of a
build, and `inspect` (manifest summary + length / fill / docs-per-row histograms as one PNG).

Progress costs one call per finished task; `inspect` reads only the shards' list offsets (O(rows), no tokens).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from packprep.shards import MANIFEST, open_shard, shard_files


class Progress:
    """Per-stage progress: `with progress.stage("tokenize", total=40, unit="tasks") as s: s.advance(1, docs=..)`.

    On a TTY: a rich progress bar per stage. Otherwise: one plain line every `every` seconds and one per stage
    end (docs/s, tokens/s), what a batch job's log wants. `Progress(enabled=False)` is silent.
    """

    def __init__(self, console: Console | None = None, enabled: bool = True, every: float = 10.0):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.every = every

    @contextmanager
    def stage(self, name: str, total: int, unit: str):
        tracker = _Stage(self, name, total, unit)
        try:
            yield tracker
        finally:
            tracker.close()

    def log(self, msg: str) -> None:
        if self.enabled:
            self.console.print(msg, highlight=False, soft_wrap=True, markup=False)  # paths may hold [brackets]


class _Stage:
    def __init__(self, parent: Progress, name: str, total: int, unit: str):
        self.parent, self.name, self.total, self.unit = parent, name, total, unit
        self.done = 0
        self.counts: dict[str, int] = {}
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if parent.enabled and parent.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn(f"{name:<9}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn(unit), TimeElapsedColumn(), TextColumn("{task.fields[rate]}"),
                                    console=parent.console, transient=False)
            self.task = self.bar.add_task(name, total=total, rate="")
            self.bar.start()

    def advance(self, n: int = 1, **counts: int) -> None:
        self.done += n
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(self.task, advance=n, rate=self._rates(now))
        elif self.parent.enabled and now - self.last >= self.parent.every:
            self.last = now
            self.parent.log(f"{self.name}: {self.done}/{self.total} {self.unit}  {self._rates(now)}")

    def _rates(self, now: float) -> str:
        dt = max(now - self.t0, 1e-9)
        return "  ".join(f"{v:,} {k} ({v / dt:,.0f}/s)" for k, v in self.counts.items())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.parent.enabled:
            now = time.perf_counter()
            self.parent.log(f"{self.name}: {self.done}/{self.total} {self.unit} in {now - self.t0:.1f}s  "
                            f"{self._rates(now)}")


def summary_table(manifest: dict, title: str = "packprep build") -> Table:
    """docs, tokens, rows, efficiency, rows/LB, padding saved, time per stage, throughput."""
    c, p, t = manifest["counts"], manifest["packing"], manifest.get("timings", {})
    dropped = c["dropped"]
    why = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in dropped.items() if v)
    rejected = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in c.get("rejected_reasons", {}).items())
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(style="dim")
    table.add_row("input docs", f"{c['input_docs']:,}", f"packed {c['packed']:,}, truncated {c['truncated']:,}, "
                  f"split {c['split']:,}, dropped {sum(dropped.values()):,}{f' ({why})' if why else ''}, "
                  f"rejected {c['rejected']:,}{f' ({rejected})' if rejected else ''}")
    table.add_row("tokens", f"{c['tokens']:,}", f"loss tokens {c['loss_tokens']:,}")
    for i, s in enumerate(c.get("sources", ())):  # a mixture (packprep.mixture): one row per source
        table.add_row(f"source {i + 1}", f"{s['share']:.4%}", f"target {s['target_share']:.4%}, {s['tokens']:,} "
                      f"tokens, {s['docs']:,} docs ({s['unique_docs']:,} distinct): {', '.join(s['paths'])}")
    table.add_row("rows", f"{c['rows']:,}", f"seq_len {manifest['seq_len']}, strategy {manifest['strategy']}, "
                  f"{len(manifest['shards'])} shard(s)")
    table.add_row("efficiency", f"{p['efficiency']:.4f}", f"docs/row {p['docs_per_row_mean']:.2f} "
                  f"(max {p['docs_per_row_max']})")
    table.add_row("rows / lower bound", f"{p['rows_over_lb']:.5f}", f"lower bound {p['lower_bound']:,} rows")
    table.add_row("padding saved", f"{p['padding_tokens_saved']:,}",
                  f"tokens vs one doc per row ({p['steps_reduction']:.2f}x fewer rows)")
    if t:
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in t.items() if k != "total")
        total = t.get("total", 0.0)
        table.add_row("time", f"{total:.2f}s", stages)
        if total:
            table.add_row("throughput", f"{c['tokens'] / total:,.0f} tok/s", f"{c['input_docs'] / total:,.0f} docs/s")
    return table


# ---------------------------------------------------------------------------------------------------- inspect


def load_manifest(out: str | Path) -> dict:
    import json

    from packprep import storage

    if storage.is_remote(out):  # only the manifest is read
        fs, root = storage.filesystem(out)
        try:
            return json.loads(fs.cat_file(storage.join(root, MANIFEST)))
        except FileNotFoundError:
            raise FileNotFoundError(f"{out}: no {MANIFEST} (not a finished packprep build)") from None
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{out}: no {MANIFEST} (not a finished packprep build); run `packprep build` first")
    return json.loads(path.read_text())


def row_histograms(out: str | Path) -> dict[str, np.ndarray]:
    """Per row: tokens, documents; per piece: length. Read from list offsets only (no token pages touched)."""
    from packprep.remote import stage

    fill, docs, lengths = [], [], []
    for f in shard_files(stage(str(out))):
        table = open_shard(f)
        for chunk in table.column("input_ids").chunks:
            fill.append(np.diff(chunk.offsets.to_numpy()))
        for chunk in table.column("seq_lengths").chunks:
            docs.append(np.diff(chunk.offsets.to_numpy()))
            lengths.append(chunk.values.to_numpy())
    return {"row_tokens": _cat(fill), "docs_per_row": _cat(docs), "piece_lengths": _cat(lengths)}


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)


def plot(out: str | Path, png: str | Path) -> Path:
    """Document length, row fill and documents-per-row histograms as one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('plots need matplotlib: pip install "packprep[plot]"') from None
    m = load_manifest(out)
    h = row_histograms(out)
    seq_len = m["seq_len"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].hist(h["piece_lengths"], bins=60, color="#4c72b0")
    axes[0].set(title="document length (tokens, per packed piece)", xlabel="tokens", ylabel="documents")
    axes[0].set_yscale("log")
    axes[1].hist(h["row_tokens"] / seq_len, bins=50, range=(0, 1), color="#55a868")
    axes[1].set(title=f"row fill (efficiency {m['packing']['efficiency']:.4f})", xlabel="tokens / seq_len",
                ylabel="rows")
    top = int(h["docs_per_row"].max()) if len(h["docs_per_row"]) else 1
    axes[2].hist(h["docs_per_row"], bins=np.arange(0.5, top + 1.5), color="#c44e52")
    axes[2].set(title="documents per row", xlabel="documents", ylabel="rows")
    fig.suptitle(f"{out}: {m['counts']['rows']:,} rows of {seq_len}, strategy {m['strategy']}")
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png

