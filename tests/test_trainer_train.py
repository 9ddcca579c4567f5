"""trainer.train + `packprep train`: the loss goes down, exact resume, safe checkpoints, CLI smoke, 2-process torchrun
(gloo) == 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from trainer_fixtures import one_torch_thread, random_lengths, write_packed
from typer.testing import CliRunner

from packprep.cli import app
from trainer.train import TrainConfig, train

SEQ = 96


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_shards")
    write_packed(out, random_lengths(160, SEQ, seed=3), SEQ, vocab=300, num_shards=2, token_high=9)
    return out


def cfg(shards, **kw) -> TrainConfig:
    base = dict(shards=str(shards), model="tiny", steps=6, batch_tokens=2 * SEQ, lr=1e-3, warmup_steps=2,
                device="cpu", attn="sdpa", log_every=1)
    return TrainConfig(**{**base, **kw})


def losses(metrics) -> list[float]:
    return [m["loss"] for m in metrics]


def test_loss_goes_down_and_resume_is_exact(shards, tmp_path):
    full = train(cfg(shards, steps=8), echo=lambda *a: None)
    assert len(full) == 8 and all(np.isfinite(losses(full)))
    assert np.mean(losses(full)[-2:]) < losses(full)[0] - 0.3  # it learns: 8 token ids of a 320-token vocabulary
    first = train(cfg(shards, steps=8, stop_at=4, ckpt=str(tmp_path)), echo=lambda *a: None)
    assert losses(first) == losses(full)[:4]
    rest = train(cfg(shards, steps=8, ckpt=str(tmp_path), resume=True), echo=lambda *a: None)
    assert [m["step"] for m in rest] == [5, 6, 7, 8]
    assert losses(rest) == losses(full)[4:]  # same batches, same fp32 CPU arithmetic: identical losses


def test_checkpoint_refuses_hostile_truncated_and_foreign_files(shards, tmp_path):
    """A checkpoint is loaded with weights_only=True: a planted pickle that would run code is refused and nothing
    runs; truncated, foreign and mismatched files are refused with one line each."""
    import pickle

    import torch

    ckpt = tmp_path / "ckpt"
    train(cfg(shards, steps=2, ckpt=str(ckpt)), echo=lambda *a: None)
    good = (ckpt / "last.pt").read_bytes()
    resume = cfg(shards, steps=4, ckpt=str(ckpt), resume=True)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # would create a file when unpickled

    torch.save({"format": "packprep-trainer-checkpoint", "version": 1, "evil": Payload()}, ckpt / "last.pt")
    with pytest.raises(ValueError, match="refused: it holds objects other than tensors") as e:
        train(resume, echo=lambda *a: None)
    assert not marker.exists() and "\n" not in str(e.value)
    with open(ckpt / "last.pt", "wb") as f:
        pickle.dump(Payload(), f)  # a bare pickle, not a torch zip file
    with pytest.raises(ValueError, match="refused|not a readable checkpoint"):
        train(resume, echo=lambda *a: None)
    assert not marker.exists()
    (ckpt / "last.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train(resume, echo=lambda *a: None)
    torch.save({"model": {}, "step": 3}, ckpt / "last.pt")  # someone else's checkpoint
    with pytest.raises(ValueError, match="not a packprep train checkpoint"):
        train(resume, echo=lambda *a: None)
    state = torch.load(_write(ckpt, good), weights_only=True)
    torch.save({**state, "version": 99}, ckpt / "last.pt")
    with pytest.raises(ValueError, match="checkpoint version 99"):
        train(resume, echo=lambda *a: None)
    torch.save({**state, "world_size": 2, "loader": state["loader"] * 2}, ckpt / "last.pt")
    with pytest.raises(ValueError, match="written by 2 rank"):
        train(resume, echo=lambda *a: None)
    _write(ckpt, good)
    assert [m["step"] for m in train(resume, echo=lambda *a: None)] == [3, 4]


def _write(folder, data: bytes):
    (folder / "last.pt").write_bytes(data)
    return folder / "last.pt"


def test_balance_reports_the_imbalance_it_removes(shards):
    from trainer.data import PackedShards
    from trainer.train import _imbalance_line

    ds = PackedShards(shards, 2 * SEQ, world_size=2, balance=True, balance_alpha=8.0, balance_window=8)
    line = _imbalance_line(ds)
    before, after = (float(x) for x in line.split("per step ")[1].split(" balanced")[0].split(" dealt by tokens -> "))
    assert after < before and after < 1.05, line


def test_epochs_roll_over(shards):
    metrics = train(cfg(shards, steps=40, batch_tokens=6 * SEQ, log_every=10), echo=lambda *a: None)
    assert [m["step"] for m in metrics] == [10, 20, 30, 40]  # more steps than one epoch holds


def test_config_validation(shards):
    with pytest.raises(ValueError, match="grad_accum"):
        cfg(shards, grad_accum=0)
    with pytest.raises(ValueError, match="--resume needs --ckpt"):
        cfg(shards, resume=True)
    with pytest.raises(ValueError, match="attn"):
        cfg(shards, attn="xformers")


def test_cli_train_smoke(shards, tmp_path):
    r = CliRunner().invoke(app, ["train", str(shards), "--steps", "3", "--batch-tokens", str(2 * SEQ), "--device",
                                 "cpu", "--ckpt", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "step      3 | loss" in r.output and (tmp_path / "last.pt").exists()
    bad = CliRunner().invoke(app, ["train", str(shards), "--batch-tokens", "8", "--device", "cpu"])
    assert bad.exit_code == 1 and "longest row" in bad.output and isinstance(bad.exception, SystemExit)
    missing = CliRunner().invoke(app, ["train", str(tmp_path / "nope"), "--device", "cpu"])
    assert missing.exit_code == 1 and "packprep build" in missing.output


def test_help_does_not_import_torch():
    code = "import sys; from packprep.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_rank_with_accumulation(shards, tmp_path):
    """2 ranks x 1 micro-batch see global batches (2j, 2j+1) at step j: the same data as 1 rank x grad_accum 2."""
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys, torch.distributed as dist\n"
        "from trainer.train import TrainConfig, train\n"
        "cfg = TrainConfig(**json.loads(sys.argv[1]))\n"
        "m = train(cfg, echo=lambda *a: None)\n"
        "if not dist.is_initialized() or dist.get_rank() == 0:\n"
        "    open(sys.argv[2], 'w').write(json.dumps([x['loss'] for x in m]))\n")
    base = dict(shards=str(shards), model="tiny", steps=4, batch_tokens=2 * SEQ, lr=1e-3, warmup_steps=1,
                device="cpu", attn="sdpa")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    two, one = tmp_path / "two.json", tmp_path / "one.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), json.dumps(base), str(two)], check=True, env=env, timeout=240)
    subprocess.run([sys.executable, str(script), json.dumps({**base, "grad_accum": 2}), str(one)], check=True,
                   env=env, timeout=240)
    l2, l1 = json.loads(two.read_text()), json.loads(one.read_text())
    assert len(l2) == len(l1) == 4
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
