"""Real SFT document lengths: the ../shared/data corpora tokenized with the Qwen BPE (make_qwen_tokenizer.py).

Writes benchmarks/data/sft_lengths_qwen.npy (int32, one length per document incl. EOS; gsm8k question+answer,
code_alpaca instruction+input+output, ShareGPT conversations through the ChatML template). Used by bench_pack.py
(real length mix) and bench_train.py (on the GPU machine, where ../shared is not available).

usage: python benchmarks/sft_lengths.py [SHARED_DATA_DIR]      (default ../shared/data)
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from make_qwen_tokenizer import main as make_tokenizer  # noqa: E402


def main(data: str = "../shared/data") -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(make_tokenizer()))
    data = Path(data)
    gsm = [json.loads(line) for line in open(data / "gsm8k_train.jsonl")]
    alpaca = json.load(open(data / "code_alpaca_2k.json"))
    share = json.load(open(data / "sharegpt_dummy.json"))
    texts = [g["question"] + "\n" + g["answer"] for g in gsm]
    texts += [a["instruction"] + ("\n" + a["input"] if a["input"] else "") + "\n" + a["output"] for a in alpaca]
    lengths = [len(ids) + 1 for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for conv in share:
        msgs = [{"role": roles.get(m["from"], "user"), "content": m["value"]} for m in conv["conversations"]]
        lengths.append(len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]) + 1)
    out = Path(__file__).parent / "data" / "sft_lengths_qwen.npy"
    arr = np.asarray(lengths, dtype=np.int32)
    np.save(out, arr)
    print(f"{out}: {len(arr)} docs, {arr.sum()} tokens, mean {arr.mean():.1f}, max {arr.max()}")
    return out


if __name__ == "__main__":
    main(*sys.argv[1:])
