"""Training checkpoints: one `last.pt` holding tensors and plain values only, loaded with `weights_only=True`.

Owns the checkpoint file: its layout {format, version, world_size, step, model, optimizer, scheduler, loader (one
state per rank), config}, its atomic write (a killed save leaves the previous file) and its checks on load. Nothing
in a checkpoint can run code: `torch.load(weights_only=True)` unpickles tensors, containers and numbers only, so a
planted or foreign file is refused with one line instead of executed. Costs: one write of the model and optimizer
state (~12 bytes per parameter in fp32 with AdamW) per save.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from packprep.shards import atomic_file

FORMAT = "packprep-trainer-checkpoint"
VERSION = 1
FILENAME = "last.pt"


def save_checkpoint(folder: Path, *, model, optimizer, scheduler, loaders: list[dict], step: int,
                    config: dict) -> Path:
    """Write `folder/last.pt` atomically; `loaders` holds every rank's loader state, in rank order."""
    path = Path(folder) / FILENAME
    state = {"format": FORMAT, "version": VERSION, "world_size": len(loaders), "step": int(step),
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "loader": loaders, "config": config}
    with atomic_file(path) as f:  # a checkpoint is never half-written, even if the job is killed while saving
        torch.save(state, f)
    return path


def load_checkpoint(folder: Path, world_size: int) -> dict:
    """Read and check `folder/last.pt`; every problem is one ValueError line (FileNotFoundError when absent)."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is refused: it holds objects other than tensors and plain values, which could "
                         f"run code on load ({first[:160]}); use a checkpoint written by packprep train") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint (truncated or not a torch file: {first[:160]}); "
                         "resume from an intact last.pt or start without --resume") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a packprep train checkpoint (no '{FORMAT}' format tag)")
    if state.get("version") != VERSION:
        raise ValueError(f"{path} has checkpoint version {state.get('version')!r}; this trainer reads version "
                         f"{VERSION}")
    missing = [k for k in ("world_size", "step", "model", "optimizer", "scheduler", "loader") if k not in state]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a complete packprep train checkpoint")
    if state["world_size"] != world_size or len(state["loader"]) != world_size:
        raise ValueError(f"{path} was written by {state['world_size']} rank(s), this run has {world_size}; resume "
                         "with the same number of ranks")
    return state
