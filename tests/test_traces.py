"""Canonical trace validation and atomic writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from routecast.traces import TraceError, TraceMeta, Traces, TraceWriter, read_traces, write_traces

META = TraceMeta(num_layers=3, num_experts=4, top_k=2, source="test")


def small_trace() -> Traces:
    n_tokens, L = 5, 3
    experts = np.array([[0, 1], [2, 3], [1, 0]] * n_tokens, dtype=np.int16)
    weights = np.tile(np.array([[0.7, 0.3]], dtype=np.float32), (n_tokens * L, 1))
    return Traces(META, seq_id=np.zeros(n_tokens * L, np.int32), token_pos=np.repeat(np.arange(n_tokens), L).astype(np.int32),
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
    gap = Traces(META, trace.seq_id[keep], trace.token_pos[keep], trace.layer[keep], trace.experts[keep], trace.weights[keep])
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
