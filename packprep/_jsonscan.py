"""Split a JSON array file into byte ranges of whole elements without parsing it (a numba byte scan).

    array_start, end, cuts, separators = scan_json_array(path, chunk_bytes)

`[ {"a": "x,]"}, {"a": 2}, 3 ]` is read once, block by block (RSS: one block), tracking strings (with escapes) and
bracket depth; every top-level comma at least `chunk_bytes` after the previous cut becomes a cut. The ranges
(array_start + 1 .. cut0), (cut0 + 1 .. cut1), ..., (cutN + 1 .. end) each hold whole elements separated by commas,
so `json.loads("[" + range + "]")` parses one. The scan does not validate JSON (a task's parse does, with a
precise error); it only needs the brackets and strings to be balanced. ~1 GB/s.
"""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np

BLOCK = 16 << 20


@numba.njit(cache=True, nogil=True)
def _scan(block, base, depth, in_str, esc, next_cut, chunk_bytes, cuts):
    """One block of the byte scan. State in, state out: (depth, in_str, esc, next_cut, n_cuts, separators, end).

    end: the position of the array's closing bracket (-1: not in this block); separators: the top-level commas in
    the block.
    """
    n_cuts = 0
    separators = 0
    for i in range(block.size):
        c = block[i]
        if in_str:
            if esc:
                esc = False
            elif c == 92:  # backslash
                esc = True
            elif c == 34:  # quote
                in_str = False
            continue
        if c == 34:
            in_str = True
        elif c == 91 or c == 123:  # [ {
            depth += 1
        elif c == 93 or c == 125:  # ] }
            depth -= 1
            if depth <= 0:
                return depth, in_str, esc, next_cut, n_cuts, separators, base + i
        elif c == 44 and depth == 1:  # a top-level comma
            separators += 1
            if base + i >= next_cut and n_cuts < cuts.size:
                cuts[n_cuts] = base + i
                n_cuts += 1
                next_cut = base + i + chunk_bytes
    return depth, in_str, esc, next_cut, n_cuts, separators, -1


class JsonScanError(ValueError):
    """The file is not one balanced JSON array (the caller reports the parser's precise error)."""


def scan_json_array(path: str | Path, chunk_bytes: int, stop_at: int = -1) -> tuple[int, int, list[int], int]:
    """(array_start, end, cuts, separators): the '[' position, the closing ']' position, the top-level commas that
    cut the array into ranges of >= chunk_bytes, and the number of top-level commas scanned. `stop_at` >= 0 ends the
    scan at that byte (end -1): the separators before a range start are the index of its first element (only used
    to report rejects)."""
    cuts: list[int] = []
    separators = 0
    with open(path, "rb") as f:
        head = f.read(4096)
        stripped = head.lstrip()
        if stripped[:1] != b"[":
            raise JsonScanError(f"{path}: not a JSON array")
        array_start = len(head) - len(stripped)
        f.seek(array_start)
        buf = bytearray(BLOCK)
        depth, in_str, esc, base = 0, False, False, array_start
        next_cut = array_start + chunk_bytes
        room = np.empty(BLOCK // max(chunk_bytes, 1) + 2, np.int64)
        while True:
            n = f.readinto(buf)
            if not n:
                raise JsonScanError(f"{path}: the JSON array is not closed")
            if 0 <= stop_at < base + n:
                n = max(stop_at - base, 0)
            block = np.frombuffer(buf, np.uint8, n)
            depth, in_str, esc, next_cut, n_cuts, seps, end = _scan(block, base, depth, in_str, esc, next_cut,
                                                                     max(chunk_bytes, 1), room)
            cuts += room[:n_cuts].tolist()
            separators += seps
            if stop_at >= 0 and base + n >= stop_at:
                return array_start, -1, cuts, separators
            if end >= 0:
                if depth < 0:
                    raise JsonScanError(f"{path}: unbalanced brackets in the JSON array")
                f.seek(end + 1)
                if f.read(4096).strip():
                    raise JsonScanError(f"{path}: data after the JSON array")
                return array_start, end, cuts, separators
            base += n
