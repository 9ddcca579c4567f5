"""Small corpora in every input format, generated on the fly (no ../shared, no network), and shard readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from packprep.shards import open_shard, shard_files

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega def class return import yield").split()


def sentence(rng: np.random.Generator, lo: int = 3, hi: int = 40) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))


def texts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    return [sentence(rng, lo, hi) for _ in range(n)]


def chats(n: int, seed: int = 0) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": sentence(rng, 2, 6)}] if rng.random() < 0.3 else []
        for _ in range(int(rng.integers(1, 4))):
            msgs += [{"role": "user", "content": sentence(rng)}, {"role": "assistant", "content": sentence(rng)}]
        out.append(msgs)
    return out


def write_corpora(folder: Path, n: int = 40) -> dict[str, Path]:
    """One file per format: text JSONL, prompt/completion JSON array, chat Parquet, ShareGPT Arrow, alpaca CSV,
    question/answer JSONL, and an HF save_to_disk folder (text)."""
    folder.mkdir(parents=True, exist_ok=True)
    t, p, c = texts(n, 1), texts(n, 2), texts(n, 3)
    files = {}
    files["text"] = folder / "text.jsonl"
    files["text"].write_text("".join(json.dumps({"text": x, "id": i}) + "\n" for i, x in enumerate(t)))
    files["prompt-completion"] = folder / "pc.json"
    files["prompt-completion"].write_text(json.dumps([{"prompt": a, "completion": b} for a, b in zip(p, c)]))
    files["qa"] = folder / "qa.jsonl"
    files["qa"].write_text("".join(json.dumps({"question": a, "answer": b}) + "\n" for a, b in zip(p, c)))
    files["chat"] = folder / "chat.parquet"
    pq.write_table(pa.table({"messages": chats(n, 4)}), files["chat"], row_group_size=7)
    files["sharegpt"] = folder / "sharegpt.arrow"
    conv = [[{"from": {"user": "human", "assistant": "gpt", "system": "system"}[m["role"]], "value": m["content"]}
             for m in msgs] for msgs in chats(n, 5)]
    table = pa.table({"conversations": conv})
    with pa.ipc.new_file(str(files["sharegpt"]), table.schema) as w:
        for b in table.to_batches(max_chunksize=9):
            w.write_batch(b)
    files["alpaca"] = folder / "alpaca.csv"
    pcsv.write_csv(pa.table({"instruction": p, "input": [x if i % 2 else "" for i, x in enumerate(t)],
                             "output": c}), files["alpaca"])
    from datasets import Dataset

    files["hf"] = folder / "hf_text"
    Dataset.from_dict({"text": t}).save_to_disk(str(files["hf"]), max_shard_size="4KB")
    return files


def read_docs(out: Path) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """doc_id -> [(ids, mask) per piece, in row-major shard order]: the documents as the shards hold them."""
    docs: dict[int, list] = {}
    for f in shard_files(out):
        t = open_shard(f).to_pydict()
        for ids, offs, mask, dids in zip(t["input_ids"], t["doc_offsets"], t["loss_mask"], t["doc_ids"]):
            for a, b, d in zip(offs[:-1], offs[1:], dids):
                docs.setdefault(d, []).append((np.array(ids[a:b]), np.array(mask[a:b])))
    return docs


def docs_of(tasks) -> list:
    """Every document of the read tasks, in order (texts, chats or (prompt, completion) pairs)."""
    from packprep.readers import read_task

    out = []
    for t in tasks:
        for d in read_task(t, batch_rows=7):
            out += d.texts or d.chats or list(zip(d.prompts, d.completions))
    return out
