"""The spool: the tokenize stage's output on disk, owned here (file names, the one writer, the one reader, deletion).

One file set per tokenize task (one input chunk), in OUT/.packprep-work/spool/:
    t000012.ids.npy        int32  the task's tokens, documents back to back (EOS included)
    t000012.mask.npy       uint8  1 where a token carries loss, one per token
    t000012.len.npy        int32  one per input record: its tokens (0 = empty, -1 = rejected by --on-error skip)
    t000012.rejects.jsonl  the records set aside by --on-error skip, in record order (only when there are some)
    t000012.done.json      the task's TaskResult, written last: a task without it is redone
Every file is written under a temporary name, fsynced and renamed (`shards.atomic_file`), so a killed writer leaves
only a `.tmp*` file, which a resumed build deletes. Token positions index the spool as if the tasks' ids were one
array in task order: task i's first token is at sum(tokens of tasks < i).

Cost: ~5 bytes per token on disk until the build ends; writing is one pass over the arrays; reading maps each file
(no copy) and `Reader.release` drops its pages from the process, so a writer's memory stays at one task file.
"""

from __future__ import annotations

import json
import mmap
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from packprep.shards import atomic_file, write_json_atomic


@dataclass(frozen=True)
class TaskResult:
    """What one tokenize task made (its `.done.json` marker)."""

    index: int
    docs: int
    tokens: int
    loss_tokens: int
    rejected: int = 0
    rejected_reasons: dict = field(default_factory=dict)  # kind -> records
    notes: dict = field(default_factory=dict)  # the tokenizer's counts: special_in_text, no_assistant documents


def paths(folder: str | Path, index: int) -> dict[str, Path]:
    """Task `index`'s files: {"ids", "mask", "len", "done", "rejects"} -> path."""
    stem = f"t{index:06d}"
    folder = Path(folder)
    return {k: folder / f"{stem}.{k}.npy" for k in ("ids", "mask", "len")} | {
        "done": folder / f"{stem}.done.json", "rejects": folder / f"{stem}.rejects.jsonl"}


def finished(folder: str | Path, index: int) -> TaskResult | None:
    """The result of a finished task (its marker exists), else None."""
    marker = paths(folder, index)["done"]
    return TaskResult(**json.loads(marker.read_text())) if marker.exists() else None


def write(folder: str | Path, index: int, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray,
          rejects: list[dict] | None = None, notes: dict | None = None) -> TaskResult:
    """Spool one task's tokens, loss mask, per-record lengths and rejects (JSON objects with a "kind"), marker last."""
    p = paths(folder, index)
    reasons: dict[str, int] = {}
    if rejects:
        for r in rejects:
            reasons[r["kind"]] = reasons.get(r["kind"], 0) + 1
        with atomic_file(p["rejects"], "wb") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode("utf-8"))
    for key, arr in (("ids", ids), ("mask", mask), ("len", lengths)):
        save_npy(p[key], arr)
    result = TaskResult(index, len(lengths), len(ids), int(mask.sum(dtype=np.int64)), len(rejects or ()),
                        dict(sorted(reasons.items())), dict(sorted((notes or {}).items())))
    write_json_atomic(p["done"], result.__dict__)
    return result


def save_npy(path: Path, arr: np.ndarray) -> None:
    """One .npy file, atomically (also used for the packing plan's arrays)."""
    with atomic_file(path) as f:
        np.save(f, arr, allow_pickle=False)


def lengths(folder: str | Path, tasks: int) -> np.ndarray:
    """Every record's length (int32, -1 = rejected), tasks in order: the one array the packer needs."""
    return np.concatenate([np.load(paths(folder, i)["len"]) for i in range(tasks)] or [np.zeros(0, np.int32)])


def copy_rejects(folder: str | Path, index: int, dest) -> None:
    """Append task `index`'s rejects.jsonl to the open binary file `dest`."""
    with open(paths(folder, index)["rejects"], "rb") as src:
        shutil.copyfileobj(src, dest)


def delete(folder: str | Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


class Reader:
    """The spool's token and mask arrays, memory-mapped on first use, one (ids, mask) pair per task.

    `release(task)` drops the pages read from a task's files from this process (MADV_DONTNEED; they stay in the
    page cache). Without it a writer's RSS grows to the size of the spool: the kernel maps 64 KB around every
    faulted page ("fault-around"), so gathering shuffled rows maps nearly every page of every task file.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.maps: dict[int, tuple[mmap.mmap, ...]] = {}
        self.arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getitem__(self, task: int) -> tuple[np.ndarray, np.ndarray]:
        if task not in self.arrays:
            p = paths(self.folder, task)
            (ids, ids_map), (mask, mask_map) = _map_npy(p["ids"]), _map_npy(p["mask"])
            self.arrays[task], self.maps[task] = (ids, mask), (ids_map, mask_map)
        return self.arrays[task]

    def release(self, task: int) -> None:
        for m in self.maps.get(task, ()):
            if hasattr(m, "madvise"):  # Python >= 3.8 on Linux/macOS
                m.madvise(mmap.MADV_DONTNEED)


def _map_npy(path: Path) -> tuple[np.ndarray, mmap.mmap]:
    """A 1-D .npy file as a read-only array over a memory map that this module holds (np.load(mmap_mode="r")
    hides its map, which `Reader.release` needs)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        offset = f.tell()
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(m, dtype=dtype, count=int(np.prod(shape)), offset=offset), m
