"""Tokenizers of the big model families' kinds, crossed with their chat templates, built offline for the tests.

Families (tokenizer.json, each trained here in seconds on this Python's standard library sources plus unicode text):
  bytelevel       byte-level BPE without BOS: packprep's built-in tokenizer (GPT-2 / Qwen kind)
  bytelevel_bos   byte-level BPE, Llama-3's split regex, a TemplateProcessing post-processor that adds
                  <|begin_of_text|> (Llama-3 kind); EOS <|end_of_text|>
  spm_bpe         SentencePiece BPE with byte fallback, "▁" prefix space and BOS <s> (Llama-2 / Mistral kind),
                  trained with `sentencepiece` and converted by transformers' LlamaTokenizer
  spm_unigram     SentencePiece Unigram with byte fallback, converted with transformers' SentencePieceExtractor;
                  its post-processor appends EOS </s> (T5 kind)
Templates, in the style of the published ones (see TRL's chat_templates/ for the originals), each plain and with
{% generation %} markers around every assistant turn's content and its end-of-turn marker (never the role header,
never the newline after the marker):
  chatml   <|im_start|>role\\n...<|im_end|>\\n
  llama3   bos_token, <|start_header_id|>role<|end_header_id|>\\n\\n + content|trim + <|eot_id|>
  mistral  bos_token, [INST] user [/INST]assistant</s> (EOS inside the template; system folded into the first
           user turn; [INST] stays plain text, as in Llama 2 and Mistral v0.1)
  gemma    bos_token, <start_of_turn>user|model\\n + content|trim + <end_of_turn>\\n; a system role raises
  phi3     <|system|>/<|user|>/<|assistant|>\\n...<|end|>\\n, eos_token after the last turn
Every family carries the markers of every template as special tokens, so any family x template pair renders.
Each entry is a folder (tokenizer.json + tokenizer_config.json with chat_template) that
`transformers.AutoTokenizer.from_pretrained(folder)` and `packprep build --tokenizer folder` load.

Cost: ~5 s for the four families on first use, then a folder copy per entry; cached under the root given. Tests
take the `zoo_root` fixture (`zoo_root = tokenizer_zoo.zoo_root` in the test module): one folder per pytest
session, shared by every module that takes it.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

FAMILIES = ("bytelevel", "bytelevel_bos", "spm_bpe", "spm_unigram")
TEMPLATES = ("chatml", "llama3", "mistral", "gemma", "phi3")
BUILTIN = Path(__file__).resolve().parent.parent / "packprep" / "assets" / "tokenizer"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
MARKERS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def _gen(body: str, generation: bool) -> str:
    return "{% generation %}" + body + "{% endgeneration %}" if generation else body


def chat_template(name: str, generation: bool) -> str:
    """The jinja chat template `name` (one of TEMPLATES), with or without {% generation %} markers."""
    if name == "chatml":
        return ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
                "{{ '<|im_start|>assistant\n' }}" + _gen("{{ message['content'] + '<|im_end|>' }}", generation)
                + "{{ '\n' }}{% else %}"
                "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    if name == "llama3":
        return ("{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
                "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
                "{% if message['role'] == 'assistant' %}"
                + _gen("{{ message['content'] | trim + '<|eot_id|>' }}", generation) +
                "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    if name == "mistral":
        return ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
                "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}"
                "{% set loop_messages = messages %}{% endif %}{{ bos_token }}"
                "{% for message in loop_messages %}"
                "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                "{% endif %}{% if message['role'] == 'user' %}"
                "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
                "{% elif message['role'] == 'assistant' %}"
                + _gen("{{ message['content'] + eos_token }}", generation) +
                "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
                "{% endfor %}")
    if name == "gemma":
        return ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}"
                "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                "{% endif %}{% if message['role'] == 'assistant' %}{{ '<start_of_turn>model\n' }}"
                + _gen("{{ message['content'] | trim + '<end_of_turn>' }}", generation) + "{{ '\n' }}"
                "{% else %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim "
                "+ '<end_of_turn>\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
    if name == "phi3":
        return ("{% for message in messages %}{% if message['role'] == 'system' %}"
                "{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
                "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
                "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
                + _gen("{{ message['content'] + '<|end|>' }}", generation) + "{{ '\n' }}"
                "{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
    raise ValueError(f"unknown template {name!r}; one of {TEMPLATES}")


def training_texts() -> list[str]:
    """Real text without a network (blocks of the standard library) plus unicode, digits and whitespace runs."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in ("textwrap.py", "csv.py", "difflib.py", "argparse.py", "json/decoder.py", "string.py"):
        out += [b for b in (root / name).read_text(encoding="utf-8").split("\n\n") if b.strip()]
    out += ["héllo wörld, naïve café", "日本語のテキストです。", "Ελληνικά и кириллица", "🤗 🚀 emoji",
            "12345 678.90 3,141", "  two  spaces\tand\ttabs\n\n\nlines"] * 20
    return out


def _bytelevel_bos(out: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", *MARKERS]
    tok.train_from_iterator(training_texts(), trainers.BpeTrainer(
        vocab_size=2000, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                            model_max_length=1 << 20).save_pretrained(str(out))


def _sentencepiece(out: Path, kind: str) -> None:
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    work = out.with_name(out.name + ".spm")
    work.mkdir(parents=True, exist_ok=True)
    lines = [line for text in training_texts() for line in text.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(work / "tokenizer"), vocab_size=1000, model_type=kind,
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    if kind == "bpe":
        tok = LlamaTokenizer.from_pretrained(str(work), add_bos_token=True, model_max_length=1 << 20)
    else:
        spec = SentencePieceExtractor(str(work / "tokenizer.model")).extract(models.Unigram)
        core = Tokenizer(models.Unigram(spec["vocab"], unk_id=spec["unk_id"], byte_fallback=True))
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                          decoders.Strip(" ", 1, 0)])
        tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      add_bos_token=False, add_eos_token=True, model_max_length=1 << 20)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    tok.save_pretrained(str(out))
    shutil.rmtree(work)


def family_folder(root: str | Path, family: str) -> Path:
    """The family's tokenizer folder under `root` (no chat template), built on first use."""
    out = Path(root) / "families" / family
    if (out / "tokenizer.json").exists():
        return out
    tmp = out.with_name(family + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if family == "bytelevel":
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(BUILTIN / "tokenizer.json"), eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>", model_max_length=1 << 20)
        tok.add_special_tokens({"additional_special_tokens": MARKERS})
        tok.save_pretrained(str(tmp))
    elif family == "bytelevel_bos":
        _bytelevel_bos(tmp)
    elif family in ("spm_bpe", "spm_unigram"):
        _sentencepiece(tmp, family.removeprefix("spm_"))
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        (tmp / extra).unlink(missing_ok=True)
    tmp.rename(out)
    return out


def zoo_tokenizer(root: str | Path, family: str, template: str, generation: bool = False) -> Path:
    """A tokenizer folder: `family`'s tokenizer.json and a tokenizer_config.json holding `template`."""
    name = f"{family}-{template}" + ("-generation" if generation else "")
    out = Path(root) / name
    if (out / "tokenizer_config.json").exists():
        return out
    base = family_folder(root, family)
    tmp = out.with_name(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    cfg = json.loads((tmp / "tokenizer_config.json").read_text())
    cfg["chat_template"] = chat_template(template, generation)
    (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory) -> Path:
    """This session's zoo folder: the same path from every module, so each entry is built once per session."""
    return tmp_path_factory.getbasetemp() / "tokenizer_zoo"


def zoo(root: str | Path) -> dict[tuple[str, str, bool], Path]:
    """Every (family, template, generation) entry -> its folder."""
    return {(f, t, g): zoo_tokenizer(root, f, t, g) for f in FAMILIES for t in TEMPLATES for g in (False, True)}
