"""`packprep verify --tokens N`: the reference tokenization (packprep.reference) against transformers' own
conventions, builds that must pass, planted corruption named by document and position, and the tokenizer zoo's
families x formats x chat templates.

Every zoo case (family x format x template x generation markers) must pass `verify --tokens`: BOS where the family
adds one, prompt + completion as one string, nothing appended to chats, loss on end-of-turn markers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import tokenizer_zoo
from build_fixtures import chats, texts
from tokenizer_zoo import FAMILIES, TEMPLATES, zoo_tokenizer

from packprep.build import build
from packprep.config import BuildConfig
from packprep.reference import Reference
from packprep.shards import open_shard, shard_files
from packprep.verify import check_tokens, verify

transformers = pytest.importorskip("transformers")
zoo_root = tokenizer_zoo.zoo_root  # the session's zoo folder (a fixture)
N = 1000


def conversations(template: str, n: int = 12) -> list[list[dict]]:
    """Alternating user/assistant chats (a system turn where the template takes one), unicode, padded content."""
    out = [m for m in chats(n, 7)] + [[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 日本 + 🤗?"},
        {"role": "assistant", "content": " Unknown,  sorry. "}]]
    return [[m for m in c if m["role"] != "system"] if template == "gemma" else c for c in out]


def write_corpus(folder: Path, fmt: str, template: str = "chatml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{fmt}.jsonl"
    if fmt == "text":
        rows = [{"text": t} for t in texts(30, 11) + ["héllo wörld\n\n", "  two  spaces\tand\ttabs\n"]]
    elif fmt == "prompt-completion":
        p, c = texts(30, 12, 2, 20), texts(30, 13, 1, 20)
        joins = ["\n", " ", ": ", "\n\n", ""]
        rows = [{"prompt": a + joins[i % 5], "completion": b} for i, (a, b) in enumerate(zip(p, c))]
        rows.append({"prompt": "Sentiment of 'great':\n", "completion": "negative"})
    else:
        rows = [{"messages": c} for c in conversations(template)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def build_with(tokenizer, data: Path, out: Path, **kw) -> Path:
    build(BuildConfig(inputs=(str(data),), out=str(out), tokenizer=str(tokenizer), workers=1,
                      **{"seq_len": 512, **kw}))
    return out


def token_checks(report) -> list[tuple[str, bool, str]]:
    return [c for c in report.checks if "reference" in c[0]]


# ---------------------------------------------------------------------------------------------------- builds that pass


@pytest.fixture(scope="module")
def text_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vt")
    return build_with("builtin", write_corpus(tmp / "in", "text"), tmp / "out", seq_len=64, shard_rows=4)


def test_builtin_text_passes(text_build, cli):
    report = verify(text_build, tokens=N)
    assert report.ok, report.failures
    names = [c[0] for c in token_checks(report)]
    assert any(n.startswith("tokens") for n in names) and any(n.startswith("loss_mask") for n in names)
    r = cli("verify", text_build, "--tokens", N, "--seed", 3)
    assert r.exit_code == 0 and "tokens vs reference" in r.output, r.output


@pytest.mark.parametrize("long_docs", ["truncate", "split", "drop"])
def test_long_doc_policies_pass(tmp_path, long_docs):
    out = build_with("builtin", write_corpus(tmp_path / "in", "text"), tmp_path / "out", seq_len=16,
                     long_docs=long_docs)
    counts = json.loads((out / "packprep.json").read_text())["counts"]
    assert counts["truncated"] + counts["split"] + counts["dropped"]["too_long"] > 5  # the policy was exercised
    report = check_tokens(out, N)
    assert report.ok, report.failures


def test_sample_is_seeded_and_bounded(text_build):
    a, b = check_tokens(text_build, 5, seed=1), check_tokens(text_build, 5, seed=1)
    assert a.checks == b.checks and "(5 sampled documents, seed 1)" in a.checks[-1][0]


# ---------------------------------------------------------------------------------------------------- corruption


def rewrite_shard(path: Path, edit) -> None:
    """Rewrite one Arrow stream shard after edit(columns as Python lists)."""
    table = open_shard(path)
    cols = table.to_pydict()
    edit(cols)
    new = pa.Table.from_pydict(cols, schema=table.schema)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, new.schema) as w:
        w.write_table(new)


def first_piece(out: Path) -> tuple[Path, int, int]:
    """(shard, doc id, piece length) of the first piece of the first row of the first shard."""
    shard = shard_files(out)[0]
    t = open_shard(shard).slice(0, 1).to_pydict()
    return shard, t["doc_ids"][0][0], t["doc_offsets"][0][1]


def test_flipped_token_is_named(text_build, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(text_build, out)
    shard, doc, length = first_piece(out)
    pos = min(3, length - 1)

    def flip(cols):
        cols["input_ids"][0][pos] = (cols["input_ids"][0][pos] + 1) % 1000

    rewrite_shard(shard, flip)
    report = check_tokens(out, N)
    failed = [d for n, ok, d in report.checks if not ok]
    assert len(failed) == 1 and f"doc {doc} (text.jsonl record {doc}), token {pos} of" in failed[0], failed
    assert "1 of" in failed[0] and "expected '" in failed[0] and "found '" in failed[0]
    assert not verify(out, tokens=N).ok  # and the whole verify fails (the sha256 too)


def test_flipped_mask_bit_is_named(text_build, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(text_build, out)
    shard, doc, length = first_piece(out)

    def flip(cols):
        cols["loss_mask"][0][length - 1] ^= 1

    rewrite_shard(shard, flip)
    failed = [(n, d) for n, ok, d in check_tokens(out, N).checks if not ok]
    assert len(failed) == 1 and failed[0][0].startswith("loss_mask"), failed
    assert f"doc {doc} (text.jsonl record {doc}), token {length - 1} (" in failed[0][1]
    assert "expected loss_mask 1, found 0" in failed[0][1]


def test_another_tokenizer_is_caught(zoo_root, tmp_path, cli):
    """A build made without BOS, checked against a BOS-adding tokenizer: the first difference is the BOS."""
    tok = zoo_tokenizer(zoo_root, "bytelevel", "chatml")
    out = build_with(tok, write_corpus(tmp_path / "in", "text"), tmp_path / "out")
    assert check_tokens(out, N).ok
    other = zoo_tokenizer(zoo_root, "bytelevel_bos", "chatml")
    r = cli("verify", out, "--tokens", N, "--tokenizer", other)
    assert r.exit_code == 1 and "token 0 of" in r.output and "expected '<|begin_of_text|>'" in r.output, r.output


def test_changed_input_is_refused(tmp_path, cli_error):
    data = write_corpus(tmp_path / "in", "text")
    out = build_with("builtin", data, tmp_path / "out")
    data.write_text(data.read_text() + json.dumps({"text": "one more"}) + "\n")
    assert "changed since the build" in cli_error("verify", out, "--tokens", 10)


# ---------------------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("template", TEMPLATES)
def test_turn_by_turn_equals_generation_markers(zoo_root, family, template):
    """Without markers the reference locates each assistant turn itself; the zoo's markers cover exactly content +
    end-of-turn, so both must give transformers' assistant_masks."""
    plain = Reference(zoo_tokenizer(zoo_root, family, template, False))
    marked = Reference(zoo_tokenizer(zoo_root, family, template, True))
    assert marked.markers and not plain.markers
    for conv in conversations(template):
        (a, ma), (b, mb) = plain.encode(("chat", conv)), marked.encode(("chat", conv))
        assert np.array_equal(a, b) and np.array_equal(ma, mb), (family, template, plain.show(a[ma != mb]))
        assert ma.any() and not ma[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_completion_rule(zoo_root, family):
    """Where tok(prompt) is a prefix of tok(prompt + completion), the loss starts right after it (TRL's completion
    mask); the EOS at the end carries loss; post-processor BOS never does."""
    ref = Reference(zoo_tokenizer(zoo_root, family, "chatml"))
    tok = ref.tok
    checked = 0
    for p, c in [("Question: 2+2?\n", "4"), ("Sentiment:\n", "negative"), ("a b c. ", "d e"), ("", "only")]:
        ids, mask = ref.encode(("pc", (p, c)))
        assert ids[-1] == tok.eos_token_id and mask[-1] == 1
        assert not (ids[0] == tok.bos_token_id and mask[0])
        pre = tok(p)["input_ids"]
        pre = pre[:-1] if pre and pre[-1] == tok.eos_token_id else pre  # a post-processor EOS (Unigram)
        if p and list(ids[: len(pre)]) == pre:
            assert mask.tolist() == [0] * len(pre) + [1] * (len(ids) - len(pre)), (p, c, ref.show(ids))
            checked += 1
    assert checked >= 1


# ---------------------------------------------------------------------------------------------------- the zoo's builds

ZOO_CASES = ([(f, "text", None, False) for f in FAMILIES]
             + [(f, "prompt-completion", None, False) for f in FAMILIES]
             + [(f, "chat", t, g) for f in FAMILIES for t in TEMPLATES for g in (False, True)])


def zoo_build_passes(zoo_root, tmp_path, family, fmt, template, generation):
    tok = zoo_tokenizer(zoo_root, family, template or "chatml", generation)
    out = build_with(tok, write_corpus(tmp_path / "in", fmt, template or "chatml"), tmp_path / "out")
    report = check_tokens(out, N)
    assert report.ok, report.failures


@pytest.mark.parametrize("family,fmt,template,generation", ZOO_CASES)
def test_zoo_builds_pass_verify_tokens(zoo_root, tmp_path, family, fmt, template, generation):
    zoo_build_passes(zoo_root, tmp_path, family, fmt, template, generation)


# ---------------------------------------------------------------------------------------------------- labels


def add_labels(out: Path, corrupt: bool = False) -> None:
    """Give every shard a `labels` column (HF's unshifted convention), one label wrong if `corrupt`; the manifest's
    sha256 follows, so the structural checks read the rows."""
    from packprep.shards import MANIFEST, sha256_file

    manifest = json.loads((out / MANIFEST).read_text())
    for k, path in enumerate(shard_files(out)):
        table = open_shard(path)
        table = table.drop_columns(["labels"]) if "labels" in table.column_names else table  # rebuilt below
        cols = table.to_pydict()
        cols["labels"] = []
        for ids, mask, offs in zip(cols["input_ids"], cols["loss_mask"], cols["doc_offsets"]):
            labels = [t if m else -100 for t, m in zip(ids, mask)]
            for a in offs[:-1]:
                labels[a] = -100
            cols["labels"].append(labels)
        if corrupt and k == 0:
            cols["labels"][0][1] = -100
        schema = table.schema.append(pa.field("labels", pa.list_(pa.int32())))
        new = pa.Table.from_pydict(cols, schema=schema)
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, schema) as w:
            w.write_table(new)
        manifest["shards"][k]["sha256"] = sha256_file(path)
    (out / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("corrupt", [False, True])
def test_labels_checked(text_build, tmp_path, corrupt):
    out = tmp_path / "out"
    shutil.copytree(text_build, out)
    add_labels(out, corrupt)
    report = verify(out, tokens=N)
    assert any(name.startswith("labels vs reference") for name, _, _ in report.checks)
    if not corrupt:
        assert report.ok, report.failures
        return
    _, doc, _ = first_piece(out)
    failed = report.failures
    assert len(failed) == 2, failed
    assert "labels != input_ids where loss_mask" in failed[0]
    assert failed[1].startswith("labels vs reference") and f"doc {doc} (text.jsonl record {doc}), token 1 (" in \
        failed[1] and "found -100" in failed[1]


# ------------------------------------------------------------------------------------------------- doc ids -> records


def test_doc_ids_map_to_records_across_files_and_rejects(tmp_path):
    """Several files of several kinds, with bad records set aside (--on-error skip): a doc_id is the record's
    position across the files, rejects included, so an off-by-one anywhere would show as differing tokens."""
    import pyarrow.parquet as pq

    folder = tmp_path / "in"
    folder.mkdir()
    lines = [json.dumps({"text": t}) for t in texts(20, 21)]
    lines[3], lines[11] = "{not json", json.dumps({"text": 5})
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": texts(25, 22)}), folder / "b.parquet", row_group_size=6)
    (folder / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(15, 23)))
    out = tmp_path / "out"
    build(BuildConfig(inputs=(str(folder / "a.jsonl"), str(folder / "b.parquet"), str(folder / "c.jsonl")),
                      out=str(out), seq_len=64, workers=1, on_error="skip", chunk_bytes=300))
    counts = json.loads((out / "packprep.json").read_text())["counts"]
    assert counts["rejected"] == 2 and counts["input_docs"] == 60
    report = verify(out, tokens=N)
    assert report.ok, report.failures


def test_unlocatable_turn_is_refused(tmp_path):
    """A template without markers whose turns end in no special token: the reference refuses, it never guesses."""
    folder = tmp_path / "tok"
    shutil.copytree(Path(__file__).resolve().parent.parent / "packprep" / "assets" / "tokenizer", folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref = Reference(folder)
    with pytest.raises(ValueError, match="end-of-turn marker"):
        ref.encode(("chat", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]))
    assert ref.encode(("chat", [{"role": "user", "content": "hi"}]))[1].sum() == 0  # no assistant: no loss
