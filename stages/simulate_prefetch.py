"""simulate_prefetch: replay the test sequences through an expert-offloading engine, for every predictor."""

import argparse
import logging
import time

from routecast.artifacts import write_csv, write_json
from routecast.params import ParamsError, load_params
from routecast.predictions import read_predictions
from routecast.prefetch import BOUNDS, Engine, build_replay, prefetch_metrics, study
from routecast.stage import stage
from routecast.traces import read_traces

log = logging.getLogger("routecast.simulate_prefetch")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", required=True, help="the canonical trace: the test sequences' true experts")
    parser.add_argument("--predictions", required=True, help="every predictor's ranked experts per test sample")
    parser.add_argument("--params", required=True)
    parser.add_argument("--metrics", required=True, help="JSON: per predictor and bound, at the configured engine")
    parser.add_argument("--slots-plot", required=True, help="CSV (slots, predictor, ...): stall against cache slots")
    parser.add_argument("--width-plot", required=True, help="CSV (width, predictor, ...): hit rate against width")
    args = parser.parse_args()
    with stage("simulate_prefetch"):
        sim = load_params(args.params).simulate
        predictions = read_predictions(args.predictions)
        meta = predictions.meta
        sim.check_shape(meta.num_experts, meta.top_k)
        unknown = sorted(set(sim.prefetch.predictor_ms) - set(predictions.rankings))
        if unknown:
            raise ParamsError(f"simulate.prefetch.predictor_ms.{unknown[0]}",
                              f"no such predictor in {args.predictions} (have {', '.join(predictions.rankings)})",
                              source=args.params)
        replay = build_replay(read_traces(args.traces), predictions, args.traces, args.predictions)
        engine = Engine.from_params(sim, meta.top_k)
        predictor_ms = {name: sim.prefetch.ms_for(name) for name in predictions.rankings}
        log.info("engine: preset %s, %s; one expert %.2f ms over the link, %.3f ms compute per layer",
                 sim.preset, engine, engine.transfer_ms, engine.compute_ms)

        start = time.perf_counter()
        done = study(replay, engine, predictor_ms, sim.sweep.slots, sim.sweep.width)
        elapsed = time.perf_counter() - start
        steps = done.replays * replay.tokens * replay.truth.shape[1]
        log.info("%d replays of %d token-layer steps each in %.1fs (%.2fM steps/s, JIT compile or cache load included)",
                 done.replays, replay.tokens * replay.truth.shape[1], elapsed, steps / elapsed / 1e6)

        metrics = prefetch_metrics(done.results)
        for name, m in metrics.items():
            gap = "-" if m["gap_closed"] is None else f"{m['gap_closed']:.3f}"
            log.info("%-16s hit %.3f  stall %8.2f ms/token  %8.1f MB/token  speedup %.3f  gap closed %s", name,
                     m["hit_rate"], m["stall_ms_per_token"], m["mb_per_token"], m["speedup_vs_on_demand"], gap)
        metrics["replay"] = {"sequences": replay.sequences, "tokens": replay.tokens,
                             "missing_layers": replay.missing_layers, "predicted_share": replay.predicted_share}
        metrics["engine"] = {"expert_mb": engine.expert_mb, "transfer_ms": engine.transfer_ms,
                             "compute_ms_per_layer": engine.compute_ms, "slots_per_layer": engine.slots_per_layer,
                             "width": engine.width}
        write_json(args.metrics, metrics)
        names = [*BOUNDS, *predictions.rankings]
        write_csv(args.slots_plot, ["slots", "predictor", "stall_ms_per_token", "hit_rate", "mb_per_token"],
                  [[s, n, r[n].stall_ms_per_token, r[n].hit_rate, r[n].mb_per_token]
                   for s, r in zip(done.slots, done.by_slots) for n in names])
        write_csv(args.width_plot, ["width", "predictor", "hit_rate", "stall_ms_per_token", "prefetch_precision"],
                  [[w, n, r[n].hit_rate, r[n].stall_ms_per_token, r[n].prefetch_precision]
                   for w, r in zip(done.widths, done.by_width) for n in names])
