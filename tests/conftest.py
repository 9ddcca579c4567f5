"""Shared fixtures: the small corpora in every input format (built once per session) and the CLI helpers.

The corpus generators themselves (`texts`, `chats`, `write_corpora`, `read_docs`) live in build_fixtures.py, a
plain module the tests import; this file holds what pytest injects.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from build_fixtures import write_corpora
from typer.testing import CliRunner

from packprep.cli import app

PROGRESS = ("tokenize", "write", "no inputs")  # stderr progress lines that may precede an error line


@pytest.fixture(scope="session", autouse=True)
def packprep_cache(tmp_path_factory):
    """Builds keep their cache (packprep.cache: backend verdicts, rank tables) in this session's folder, not ~/.cache;
    subprocess builds inherit it."""
    saved = os.environ.get("PACKPREP_CACHE")
    os.environ["PACKPREP_CACHE"] = str(tmp_path_factory.mktemp("packprep-cache"))
    yield Path(os.environ["PACKPREP_CACHE"])
    if saved is None:
        os.environ.pop("PACKPREP_CACHE", None)
    else:
        os.environ["PACKPREP_CACHE"] = saved


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """One small file per format (text, prompt-completion, qa, chat, sharegpt, alpaca, hf): name -> path.
    Session-scoped and shared: tests must not modify these files."""
    return write_corpora(tmp_path_factory.mktemp("corpora"))


def invoke(*args):
    """`packprep ARGS...` in this process (arguments may be paths or numbers) -> typer's Result."""
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(*args) -> str:
    """`packprep ARGS...` must fail cleanly: exit 1, a SystemExit (no exception escaping the CLI) and exactly one
    line, `error: ...`, besides progress lines. Returns that line."""
    r = invoke(*args)
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit), r.exception  # a clean exit, not an exception escaping the CLI
    lines = [x for x in r.output.splitlines() if x.strip() and not x.startswith(PROGRESS)]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


@pytest.fixture(scope="session")
def cli():
    """cli(*args) -> Result of `packprep ARGS...`, run in-process."""
    return invoke


@pytest.fixture(scope="session")
def cli_error():
    """cli_error(*args) -> the one `error:` line of a `packprep ARGS...` that must fail cleanly (exit code 1)."""
    return error_line
