"""The engine policies on the default run's test sequences, every preset: the link (priority, the
default, and fifo), width 2 and 1, the bounds, and the CPU fallback at an assumed host bandwidth,
into benchmarks/results/prefetch_policies.json. Reads the workspace's `data/traces.parquet` and
`data/predictions.parquet` (run `dvc repro` first); the figures are simulated times (counts of a
deterministic replay), so the machine's load does not change them.

    .venv/bin/python benchmarks/prefetch_policies.py [--cpu-gb-per-s 100]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import machine, write_result  # noqa: E402

PRESETS = ["mixtral_bf16_pcie4", "mixtral_3bit_pcie4", "mixtral_3bit_t4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-gb-per-s", type=float, default=100.0,
                        help="host memory bandwidth for the CPU fallback (issue 21's estimate; no preset has one)")
    args = parser.parse_args()
    from routecast.config.params import load_params
    from routecast.data.predictions import read_predictions
    from routecast.data.traces import read_traces
    from routecast.sim.prefetch import Engine, build_replay, run_all

    params = load_params(ROOT / "params.yaml")
    traces = read_traces(ROOT / "data" / "traces.parquet")
    replay = build_replay(traces, read_predictions(ROOT / "data" / "predictions.parquet"))
    predictor_ms = {name: params.simulate.prefetch.ms_for(name) for name in replay.rankings}
    runs: dict[str, dict[str, dict[str, float]]] = {}
    for preset in PRESETS:
        base = Engine.from_params(dataclasses.replace(params.simulate, preset=preset), traces.meta)
        policies = {
            f"{queue}/width{width}": dataclasses.replace(base, queue=queue, width=width)
            for queue in ("priority", "fifo") for width in (2, 1)
        } | {f"priority/width2/cpu/{eviction}": dataclasses.replace(base, cpu_ms=base.expert_mb / args.cpu_gb_per_s,
                                                                      eviction=eviction)
             for eviction in ("lru", "belady")}
        reference = run_all(replay, base, predictor_ms)["on_demand"].ms_per_token  # on-demand LRU, no CPU
        for policy, engine in policies.items():
            results = run_all(replay, engine, predictor_ms)
            runs[f"{preset}/{policy}"] = {
                name: {"speedup_vs_on_demand_lru": reference / r.ms_per_token,
                       "misses_per_token": (r.accesses - r.hits) / r.tokens, "cpu_experts": r.cpu_experts}
                for name, r in results.items()}
            print(preset, policy, {n: round(m["speedup_vs_on_demand_lru"], 3)
                                   for n, m in runs[f"{preset}/{policy}"].items()}, flush=True)
    write_result("prefetch_policies", {"machine": machine(), "cpu_gb_per_s": args.cpu_gb_per_s, "runs": runs})


if __name__ == "__main__":
    main()
