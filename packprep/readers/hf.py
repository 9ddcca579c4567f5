"""Hugging Face `datasets` save_to_disk folders: the Arrow stream files that the folder's state.json lists.

A folder is one split (`Dataset.save_to_disk`), recognised by its whole layout: a state.json whose `_data_files`
lists files that all exist beside it, and a dataset_info.json (a folder that merely holds a file named state.json is
an ordinary folder). Its data files are read by the Arrow reader, in state.json's order; anything else in it is
listed as left out. A DatasetDict folder (dataset_dict.json, one sub-folder per split) is refused with the split to
pass. Costs two small JSON reads per folder.
"""

from __future__ import annotations

import json
from pathlib import Path

METADATA_FILES = {"state.json", "dataset_info.json", "dataset_dict.json", "packprep.json"}  # never inputs


def dataset_files(folder: Path) -> tuple[list[Path], list[Path]] | None:
    """(data files in order, other files) of a save_to_disk folder; None for a folder that is not one."""
    if (folder / "dataset_dict.json").is_file() and not (folder / "state.json").exists():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        except (ValueError, AttributeError, OSError):
            splits = []
        raise ValueError(f"{folder} is a DatasetDict folder; pass one split folder, e.g. "
                         f"{folder / (splits or ['train'])[0]}")
    if not ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()):
        return None
    try:
        state = json.loads((folder / "state.json").read_text())
        names = [f["filename"] for f in state["_data_files"]]
    except (ValueError, KeyError, TypeError, OSError):
        return None  # not datasets' state.json
    files = [folder / n for n in names]
    if not names or not all(isinstance(n, str) and "/" not in n and f.is_file() for n, f in zip(names, files)):
        return None
    listed = set(names) | METADATA_FILES
    return files, [p for p in sorted(folder.iterdir()) if p.name not in listed]
