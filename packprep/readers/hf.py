"""Hugging Face `datasets` save_to_disk folders: the Arrow stream files that the folder's state.json lists.

A folder is one split (`Dataset.save_to_disk`): its data files are read by the Arrow reader, in state.json's
order. A DatasetDict folder (dataset_dict.json, one sub-folder per split) is refused with the split to pass.
Costs two small JSON reads per folder.
"""

from __future__ import annotations

import json
from pathlib import Path

METADATA_FILES = {"state.json", "dataset_info.json", "dataset_dict.json", "packprep.json"}  # never inputs


def dataset_files(folder: Path) -> list[Path] | None:
    """The data files of a save_to_disk folder, in order; None for a folder that is not one."""
    if (folder / "dataset_dict.json").exists():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(f"{folder} is a DatasetDict folder; pass one split folder, e.g. "
                         f"{folder / (splits or ['train'])[0]}")
    if not (folder / "state.json").exists():
        return None
    state = json.loads((folder / "state.json").read_text())
    return [folder / f["filename"] for f in state.get("_data_files", [])]
