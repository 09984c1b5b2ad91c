"""The `simulate:` params block and the simulate_prefetch stage script."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, set_params
from routecast.config.params import PRESETS, FeaturesParams, ParamsError, SyntheticParams, load_params
from routecast.data.features import encode_features
from routecast.data.predictions import prediction_ranks, write_predictions
from routecast.data.traces import write_traces
from routecast.sources.synthetic import generate


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


def test_preset_fills_the_nulls_and_an_explicit_number_wins(params_file: Path) -> None:
    sim = load_params(params_file).simulate
    assert sim.hardware() == PRESETS[sim.preset]
    set_params(params_file, {"simulate.preset": "mixtral_3bit_t4", "simulate.link.gb_per_s": 6.5})
    hw = load_params(params_file).simulate.hardware()
    preset = PRESETS["mixtral_3bit_t4"]
    assert hw.gb_per_s == 6.5
    assert (hw.expert_mb, hw.ms_per_layer, hw.slots_per_layer) == (preset.expert_mb, preset.ms_per_layer,
                                                                    preset.slots_per_layer)


def test_no_preset_needs_every_number(params_file: Path) -> None:
    set_params(params_file, {"simulate.preset": None})
    with pytest.raises(ParamsError) as info:
        load_params(params_file)
    assert info.value.key == "simulate.expert_mb" and "simulate.preset is null" in str(info.value)
    set_params(params_file, {"simulate.expert_mb": 100, "simulate.link.gb_per_s": 10,
                             "simulate.compute.ms_per_layer": 1, "simulate.cache.slots_per_layer": 4})
    hw = load_params(params_file).simulate.hardware()
    assert (hw.expert_mb, hw.gb_per_s, hw.ms_per_layer, hw.slots_per_layer) == (100, 10, 1, 4)


@pytest.mark.parametrize(("updates", "key"), [
    ({"simulate.link.gb_per_s": -25}, "simulate.link.gb_per_s"),
    ({"simulate.link.gb_per_s": 0}, "simulate.link.gb_per_s"),
    ({"simulate.preset": "h100_nvlink"}, "simulate.preset"),
    ({"simulate.expert_mb": -1}, "simulate.expert_mb"),
    ({"simulate.compute.ms_per_layer": -0.5}, "simulate.compute.ms_per_layer"),
    ({"simulate.cache.slots_per_layer": 0}, "simulate.cache.slots_per_layer"),
    ({"simulate.cache.eviction": "fifo"}, "simulate.cache.eviction"),
    ({"simulate.prefetch.width": 0}, "simulate.prefetch.width"),
    ({"simulate.prefetch.width": 9}, "simulate.prefetch.width"),  # wider than the cache
    ({"simulate.prefetch.predictor_ms": {"tuned": -1}}, "simulate.prefetch.predictor_ms.tuned"),
    ({"simulate.prefetch.predictor_ms": {"tuned": "fast"}}, "simulate.prefetch.predictor_ms.tuned"),
    ({"simulate.sweep.slots": []}, "simulate.sweep.slots"),
    ({"simulate.sweep.width": [1, 1]}, "simulate.sweep.width"),
    ({"simulate.cache.size": 3}, "simulate.cache.size"),
])
def test_bad_simulate_params_name_the_key(params_file: Path, updates: dict, key: str) -> None:
    set_params(params_file, updates)
    with pytest.raises(ParamsError) as info:
        load_params(params_file)
    assert info.value.key == key and key in str(info.value)


@pytest.mark.parametrize(("updates", "key"), [
    ({"simulate.cache.slots_per_layer": 9}, "simulate.cache.slots_per_layer"),  # more slots than experts
    ({"simulate.cache.slots_per_layer": 1}, "simulate.cache.slots_per_layer"),  # fewer than top_k
    ({"simulate.cache.slots_per_layer": 8, "simulate.prefetch.width": 9}, "simulate.prefetch.width"),
    ({"simulate.sweep.slots": [2, 12]}, "simulate.sweep.slots"),
    ({"simulate.sweep.width": [4]}, "simulate.sweep.width"),  # the preset's 3 slots hold at most 3
])
def test_params_that_do_not_fit_the_trace_name_the_key(params_file: Path, updates: dict, key: str) -> None:
    set_params(params_file, updates)
    with pytest.raises(ParamsError) as info:
        load_params(params_file).simulate.check_shape(num_experts=8, top_k=2)
    assert info.value.key == key


# --------------------------------------------------------------------------- the stage script


def stage_inputs(tmp_path: Path) -> tuple[Path, Path]:
    traces, _ = generate(SyntheticParams(num_sequences=5, tokens_per_sequence=24, num_layers=6, num_experts=8, top_k=2))
    feats = encode_features(traces, FeaturesParams())
    test = feats.take(np.isin(feats.seq_id, [4, 2]))
    r = prediction_ranks(8)
    rng = np.random.default_rng(0)
    rankings = {"random": np.stack([rng.permutation(8)[:r] for _ in range(len(test))]),
                "tuned": np.concatenate([test.target_set, np.tile(np.arange(8), (len(test), 1))], axis=1)}
    rankings["tuned"] = np.stack([list(dict.fromkeys(row))[:r] for row in rankings["tuned"].tolist()])
    write_traces(tmp_path / "traces.parquet", traces)
    write_predictions(tmp_path / "predictions.parquet", test, rankings)
    return tmp_path / "traces.parquet", tmp_path / "predictions.parquet"


def run_stage(tmp_path: Path, params: Path) -> subprocess.CompletedProcess:
    traces, predictions = tmp_path / "traces.parquet", tmp_path / "predictions.parquet"
    cmd = [sys.executable, str(ROOT / "stages" / "simulate_prefetch.py"), "--traces", str(traces), "--predictions",
           str(predictions), "--params", str(params), "--metrics", str(tmp_path / "prefetch.json"),
           "--slots-plot", str(tmp_path / "slots.csv"), "--width-plot", str(tmp_path / "width.csv")]
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def test_stage_writes_metrics_and_plots_and_stops_cleanly_on_bad_params(tmp_path: Path, params_file: Path) -> None:
    stage_inputs(tmp_path)
    set_params(params_file, {"simulate.prefetch.predictor_ms": {"tuned": 0.2}})
    proc = run_stage(tmp_path, params_file)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "prefetch.json").read_text())
    bounds = ["on_demand", "perfect", "belady", "clairvoyant", "compute_floor"]
    assert list(metrics) == [*bounds, "random", "tuned", "replay", "engine"]
    for name in (*bounds, "random", "tuned"):
        assert set(metrics[name]) == {"hit_rate", "prefetch_precision", "mb_per_token", "stall_ms_per_token",
                                      "ms_per_token", "speedup_vs_on_demand", "gap_closed"}
    assert metrics["perfect"]["stall_ms_per_token"] <= metrics["tuned"]["stall_ms_per_token"]
    stall = {name: metrics[name]["stall_ms_per_token"] for name in bounds}
    assert stall["compute_floor"] == 0 <= stall["clairvoyant"] <= min(stall["perfect"], stall["belady"])
    assert stall["belady"] <= stall["on_demand"]
    assert metrics["replay"] == {"sequences": 2, "tokens": 48, "missing_layers": 0, "predicted_share": 1.0}
    assert metrics["engine"]["transfer_ms"] == pytest.approx(352.321536 / 25)
    with open(tmp_path / "slots.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted({int(r["slots"]) for r in rows}) == list(range(2, 9))  # max(top_k, width) .. num_experts
    assert {r["predictor"] for r in rows} == {*bounds, "random", "tuned"}
    with open(tmp_path / "width.csv") as fh:
        assert sorted({int(r["width"]) for r in csv.DictReader(fh)}) == [1, 2, 3]  # 1 .. the preset's slots
    before = (tmp_path / "prefetch.json").read_text()

    set_params(params_file, {"simulate.cache.slots_per_layer": 9})
    proc = run_stage(tmp_path, params_file)
    assert proc.returncode == 1
    assert "simulate.cache.slots_per_layer" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "prefetch.json").read_text() == before  # what was written stays

    set_params(params_file, {"simulate.cache.slots_per_layer": None, "simulate.prefetch.predictor_ms": {"tunde": 1}})
    proc = run_stage(tmp_path, params_file)
    assert proc.returncode == 1 and "simulate.prefetch.predictor_ms.tunde: no such predictor" in proc.stderr


def test_predictions_that_do_not_match_the_trace_stop_the_stage_in_one_line(tmp_path: Path, params_file: Path) -> None:
    """A predictions file made for another trace is bad input (PredictionsError is an InputError):
    one line naming the file, no traceback."""
    stage_inputs(tmp_path)
    other, _ = generate(SyntheticParams(num_sequences=5, tokens_per_sequence=24, num_layers=6, num_experts=7, top_k=2))
    write_traces(tmp_path / "traces.parquet", other)
    set_params(params_file, {"simulate.prefetch.predictor_ms": {"tuned": 0.2}})
    proc = run_stage(tmp_path, params_file)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line]
    assert len(errors) == 1 and "simulate_prefetch failed: " in errors[0], proc.stderr
    assert "predictions.parquet: num_experts = 8, but " in errors[0] and "traces.parquet has 7" in errors[0], errors[0]
