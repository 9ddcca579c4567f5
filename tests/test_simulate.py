"""packprep simulate: reading lengths (.npy, text, Parquet/Arrow) and the CLI (table, --json, errors)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from packprep.simulate import read_lengths, simulate

LENGTHS = np.array([300, 120, 512, 7, 64, 256, 200, 90, 33, 1])


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "lengths.npy", LENGTHS.astype(np.int32))
    (tmp_path / "lengths.txt").write_text("\n".join(map(str, LENGTHS)) + "\n")
    ids = pa.array([list(range(n)) for n in LENGTHS], pa.list_(pa.int32()))
    pq.write_table(pa.table({"length": LENGTHS, "input_ids": ids}), tmp_path / "lengths.parquet")
    with pa.OSFile(str(tmp_path / "lengths.arrow"), "wb") as sink, pa.ipc.new_stream(sink, pa.schema(
            [("n", pa.int64())])) as writer:
        writer.write_table(pa.table({"n": LENGTHS}))
    return tmp_path


@pytest.mark.parametrize("name, column", [("lengths.npy", None), ("lengths.txt", None),
                                          ("lengths.parquet", "length"), ("lengths.parquet", "input_ids"),
                                          ("lengths.arrow", None)])
def test_read_lengths(files, name, column):
    assert read_lengths(files / name, column).tolist() == LENGTHS.tolist()


def test_simulate_library():
    result = simulate(LENGTHS, 512, "all")
    assert [s["strategy"] for s in result["strategies"]] == ["ffd", "bfd", "greedy", "random", "none", "b2f"]
    by_name = {s["strategy"]: s for s in result["strategies"]}
    ffd, none = by_name["ffd"], by_name["none"]
    assert ffd["rows"] == 4 and ffd["lower_bound"] == 4 and by_name["b2f"]["rows"] == 4
    assert none["rows"] == len(LENGTHS) and none["padding_tokens_saved"] == 0
    # 1,583 tokens in 4 rows of 512 vs one padded row per document (10): 6 rows and 6 * 512 padded tokens saved
    assert ffd["efficiency"] == int(LENGTHS.sum()) / (4 * 512) and ffd["padding_tokens"] == 4 * 512 - LENGTHS.sum()
    assert (ffd["rows_saved"], ffd["padding_tokens_saved"], ffd["steps_reduction"]) == (6, 6 * 512, 2.5)


@pytest.mark.parametrize("name, extra", [("lengths.npy", []), ("lengths.txt", []),
                                         ("lengths.parquet", ["--column", "length"])])
def test_cli_table(files, name, extra, cli):
    result = cli("simulate", files / name, "--seq-len", 512, *extra)
    assert result.exit_code == 0, result.output
    for word in ("ffd", "bfd", "b2f", "greedy", "random", "none", "rows/LB", "10 documents", "lower bound (LB) 4 rows"):
        assert word in result.output


def test_cli_json(files, cli):
    result = cli("simulate", files / "lengths.npy", "--seq-len", 1024, "--strategy", "ffd", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["docs"] == 10 and out["tokens"] == int(LENGTHS.sum())
    (ffd,) = out["strategies"]
    assert ffd["strategy"] == "ffd" and ffd["rows"] == 2 and ffd["steps_reduction"] == 5.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.npy", "--seq-len", "8"], "lengths file not found"),
        (["lengths.npy", "--seq-len", "100"], "5 documents exceed seq_len=100 (first: index 0, length 300)"),
        (["lengths.npy", "--seq-len", "0"], "seq_len must be between 1"),
        (["lengths.npy", "--seq-len", "512", "--strategy", "best"], "unknown strategy 'best'; choose one of"),
        (["lengths.parquet", "--seq-len", "512"], "has 2 columns (length, input_ids); pick one with --column"),
        (["lengths.parquet", "--seq-len", "512", "--column", "x"], "has no column 'x'; columns: length, input_ids"),
        (["lengths.npy", "--seq-len", "512", "--column", "x"], "--column only applies to Parquet / Arrow files"),
        (["bad.txt", "--seq-len", "512"], "value 2 is '1.5', expected one integer length a line"),
    ],
)
def test_cli_errors(files, args, message, cli_error):
    (files / "bad.txt").write_text("3\n1.5\n4\n")
    assert message in cli_error("simulate", files / args[0], *args[1:])
