"""Hostile, careless and unlucky use (issue 13): every case failed before its fix (silently lost or changed data, a
recovery step that did not recover, or a traceback) and must now read every input or name it, refuse in one line, or
recover. One section per class of the issue."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pyarrow as pa
import pytest
from build_fixtures import texts

import packprep.build as build_mod
from packprep.build import build
from packprep.config import BuildConfig
from packprep.executor import LocalExecutor, WorkerDiedError
from packprep.inputs import expand_inputs
from packprep.shards import write_hf_metadata
from packprep.verify import verify


def run(inputs, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("seq_len", 64)
    return build(BuildConfig(inputs=tuple(map(str, inputs)), out=str(out), **kw))


def lines(path: Path, records) -> Path:
    """JSON lines: dicts dumped, str/bytes written as they are."""
    path.write_bytes(b"".join((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode())
                              + b"\n" for r in records))
    return path


def docs(n: int, seed: int = 0) -> list[dict]:
    return [{"text": t} for t in texts(n, seed)]


def doc_ids(out: Path) -> list[int]:
    from packprep.shards import open_shard

    return sorted({int(d) for p in sorted(out.glob("data-*.arrow")) for d in
                   open_shard(p).column("doc_ids").combine_chunks().values.to_numpy()})


def rejects(out: Path) -> list[dict]:
    p = out / "rejects.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


# ------------------------------------------------------------------------ 1. folders: every file read or named


def test_underscore_files_are_read_and_other_files_named(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    lines(src / "_part0.jsonl", docs(5, 1))
    lines(src / "part1.jsonl", docs(7, 2))
    (src / "README.md").write_text("about the data")
    (src / ".cache").mkdir()
    m = run([src], tmp_path / "o").manifest
    assert [Path(f["path"]).name for f in m["inputs"]["files"]] == ["_part0.jsonl", "part1.jsonl"]
    assert m["counts"]["input_docs"] == 12
    assert {Path(x["path"]).name: x["reason"] for x in m["inputs"]["ignored"]}.keys() == {"README.md", ".cache"}
    assert "not an input format (.md" in m["inputs"]["ignored"][0]["reason"] + m["inputs"]["ignored"][1]["reason"]


def test_expansion_log_names_what_was_left_out(tmp_path, cli):
    (tmp_path / "src").mkdir()
    lines(tmp_path / "src" / "a.jsonl", docs(3))
    (tmp_path / "src" / "notes.txt").write_text("x")
    r = cli("build", tmp_path / "src", "--out", tmp_path / "o", "--seq-len", 64, "--workers", 1)
    assert r.exit_code == 0, r.output
    assert "1 left out" in r.output and "notes.txt: not an input format" in r.output


def test_state_json_alone_is_not_a_save_to_disk_folder(tmp_path):
    sub = tmp_path / "src" / "run1"
    sub.mkdir(parents=True)
    (sub / "state.json").write_text('{"step": 3}')  # an app's state, no dataset_info.json, no _data_files
    lines(sub / "data.jsonl", docs(4))
    exp = expand_inputs([tmp_path / "src"])
    assert [p.name for p, _ in exp.files] == ["data.jsonl"]
    assert [(Path(p).name, "metadata" in why) for p, why in exp.ignored] == [("state.json", True)]


def test_save_to_disk_folder_lists_its_unlisted_files(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    with pa.ipc.new_stream(hf / "data-00000-of-00001.arrow", pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": texts(6)}))
    write_hf_metadata(hf, ["data-00000-of-00001.arrow"], "f" * 16)
    lines(hf / "extra.jsonl", docs(2))  # put there by hand: not part of the dataset, and said so
    exp = expand_inputs([hf])
    assert [p.name for p, _ in exp.files] == ["data-00000-of-00001.arrow"]
    assert [(Path(p).name, why) for p, why in exp.ignored] == [
        ("extra.jsonl", "not listed in the save_to_disk folder's state.json")]


# ------------------------------------------------------------------------ 2. content identity


def _same_size_same_mtime_rewrite(path: Path, records) -> None:
    st = path.stat()
    lines(path, records)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p / rsync -t leave it


def test_rewritten_input_is_not_already_built(tmp_path):
    src = lines(tmp_path / "a.jsonl", [{"text": "aaaa " * 20}] * 10)
    run([src], tmp_path / "o")
    _same_size_same_mtime_rewrite(src, [{"text": "bbbb " * 20}] * 10)
    with pytest.raises(FileExistsError, match=r"the input files changed \(size or content\)"):
        run([src], tmp_path / "o")


def test_resume_rechecks_input_content(tmp_path, monkeypatch):
    src = lines(tmp_path / "a.jsonl", [{"text": "aaaa " * 20}] * 400)
    out = tmp_path / "o"

    def stop(point):  # a kill after the first tokenize task, as an exception (in-process)
        if point == "tokenize:1":
            raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "kill_hook", stop)
    with pytest.raises(KeyboardInterrupt):
        run([src], out, chunk_bytes=4000)
    monkeypatch.undo()
    _same_size_same_mtime_rewrite(src, [{"text": "bbbb " * 20}] * 400)
    with pytest.raises(FileExistsError, match="unfinished build of different settings .*input files changed"):
        run([src], out, chunk_bytes=4000)


def test_input_truncated_during_the_build_is_an_error(tmp_path, monkeypatch):
    src = lines(tmp_path / "a.jsonl", docs(300))
    real, calls = build_mod.tokenize_task, []

    def truncating(task, ctx):
        if not calls:
            with open(src, "r+b") as f:
                f.truncate(src.stat().st_size // 2)
        calls.append(task.index)
        return real(task, ctx)

    monkeypatch.setattr(build_mod, "tokenize_task", truncating)
    with pytest.raises(ValueError, match=r"input changed while the build read it: .*a.jsonl \(size .* -> "):
        run([src], tmp_path / "o", chunk_bytes=2000, on_error="skip")
    assert not (tmp_path / "o" / "packprep.json").exists()


TRUNCATE_WHILE_READING = """
import sys, packprep.readers.arrow as arrow
from packprep.cli import app
real = arrow.read
def read(f, task):  # the first task cuts its file after its first record batch, while its reader holds it open
    for n, part in enumerate(real(f, task)):
        yield part
        if n == 0 and task.index == 0:
            with open(sys.argv[1], "r+b") as g:
                g.truncate(int(sys.argv[2]))
arrow.read = read
app(["build", sys.argv[1], "--out", sys.argv[3], "--workers", "1", "--seq-len", "64", "--chunk-bytes", "20000", "-q"])
"""


@pytest.mark.parametrize("writer", ["new_stream", "new_file"])
def test_arrow_input_truncated_during_the_build_is_one_line(tmp_path, writer):
    """A memory-mapped Arrow input cut under its reader was a SIGBUS: with --workers 1 the process died without a
    line. Run in a child, so that a SIGBUS fails this test instead of killing the test session."""
    import subprocess
    import sys

    src = tmp_path / "a.arrow"
    table = pa.table({"text": texts(3000, 5)})
    with getattr(pa.ipc, writer)(src, table.schema) as w:
        for batch in table.to_batches(max_chunksize=20):  # ~4 KB batches: the first task holds several
            w.write_batch(batch)
    r = subprocess.run([sys.executable, "-c", TRUNCATE_WHILE_READING, str(src), "8000", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "a.arrow" in err[0] and "changed" in err[0], err
    assert not (tmp_path / "o" / "packprep.json").exists()


# ------------------------------------------------------------------------ 4. --overwrite and nested folders


def test_overwrite_and_resume_keep_user_tmp_files(tmp_path):
    src = lines(tmp_path / "a.jsonl", docs(20))
    out = tmp_path / "o"
    run([src], out)
    (out / "notes.tmp.txt").write_text("mine")
    (out / "data-00000-of-00001.arrow.tmp123").write_text("packprep's own temp file")
    run([src], out, seq_len=128, overwrite=True)
    assert (out / "notes.tmp.txt").read_text() == "mine"
    assert not (out / "data-00000-of-00001.arrow.tmp123").exists()
    assert verify(out).ok


def test_out_inside_an_input_folder_is_refused(tmp_path, cli_error):
    src = tmp_path / "src"
    src.mkdir()
    lines(src / "a.jsonl", docs(5))
    line = cli_error("build", src, "--out", src / "packed", "--seq-len", 64)
    assert "lies inside the input folder" in line
    assert not (src / "packed").exists()
    line = cli_error("build", src, "--out", src, "--seq-len", 64)  # the input folder itself
    assert "lies inside the input folder" in line


def test_input_inside_out_is_refused(tmp_path):
    out = tmp_path / "o"
    run([lines(tmp_path / "a.jsonl", docs(5))], out)
    lines(out / "more.jsonl", docs(3))
    with pytest.raises(ValueError, match="more.jsonl lies inside --out"):
        run([out / "more.jsonl"], out, overwrite=True)
    assert (out / "more.jsonl").exists()


# ------------------------------------------------------------------------ 6. one line, never a traceback


@pytest.mark.parametrize("bad, kind", [
    ('{"text": "a \\ud800 b"}', "invalid_utf8"),  # a lone surrogate escape
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "malformed_json"),  # nested 100k deep
    ('{"text": "two"}{"text": "objects"}', "malformed_json"),  # one line, two objects: not two documents
])
def test_bad_line_is_a_reject_and_keeps_doc_ids(tmp_path, cli_error, bad, kind):
    src = lines(tmp_path / "a.jsonl", [*docs(3), bad, *docs(3, 1)])
    line = cli_error("build", src, "--out", tmp_path / "raise", "--seq-len", 64, "--workers", 1)
    assert "a.jsonl line 4: " in line and "--on-error skip" in line
    m = run([src], tmp_path / "o", on_error="skip").manifest
    assert m["counts"]["input_docs"] == 7 and m["counts"]["rejected_reasons"] == {kind: 1}
    assert doc_ids(tmp_path / "o") == [0, 1, 2, 4, 5, 6]
    assert rejects(tmp_path / "o")[0]["line"] == 4


def test_deeply_nested_first_line_in_the_format_peek(tmp_path, cli_error):
    src = lines(tmp_path / "a.jsonl", ['{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", *docs(4)])
    assert "a.jsonl line 1: JSON nested deeper" in cli_error("build", src, "--out", tmp_path / "x", "--seq-len", 64)
    m = run([src], tmp_path / "o", on_error="skip").manifest
    assert m["counts"]["input_docs"] == 5 and m["counts"]["rejected"] == 1 and doc_ids(tmp_path / "o") == [1, 2, 3, 4]


def test_deeply_nested_json_array_element(tmp_path, cli_error):
    src = tmp_path / "a.json"
    src.write_text('[{"text": "a"}, {"text": ' + "[" * 100_000 + "]" * 100_000 + '}]')
    assert "a.json: an element between line 1" in cli_error("build", src, "--out", tmp_path / "o", "--seq-len", 64)


def test_lone_surrogate_in_a_json_array(tmp_path):
    src = tmp_path / "a.json"
    src.write_text('[{"text": "a"}, {"text": "b \\uDC00"}, {"text": "ok \\ud83d\\ude00"}]')  # lone; a valid pair
    m = run([src], tmp_path / "o", on_error="skip").manifest
    assert m["counts"]["rejected_reasons"] == {"invalid_utf8": 1} and doc_ids(tmp_path / "o") == [0, 2]


def test_cr_only_line_ends_are_one_clear_line(tmp_path, cli_error):
    src = tmp_path / "mac.jsonl"
    src.write_bytes(b"\r".join(json.dumps(d).encode() for d in docs(5)) + b"\r")
    line = cli_error("build", src, "--out", tmp_path / "o", "--seq-len", 64)
    assert "lone CR" in line and "None" not in line


def test_csv_bad_row_keeps_later_doc_ids(tmp_path):
    src = tmp_path / "a.csv"
    src.write_text('text,n\nalpha beta,1\n"gamma\ndelta",2\nbad,3,4\nepsilon,5\nzeta,6\n')
    m = run([src], tmp_path / "o", on_error="skip").manifest
    assert m["counts"]["input_docs"] == 5 and doc_ids(tmp_path / "o") == [0, 1, 3, 4]
    assert [(r["kind"], r["line"]) for r in rejects(tmp_path / "o")] == [("bad_row", 5)]


def test_every_record_rejected_says_so_and_writes_rejects(tmp_path):
    src = lines(tmp_path / "a.jsonl", [{"text": 1}, {"text": None}, "{oops"])
    with pytest.raises(ValueError, match=r"3 records, 0 empty, 3 rejected .*see .*rejects.jsonl") as e:
        run([src], tmp_path / "o", on_error="skip")
    assert "empty corpus" not in str(e.value)
    assert len(rejects(tmp_path / "o")) == 3


def test_truncated_tokenizer_json(tmp_path, cli_error):
    tok = tmp_path / "tok"
    shutil.copytree(Path(build_mod.__file__).parent / "assets" / "tokenizer", tok)
    (tok / "tokenizer.json").write_bytes((tok / "tokenizer.json").read_bytes()[:5000])
    line = cli_error("build", lines(tmp_path / "a.jsonl", docs(3)), "--out", tmp_path / "o", "--tokenizer", tok)
    assert "cannot load the tokenizer" in line and "tokenizer.json" in line


def test_bad_record_late_then_skip_keeps_finished_tasks(tmp_path, cli_error):
    recs = docs(400)
    recs[390] = {"text": 5}
    src = lines(tmp_path / "a.jsonl", recs)
    out = tmp_path / "o"
    args = ("build", src, "--out", out, "--seq-len", 64, "--workers", 1, "--chunk-bytes", 4000)
    assert "line 391" in cli_error(*args)
    finished = len(list((out / ".packprep-work" / "spool").glob("*.done.json")))
    assert finished > 3
    m = run([src], out, chunk_bytes=4000, on_error="skip").manifest  # no --overwrite needed
    assert m["resumed"]["tokenize_tasks"] == finished and m["counts"]["rejected"] == 1
    with pytest.raises(FileExistsError, match="on_error: 'skip' -> 'raise'"):  # raise would stop at that record
        run([src], out, chunk_bytes=4000)


def test_clean_build_under_raise_is_the_build_under_skip(tmp_path):
    src = lines(tmp_path / "a.jsonl", docs(30))
    run([src], tmp_path / "o")
    assert run([src], tmp_path / "o", on_error="skip").already_built


def _die(task, ctx):
    os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does to a worker


def test_dead_worker_says_rerun(cli):
    with pytest.raises(WorkerDiedError, match="rerun the same command to resume"):
        list(LocalExecutor(2).imap(_die, [1, 2, 3], None))
    assert issubclass(WorkerDiedError, OSError)  # the CLI prints OSErrors as one line


# ------------------------------------------------------------------------ 8. consumers: verify, broken shards


@pytest.fixture
def built(tmp_path):
    src = lines(tmp_path / "a.jsonl", docs(200))
    out = tmp_path / "o"
    run([src], out, shard_rows=20)
    return src, out


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_finished_build_with_a_broken_shard_is_not_already_built(built, cli_error, damage):
    src, out = built
    shard = sorted(out.glob("data-*.arrow"))[1]
    shard.unlink() if damage == "delete" else shard.write_bytes(shard.read_bytes()[:100])
    line = cli_error("build", src, "--out", out, "--seq-len", 64, "--shard-rows", 20, "--workers", 1)
    assert shard.name in line and "--overwrite" in line


def test_same_size_corruption_needs_check_full(built):
    src, out = built
    shard = sorted(out.glob("data-*.arrow"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-200] ^= 1
    shard.write_bytes(bytes(raw))
    assert run([src], out, shard_rows=20).already_built  # sizes only: the default
    with pytest.raises(ValueError, match=f"{shard.name}: sha256 differs"):
        run([src], out, shard_rows=20, check="full")


def test_shard_rewritten_from_a_spool_left_behind(tmp_path, monkeypatch):
    src = lines(tmp_path / "a.jsonl", docs(200))
    out = tmp_path / "o"
    monkeypatch.setattr(build_mod.spool, "delete", lambda folder: None)  # killed after the manifest: spool left
    monkeypatch.setattr(build_mod.workdir, "finish", lambda out: None)
    run([src], out, shard_rows=20)
    monkeypatch.undo()
    shard = sorted(out.glob("data-*.arrow"))[2]
    before = shard.read_bytes()
    shard.unlink()
    assert run([src], out, shard_rows=20).already_built
    assert shard.read_bytes() == before and verify(out).ok and not (out / ".packprep-work").exists()


@pytest.mark.parametrize("damage, check", [
    (lambda out: (out / "dataset_info.json").unlink(), "dataset_info.json"),
    (lambda out: (out / "dataset_info.json").write_text(json.dumps(
        {"features": {"input_ids": {"feature": {"dtype": "int64", "_type": "Value"}, "_type": "List"}}})),
     "dataset_info.json"),
    (lambda out: (out / "state.json").write_text(json.dumps(  # load_from_disk: KeyError '_split'
        {k: v for k, v in json.loads((out / "state.json").read_text()).items() if k != "_split"})), "state.json"),
])
def test_verify_checks_what_load_from_disk_reads(built, damage, check):
    _, out = built
    assert verify(out).ok
    damage(out)
    assert [f.split(":")[0] for f in verify(out).failures] == [check]


@pytest.mark.parametrize("edit", [
    lambda m: {**m, "counts": {**m["counts"], "dropped": 3}},
    lambda m: {**m, "counts": {**m["counts"], "rejected_reasons": [1]}},
    lambda m: {**m, "counts": {**m["counts"], "input_docs": -1}},
    lambda m: {**m, "counts": {**m["counts"], "input_docs": 10**15}},
    lambda m: {**m, "shards": [{**m["shards"][0], "file": "../../etc/passwd"}]},
    lambda m: {**m, "seq_len": 1.5},
])
def test_verify_a_malformed_manifest_is_one_failed_check(built, cli, edit):
    _, out = built
    path = out / "packprep.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    report = verify(out)
    assert not report.ok and report.failures[0].startswith("manifest")
    r = cli("verify", out)
    assert r.exit_code == 1 and "Traceback" not in r.output and isinstance(r.exception, SystemExit)


def test_finished_build_with_a_malformed_manifest(built, cli_error):
    src, out = built
    (out / "packprep.json").write_text('{"shards": [')
    assert "--overwrite" in cli_error("build", src, "--out", out, "--seq-len", 64, "--shard-rows", 20)
