"""Train packprep's built-in tokenizer: a byte-level BPE (8,192 tokens) with ChatML special tokens and template.

Trained with `tokenizers` on the embedded default corpus (this Python's standard library sources, the same text
`packprep build` reads with no arguments), so the package ships a real tokenizer and needs no download.
Deterministic for a given corpus; ~20 s on 2 cores; the asset is ~0.5 MB.

usage: python packprep/assets/make_tokenizer.py [OUT]      (default packprep/assets/tokenizer)
"""

import json
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from packprep.inputs import stdlib_corpus

VOCAB = 8192
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def main(out: str = str(Path(__file__).parent / "tokenizer")) -> Path:
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        texts = pq.read_table(stdlib_corpus(Path(tmp) / "corpus.parquet"))["text"].to_pylist()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None, "model_max_length": 1 << 20,
              "chat_template": CHATML}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
