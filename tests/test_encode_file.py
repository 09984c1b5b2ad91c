"""encode_features_file: the streamed encoder writes the in-memory encoder's file, byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from routecast.config.params import FeaturesParams, SyntheticParams
from routecast.data import features as features_module
from routecast.data.features import encode_features, encode_features_file, features_to_table, write_features
from routecast.data.traces import TraceMeta, Traces, read_traces, write_traces
from routecast.sources.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]


def rows_of(traces: Traces, index: np.ndarray) -> Traces:
    return replace(traces, **{f.name: getattr(traces, f.name)[index] for f in fields(traces)
                              if isinstance(getattr(traces, f.name), np.ndarray)})


def in_memory(trace: Path, out: Path, params: FeaturesParams) -> dict[str, int]:
    feats = encode_features(read_traces(trace), params)
    write_features(out, feats)
    return feats.report


@pytest.mark.parametrize("case", ["sorted", "shuffled with missing rows", "spec_logits, history_len 3"])
def test_streamed_file_equals_the_in_memory_one(tmp_path: Path, case: str) -> None:
    traces, _ = generate(SyntheticParams(num_sequences=9, tokens_per_sequence=7, num_layers=5,
                                         spec_noise=1.0 if "spec" in case else None))
    params = FeaturesParams(history_len=3) if "spec" in case else FeaturesParams()
    if "shuffled" in case:  # not sorted by sequence: read once per group; rows missing: samples dropped
        rng = np.random.default_rng(0)
        traces = rows_of(traces, rng.permutation(np.flatnonzero(rng.random(len(traces)) > 0.1)))
    write_traces(tmp_path / "t.parquet", traces)
    expected = in_memory(tmp_path / "t.parquet", tmp_path / "whole.parquet", params)
    report = encode_features_file(tmp_path / "t.parquet", params, tmp_path / "streamed.parquet", max_rows=40)
    assert report == expected
    assert (tmp_path / "streamed.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    if "shuffled" in case:
        assert expected["dropped_missing_layer"] + expected["dropped_missing_target"] > 0


def test_row_groups_are_cut_as_pq_write_table_cuts_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row groups of exactly FEATURE_ROW_GROUP rows, whatever the encoded groups' sizes (here 50
    rows against groups of about 40 trace rows)."""
    monkeypatch.setattr(features_module, "FEATURE_ROW_GROUP", 50)
    traces, _ = generate(SyntheticParams(num_sequences=6, tokens_per_sequence=9, num_layers=4))
    write_traces(tmp_path / "t.parquet", traces)
    encode_features_file(tmp_path / "t.parquet", FeaturesParams(), tmp_path / "streamed.parquet", max_rows=40)
    pq.write_table(features_to_table(encode_features(traces, FeaturesParams())), tmp_path / "whole.parquet",
                   compression="zstd", row_group_size=50)
    assert pq.ParquetFile(tmp_path / "streamed.parquet").metadata.num_row_groups == -(-6 * 9 * 3 // 50)
    assert (tmp_path / "streamed.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()


def test_no_samples_at_all(tmp_path: Path) -> None:
    """Every token is routed at one of two layers only: no sample, as in memory."""
    meta = TraceMeta(num_layers=2, num_experts=4, top_k=2, source="test")
    traces = Traces(meta, seq_id=np.array([0, 0], np.int32), token_pos=np.array([0, 1], np.int32),
                    layer=np.array([0, 1], np.int16), experts=np.array([[0, 1], [2, 3]], np.int16),
                    weights=np.full((2, 2), 0.5, np.float32))
    write_traces(tmp_path / "t.parquet", traces)
    expected = in_memory(tmp_path / "t.parquet", tmp_path / "whole.parquet", FeaturesParams())
    assert encode_features_file(tmp_path / "t.parquet", FeaturesParams(), tmp_path / "streamed.parquet") == expected
    assert expected["samples"] == 0
    assert (tmp_path / "streamed.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()


def test_stage_writes_the_in_memory_encoders_outputs(tmp_path: Path) -> None:
    traces, _ = generate(SyntheticParams(num_sequences=3, tokens_per_sequence=20, num_layers=6))
    write_traces(tmp_path / "t.parquet", traces)
    expected = in_memory(tmp_path / "t.parquet", tmp_path / "whole.parquet", FeaturesParams())
    subprocess.run([sys.executable, str(ROOT / "stages" / "encode_features.py"), str(tmp_path / "t.parquet"),
                    "--params", str(ROOT / "params.yaml"), "--out", str(tmp_path / "f.parquet"),
                    "--report", str(tmp_path / "features.json")], check=True, cwd=ROOT, capture_output=True)
    assert (tmp_path / "f.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    assert json.loads((tmp_path / "features.json").read_text()) == expected
