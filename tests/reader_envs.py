"""Each training stack's own reader, installed from PyPI into an overlay venv of its own, and run as a subprocess.

An overlay venv is a fresh venv whose own site-packages come first on sys.path and which then falls back to this
project's environment through a `.pth` file. The reader's package and any version it pins that conflicts with the
project (mosaicml-streaming: numpy<2.2, transformers<5) are installed into the overlay, so the project's venv is
never changed and large shared packages (torch) are not downloaded again. torch is pinned to the project's version
while resolving, so a reader never pulls another multi-GB torch build.

Venvs are cached under $PACKPREP_READER_CACHE (default: <repo>/.cache/readers), keyed by the requirement list; the
first run installs (tens of seconds each, PyPI needed), later runs reuse them. Without PyPI the tests that need a
reader skip with the pip error.
"""

from __future__ import annotations

import hashlib
import json
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PACKPREP_READER_CACHE", REPO / ".cache" / "readers"))

# One entry per stack: the pip requirements of its reader (pins chosen to resolve against the project's torch).
READERS = {
    "megatron": ["megatron-core==0.16.1"],
    # megatron-bridge's own dependencies include CUDA-only packages (transformer-engine, mamba-ssm): only what its
    # data modules import is installed
    "nemo": ["megatron-core==0.16.1", "six", "--no-deps", "megatron-bridge==0.3.1"],
    "olmo": ["ai2-olmo-core==3.0.0"],
    # its pins that conflict with the project (numpy<2.2, transformers<5) and the modules streaming.base imports;
    # its cloud SDKs (azure, oci, gcs, paramiko) are not needed to read local shards
    "mds": ["numpy<2.2", "transformers<5", "xxhash<4", "zstd", "brotli", "python-snappy", "catalogue", "--no-deps",
            "mosaicml-streaming==0.13.0"],
    "litdata": ["litdata==0.2.76"],
    # the pins its import checks (datasets<=4.0, transformers<=5.6, trl<=0.24: conflicts with the project's) and what
    # llamafactory.data imports; its GUI, API server and training extras are not needed to load and collate a
    # tokenized_path (torchaudio, whose PyPI build does not load with a CPU torch, is stubbed by the reader: the text
    # path never calls it)
    "llamafactory": ["transformers>=4.55,<=5.6.0", "datasets>=2.16,<=4.0.0", "peft==0.18.1", "trl>=0.18,<=0.24",
                     "omegaconf", "--no-deps", "llamafactory==0.9.5"],
    "torchtitan": ["torchtitan==0.3.0"],
}


class ReaderUnavailable(RuntimeError):
    """The reader's packages could not be installed (no PyPI, or no release for this Python)."""


def reader_python(stack: str) -> Path:
    """The python of `stack`'s overlay venv, created and installed on first use."""
    reqs = READERS[stack]
    key = hashlib.sha256(json.dumps([sys.version, reqs]).encode()).hexdigest()[:10]
    folder = CACHE / f"{stack}-{key}"
    python = folder / "bin" / "python"
    if (folder / "ready").exists():
        return python
    venv.EnvBuilder(clear=True, with_pip=False).create(folder)
    own = Path(subprocess.check_output([python, "-c", "import site; print(site.getsitepackages()[0])"],
                                       text=True).strip())
    (own / "_packprep_parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    import torch  # the project's torch: readers resolve against it instead of pulling another build

    constraints = folder / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    groups, current = [], []
    for r in reqs:  # "--no-deps" starts a second pip call for the requirements after it
        if r == "--no-deps":
            groups.append(current)
            current = ["--no-deps"]
        else:
            current.append(r)
    groups.append(current)
    for group in groups:
        cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "-c", str(constraints), *group]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise ReaderUnavailable(f"pip install {' '.join(group)} failed: {done.stderr.strip()[-500:]}")
    (folder / "ready").write_text(json.dumps(reqs))
    return python


def run_reader(stack: str, script: str, *args: str) -> str:
    """Run tests/readers/<script> with `stack`'s python; returns its stdout, raises with its stderr on failure."""
    python = reader_python(stack)
    done = subprocess.run([str(python), str(REPO / "tests" / "readers" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise AssertionError(f"{stack} reader failed:\n{done.stderr[-3000:]}")
    return done.stdout
