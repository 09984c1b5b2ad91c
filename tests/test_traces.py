"""Canonical trace validation and atomic writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from routecast.data.traces import (
    SHAPE_LIMIT,
    RowNames,
    TraceError,
    TraceMeta,
    Traces,
    TraceWriter,
    _RowKeys,
    read_trace_meta,
    read_trace_sequences,
    read_traces,
    write_traces,
)

META = TraceMeta(num_layers=3, num_experts=4, top_k=2, source="test")


def small_trace() -> Traces:
    n_tokens, L = 5, 3
    experts = np.array([[0, 1], [2, 3], [1, 0]] * n_tokens, dtype=np.int16)
    weights = np.tile(np.array([[0.7, 0.3]], dtype=np.float32), (n_tokens * L, 1))
    return Traces(META, seq_id=np.zeros(n_tokens * L, np.int32),
                  token_pos=np.repeat(np.arange(n_tokens), L).astype(np.int32),
                  layer=np.tile(np.arange(L), n_tokens).astype(np.int16), experts=experts, weights=weights)


def test_round_trip_keeps_rows_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    write_traces(path, small_trace())
    back = read_traces(path)
    assert back.meta == META
    assert np.array_equal(back.experts, small_trace().experts)
    assert np.array_equal(back.weights, small_trace().weights)


@pytest.mark.parametrize(
    ("column", "row", "value", "message"),
    [
        ("experts", 4, [4, 1], "out of range"),
        ("experts", 2, [1, 1], "repeat"),
        ("weights", 7, [np.nan, 0.5], "not finite"),
        ("weights", 1, [0.6, 0.6], "sum to"),
        ("weights", 3, [0.3, 0.7], "sorted by weight"),
        ("layer", 6, 3, "layer 3 out of range"),
    ],
)
def test_bad_row_is_named_and_nothing_is_written(tmp_path: Path, column: str, row: int, value, message: str) -> None:
    trace = small_trace()
    getattr(trace, column)[row] = value
    path = tmp_path / "t.parquet"
    path.write_text("previous good artifact")
    with pytest.raises(TraceError, match=rf"row {row}: .*{message}"):
        write_traces(path, trace)
    assert path.read_text() == "previous good artifact"
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # no temporary file left behind


def test_layer_gap_and_empty_input_write_nothing(tmp_path: Path) -> None:
    trace = small_trace()
    keep = trace.layer != 1
    gap = Traces(META, trace.seq_id[keep], trace.token_pos[keep], trace.layer[keep], trace.experts[keep],
                 trace.weights[keep])
    path = tmp_path / "t.parquet"
    with pytest.raises(TraceError, match=r"layer gap: no rows for layer\(s\) \[1\] \(layers must be contiguous 0..2\)"):
        write_traces(path, gap)
    with pytest.raises(TraceError, match="no rows"):
        with TraceWriter(path, META):
            pass
    assert not path.exists() and not list(tmp_path.iterdir())


def test_error_in_the_middle_of_a_stream_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    trace = small_trace()
    with pytest.raises(RuntimeError):
        with TraceWriter(path, META) as writer:
            writer.write(trace.seq_id, trace.token_pos, trace.layer, trace.experts, trace.weights)
            raise RuntimeError("source died")
    assert not list(tmp_path.iterdir())


def test_origin_names_the_source_line(tmp_path: Path) -> None:
    trace = small_trace()
    trace.experts[2] = [9, 1]
    origin = np.array([f"line {i + 1}" for i in range(len(trace))])
    with pytest.raises(TraceError, match=r"log\.jsonl: line 3: expert id"):
        with TraceWriter(tmp_path / "t.parquet", META) as writer:
            writer.write(trace.seq_id, trace.token_pos, trace.layer, trace.experts, trace.weights,
                         where="log.jsonl", origin=origin)


# --------------------------------------------------------------------------- values that do not fit, whole-trace checks


@pytest.mark.parametrize(("column", "value", "message"), [
    ("seq_id", 2**31, r"row 4: seq_id 2147483648 does not fit int32 \(at most 2147483647\)"),
    ("token_pos", 3_000_000_000, r"row 4: token_pos 3000000000 does not fit int32"),
    ("token_pos", 1.5, r"row 4: token_pos 1\.5 is not a whole number"),
    ("experts", [40_000, 1], r"row 4: experts \[40000, 1\]: id 40000 does not fit int16 \(at most 32767\)"),
    ("experts", [2**64 - 1, 1],
     r"row 4: experts \[18446744073709551615, 1\]: id 18446744073709551615 does not fit int16"),
    ("layer", 70_000, r"row 4: layer 70000 does not fit int16"),
])
def test_writer_refuses_values_that_do_not_fit_their_column(tmp_path: Path, column: str, value, message: str) -> None:
    """Values were checked as int64 and written as int32/int16: 2**31 became -2**31, silently."""
    trace = small_trace()
    dtype = np.uint64 if isinstance(value, list) and value[0] >= 2**63 else (np.float64 if isinstance(value, float)
                                                                              else np.int64)
    cols = {name: getattr(trace, name).astype(dtype) for name in ("seq_id", "token_pos", "layer", "experts")}
    cols[column][4] = value
    path = tmp_path / "t.parquet"
    path.write_text("previous good artifact")
    with pytest.raises(TraceError, match=message):
        with TraceWriter(path, META) as writer:
            writer.write(cols["seq_id"], cols["token_pos"], cols["layer"], cols["experts"], trace.weights)
    assert path.read_text() == "previous good artifact"
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # no temporary (or key) file left behind


def test_meta_refuses_shapes_beyond_int16_ids() -> None:
    with pytest.raises(TraceError, match="at most 32768 layers and experts"):
        TraceMeta(num_layers=3, num_experts=40_001, top_k=2, source="test")


def test_read_traces_refuses_values_too_wide_for_the_canonical_types(tmp_path: Path) -> None:
    """A trace written by another tool with int64 columns was narrowed with astype: 3e9 wrapped."""
    trace = small_trace()
    table = pa.table({
        "seq_id": pa.array(trace.seq_id.astype(np.int64)),
        "token_pos": pa.array(np.r_[trace.token_pos[:6].astype(np.int64), 3_000_000_000, trace.token_pos[7:]]),
        "layer": pa.array(trace.layer),
        "experts": pa.array(trace.experts.tolist(), pa.list_(pa.int64())),
        "weights": pa.array(trace.weights.tolist(), pa.list_(pa.float32())),
    }).replace_schema_metadata(META.to_metadata())
    pq.write_table(table, tmp_path / "wide.parquet")
    with pytest.raises(TraceError, match=r"wide\.parquet: row 6: token_pos 3000000000 does not fit int32"):
        read_traces(tmp_path / "wide.parquet")


def test_duplicate_check_does_not_collide_and_finds_repeats_across_batches_and_passes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old packed key (seq << 40 | token << 16 | layer) made sequence 1 / token 0 equal to
    sequence 0 / token 2**24. The check now runs over the whole trace, in several passes."""
    meta = TraceMeta(num_layers=1, num_experts=4, top_k=2, source="test")
    one = np.array([[0, 1]]), np.array([[0.7, 0.3]])
    path = tmp_path / "t.parquet"
    with TraceWriter(path, meta) as writer:
        writer.write([1], [0], [0], *one)
        writer.write([0], [2**24], [0], *one)
        assert writer.finish() == {"rows": 2, "sequences": 2, "tokens": 2}
    assert read_traces(path).token_pos.tolist() == [0, 2**24]

    monkeypatch.setattr(_RowKeys, "PASS_ROWS", 7)  # 40 rows: 6 passes over hash partitions
    monkeypatch.setattr(_RowKeys, "READ_ROWS", 5)
    rng = np.random.default_rng(0)
    seq, tok = rng.integers(0, 4, 40), rng.permutation(40)  # distinct tokens...
    tok[33] = tok[21]
    seq[33] = seq[21]  # ...but row 33 repeats row 21
    experts, weights = np.tile(one[0], (40, 1)), np.tile(one[1], (40, 1))
    with pytest.raises(TraceError, match=r"log: line 34 repeats line 22: sequence \d, token \d+, layer 0"):
        with TraceWriter(path, meta, where="log") as writer:
            for lo in range(0, 40, 9):  # the two rows land in different batches
                writer.write(seq[lo:lo + 9], tok[lo:lo + 9], np.zeros(len(seq[lo:lo + 9])), experts[lo:lo + 9],
                             weights[lo:lo + 9], origin=RowNames("line", lo + 1))
    assert read_traces(path).token_pos.tolist() == [0, 2**24]  # the earlier trace stays


@pytest.mark.parametrize("wide", [False, True], ids=["packed key, 6 passes", "three-column sort"])
def test_whole_trace_counts_match_a_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wide: bool) -> None:
    """Distinct tokens and sequences, in several passes over hash partitions, equal a plain set
    count, and a repeated row is found. Ids spanning the whole int32 range (in one pass) take the
    three-column sort: no int64 key can hold seq x token x layer then."""
    if not wide:
        monkeypatch.setattr(_RowKeys, "PASS_ROWS", 50)
    rng = np.random.default_rng(1)
    n = 300
    high = 2**31 - 1 if wide else 20
    seq, tok = rng.integers(0, high, n), rng.integers(0, high, n)
    seq[n // 2:], tok[n // 2:] = seq[:n - n // 2], tok[:n - n // 2]  # tokens with several layers
    layer = rng.integers(0, 3, n)
    layer[:3] = [0, 1, 2]  # every layer present
    first = {}
    for i, cell in enumerate(zip(seq.tolist(), tok.tolist(), layer.tolist())):
        first.setdefault(cell, i)
    keep = np.array(sorted(first.values()))  # no (seq, token, layer) twice
    seq, tok, layer = seq[keep], tok[keep], layer[keep]
    meta = TraceMeta(num_layers=3, num_experts=4, top_k=2, source="test")

    def write(rows: np.ndarray) -> dict[str, int]:
        with TraceWriter(tmp_path / "t.parquet", meta) as writer:
            writer.write(seq[rows], tok[rows], layer[rows], np.tile([[0, 1]], (len(rows), 1)),
                         np.tile([[0.7, 0.3]], (len(rows), 1)))
            return writer.finish()

    all_rows = np.arange(len(seq))
    assert write(all_rows) == {"rows": len(seq), "sequences": len(set(seq.tolist())),
                               "tokens": len(set(zip(seq.tolist(), tok.tolist())))}
    with pytest.raises(TraceError, match=rf"row {len(seq)} repeats row 5: sequence {seq[5]}, token {tok[5]}"):
        write(np.r_[all_rows, 5])


def test_inferred_shape_is_the_files_metadata(tmp_path: Path) -> None:
    """num_layers and num_experts known only at the end are written at close: the file's metadata
    (its serialised Arrow schema included) is the one written when the shape is known up front."""
    trace = small_trace()  # layers 0..2, expert ids 0..3
    placeholder = TraceMeta(num_layers=SHAPE_LIMIT, num_experts=SHAPE_LIMIT, top_k=2, source="test")
    with TraceWriter(tmp_path / "inferred.parquet", placeholder, infer=("num_layers", "num_experts")) as writer:
        writer.write(trace.seq_id, trace.token_pos, trace.layer, trace.experts, trace.weights)
        writer.source_params["rows"] = len(trace)
    meta = TraceMeta(num_layers=3, num_experts=4, top_k=2, source="test", source_params={"rows": len(trace)})
    with TraceWriter(tmp_path / "known.parquet", meta) as writer:
        writer.write(trace.seq_id, trace.token_pos, trace.layer, trace.experts, trace.weights)
    inferred, known = (pq.ParquetFile(tmp_path / f"{name}.parquet") for name in ("inferred", "known"))
    assert inferred.metadata.metadata == known.metadata.metadata  # ARROW:schema included
    assert inferred.schema_arrow.metadata == meta.to_metadata()
    assert read_traces(tmp_path / "inferred.parquet").meta == meta == read_trace_meta(tmp_path / "inferred.parquet")
    assert pq.read_table(tmp_path / "inferred.parquet").equals(pq.read_table(tmp_path / "known.parquet"))


def test_trace_read_in_sequence_groups_equals_the_whole(tmp_path: Path) -> None:
    trace = small_trace()
    trace.seq_id[:] = np.repeat([3, 1, 2, 0, 4], 3)  # not sorted by sequence
    write_traces(tmp_path / "t.parquet", trace)
    groups = list(read_trace_sequences(tmp_path / "t.parquet", max_rows=4))
    # groups: the sequences whose rows start in the same window of 4 (starts 0, 3, 6, 9, 12)
    assert [sorted(set(g.seq_id.tolist())) for g in groups] == [[0, 1], [2], [3], [4]]
    rows = sorted(zip(trace.seq_id.tolist(), trace.token_pos.tolist(), trace.layer.tolist(), trace.experts.tolist()))
    got = sorted(r for g in groups for r in zip(g.seq_id.tolist(), g.token_pos.tolist(), g.layer.tolist(),
                                                g.experts.tolist()))
    assert got == rows
