"""Training throughput on a real SFT length mix: padding vs packprep ffd + varlen attention vs whole-row causal.

One epoch of the same documents (benchmarks/data/sft_lengths_qwen.npy: 9,990 real documents' lengths, mean ~156,
max 537; random token ids with those lengths) through a Llama-style model (`small`, ~300M parameters), bf16
autocast, AdamW, the same token budget per step in every mode:
    (a) padding  one document per row, rows right-padded to the longest in the batch, B * L <= budget, causal SDPA
    (b) packed   packprep ffd rows of seq_len 4096 written as real shards, streamed through PackedShards,
                 varlen attention per document (the `torch` backend on the device)
    (c) rows     the same packed batches with causal attention over whole rows (no document mask): the upper bound
Reports useful (real) tokens/s, median step time, epoch time, peak GPU memory and loader time per step, as JSON.

    PYTHONPATH=. python benchmarks/bench_train.py --out bench_train.json        # on a CUDA machine (~2-4 min on H100)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from packprep.shards import make_batch, shard_name, write_hf_metadata, write_shard
from trainer import PackedShards, build_model, model_inputs
from trainer.data import IGNORE_INDEX
from trainer.model import num_params
from trainer.optim import make_optimizer
from trainer.train import PEAK_FLOPS, train_step

HERE = Path(__file__).parent


def pack_rows(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(row_offsets over pieces, document index per piece) from packprep's ffd engine."""
    from packprep.pack import pack

    plan = pack(lengths, seq_len=seq_len, strategy="ffd")
    return plan.row_offsets, plan.doc


def write_shards(out: Path, docs: list[np.ndarray], seq_len: int, num_shards: int = 4) -> dict:
    lengths = np.array([len(d) for d in docs])
    row_off, doc = pack_rows(lengths, seq_len)
    rows = len(row_off) - 1
    names = []
    for s, part in enumerate(np.array_split(np.arange(rows), num_shards)):
        batches = []
        for chunk in np.array_split(part, max(1, len(part) // 64)):
            p0, p1 = row_off[chunk[0]], row_off[chunk[-1] + 1]
            pieces = doc[p0:p1]
            tokens = np.concatenate([docs[d] for d in pieces])
            piece_row_off = row_off[chunk[0] : chunk[-1] + 2] - p0
            tok_row_off = np.concatenate([[0], np.cumsum(lengths[pieces])])[piece_row_off]
            batches.append(make_batch(tokens, tok_row_off, lengths[pieces], piece_row_off, pieces))
        names.append(shard_name(s, num_shards))
        write_shard(out / names[-1], batches, fsync=False)
    write_hf_metadata(out, names, fingerprint="bench_train_0000")
    return {"rows": rows, "efficiency": float(lengths.sum() / (rows * seq_len))}


def padded_batches(docs: list[np.ndarray], budget: int, seed: int):
    """Seeded order, greedy: add documents while batch_size * longest <= budget; yields (input_ids, labels) [B, L]."""
    order = np.random.default_rng(seed).permutation(len(docs))
    batch: list[np.ndarray] = []
    for i in order.tolist():
        longest = max([len(docs[i])] + [len(d) for d in batch])
        if batch and (len(batch) + 1) * longest > budget:
            yield _pad(batch)
            batch = []
        batch.append(docs[i])
    if batch:
        yield _pad(batch)


def _pad(batch: list[np.ndarray]):
    """(input_ids, labels, real tokens): right-padded [B, L]; labels -100 at padding (and the first token)."""
    L = max(len(d) for d in batch)
    ids = np.zeros((len(batch), L), dtype=np.int64)
    labels = np.full((len(batch), L), IGNORE_INDEX, dtype=np.int64)
    for r, d in enumerate(batch):
        ids[r, : len(d)] = d
        labels[r, 1 : len(d)] = d[1:]
    return torch.from_numpy(ids), torch.from_numpy(labels), sum(len(d) for d in batch)


def run_mode(mode: str, model, optimizer, batches, device, warmup: int, peak_flops, flops_per_token) -> dict:
    """Train over `batches` (an iterator of host batches); the first `warmup` steps are run but not counted."""
    step_times, load_times, useful, positions = [], [], 0, 0
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    it = iter(batches)
    n = 0
    epoch_t0 = None
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            break
        if mode == "a":
            ids, labels, real = item
            pin = (lambda x: x.pin_memory()) if cuda else (lambda x: x)
            inputs = {"input_ids": pin(ids).to(device, non_blocking=True), "use_cache": False}
            labels = pin(labels).to(device, non_blocking=True)
            pos = ids.numel()
        else:
            b = item.to(device)
            if mode == "c":  # whole rows: one "document" per row (labels unchanged)
                b.cu_seqlens, b.max_seqlen = b.cu_rows, int(item.cu_rows.diff().max())
            inputs, labels, real, pos = model_inputs(b), b.labels.unsqueeze(0), item.num_tokens, item.num_tokens
        t_load = time.perf_counter() - t0
        train_step(model, optimizer, [(inputs, labels)], device=device, bf16=cuda, grad_clip=1.0)  # syncs (loss)
        dt = time.perf_counter() - t0
        n += 1
        if n == warmup:
            epoch_t0 = time.perf_counter()
        if n > warmup:
            step_times.append(dt)
            load_times.append(t_load)
            useful += real
            positions += pos
    epoch_s = time.perf_counter() - epoch_t0
    out = {
        "mode": mode, "steps": len(step_times), "warmup_steps": warmup, "epoch_s": epoch_s,
        "useful_tokens": useful, "positions": positions, "useful_fraction": useful / positions,
        "useful_tok_s": useful / epoch_s, "step_ms_median": 1e3 * statistics.median(step_times),
        "loader_ms_median": 1e3 * statistics.median(load_times), "loader_ms_mean": 1e3 * statistics.mean(load_times),
        "loader_frac": sum(load_times) / sum(step_times),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
    }
    out["epoch_s_all_docs_est"] = out["epoch_s"] * (1 + warmup / max(1, len(step_times)))
    if peak_flops:
        out["mfu_dense_6N"] = flops_per_token * positions / epoch_s / peak_flops
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default=str(HERE / "data" / "sft_lengths_qwen.npy"))
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--model", default="small")
    ap.add_argument("--attn", default="torch")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--modes", default="abc")
    ap.add_argument("--out", default=None)
    ap.add_argument("--docs", type=int, default=0, help="use only the first N documents (0: all; CPU smoke runs)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_train needs a CUDA device (or --device cpu --model tiny --attn sdpa for a smoke run)",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    lengths = np.load(args.lengths).astype(np.int64)
    if args.docs:
        lengths = lengths[: args.docs]
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, args.vocab, n).astype(np.int32) for n in lengths.tolist()]
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    t = time.perf_counter()
    packed = write_shards(tmp, docs, args.seq_len)
    pack_s = time.perf_counter() - t
    torch.manual_seed(0)
    model = build_model(args.model, args.attn, vocab_size=args.vocab).to(device).train()
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.1)
    n = num_params(model)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    meta = {"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__,
            "model": args.model, "params_non_embedding": n, "params": num_params(model, embeddings=True),
            "attn": args.attn, "seq_len": args.seq_len, "batch_tokens": args.batch_tokens, "docs": len(docs),
            "doc_tokens": int(lengths.sum()), "mean_len": float(lengths.mean()), "max_len": int(lengths.max()),
            "packed_rows": packed["rows"], "pack_efficiency": packed["efficiency"], "write_shards_s": pack_s,
            "command": "PYTHONPATH=. python " + " ".join(["benchmarks/bench_train.py"] + (argv or sys.argv[1:]))}
    print(json.dumps(meta), flush=True)
    results = []
    for mode in args.modes:
        if mode == "a":
            batches = padded_batches(docs, args.batch_tokens, seed=0)
        else:
            batches = PackedShards(tmp, args.batch_tokens, seed=0)
        r = run_mode(mode, model, optimizer, batches, device, args.warmup, peak, 6 * n)
        results.append(r)
        print(json.dumps(r), flush=True)
    by = {r["mode"]: r for r in results}
    summary = {}
    if "a" in by and "b" in by:
        summary["b_over_a_useful_tok_s"] = by["b"]["useful_tok_s"] / by["a"]["useful_tok_s"]
        summary["b_peak_mem_le_a"] = by["b"]["peak_mem_gib"] <= by["a"]["peak_mem_gib"]
    if "b" in by and "c" in by:
        summary["b_over_c_useful_tok_s"] = by["b"]["useful_tok_s"] / by["c"]["useful_tok_s"]
    if "b" in by:
        summary["b_loader_frac"] = by["b"]["loader_frac"]
    print(json.dumps(summary), flush=True)
    names = {"a": "(a) padding", "b": "(b) packed+varlen", "c": "(c) packed, whole-row causal"}
    print(f"\n{'mode':<30} {'useful tok/s':>13} {'step ms':>8} {'epoch s':>8} {'steps':>6} {'useful':>7} "
          f"{'peak GiB':>9} {'loader ms':>10}")
    for r in results:
        print(f"{names[r['mode']]:<30} {r['useful_tok_s']:>13,.0f} {r['step_ms_median']:>8.1f} {r['epoch_s']:>8.2f} "
              f"{r['steps']:>6} {r['useful_fraction']:>7.1%} {r['peak_mem_gib']:>9.2f} {r['loader_ms_median']:>10.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
