"""The Ray executor and the pipeline recipes: `--executor ray` on a local 2-CPU Ray runtime writes the same bytes as
the local executor, and the recipes in pipelines/ run as shipped (config files parsed, scripts valid)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from build_fixtures import write_corpora
from typer.testing import CliRunner

from packprep.build import build
from packprep.cli import app
from packprep.config import BuildConfig, load_config_file
from packprep.shards import sha256_file, shard_files
from packprep.verify import verify

ray = pytest.importorskip("ray")
PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    return write_corpora(tmp_path_factory.mktemp("ray-corpora"), n=120)


def _hashes(out: Path) -> list[str]:
    return [sha256_file(f) for f in shard_files(out)]


def test_ray_executor_writes_the_same_bytes_as_local(ray_runtime, corpora, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    inputs = (str(corpora["text"]), str(corpora["chat"]), str(corpora["prompt-completion"]))
    common = dict(inputs=inputs, seq_len=256, chunk_bytes=2048, shard_rows=40)
    local = build(BuildConfig(out=str(tmp_path / "local"), workers=1, **common)).manifest
    on_ray = build(BuildConfig(out=str(tmp_path / "ray"), workers=2, executor="ray", **common)).manifest
    assert len(local["shards"]) > 1 and len(local["inputs"]["files"]) == 3
    assert _hashes(tmp_path / "ray") == _hashes(tmp_path / "local")
    assert on_ray["counts"] == local["counts"]
    assert verify(tmp_path / "ray").ok
    assert ray.is_initialized()  # a runtime the build did not start is left running for its owner


def test_ray_task_errors_reach_the_user_as_one_line(ray_runtime, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"other": 3}\n' * 3)
    res = CliRunner().invoke(app, ["build", str(bad), "--out", str(tmp_path / "o"), "--executor", "ray",
                                   "--format", "text", "--workers", "2"])
    assert res.exit_code == 1
    assert isinstance(res.exception, SystemExit) and "RayTaskError" not in res.output
    assert "bad.jsonl" in res.output


def test_ray_cluster_recipe_runs_on_a_local_runtime(ray_runtime, corpora, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config_file(PIPELINES / "ray_cluster.toml")
    assert cfg["executor"] == "ray"
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["build", str(corpora["sharegpt"]), str(corpora["alpaca"]), "--config",
                                   str(PIPELINES / "ray_cluster.toml"), "--out", str(out), "--tokenizer", "builtin",
                                   "--seq-len", "512", "--quiet"])
    assert res.exit_code == 0, res.output
    assert verify(out).ok


def test_local_sft_recipe_builds(corpora, tmp_path):
    cfg = load_config_file(PIPELINES / "sft_local.toml")
    assert cfg["strategy"] == "ffd" and cfg["seq_len"] == 4096
    out = tmp_path / "sft"
    res = CliRunner().invoke(app, ["build", str(corpora["prompt-completion"]), str(corpora["chat"]), "--config",
                                   str(PIPELINES / "sft_local.toml"), "--out", str(out), "--workers", "1", "-q"])
    assert res.exit_code == 0, res.output
    assert verify(out).ok


@pytest.mark.parametrize("script", ["ray_job.sh", "slurm_ray.sbatch"])
def test_shell_recipes_are_valid_bash(script):
    subprocess.run(["bash", "-n", str(PIPELINES / script)], check=True)
