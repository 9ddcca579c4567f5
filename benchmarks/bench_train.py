"""Training throughput on a real SFT length mix: honest baselines against packprep's packed rows, in one run.

The same documents (benchmarks/data/sft_lengths_qwen.npy: 9,990 real documents' lengths, mean ~156, max 537; random
token ids of those lengths), the same model initialisation (Llama-style preset, bf16 autocast, AdamW), the same token
budget per step in every mode:
    a   random-order padding: one document per row, rows right-padded to the longest in the batch, B*L <= budget,
        causal SDPA (what a plain HF Trainer does)
    g   length-grouped padding: documents sorted by length, padded batches cut greedily, batch order shuffled (the
        best case of HF's group_by_length)
    f   padding-free flattening in arrival order: documents in shuffled order concatenated into flat varlen batches
        of <= budget tokens, no packing (TRL's padding_free); the best stock kernel here (`--f-attn`, torch varlen),
        eager
    fc  f with the decoder torch.compile'd with dynamic shapes (what a flattening user can do)
    b   packprep ffd rows of seq_len 4096 streamed by PackedShards, varlen attention (`--attn`), eager
    bc  b with static batches (exactly `budget` tokens, the residue one filler document without loss) and the decoder
        compiled once
Per mode: useful (real) tokens/s, median step time, steps per epoch, epoch time estimate, peak GPU memory, useful MFU
(6N per real token + causal attention over real documents, against the dense bf16 peak), loader share of a step,
graphs compiled after the warm-up (0: no recompiles), and every step's loss (modes b and bc see the same rows in the
same order, so their loss curves must agree within bf16 noise). `--steps` timed steps follow `--warmup` untimed ones.

    PYTHONPATH=. python benchmarks/bench_train.py --model small --modes a,g,f,fc,b,bc --attn fa4 --out r.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from packprep.shards import MANIFEST, make_batch, shard_name, write_hf_metadata, write_shard
from trainer import PackedShards, build_model, model_inputs
from trainer.data import IGNORE_INDEX, make_varlen_batch
from trainer.loss import CausalLMLoss
from trainer.model import num_params
from trainer.optim import make_optimizer
from trainer.train import PEAK_FLOPS, train_step

HERE = Path(__file__).parent


def write_shards(out: Path, docs: list[np.ndarray], seq_len: int, vocab: int, num_shards: int = 4) -> dict:
    """packprep ffd rows of the documents as a shard folder with a manifest (what PackedShards opens)."""
    from packprep.pack import pack

    lengths = np.array([len(d) for d in docs])
    plan = pack(lengths, seq_len=seq_len, strategy="ffd")
    row_off, doc = plan.row_offsets, plan.doc
    rows = len(row_off) - 1
    infos = []
    for s, part in enumerate(np.array_split(np.arange(rows), num_shards)):
        batches = []
        for chunk in np.array_split(part, max(1, len(part) // 64)):
            p0, p1 = row_off[chunk[0]], row_off[chunk[-1] + 1]
            pieces = doc[p0:p1]
            tokens = np.concatenate([docs[d] for d in pieces])
            piece_row_off = row_off[chunk[0] : chunk[-1] + 2] - p0
            tok_row_off = np.concatenate([[0], np.cumsum(lengths[pieces])])[piece_row_off]
            batches.append(make_batch(tokens, tok_row_off, lengths[pieces], piece_row_off, pieces))
        infos.append(write_shard(out / shard_name(s, num_shards), batches, fsync=False))
    write_hf_metadata(out, [i["file"] for i in infos], fingerprint="bench_train_0000")
    (out / MANIFEST).write_text(json.dumps({"format_version": 1, "seq_len": seq_len, "shards": infos, "tokenizer": {
        "name": "random-ids", "sha256": None, "vocab_size": vocab, "eos_id": 0}}))
    return {"rows": rows, "efficiency": float(lengths.sum() / (rows * seq_len))}


def padded_batches(docs: list[np.ndarray], order: np.ndarray, budget: int) -> list[list[int]]:
    """Greedy in the given order: add documents while batch_size * longest <= budget."""
    out, batch, longest = [], [], 0
    for i in order.tolist():
        n = len(docs[i])
        if batch and (len(batch) + 1) * max(longest, n) > budget:
            out.append(batch)
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, n)
    return out + ([batch] if batch else [])


def flat_batches(docs: list[np.ndarray], order: np.ndarray, budget: int) -> list[list[int]]:
    """Greedy in the given order: add documents while the flat batch stays within budget tokens."""
    out, batch, used = [], [], 0
    for i in order.tolist():
        if batch and used + len(docs[i]) > budget:
            out.append(batch)
            batch, used = [], 0
        batch.append(i)
        used += len(docs[i])
    return out + ([batch] if batch else [])


def pad(docs: list[np.ndarray], ids: list[int]):
    """(input_ids, labels) right-padded [B, L]; labels -100 at padding and each first token."""
    L = max(len(docs[i]) for i in ids)
    x = np.zeros((len(ids), L), np.int64)
    y = np.full((len(ids), L), IGNORE_INDEX, np.int64)
    for r, i in enumerate(ids):
        x[r, : len(docs[i])] = docs[i]
        y[r, 1 : len(docs[i])] = docs[i][1:]
    return torch.from_numpy(x), torch.from_numpy(y)


def flatten(docs: list[np.ndarray], ids: list[int]):
    lens = [len(docs[i]) for i in ids]
    cu = np.concatenate([[0], np.cumsum(lens)])
    return make_varlen_batch(np.concatenate([docs[i] for i in ids]), cu, np.ones(cu[-1]), np.array([0, cu[-1]]))


def useful_flops(n_params: int, attn_per_pair: float, lens) -> float:
    lens = np.asarray(lens, np.float64)
    return 6 * n_params * lens.sum() + attn_per_pair * (lens * lens).sum() / 2


def run_mode(mode: str, args, docs, shards: Path, device) -> dict:
    """Build a fresh model (same seed), train `warmup + steps` steps of this mode's batches, return its figures."""
    torch.manual_seed(0)
    attn = args.f_attn if mode in ("f", "fc") else args.attn
    model = build_model(args.model, attn, vocab_size=args.vocab).to(device).train()
    compiled = mode in ("fc", "bc")
    if compiled:
        model.get_decoder().compile(dynamic=mode == "fc")
    net = CausalLMLoss(model)
    opt = make_optimizer(model, lr=args.lr, weight_decay=0.1)
    n = num_params(model)
    cfg = model.config
    per_pair = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(docs))
    if mode in ("a", "g"):
        if mode == "g":
            by_len = np.argsort([len(d) for d in docs], kind="stable")
            groups = padded_batches(docs, by_len, args.batch_tokens)
            groups = [groups[i] for i in rng.permutation(len(groups))]
        else:
            groups = padded_batches(docs, order, args.batch_tokens)
        steps_epoch = len(groups)

        def batches():
            for ids in groups:
                x, y = pad(docs, ids)
                if cuda:
                    x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
                yield {"input_ids": x, "use_cache": False}, y, [len(docs[i]) for i in ids], x.numel()
    elif mode in ("f", "fc"):
        groups = flat_batches(docs, order, args.batch_tokens)
        steps_epoch = len(groups)

        def batches():
            for ids in groups:
                b = flatten(docs, ids).to(device)
                yield model_inputs(b), b.labels[None], [len(docs[i]) for i in ids], b.num_tokens
    else:
        ds = PackedShards(shards, args.batch_tokens, seed=0, static=mode == "bc")
        steps_epoch = ds.num_batches()

        def batches():
            for host in ds:
                b = host.to(device)
                lens = np.diff(host.cu_seqlens.numpy())[: host.num_docs - (1 if host.filler else 0)]
                yield model_inputs(b, compiled=compiled), b.labels[None], lens, b.num_tokens
    from torch._dynamo.utils import counters

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    graphs0 = counters["stats"]["unique_graphs"]
    losses, step_s, load_s, useful, positions, flops = [], [], [], 0, 0, 0.0
    it = batches()
    total = args.warmup + args.steps
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_compile = time.perf_counter()
    for step in range(total):
        if step == args.warmup:
            sync()
            warm_s, graphs_warm, t_epoch = time.perf_counter() - t_compile, counters["stats"]["unique_graphs"], \
                time.perf_counter()
        t0 = time.perf_counter()
        try:
            inputs, labels, lens, pos = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        out = train_step(net, opt, [(inputs, labels)], device=device, bf16=cuda, grad_clip=1.0)  # syncs (loss)
        t2 = time.perf_counter()
        losses.append(out["loss"])
        if step >= args.warmup:
            step_s.append(t2 - t0)
            load_s.append(t1 - t0)
            useful += int(np.sum(lens))
            positions += pos
            flops += useful_flops(n, per_pair, lens)
    elapsed = time.perf_counter() - t_epoch
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = PEAK_FLOPS.get(next((k for k in PEAK_FLOPS if k in name), ""), None)
    r = {"mode": mode, "attn": attn, "compiled": compiled, "steps": len(step_s), "steps_per_epoch": steps_epoch,
         "useful_tok_s": useful / elapsed, "step_ms_median": 1e3 * statistics.median(step_s),
         "epoch_s_est": steps_epoch * elapsed / len(step_s), "useful_fraction": useful / positions,
         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
         "loader_frac": sum(load_s) / sum(step_s),
         "loader_ms_median": 1e3 * statistics.median(load_s), "warmup_s": warm_s,
         "params_non_embedding": n, "graphs_compiled": graphs_warm - graphs0,
         "graphs_after_warmup": counters["stats"]["unique_graphs"] - graphs_warm, "losses": losses}
    if peak:
        r["useful_mfu"] = flops / elapsed / peak
    del model, net, opt
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default=str(HERE / "data" / "sft_lengths_qwen.npy"))
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--model", default="small")
    ap.add_argument("--attn", default="auto", help="backend of modes b and bc")
    ap.add_argument("--f-attn", default="torch", help="backend of modes f and fc (the stock kernel)")
    ap.add_argument("--modes", default="a,g,f,fc,b,bc")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=45)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (--model tiny --attn sdpa --f-attn sdpa)")
    ap.add_argument("--docs", type=int, default=0, help="only the first N documents (0: all)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_train needs a CUDA device (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    lengths = np.load(args.lengths).astype(np.int64)[: args.docs or None]
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, args.vocab, n).astype(np.int32) for n in lengths.tolist()]
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    packed = write_shards(tmp, docs, args.seq_len, args.vocab)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "model": args.model, "seq_len": args.seq_len,
            "batch_tokens": args.batch_tokens, "docs": len(docs), "doc_tokens": int(lengths.sum()),
            "packed_rows": packed["rows"], "pack_efficiency": packed["efficiency"],
            "command": "PYTHONPATH=. python " + " ".join(["benchmarks/bench_train.py"] + (argv or sys.argv[1:]))}
    print(json.dumps(meta), flush=True)
    results = []
    for mode in args.modes.split(","):
        try:
            r = run_mode(mode, args, docs, tmp, device)
        except Exception as e:  # one failing mode must not lose the others' figures
            traceback.print_exc()
            r = {"mode": mode, "error": f"{type(e).__name__}: {str(e)[:400]}"}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
        if args.out:  # after every mode: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    by = {r["mode"]: r for r in results if "error" not in r}
    summary = {f"{x}_over_{y}": by[x]["useful_tok_s"] / by[y]["useful_tok_s"]
               for x in ("b", "bc") for y in ("a", "g", "f", "fc") if x in by and y in by}
    if "b" in by and "bc" in by:
        lb, lc = np.array(by["b"]["losses"]), np.array(by["bc"]["losses"])
        k = min(len(lb), len(lc))
        summary["loss_curve_max_abs_diff_b_bc"] = float(np.abs(lb[:k] - lc[:k]).max())
        summary["loss_curve_steps"] = k
    print(json.dumps(summary), flush=True)
    print(f"\n{'mode':<5} {'attn':<6} {'useful tok/s':>13} {'step ms':>8} {'steps/ep':>8} {'useful':>7} "
          f"{'peak GiB':>9} {'MFU':>6} {'loader':>7} {'recomp':>6}")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<5} ERROR {r['error'][:100]}")
            continue
        print(f"{r['mode']:<5} {r['attn']:<6} {r['useful_tok_s']:>13,.0f} {r['step_ms_median']:>8.1f} "
              f"{r['steps_per_epoch']:>8} {r['useful_fraction']:>7.1%} {r['peak_mem_gib']:>9.2f} "
              f"{r.get('useful_mfu', float('nan')):>6.1%} {r['loader_frac']:>7.2%} {r['graphs_after_warmup']:>6}")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
