"""The `simulate:` params block and the simulate_prefetch stage script."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, set_params
from routecast.config.params import CpuParams, FeaturesParams, ParamsError, SyntheticParams, load_params
from routecast.data.features import encode_features
from routecast.data.predictions import prediction_ranks, write_predictions
from routecast.data.traces import write_traces
from routecast.sources.synthetic import generate


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


MIXTRAL = (32, 8, 2, "synthetic")  # a trace shaped like Mixtral-8x7B: the synthetic default


def test_the_preset_and_the_model_give_every_number_and_an_explicit_one_wins(params_file: Path) -> None:
    """The default machine with Mixtral's weights gives the numbers docs/prefetch.md derives: a bf16
    expert 352.3 MB, 3 per layer in 37.9 GB, 0.68 ms a layer; a number set in params wins."""
    hw = load_params(params_file).simulate.engine_numbers(*MIXTRAL)
    assert hw.expert_mb == pytest.approx(352.321536) and hw.slots_per_layer == 3 and hw.gb_per_s == 25
    assert hw.ms_per_layer == pytest.approx(0.68, abs=0.01) and hw.cpu_ms == 0
    set_params(params_file, {"simulate.preset": "mixtral_3bit_t4", "simulate.link.gb_per_s": 6.5})
    hw = load_params(params_file).simulate.engine_numbers(*MIXTRAL)
    assert (hw.gb_per_s, hw.slots_per_layer) == (6.5, 4)  # mixtral-offloading's 4 experts per layer on the T4
    assert hw.expert_mb == pytest.approx(176.160768 * 2.6 / 8)
    set_params(params_file, {"simulate.cache.slots_per_layer": 6, "simulate.expert_mb": 100.0,
                             "simulate.cpu.fallback": True, "simulate.cpu.gb_per_s": 50.0})
    hw = load_params(params_file).simulate.engine_numbers(*MIXTRAL)
    assert (hw.slots_per_layer, hw.expert_mb, hw.cpu_ms) == (6, 100.0, 2.0)


def test_slots_follow_from_the_memory_and_the_models_known_by_source_or_shape(params_file: Path) -> None:
    """At the default machine (37.9 GB for experts) the shared logs' models fit whole: DeepSeek-V2-Lite
    (by its importer) and FLAME-MoE-290M hold all 64 experts of every layer; their own presets'
    memory holds fewer; a trace of no known shape needs the numbers set."""
    sim = load_params(params_file).simulate
    deepseek = sim.engine_numbers(26, 64, 6, "import:deepseek_csv")
    assert deepseek.slots_per_layer == 64 and deepseek.expert_mb == pytest.approx(3 * 2048 * 1408 * 2 / 1e6)
    flame = sim.engine_numbers(25, 64, 6, "import:flame_csv")
    assert flame.slots_per_layer == 64 and flame.expert_mb == pytest.approx(3 * 1024 * 704 * 2 / 1e6)
    assert sim.engine_numbers(26, 64, 6).expert_mb == deepseek.expert_mb  # no source: by its shape
    own = dataclasses.replace(sim, preset="deepseek_v2_lite_int8_pcie4").engine_numbers(26, 64, 6,
                                                                                        "import:deepseek_csv")
    assert own.slots_per_layer == 6  # 10% of the experts (MoE-Beyond's setting)
    with pytest.raises(ParamsError) as info:
        sim.engine_numbers(12, 16, 4, "import:jsonl")
    assert info.value.key == "simulate.expert_mb" and "not a known model" in str(info.value)
    with pytest.raises(ParamsError) as info:  # Fiddler's GPU holds 1 bf16 expert per layer: its CPU computes the rest
        dataclasses.replace(sim, preset="fiddler_rtx6000_bf16").engine_numbers(*MIXTRAL)
    assert info.value.key == "simulate.cache.expert_gb" and "cpu.fallback" in str(info.value)
    fiddler = dataclasses.replace(sim, preset="fiddler_rtx6000_bf16", cpu=CpuParams(fallback=True))
    assert fiddler.engine_numbers(*MIXTRAL).slots_per_layer == 1
    assert fiddler.engine_numbers(*MIXTRAL).cpu_ms == pytest.approx(352.321536 / 128)


def test_a_cache_shared_by_every_layer_takes_its_budget_from_the_memory(params_file: Path) -> None:
    """cache.scope: model: one budget, 37.9 GB of 352.3 MB experts = 107 on the default machine, or
    slots_total; the per-layer and shared knobs each refuse the other scope."""
    set_params(params_file, {"simulate.cache.scope": "model"})
    hw = load_params(params_file).simulate.engine_numbers(*MIXTRAL)
    assert (hw.slots_total, hw.slots_per_layer) == (107, 8)
    set_params(params_file, {"simulate.cache.slots_total": 40})
    assert load_params(params_file).simulate.engine_numbers(*MIXTRAL).slots_total == 40
    set_params(params_file, {"simulate.cache.slots_total": 3})
    with pytest.raises(ParamsError) as info:
        load_params(params_file).simulate.check_shape(*MIXTRAL)
    assert info.value.key == "simulate.cache.slots_total"
    for updates, key in (({"simulate.cache.slots_total": None, "simulate.cache.slots_per_layer": 3},
                          "simulate.cache.slots_per_layer"),
                         ({"simulate.cache.scope": "layer", "simulate.cache.slots_per_layer": None,
                           "simulate.cache.slots_total": 40}, "simulate.cache.slots_total")):
        set_params(params_file, updates)
        with pytest.raises(ParamsError) as info:
            load_params(params_file)
        assert info.value.key == key


def test_miss_bits_is_the_share_of_the_presets_precision_a_miss_moves(params_file: Path) -> None:
    set_params(params_file, {"simulate.miss_bits": 4})
    assert load_params(params_file).simulate.engine_numbers(*MIXTRAL).miss_fraction == 0.25  # of bf16
    set_params(params_file, {"simulate.miss_bits": 16})
    with pytest.raises(ParamsError) as info:
        load_params(params_file).simulate.engine_numbers(*MIXTRAL)
    assert info.value.key == "simulate.miss_bits" and "below the preset's 16" in str(info.value)


def test_no_preset_needs_every_number(params_file: Path) -> None:
    set_params(params_file, {"simulate.preset": None})
    with pytest.raises(ParamsError) as info:
        load_params(params_file).simulate.engine_numbers(*MIXTRAL)
    assert info.value.key == "simulate.expert_mb" and "simulate.preset is null" in str(info.value)
    set_params(params_file, {"simulate.expert_mb": 100, "simulate.link.gb_per_s": 10,
                             "simulate.compute.ms_per_layer": 1, "simulate.cache.slots_per_layer": 4})
    hw = load_params(params_file).simulate.engine_numbers(*MIXTRAL)
    assert (hw.expert_mb, hw.gb_per_s, hw.ms_per_layer, hw.slots_per_layer) == (100, 10, 1, 4)


@pytest.mark.parametrize(("updates", "key"), [
    ({"simulate.link.gb_per_s": -25}, "simulate.link.gb_per_s"),
    ({"simulate.link.gb_per_s": 0}, "simulate.link.gb_per_s"),
    ({"simulate.preset": "h100_nvlink"}, "simulate.preset"),
    ({"simulate.expert_mb": -1}, "simulate.expert_mb"),
    ({"simulate.compute.ms_per_layer": -0.5}, "simulate.compute.ms_per_layer"),
    ({"simulate.cache.slots_per_layer": 0}, "simulate.cache.slots_per_layer"),
    ({"simulate.cache.expert_gb": 0}, "simulate.cache.expert_gb"),
    ({"simulate.cache.eviction": "fifo"}, "simulate.cache.eviction"),
    ({"simulate.model": "gpt4"}, "simulate.model"),
    ({"simulate.cpu.fallback": True, "simulate.link.queue": "fifo"}, "simulate.cpu.fallback"),
    ({"simulate.cpu.gb_per_s": -3}, "simulate.cpu.gb_per_s"),
    ({"simulate.miss_bits": 0}, "simulate.miss_bits"),
    ({"simulate.miss_bits": 4, "simulate.link.queue": "fifo"}, "simulate.miss_bits"),
    ({"simulate.prefetch.width": 0}, "simulate.prefetch.width"),
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
    ({"simulate.prefetch.width": 4}, "simulate.prefetch.width"),  # wider than the cache
    ({"simulate.preset": "deepseek_v2_lite_int8_pcie4"}, "simulate.cache.expert_gb"),  # 1.35 GB: no bf16 expert
])
def test_params_that_do_not_fit_the_trace_name_the_key(params_file: Path, updates: dict, key: str) -> None:
    set_params(params_file, updates)
    with pytest.raises(ParamsError) as info:
        load_params(params_file).simulate.check_shape(*MIXTRAL)
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
    stage_inputs(tmp_path)  # 6 layers: the default machine would hold every expert; 3 slots as for 32 layers
    set_params(params_file, {"simulate.prefetch.predictor_ms": {"tuned": 0.2}, "simulate.cache.slots_per_layer": 3})
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
