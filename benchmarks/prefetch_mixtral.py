"""What prediction buys on the shared real Mixtral-8x7B trace (../shared/traces/mixtral-8x7b-instruct):
simulate_prefetch's metrics for the bounds and the table predictors at each hardware preset.

The log holds two HumanEval problems, too few for the pipeline's split by sequence, and a random
split would give predictions for only the test samples' 5% of the layers. So this script
cross-fits instead: each problem's predictions come from predictors fitted on the other problem
only (held-out problems, as the published lookup figures), and the whole trace is replayed. The
MLPs are left out (they need train_full on the other problem); frequency and the lookup ladder
are what an engine could build from a routing log alone. Not a timing benchmark: the figures are
simulated milliseconds, deterministic.

    .venv/bin/python benchmarks/prefetch_mixtral.py     # writes benchmarks/results/prefetch_mixtral.json
    .venv/bin/python benchmarks/prefetch_mixtral.py --trace /elsewhere/humaneval_2_routing.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402
from routecast.config.params import FeaturesParams, LogsParams, ParamsError, SimulateParams
from routecast.data.features import encode_features
from routecast.data.predictions import prediction_ranks, read_predictions, write_predictions
from routecast.data.traces import read_traces
from routecast.evaluate.evaluation import ranked
from routecast.predictors.references import FrequencyPredictor, lookup_ladder
from routecast.sim.prefetch import Engine, build_replay, prefetch_metrics, study
from routecast.sim.presets import PRESETS
from routecast.sources.logs import import_logs

TRACE = Path("../shared/traces/mixtral-8x7b-instruct/humaneval_2_routing.jsonl")  # from the project's root


def crossfit_replay(trace: Path):
    """The log's traces and its replay, each problem predicted by the tables fitted on the other."""
    tmp = Path(tempfile.mkdtemp())
    import_logs(LogsParams(format="jsonl", path=str(trace)), tmp / "traces.parquet")
    traces = read_traces(tmp / "traces.parquet")
    feats = encode_features(traces, FeaturesParams())
    r = prediction_ranks(traces.meta.num_experts)
    names = ["frequency", "lookup_1", "lookup_2", "lookup_3"]
    rankings = {name: np.zeros((len(feats), r), dtype=np.int16) for name in names}
    for problem in np.unique(feats.seq_id):
        held_out = feats.seq_id == problem
        train, test = feats.take(~held_out), feats.take(held_out)
        for predictor in [FrequencyPredictor(), *lookup_ladder(3)]:
            rankings[predictor.name][held_out] = ranked(predictor.fit(train).scores(test), r)
    write_predictions(tmp / "predictions.parquet", feats, rankings)
    return traces, build_replay(traces, read_predictions(tmp / "predictions.parquet"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=TRACE)
    args = parser.parse_args()
    traces, replay = crossfit_replay(args.trace)
    results: dict[str, object] = {}
    for preset in PRESETS:
        sim = SimulateParams(preset=preset)
        try:
            engine = Engine.from_params(sim, traces.meta)
        except ParamsError as error:  # a machine whose memory cannot hold Mixtral's layers (DeepSeek's, Fiddler's)
            print(f"{preset}: skipped: {error}")
            continue
        done = study(replay, engine)
        width1 = prefetch_metrics(study(replay, dataclasses.replace(engine, width=1), slots=[engine.slots_per_layer],
                                        widths=[1]).results)
        results[preset] = {
            "engine": dataclasses.asdict(engine),
            "metrics": prefetch_metrics(done.results),
            "metrics_width_1": width1,
            "stall_ms_per_token_by_slots": {str(s): {n: r.stall_ms_per_token for n, r in by.items()}
                                            for s, by in zip(done.slots, done.by_slots)},
        }
        print(f"{preset}: slots {engine.slots_per_layer}, width {engine.width}")
        for name, m in results[preset]["metrics"].items():
            gap = "-" if m["gap_closed"] is None else f"{m['gap_closed']:.2f}"
            print(f"  {name:10s} stall {m['stall_ms_per_token']:8.1f} ms/token  hit {m['hit_rate']:.3f}  "
                  f"speedup {m['speedup_vs_on_demand']:.3f}  gap closed {gap}")
    out = {
        "what": "simulate_prefetch on the shared Mixtral-8x7B HumanEval trace, predictors cross-fitted across "
                "its two problems (each problem predicted by tables fitted on the other)",
        "trace": str(args.trace.name), "tokens": replay.tokens, "missing_layers": replay.missing_layers,
        "predicted_share": replay.predicted_share, "presets": results,
        "command": "python benchmarks/prefetch_mixtral.py",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prefetch_mixtral.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
