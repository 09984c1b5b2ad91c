"""`extract.source: import`: the shared real logs, every format, and malformed input."""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from routecast.config.params import ExtractParams, FeaturesParams, LogFields, LogsParams, ParamsError, SyntheticParams
from routecast.data.features import encode_features
from routecast.data.traces import TraceError, TraceWriter, read_traces, write_traces
from routecast.sources import logs
from routecast.sources.extract import extract_traces
from routecast.sources.logs import import_logs
from routecast.sources.synthetic import generate

SHARED_TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
MIXTRAL_LOG = SHARED_TRACES / "mixtral-8x7b-instruct" / "humaneval_2_routing.jsonl"
FLAME_DIR = SHARED_TRACES / "flame-moe-290m" / "prefill-32seqs-2048tokens"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real traces absent: {path} does not exist (shared/ sits beside the repository)")
    return path


# --------------------------------------------------------------------------- the shared real logs


def test_mixtral_jsonl_counts_match_the_file(tmp_path: Path) -> None:
    log = need(MIXTRAL_LOG)
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    cells = {(r["problem_id"], r["token_idx"], r["layer"]) for r in rows}
    tokens = {(s, t) for s, t, _ in cells}
    samples = sum((s, t, l) in cells and (s, t, l + 1) in cells for s, t in tokens for l in range(31))

    report = import_logs(LogsParams(path=str(log), model="Mixtral-8x7B-Instruct-v0.1"), tmp_path / "t.parquet")
    traces = read_traces(tmp_path / "t.parquet")
    m = traces.meta
    assert (m.num_layers, m.num_experts, m.top_k) == (32, 8, 2)
    assert len(traces) == report["rows"] == len(rows) == 10_779
    assert report["tokens"] == len(tokens)
    assert report["missing_token_layer_rows"] == len(tokens) * 32 - len(rows) > 0  # the dropped [0.5, 0.5] rows
    assert m.source == "Mixtral-8x7B-Instruct-v0.1"
    feats = encode_features(traces, FeaturesParams())
    assert len(feats) == samples
    assert feats.report["candidate_samples"] - len(feats) == (feats.report["dropped_missing_layer"]
                                                             + feats.report["dropped_missing_target"]) > 0
    # one row checked against its line
    first = rows[0]
    i = np.flatnonzero((traces.seq_id == first["problem_id"]) & (traces.token_pos == first["token_idx"])
                       & (traces.layer == first["layer"]))[0]
    assert traces.experts[i].tolist() == first["experts"]
    np.testing.assert_allclose(traces.weights[i], first["gating_probs"], rtol=1e-6)


def test_flame_csv_counts_and_rows_match_the_files(tmp_path: Path) -> None:
    folder = need(FLAME_DIR)
    files = sorted(folder.glob("layer_*.csv"), key=lambda p: int(p.stem.split("_")[1]))
    data_lines = [sum(1 for _ in open(f)) - 1 for f in files]  # minus the header
    layers = [int(f.stem.split("_")[1]) for f in files]

    report = import_logs(LogsParams(format="flame_csv", path=str(folder), tokens_per_sequence=64),
                         tmp_path / "t.parquet")
    traces = read_traces(tmp_path / "t.parquet")
    m = traces.meta
    assert (m.num_layers, m.num_experts, m.top_k) == (len(files), 64, 6) == (25, 64, 6)
    assert m.source_params["original_layers"] == layers == list(range(2, 27))
    assert len(traces) == report["rows"] == sum(data_lines) == 25 * 2048
    assert report["tokens"] == 2048 and report["sequences"] == 32
    assert traces.seq_id.max() == 31 and traces.token_pos.max() == 63
    feats = encode_features(traces, FeaturesParams())
    assert len(feats) == 2048 * 24

    # row 5 of the third file (original layer 4): experts sorted by score, weights = scores / their sum
    header, *lines = files[2].read_text().splitlines()
    scores = np.array(lines[5].split(",")[2:], dtype=float)
    chosen = np.argsort(-scores, kind="stable")[:6]
    i = np.flatnonzero((traces.layer == 2) & (traces.seq_id == 0) & (traces.token_pos == 5))[0]
    assert traces.experts[i].tolist() == chosen.tolist()
    np.testing.assert_allclose(traces.weights[i], scores[chosen] / scores[chosen].sum(), rtol=1e-5)


def test_import_source_through_extract_traces(tmp_path: Path) -> None:
    log = need(MIXTRAL_LOG)
    extract_traces(ExtractParams(source="import", logs=LogsParams(path=str(log))), tmp_path / "t.parquet")
    assert len(read_traces(tmp_path / "t.parquet")) == 10_779


# --------------------------------------------------------------------------- formats on small files


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def grid(n_seq: int = 2, n_tok: int = 3, n_layers: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for s in range(n_seq):
        for t in range(n_tok):
            for layer in range(n_layers):
                e = rng.choice(8, size=2, replace=False).tolist()
                w = sorted(rng.dirichlet([1, 1]).tolist(), reverse=True)
                rows.append({"problem_id": s, "token_idx": t, "layer": layer, "experts": e, "gating_probs": w})
    return rows


def test_jsonl_field_mapping_sorting_and_renormalising(tmp_path: Path) -> None:
    rows = [{"seq": "a", "pos": t, "lyr": layer, "ids": [1, 4], "w": [1.0, 3.0]}  # unsorted, sums to 4
            for t in range(2) for layer in range(2)]
    path = write_jsonl(tmp_path / "log.jsonl", rows)
    fields = LogFields(sequence="seq", token="pos", layer="lyr", experts="ids", weights="w")
    with pytest.raises(TraceError, match=r"log\.jsonl: line 1: .*sum to 4"):
        import_logs(LogsParams(path=str(path), fields=fields), tmp_path / "t.parquet")
    report = import_logs(LogsParams(path=str(path), fields=fields, renormalize=True, num_experts=6),
                         tmp_path / "t.parquet")
    traces = read_traces(tmp_path / "t.parquet")
    assert traces.meta.num_experts == 6 and report["rows_resorted_by_weight"] == 4
    assert traces.experts.tolist() == [[4, 1]] * 4
    np.testing.assert_allclose(traces.weights, [[0.75, 0.25]] * 4)


def test_vllm_npy_directory_and_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = [np.stack([rng.permutation(16)[:4] for _ in range(T * 5)]).reshape(T, 5, 4) for T in (7, 3, 9)]
    folder = tmp_path / "routed"
    folder.mkdir()
    for i, a in enumerate(arrays):
        np.save(folder / f"seq_{i:03d}.npy", a)
    np.savez(tmp_path / "routed.npz", **{f"req{i}": a for i, a in enumerate(arrays)})
    for path in (folder, tmp_path / "routed.npz"):
        report = import_logs(LogsParams(format="vllm_npy", path=str(path), num_experts=16), tmp_path / "t.parquet")
        traces = read_traces(tmp_path / "t.parquet")
        assert (traces.meta.num_layers, traces.meta.num_experts, traces.meta.top_k) == (5, 16, 4)
        assert len(traces) == report["rows"] == 19 * 5
        np.testing.assert_allclose(traces.weights, 0.25)
        sel = traces.seq_id == 2
        assert traces.experts[sel].reshape(9, 5, 4).tolist() == arrays[2].tolist()


def test_parquet_round_trip(tmp_path: Path) -> None:
    traces, _ = generate(SyntheticParams(num_sequences=3, tokens_per_sequence=5, num_layers=4, num_experts=6,
                                         top_k=3, spec_noise=0.5))
    write_traces(tmp_path / "in.parquet", traces)
    import_logs(LogsParams(format="parquet", path=str(tmp_path / "in.parquet")), tmp_path / "out.parquet")
    again = read_traces(tmp_path / "out.parquet")
    for name in ("seq_id", "token_pos", "layer", "experts", "weights", "spec_logits"):
        np.testing.assert_array_equal(getattr(again, name), getattr(traces, name))
    assert again.meta.source_params["imported_from"] == str(tmp_path / "in.parquet")


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize("name, edit, message", [
    ("bad JSON", lambda rows: rows.__setitem__(4, '{"problem_id": 0, "layer": '), r"line 5: not valid JSON"),
    ("missing field", lambda rows: rows[6].pop("experts"), r"line 7: missing field\(s\) \['experts'\]"),
    ("expert out of range", lambda rows: rows[2].update(experts=[8, 1]), r"line 3: expert id in \[8, 1\] out of range"),
    ("NaN weights", lambda rows: rows[9].update(gating_probs=[math.nan, 0.5]), r"line 10: weights .* not finite"),
    ("k changes", lambda rows: rows[3].update(experts=[1, 2, 3], gating_probs=[.5, .3, .2]), r"line 4: 3 experts"),
    ("duplicate row", lambda rows: rows.__setitem__(8, rows[0]), r"line 9 repeats line 1"),
    ("layer gap", lambda rows: [r.update(layer=3) for r in rows if r["layer"] == 2],
     r"layer gap: no rows for layer\(s\) \[2\]"),
])
def test_malformed_jsonl_names_file_and_line_and_writes_nothing(tmp_path: Path, name, edit, message) -> None:
    rows = grid()
    edit(rows)
    path = write_jsonl(tmp_path / "routing.jsonl", rows)
    out = tmp_path / "traces.parquet"
    with pytest.raises(TraceError, match=r"routing\.jsonl: " + message):
        import_logs(LogsParams(path=str(path), num_experts=8), out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind either


def test_empty_file_errors_and_keeps_an_existing_output(tmp_path: Path) -> None:
    path = tmp_path / "routing.jsonl"
    path.write_text("\n\n")
    out = tmp_path / "traces.parquet"
    out.write_bytes(b"the previous trace")
    with pytest.raises(TraceError, match=r"routing\.jsonl: empty file"):
        import_logs(LogsParams(path=str(path)), out)
    assert out.read_bytes() == b"the previous trace"


def flame_files(folder: Path, layers=(2, 3, 4), n_rows: int = 8, k: int = 3, E: int = 6) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for layer in layers:
        lines = ["layer_id,token_id," + ",".join(f"expert_{e}" for e in range(E))]
        for r in range(n_rows):
            scores = np.zeros(E)
            scores[rng.choice(E, size=k, replace=False)] = rng.uniform(0.05, 0.4, size=k)
            lines.append(f"0,{r}," + ",".join(f"{s:.6f}" for s in scores))
        (folder / f"layer_{layer}.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_flame_csv_small_and_malformed(tmp_path: Path) -> None:
    folder = flame_files(tmp_path / "flame")
    out = tmp_path / "t.parquet"
    report = import_logs(LogsParams(format="flame_csv", path=str(folder), tokens_per_sequence=4), out)
    assert report["rows"] == 24 and report["sequences"] == 2
    assert read_traces(out).meta.source_params["original_layers"] == [2, 3, 4]
    out.unlink()

    lines = (folder / "layer_3.csv").read_text().splitlines()
    lines[4] = lines[4].replace("0.000000", "0.5", 1)  # a 4th non-zero score on line 5
    (folder / "layer_3.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=r"layer_3\.csv: line 5: 4 non-zero expert scores, expected top_k=3"):
        import_logs(LogsParams(format="flame_csv", path=str(folder)), out)
    (folder / "layer_3.csv").unlink()
    with pytest.raises(TraceError, match=r"layer gap: .* none for \[3\]"):
        import_logs(LogsParams(format="flame_csv", path=str(folder)), out)
    (folder / "layer_4.csv").write_text("")
    with pytest.raises(TraceError, match=r"layer_4\.csv"):
        import_logs(LogsParams(format="flame_csv", path=str(folder / "layer_4.csv")), out)
    assert not out.exists()


def test_vllm_npy_out_of_range_names_file_token_and_layer(tmp_path: Path) -> None:
    a = np.tile(np.array([0, 1]), (4, 3, 1))
    a[2, 1] = [1, 9]
    np.save(tmp_path / "seq.npy", a)
    with pytest.raises(TraceError, match=r"seq\.npy: token 2, layer 1: expert id in \[1, 9\] out of range"):
        import_logs(LogsParams(format="vllm_npy", path=str(tmp_path / "seq.npy"), num_experts=8),
                    tmp_path / "t.parquet")
    assert not (tmp_path / "t.parquet").exists()


def test_params_require_the_logs_path() -> None:
    params = ExtractParams(source="import")
    with pytest.raises(ParamsError, match=r"extract\.logs\.path: must be set"):
        params.validate("extract")
    with pytest.raises(ParamsError, match=r"extract\.hf\.model: must be set"):
        ExtractParams(source="hf").validate("extract")


# --------------------------------------------------------------- issue 14: silent corruption, unnamed errors, streaming


def lines_of(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.mark.parametrize("field, value, message", [
    ("token_idx", 3_000_000_000, r"line 5: field 'token_idx': 3000000000 does not fit int32 \(at most 2147483647\)"),
    ("token_idx", 10**30, r"line 5: field 'token_idx': 1000000000000000000000000000000 does not fit int32"),
    ("token_idx", -10**30, r"line 5: field 'token_idx': -1000000000000000000000000000000 is negative"),
    ("token_idx", 1e30, r"line 5: field 'token_idx': 1000000000000000019884624838656 does not fit int32"),
    ("problem_id", 2**31, r"line 5: field 'problem_id': 2147483648 does not fit int32"),
    ("layer", 40_000, r"line 5: field 'layer': 40000 does not fit int16 \(at most 32767\)"),
    ("experts", [40_000, 1], r"line 5: field 'experts': \[40000, 1\]: id 40000 does not fit int16"),
])
def test_values_that_do_not_fit_the_trace_are_refused(tmp_path: Path, field, value, message) -> None:
    """They were checked as int64 and written as int32/int16: the import exited 0 with wrapped
    numbers (and 10**30 crashed with an OverflowError traceback)."""
    rows = grid()
    rows[4][field] = value
    path = write_jsonl(tmp_path / "routing.jsonl", rows)
    out = tmp_path / "traces.parquet"
    out.write_bytes(b"the previous trace")
    with pytest.raises(TraceError, match=r"routing\.jsonl: " + message):
        import_logs(LogsParams(path=str(path)), out)
    assert out.read_bytes() == b"the previous trace"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routing.jsonl", "traces.parquet"]


def test_duplicate_check_does_not_collide(tmp_path: Path) -> None:
    """The old key (seq << 40 | token << 16 | layer) made sequence 1 / token 0 equal to sequence 0 /
    token 2**24, and two distinct rows were reported as duplicates."""
    rows = [{"problem_id": 1, "token_idx": 0, "layer": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4]},
            {"problem_id": 0, "token_idx": 2**24, "layer": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4]}]
    path = write_jsonl(tmp_path / "log.jsonl", rows)
    report = import_logs(LogsParams(path=str(path)), tmp_path / "t.parquet")
    traces = read_traces(tmp_path / "t.parquet")
    assert report["rows"] == report["tokens"] == report["sequences"] == 2
    assert list(zip(traces.seq_id.tolist(), traces.token_pos.tolist())) == [(1, 0), (0, 2**24)]


def test_random_bytes_and_other_compression_name_the_file(tmp_path: Path) -> None:
    """A bare UnicodeDecodeError traceback before."""
    path = tmp_path / "routing.jsonl"
    path.write_bytes(write_jsonl(tmp_path / "ok.jsonl", grid()).read_bytes()[:300] + bytes(range(128, 256)) + b"\n")
    with pytest.raises(TraceError, match=r"routing\.jsonl: line 3: not UTF-8 text \(byte 0x80 at column \d+\)"):
        import_logs(LogsParams(path=str(path)), tmp_path / "t.parquet")
    path.write_bytes(b"\xfd7zXZ\x00" + bytes(100))
    with pytest.raises(TraceError, match=r"routing\.jsonl: xz-compressed, which is not read \(gzip is read"):
        import_logs(LogsParams(path=str(path)), tmp_path / "t.parquet")
    assert not (tmp_path / "t.parquet").exists()


def test_gzip_logs_are_read_as_they_are(tmp_path: Path) -> None:
    """A gzip file was a UnicodeDecodeError; now it is read transparently (by its magic number)."""
    plain = write_jsonl(tmp_path / "routing.jsonl", grid())
    import_logs(LogsParams(path=str(plain)), tmp_path / "plain.parquet")
    packed = tmp_path / "routing.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    report = import_logs(LogsParams(path=str(packed)), tmp_path / "gz.parquet")
    assert report["rows"] == 18
    assert pq.read_table(tmp_path / "gz.parquet").equals(pq.read_table(tmp_path / "plain.parquet"))
    packed.write_bytes(gzip.compress(plain.read_bytes())[:-30])  # truncated
    with pytest.raises(TraceError, match=r"routing\.jsonl\.gz: cannot read it to the end \(corrupt or truncated gzip"):
        import_logs(LogsParams(path=str(packed)), tmp_path / "gz.parquet")


def test_blocks_keep_exact_line_numbers_and_find_repeats_across_them(tmp_path: Path, monkeypatch) -> None:
    """Streamed in blocks of a few lines: blank, whitespace-only and CRLF lines, string sequence
    ids, weights as integers and floats as token indices give the trace of one big block; an
    error names its exact line, and a repeat is found across blocks."""
    rows = grid(n_seq=3, n_tok=4)
    for r in rows:
        r["problem_id"] = f"p{r['problem_id']}"
    rows[7]["token_idx"] = float(rows[7]["token_idx"])
    rows[9]["gating_probs"] = [1, 0]
    lines = [json.dumps(r) for r in rows]
    lines[3:3] = ["", "  \t", ""]  # blank lines, one of them whitespace only
    lines[8], lines[12] = "   " + lines[8], lines[12] + "\r"  # leading whitespace, CRLF
    lines.insert(20, "")
    text = "\n".join(lines) + "\n"
    path = tmp_path / "log.jsonl"
    path.write_text(text)
    import_logs(LogsParams(path=str(path)), tmp_path / "whole.parquet")
    monkeypatch.setattr(logs.jsonl, "JSON_BLOCK_BYTES", 150)  # one or two lines a block
    report = import_logs(LogsParams(path=str(path)), tmp_path / "blocks.parquet")
    assert pq.read_table(tmp_path / "blocks.parquet").equals(pq.read_table(tmp_path / "whole.parquet"))
    assert report["rows"] == 36 and report["blank_lines_skipped"] == 4 and report["sequences"] == 3
    assert report["lines_read"] == len(lines) == 40
    bad = 33  # line 34
    lines[bad] = lines[bad].replace('"layer": ', '"layer": -')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=rf"log\.jsonl: line {bad + 1}: field 'layer': -\d+ is negative"):
        import_logs(LogsParams(path=str(path)), tmp_path / "t.parquet")
    path.write_text(lines_of(rows + [rows[2]]))
    with pytest.raises(TraceError, match=r"log\.jsonl: line 37 repeats line 3: sequence 0, token 0, layer 2"):
        import_logs(LogsParams(path=str(path)), tmp_path / "t.parquet")


def test_flame_csv_non_numeric_cell_names_file_line_and_column(tmp_path: Path, monkeypatch) -> None:
    """pyarrow's conversion error named no line, and a string column ended in a bare ValueError."""
    folder = flame_files(tmp_path / "flame", n_rows=40)
    lines = (folder / "layer_3.csv").read_text().splitlines()
    cells = lines[30].split(",")
    cells[5] = "0.1x"
    lines[30] = ",".join(cells)
    (folder / "layer_3.csv").write_text("\n".join(lines) + "\n")
    for block in (1 << 20, 200):  # the bad line in the first block, and well after it
        monkeypatch.setattr(logs.flame_csv, "CSV_BLOCK_BYTES", block)
        with pytest.raises(TraceError, match=r"layer_3\.csv: line 31, column expert_3: '0\.1x' is not a number"):
            import_logs(LogsParams(format="flame_csv", path=str(folder)), tmp_path / "t.parquet")
    lines[30] = ",".join(cells[:4])
    (folder / "layer_3.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=r"layer_3\.csv: line 31: 4 columns, the header has 8"):
        import_logs(LogsParams(format="flame_csv", path=str(folder)), tmp_path / "t.parquet")
    assert not (tmp_path / "t.parquet").exists()


def test_npz_file_is_closed_after_an_error(tmp_path: Path) -> None:
    """The .npz reader opened the archive once per array and left it to the garbage collector: an
    error kept it open as long as the exception lived."""
    good = np.zeros((3, 2, 2), dtype=np.int64)
    good[..., 1] = 1
    np.savez(tmp_path / "routed.npz", a=good, b=np.array([{"pickled": 1}], dtype=object))

    def open_handles() -> list[str]:
        fds = Path("/proc/self/fd")
        return [str(p) for p in fds.iterdir() if p.is_symlink() and "routed.npz" in os.readlink(p)] \
            if fds.exists() else []

    with pytest.raises(TraceError, match=r"routed\.npz\['b'\]: cannot read: .*never done") as caught:
        import_logs(LogsParams(format="vllm_npy", path=str(tmp_path / "routed.npz")), tmp_path / "t.parquet")
    assert "allow_pickle" not in str(caught.value)  # numpy's advice to load unsafely is not passed on
    if not Path("/proc/self/fd").exists():
        pytest.skip("no /proc/self/fd to list open files")
    assert open_handles() == [], "the .npz is still open while the error is alive"


@pytest.mark.parametrize("dtype, value, message", [
    (np.int64, 40_000, r"seq\.npy: token 2, layer 1: experts \[40000, 1\]: id 40000 does not fit int16"),
    (np.uint64, 2**64 - 1, r"seq\.npy: token 2, layer 1: experts \[18446744073709551615, 1\]: id 18446744073709551615"),
])
def test_vllm_ids_that_do_not_fit_are_refused(tmp_path: Path, dtype, value, message) -> None:
    """An id of 40,000 made num_experts 40,001 and was written as int16: -25,536."""
    a = np.zeros((4, 3, 2), dtype=dtype)
    a[..., 1] = 1
    a[2, 1, 0] = value
    np.save(tmp_path / "seq.npy", a)
    with pytest.raises(TraceError, match=message):
        import_logs(LogsParams(format="vllm_npy", path=str(tmp_path / "seq.npy")), tmp_path / "t.parquet")


def test_parquet_import_refuses_values_too_wide_for_the_trace(tmp_path: Path) -> None:
    """A trace from another tool with an int64 seq_id of 3e9 was narrowed with astype: wrapped."""
    traces, _ = generate(SyntheticParams(num_sequences=2, tokens_per_sequence=3, num_layers=2, num_experts=4))
    table = pq.read_table(write_and_return(tmp_path / "in.parquet", traces))
    seq = table.column("seq_id").to_numpy().astype(np.int64)
    seq[5] = 3_000_000_000
    table = table.set_column(0, pa.field("seq_id", pa.int64()), pa.array(seq))
    pq.write_table(table, tmp_path / "in.parquet")
    with pytest.raises(TraceError, match=r"in\.parquet: row 5: seq_id 3000000000 does not fit int32"):
        import_logs(LogsParams(format="parquet", path=str(tmp_path / "in.parquet")), tmp_path / "t.parquet")


def write_and_return(path: Path, traces) -> Path:
    write_traces(path, traces)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "flame_csv", "vllm_npy", "parquet"])
def test_every_format_streams(tmp_path: Path, monkeypatch, fmt: str) -> None:
    """Rows are written while the input is read: a bad row near the end of a log is found after
    earlier rows were checked and written (to the temporary file, discarded), not before any
    write as when the whole input was read first. The earlier trace stays."""
    for module, name, value in ((logs.jsonl, "JSON_BLOCK_BYTES", 2000), (logs.flame_csv, "CSV_BLOCK_BYTES", 1000),
                                (logs.vllm_npy, "CHUNK_ROWS", 30), (logs.parquet, "CHUNK_ROWS", 30)):
        monkeypatch.setattr(module, name, value)  # in the module that reads it
    if fmt == "jsonl":
        rows: list = grid(n_seq=4, n_tok=10)
        rows[-1] = '{"problem_id": 3, "layer": '
        path = write_jsonl(tmp_path / "log.jsonl", rows)
        params, message = LogsParams(path=str(path)), r"line 120: not valid JSON"
    elif fmt == "flame_csv":
        path = flame_files(tmp_path / "flame", layers=(0,), n_rows=200)
        text = (path / "layer_0.csv").read_text().rstrip("\n")
        (path / "layer_0.csv").write_text(text[: text.rfind(",")] + ",-1\n")
        params, message = LogsParams(format="flame_csv", path=str(path)), r"layer_0\.csv: line 201: negative score"
    elif fmt == "vllm_npy":
        a = np.tile(np.array([0, 1]), (100, 3, 1))
        a[99, 2] = [1, 1]
        np.save(tmp_path / "seq.npy", a)
        params, message = LogsParams(format="vllm_npy", path=str(tmp_path / "seq.npy")), r"token 99, layer 2: experts"
    else:
        traces, _ = generate(SyntheticParams(num_sequences=4, tokens_per_sequence=10, num_layers=3, num_experts=4))
        table = pq.read_table(write_and_return(tmp_path / "in.parquet", traces))
        flat = table.column("weights").combine_chunks().values.to_numpy().copy()
        flat[-2:] = [0.25, 0.75]  # the last row's weights in the wrong order
        table = table.set_column(4, table.schema.field("weights"), pa.FixedSizeListArray.from_arrays(pa.array(flat), 2))
        pq.write_table(table, tmp_path / "in.parquet")
        params = LogsParams(format="parquet", path=str(tmp_path / "in.parquet"))
        message = r"row 119: experts must be sorted"
    out = tmp_path / "t.parquet"
    out.write_bytes(b"the previous trace")
    written = []
    real_write = TraceWriter.write
    monkeypatch.setattr(TraceWriter, "write",
                        lambda self, *a, **k: (real_write(self, *a, **k), written.append(self.rows)))
    with pytest.raises(TraceError, match=message):
        import_logs(params, out)
    assert len(written) > 1 and written[-1] > 0  # several batches were checked and written before the bad one
    assert out.read_bytes() == b"the previous trace"
