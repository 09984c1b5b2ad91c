"""Which policy and which predictor to deploy on each machine, how far each is from its clairvoyant
bound, and the simulator against published throughput: the README's verdict and calibration tables,
into benchmarks/results/prefetch_verdict.json.

Policies, on the priority link (demand first, wrong prefetches cancelled) at each preset:
eviction `lru` | `lfu` | `predicted` (on demand it has no ranks: the layer visited farthest ahead,
then LRU), a cache per layer or one for every layer (`cache.scope`), with and without the CPU
fallback (where the preset's source gives a CPU). The
reference of every speedup is on-demand LRU with a cache per layer and no CPU (on Fiddler's machine,
which cannot hold two experts a layer, the same with its CPU). The clairvoyant bound of a policy is
the same policy fed the true routing: perfect prefetch and Belady's retention.

Traces:
- the default run's test sequences, in a copy of the project run with `features.next_token: true`
  and horizons [1, 2, 3, 4] (so `predicted` retention has next-token and deeper rankings, and
  prefetch can look 1, 2 or 4 layers ahead), the tuned predictor as `dvc repro` picks it there;
- the shared Mixtral-8x7B log, whole, each of its two problems predicted by tables fitted on the
  other (benchmarks/prefetch_mixtral.py); `lookup_3`, the best table in the published figures,
  stands in for the tuned predictor (the pipeline's test split of this log is one 64-token sequence).

The figures are simulated times (counts of a deterministic replay): the machine's load does not
change them. The pipeline run takes about 4 minutes.

    .venv/bin/python benchmarks/prefetch_verdict.py [--no-pipeline]   # --no-pipeline: the Mixtral log only
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from common import machine, write_result  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "mixtral-8x7b-instruct" / "humaneval_2_routing.jsonl"
MIXTRAL_PRESETS = ["mixtral_bf16_pcie4", "mixtral_3bit_pcie4", "mixtral_3bit_t4", "fiddler_rtx6000_bf16"]
HORIZONS = [1, 2, 3, 4]  # the default run's copy is trained for these, and the next token
DEPTHS = [1, 2, 4]

# Published decode throughput at batch 1 (tokens/s) and the policy each measured.
# mixtral-offloading: Eliseev and Mazur, arXiv:2312.17238, Table 2, 2-bit experts, T4 (Colab), k = 4.
# Fiddler: Kamahori et al., arXiv:2402.07033 v1, github.com/efeslab/fiddler README: "> 3 token/s" on a
# Quadro RTX 6000 (Env1) for uncompressed Mixtral-8x7B.
PUBLISHED = {
    "mixtral_3bit_t4": [
        ("no cache, no prefetch (k = 2: a layer's own experts)", 1.168, {"slots_per_layer": 2}, None),
        ("LRU cache k = 4, no prefetch", 1.567, {}, None),
        ("LRU cache k = 4 + speculative prefetch (full algorithm)", 2.092, {}, "prefetch"),
    ],
    "fiddler_rtx6000_bf16": [
        ("Fiddler: misses computed on the CPU, no prefetch", 3.0, {}, None),
    ],
}


EVICTIONS = ("lru", "lfu", "predicted")  # predicted with no ranks (on demand): layer order, then LRU


def policies(base, cpu_ok: bool, fiddler: bool, layers: int, experts: int):
    """name -> engine: scope / cpu / eviction (the shared cache pools the per-layer cache's memory)."""
    out = {}
    for scope in ("layer", "model"):
        for cpu in ((True,) if fiddler else (False, True) if cpu_ok else (False,)):
            for eviction in EVICTIONS:
                engine = dataclasses.replace(base, eviction=eviction, cpu_ms=base.cpu_ms if cpu else 0.0)
                if scope == "model":
                    engine = dataclasses.replace(engine, slots_total=base.slots_per_layer * layers,
                                                 slots_per_layer=experts)
                out[f"{scope}/{'cpu' if cpu else 'gpu'}/{eviction}"] = engine
    return out


def study_trace(replay, traces, params, presets, tuned: str) -> dict:
    from routecast.config.params import CpuParams
    from routecast.sim.prefetch import Engine, run_all
    from routecast.sim.presets import PRESETS

    out = {}
    for preset in presets:
        fiddler = preset.startswith("fiddler")
        sim = dataclasses.replace(params.simulate, preset=preset, cpu=CpuParams(fallback=True))
        try:
            with_cpu = Engine.from_params(sim, traces.meta)
            cpu_ok = True
        except Exception:  # no CPU figure for this machine
            with_cpu = Engine.from_params(dataclasses.replace(params.simulate, preset=preset), traces.meta)
            cpu_ok = False
        runs = {}
        for name, engine in policies(with_cpu, cpu_ok, fiddler, replay.truth.shape[1], replay.num_experts).items():
            r = run_all(replay, engine)  # the bounds (no ranks) and each predictor, with this eviction
            runs[name] = {**{bound: r[bound].ms_per_token
                             for bound in ("on_demand", "clairvoyant", "belady", "perfect", "compute_floor")},
                          "tuned": r[tuned].ms_per_token,
                          "misses_per_token": {n: miss(r[n]) for n in ("on_demand", tuned, "belady")}}
        default = run_all(replay, with_cpu if fiddler else dataclasses.replace(with_cpu, cpu_ms=0.0))
        low = {}  # a lower-precision copy on a miss (miss_bits), the default engine: bf16 machines, int4 and int2
        for bits in (4, 2) if PRESETS[preset].expert_bits == 16 else ():
            engine = dataclasses.replace(with_cpu if fiddler else dataclasses.replace(with_cpu, cpu_ms=0.0),
                                         miss_fraction=bits / 16)
            r = run_all(replay, engine)
            low[f"miss_bits{bits}"] = {n: {"ms_per_token": r[n].ms_per_token, "mb_per_token": r[n].mb_per_token}
                                       for n in ("on_demand", tuned)}
        every = {n: default["on_demand"].ms_per_token / r.ms_per_token for n, r in default.items()
                 if n not in ("on_demand", "perfect", "belady", "clairvoyant", "compute_floor")}
        reference = runs["layer/cpu/lru" if fiddler else "layer/gpu/lru"]["on_demand"]
        no_pred = min(((n, r["on_demand"]) for n, r in runs.items()), key=lambda x: x[1])
        with_pred = min(((n, r["tuned"]) for n, r in runs.items()), key=lambda x: x[1])
        family = runs[with_pred[0]]
        gap = family["on_demand"] - family["clairvoyant"]
        out[preset] = {
            "engine": {"expert_mb": with_cpu.expert_mb, "transfer_ms": with_cpu.transfer_ms,
                       "compute_ms": with_cpu.compute_ms, "slots_per_layer": with_cpu.slots_per_layer,
                       "cpu_ms": with_cpu.cpu_ms if cpu_ok else None},
            "reference": "on-demand LRU, a cache per layer" + (", CPU fallback" if fiddler else ", no CPU"),
            "reference_ms_per_token": reference,
            "best_no_prediction": {"policy": no_pred[0], "speedup": reference / no_pred[1]},
            "best_tuned": {"policy": with_pred[0] + " + prefetch", "speedup": reference / with_pred[1]},
            "clairvoyant_of_best": {"policy": with_pred[0], "speedup": reference / family["clairvoyant"]},
            "gap_closed": (family["on_demand"] - with_pred[1]) / gap if gap > 1e-9 else None,
            # the tuned predictor (its prefetch on both) with predicted eviction, over LRU, same cache and CPU
            "predicted_vs_lru": {n[:-4]: r["tuned"] / runs[n[:-4] + "/predicted"]["tuned"]
                                 for n, r in runs.items() if n.endswith("/lru")},
            # on demand with predicted eviction's layer order (no ranks), over LRU
            "layer_order_vs_lru": {n[:-4]: r["on_demand"] / runs[n[:-4] + "/predicted"]["on_demand"]
                                   for n, r in runs.items() if n.endswith("/lru")},
            "every_predictor_vs_on_demand": every,  # at the preset's default engine (LRU per layer, width top_k)
            "miss_bits": low,  # the quality cost of computing with the copies is not measured
            "runs": runs,
        }
        v = out[preset]
        print(f"{preset}: best no-prediction {v['best_no_prediction']['policy']} "
              f"{v['best_no_prediction']['speedup']:.3f}x; best tuned {v['best_tuned']['policy']} "
              f"{v['best_tuned']['speedup']:.3f}x; clairvoyant {v['clairvoyant_of_best']['speedup']:.3f}x; gap closed "
              f"{v['gap_closed']}; predicted/lru {({n: round(x, 3) for n, x in v['predicted_vs_lru'].items()})}; "
              f"layer order/lru {({n: round(x, 3) for n, x in v['layer_order_vs_lru'].items()})}; "
              f"worst predictor {min(every.items(), key=lambda x: x[1])}; miss_bits "
              f"{({b: {n: round(reference / x['ms_per_token'], 3) for n, x in v.items()} for b, v in low.items()})}",
              flush=True)
    return out


def depth_study(replay, traces, params) -> dict:
    """Speedup over on demand of the true experts and the tuned predictor prefetched 1, 2 and 4 layers
    ahead (each from its ranking for that horizon), with and without the CPU fallback."""
    from routecast.config.params import CpuParams
    from routecast.sim.prefetch import Engine, run_all

    out = {}
    for preset in MIXTRAL_PRESETS[:3]:
        sim = dataclasses.replace(params.simulate, preset=preset, cpu=CpuParams(fallback=preset != "mixtral_3bit_t4"))
        base = Engine.from_params(sim, traces.meta)
        for cpu in (False, True) if base.cpu_ms else (False,):
            reference = None
            for depth in DEPTHS:
                runs = run_all(replay, dataclasses.replace(base, depth=depth, cpu_ms=base.cpu_ms if cpu else 0.0))
                reference = reference or runs["on_demand"].ms_per_token
                out[f"{preset}/{'cpu' if cpu else 'gpu'}/depth{depth}"] = {
                    n: reference / runs[n].ms_per_token for n in ("perfect", "clairvoyant", "tuned", "oracle")
                    if n in runs}
                print(preset, cpu, depth, {n: round(x, 3) for n, x in out[f"{preset}/{'cpu' if cpu else 'gpu'}/"
                                                                            f"depth{depth}"].items()}, flush=True)
    return out


def miss(r) -> float:
    return (r.accesses - r.hits) / r.tokens


def calibration(replay, traces, params, tuned: str) -> list[dict]:
    """Each published figure beside the simulator's, at the preset's numbers and, for the T4, with the
    link's bandwidth fitted to the no-cache row (the one figure that depends on the link alone)."""
    from routecast.config.params import CpuParams
    from routecast.sim.prefetch import Engine, run_all

    rows = []
    for preset, figures in PUBLISHED.items():
        sim = dataclasses.replace(params.simulate, preset=preset,
                                  cpu=CpuParams(fallback=preset.startswith("fiddler")))
        base = Engine.from_params(sim, traces.meta)
        fitted = None
        for what, published, changes, prefetch in figures:
            engine = dataclasses.replace(base, **changes)
            runs = run_all(replay, engine)
            sim_ms = runs[tuned].ms_per_token if prefetch else runs["on_demand"].ms_per_token
            row = {"preset": preset, "policy": what, "published_tokens_per_s": published,
                   "simulated_tokens_per_s": 1000 / sim_ms, "ratio": 1000 / sim_ms / published}
            if prefetch:
                row["simulated_perfect_prefetch_tokens_per_s"] = 1000 / runs["perfect"].ms_per_token
            if preset == "mixtral_3bit_t4":
                if fitted is None:  # the no-cache row: all its time is the link's, but compute
                    layers = runs["on_demand"].layers / runs["on_demand"].tokens
                    fetched = runs["on_demand"].moved_experts / runs["on_demand"].tokens
                    link_ms = 1000 / published - layers * engine.compute_ms
                    fitted = engine.expert_mb * fetched / link_ms  # GB/s
                    row["fitted_link_gb_per_s"] = fitted
                slow = dataclasses.replace(engine, transfer_ms=engine.expert_mb / fitted,
                                           chunk_ms=engine.expert_mb / fitted / max(1, round(engine.transfer_ms
                                                                                          / engine.chunk_ms)))
                fit_runs = run_all(replay, slow)
                fit_ms = fit_runs[tuned].ms_per_token if prefetch else fit_runs["on_demand"].ms_per_token
                row["simulated_at_fitted_link_tokens_per_s"] = 1000 / fit_ms
                row["ratio_at_fitted_link"] = 1000 / fit_ms / published
                if prefetch:
                    row["simulated_at_fitted_link_perfect_tokens_per_s"] = 1000 / fit_runs["perfect"].ms_per_token
            if preset.startswith("fiddler"):  # one figure: the CPU's effective bandwidth that gives it (a fit)
                low, high = 1.0, 1000.0  # GB/s; the simulated speed rises with it
                for _ in range(40):
                    mid = (low * high) ** 0.5
                    ms = run_all(replay, dataclasses.replace(engine, cpu_ms=engine.expert_mb / mid))["on_demand"]
                    low, high = (mid, high) if 1000 / ms.ms_per_token < published else (low, mid)
                row["fitted_cpu_gb_per_s"] = low
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-pipeline", action="store_true", help="skip the default run (the Mixtral log only)")
    parser.add_argument("--trace", type=Path, default=TRACE)
    args = parser.parse_args()
    from conftest import copy_repo, run
    from prefetch_mixtral import crossfit_replay
    from routecast.config.params import load_params
    from routecast.data.predictions import read_predictions
    from routecast.data.traces import read_traces
    from routecast.sim.prefetch import build_replay

    start = time.perf_counter()
    params = load_params(ROOT / "params.yaml")
    result: dict[str, object] = {"machine": machine()}
    traces, replay = crossfit_replay(args.trace)
    result["mixtral_log"] = {"tokens": replay.tokens, "stand_in_for_tuned": "lookup_3",
                             "verdict": study_trace(replay, traces, params, MIXTRAL_PRESETS, "lookup_3"),
                             "calibration": calibration(replay, traces, params, "lookup_3")}
    if not args.no_pipeline:
        with tempfile.TemporaryDirectory() as tmp:
            repo = copy_repo(Path(tmp) / "repo", {"features.next_token": True, "features.horizons": HORIZONS},
                             tiny=False)
            run(["dvc", "repro"], repo)
            result["repro_seconds"] = round(time.perf_counter() - start, 1)
            traces = read_traces(repo / "data" / "traces.parquet")
            replay = build_replay(traces, read_predictions(repo / "data" / "predictions.parquet"))
        result["default_run"] = {"tokens": replay.tokens,
                                 "verdict": study_trace(replay, traces, params, MIXTRAL_PRESETS, "tuned"),
                                 "depth": depth_study(replay, traces, params),
                                 "calibration": calibration(replay, traces, params, "tuned")}
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_result("prefetch_verdict", result)


if __name__ == "__main__":
    main()
