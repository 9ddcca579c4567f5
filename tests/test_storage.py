"""storage: URL parsing, filesystem options from --storage-options and the AWS_* environment, a missing extra as one
line naming it, secrets masked for the manifest; the Ray-over-S3 recipe parses into a BuildConfig."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from packprep import storage
from packprep.config import BuildConfig, load_config_file


def test_protocols():
    assert [storage.protocol(u) for u in ("s3://b/k", "GS://b", "data/a.jsonl", "file:///tmp/x", "/abs")] == [
        "s3", "gs", None, None, None]
    assert storage.is_remote("hf://datasets/x/y") and not storage.is_remote("C:/data")


def test_options_from_flag_and_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    storage.configure(None)
    assert storage.options("s3") == {"endpoint_url": "http://127.0.0.1:9000"}
    storage.configure('{"anon": true}')
    assert storage.options("s3") == {"anon": True, "endpoint_url": "http://127.0.0.1:9000"}
    assert storage.options("gs") == {"anon": True}
    storage.configure('{"s3": {"endpoint_url": "http://other"}, "gs": {"project": "p"}}')  # per protocol; given wins
    assert storage.options("s3") == {"endpoint_url": "http://other"} and storage.options("gs") == {"project": "p"}
    storage.configure(None)


def test_bad_options_and_missing_extra(cli_error, tmp_path):
    with pytest.raises(ValueError, match="--storage-options is not valid JSON"):
        BuildConfig(storage_options="{anon: true}")
    with pytest.raises(ValueError, match="must be a JSON object"):
        BuildConfig(storage_options="[1]")
    assert "--storage-options is not valid JSON" in cli_error("build", "x.jsonl", "--storage-options", "{")
    for url, extra in (("gs://bucket/a.jsonl", "gcs"), ("az://container/a.jsonl", "azure")):
        module = {"gcs": "gcsfs", "azure": "adlfs"}[extra]
        if importlib.util.find_spec(module) is None:
            line = cli_error("build", url, "--out", tmp_path / "o")
            assert f'pip install "packprep[{extra}]"' in line and url in line


def test_redacted():
    text = json.dumps({"key": "AKIA", "secret": "s", "anon": False, "s3": {"token": "t", "region": "eu"}})
    assert json.loads(storage.redacted(text)) == {"key": "***", "secret": "***", "anon": False,
                                                  "s3": {"token": "***", "region": "eu"}}


def test_ray_s3_recipe_parses():
    cfg = BuildConfig(**load_config_file(Path(__file__).resolve().parents[1] / "pipelines" / "ray_s3.toml"))
    assert cfg.executor == "ray" and storage.is_remote(cfg.out) and all(map(storage.is_remote, cfg.inputs))
