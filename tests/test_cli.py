"""The CLI and its config: options generated from the config dataclasses, typed config-file values, refused flag
combinations, flags over config files, and the `train` command without torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from build_fixtures import texts

from packprep import cli as cli_module
from packprep.config import BuildConfig, load_config_file, merge


@pytest.fixture(scope="module")
def text_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(30, 7)))
    return path


def test_build_help_lists_every_field_with_its_doc_and_default(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # no option name cut short by the help's width
    r = cli("build", "--help")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.replace("│", " ").split())  # rich boxes and wraps the help
    for f in dataclasses.fields(BuildConfig):
        if f.name != "inputs" and f.metadata["cli"]:  # sources: config-file tables only
            assert "--" + f.name.replace("_", "-") in text, f.name
    assert "[ffd|bfd|greedy|random|none|b2f]" in text and "[default: 4096]" in text and "--no-shuffle" in text
    assert "Tokens per packed row" in text  # the field's doc, declared once in config.py


@pytest.mark.parametrize("line, message", [
    ('overwrite = "no"', "overwrite = 'no': expected true or false (a boolean), got a string"),
    ('shuffle = "false"', "shuffle = 'false': expected true or false (a boolean), got a string"),
    ("seed = true", "seed = True: expected an integer, got a boolean"),
    ('seq_len = "4096"', "seq_len = '4096': expected an integer, got a string"),
    ("workers = 2.5", "workers = 2.5: expected an integer, got a number"),
    ('shard_rows = "10"', "shard_rows = '10': expected an integer, got a string"),
    ("inputs = [1, 2]", "inputs = (1, 2): expected a list of strings"),
    ("tokenizer = 3", "tokenizer = 3: expected a string, got an integer"),
    ('strategy = "best"', "unknown strategy 'best'; expected one of: ffd, bfd, greedy, random, none, b2f"),
    ("sequence_length = 3", "unknown setting(s) sequence_length; known:"),
])
def test_config_file_values_are_typed(tmp_path, cli_error, line, message):
    path = tmp_path / "c.toml"
    path.write_text(line + "\n")
    error = cli_error("build", "--config", path, "--out", tmp_path / "o")
    assert error.startswith(f"error: {path}: ") and message in error, error
    assert not (tmp_path / "o").exists()


def test_yaml_values_are_typed_too(tmp_path):
    (tmp_path / "c.yaml").write_text("build:\n  overwrite: 'no'\n")
    with pytest.raises(ValueError, match="c.yaml: overwrite = 'no': expected true or false"):
        load_config_file(tmp_path / "c.yaml")
    (tmp_path / "ok.yaml").write_text("build:\n  overwrite: false\n  seq-len: 512\n")
    assert load_config_file(tmp_path / "ok.yaml") == {"overwrite": False, "seq_len": 512}


def test_library_refuses_wrong_types():
    with pytest.raises(ValueError, match="seed = True: expected an integer"):
        BuildConfig(seed=True)
    with pytest.raises(ValueError, match="shuffle = 'false'"):
        BuildConfig(shuffle="false")


@pytest.mark.parametrize("args, message", [
    (["--text-field", "t", "--prompt-field", "p"], "--text-field and --prompt-field cannot be combined"),
    (["--messages-field", "m", "--completion-field", "c"], "--completion-field and --messages-field cannot be"),
    (["--format", "text", "--prompt-field", "q"], "--prompt-field does not apply to --format text"),
    (["--format", "chat", "--text-field", "body"], "--text-field does not apply to --format chat"),
    (["--format", "alpaca", "--messages-field", "m"], "--messages-field does not apply to --format alpaca"),
    (["--seq-len", 2**31], "seq_len must be at most 2,147,483,647 (2**31 - 1), got 2,147,483,648"),
])
def test_refused_flags(text_jsonl, tmp_path, cli_error, args, message):
    error = cli_error("build", text_jsonl, "--out", tmp_path / "o", *args)
    assert message in error, error
    assert not (tmp_path / "o").exists()


def test_field_flags_that_fit_are_accepted():
    assert BuildConfig(format="prompt-completion", prompt_field="q", completion_field="a").prompt_field == "q"
    assert BuildConfig(messages_field="conv").messages_field == "conv"  # auto: the flag picks the family
    assert BuildConfig(format="sharegpt", messages_field="conv").format == "sharegpt"


def test_config_file_then_flags(text_jsonl, tmp_path, cli):
    """The file's values hold unless a flag is given; a flag left at its default does not override the file."""
    path = tmp_path / "c.toml"
    path.write_text(f'[build]\ninputs = ["{text_jsonl}"]\nseq-len = 64\nshuffle = false\nworkers = 1\n')
    r = cli("build", "--config", path, "--out", tmp_path / "a", "-q")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "a" / "packprep.json").read_text())["config"]
    assert (m["seq_len"], m["shuffle"], m["strategy"], m["inputs"]) == (64, False, "ffd", [str(text_jsonl)])
    r = cli("build", "--config", path, "--out", tmp_path / "b", "--shuffle", "--seq-len", 128, "--strategy", "bfd",
            "-q")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "b" / "packprep.json").read_text())["config"]
    assert (m["seq_len"], m["shuffle"], m["strategy"]) == (128, True, "bfd")
    cfg = merge(path, seq_len=256, seed=None)  # the library's merge: None means "not given"
    assert (cfg.seq_len, cfg.seed, cfg.shuffle) == (256, 0, False)


def test_train_without_torch_is_one_line(monkeypatch, cli_error):
    monkeypatch.setitem(sys.modules, "trainer.train", None)  # `import trainer.train` raises ImportError
    cli_module.train_command.cache_clear()
    try:
        error = cli_error("train", "shards", "--steps", 3)
    finally:
        cli_module.train_command.cache_clear()
    assert "packprep train cannot start" in error and 'pip install "packprep[train]"' in error


def test_train_options_are_the_train_config_fields(tmp_path, cli, cli_error, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("COLUMNS", "300")
    from trainer.train import TrainConfig

    r = cli("train", "--help")
    text = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 0 and "--warmup-steps" in text and "Linear warmup steps" in text
    for f in dataclasses.fields(TrainConfig):
        assert f.name == "shards" or "--" + f.name.replace("_", "-") in text, f.name
    (tmp_path / "t.toml").write_text('[train]\nsteps = "3"\n')
    error = cli_error("train", tmp_path, "--config", tmp_path / "t.toml")
    assert "steps = '3': expected an integer, got a string" in error
    assert "unknown device 'gpu'" in cli_error("train", tmp_path, "--device", "gpu")


def test_console_script_exits_normally(tmp_path):
    """The entry point is the typer app itself: no os._exit, finalizers run; errors are one line, exit 1."""
    bad = subprocess.run([sys.executable, "-c", "from packprep.cli import app; app()", "build",
                          str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: input not found") and "Traceback" not in bad.stderr
    assert not hasattr(cli_module, "run")
