"""What deeper lookahead buys: the default pipeline trained for horizons [1, 2, 3, 4] (one `dvc repro`
in a fresh copy of the repository), then its test sequences replayed at prefetch depth 1, 2 and 4
on each preset (the priority link, staging), every predictor beside the bounds, into
benchmarks/results/prefetch_depth.json.

    .venv/bin/python benchmarks/prefetch_depth.py
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from common import machine, write_result  # noqa: E402
from conftest import copy_repo, run  # noqa: E402

HORIZONS = [1, 2, 3, 4]
DEPTHS = [1, 2, 4]
PRESETS = ["mixtral_bf16_pcie4", "mixtral_3bit_pcie4", "mixtral_3bit_t4"]


def main() -> None:
    from routecast.config.params import load_params
    from routecast.data.predictions import read_predictions
    from routecast.data.traces import read_traces
    from routecast.sim.prefetch import Engine, build_replay, prefetch_metrics, run_all

    result: dict[str, object] = {"machine": machine(), "horizons": HORIZONS}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_repo(Path(tmp) / "repo", {"features.horizons": HORIZONS}, tiny=False)
        run(["dvc", "repro"], repo)
        result["repro_seconds"] = round(time.perf_counter() - start, 1)
        params = load_params(repo / "params.yaml")
        traces = read_traces(repo / "data" / "traces.parquet")
        replay = build_replay(traces, read_predictions(repo / "data" / "predictions.parquet"))
        result["tuned_kind"] = json.loads((repo / "metrics" / "tune.json").read_text())["best_params"]["kind"]
    predictor_ms = {name: params.simulate.prefetch.ms_for(name) for name in replay.rankings}
    runs: dict[str, dict[str, dict[str, float]]] = {}
    for preset in PRESETS:
        base = Engine.from_params(dataclasses.replace(params.simulate, preset=preset), traces.meta)
        for depth in DEPTHS:
            metrics = prefetch_metrics(run_all(replay, dataclasses.replace(base, depth=depth), predictor_ms))
            runs[f"{preset}/depth{depth}"] = {name: {k: m[k] for k in ("speedup_vs_on_demand", "stall_ms_per_token",
                                                                         "mb_per_token", "gap_closed")}
                                              for name, m in metrics.items()}
            print(preset, depth, {n: round(m["speedup_vs_on_demand"], 3) for n, m in metrics.items()}, flush=True)
    result["runs"] = runs
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_result("prefetch_depth", result)


if __name__ == "__main__":
    main()
