"""simulate_prefetch: replay the test sequences through an expert-offloading engine, for every predictor."""

import argparse

from routecast.config.params import load_params
from routecast.data.predictions import read_predictions
from routecast.data.traces import read_traces
from routecast.pipeline.artifacts import write_csv, write_json
from routecast.pipeline.stage import stage
from routecast.sim.names import SLOTS_COLUMNS, WIDTH_COLUMNS
from routecast.sim.prefetch import simulate_prefetch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", required=True, help="the canonical trace: the test sequences' true experts")
    parser.add_argument("--predictions", required=True, help="every predictor's ranked experts per test sample")
    parser.add_argument("--params", required=True)
    parser.add_argument("--metrics", required=True, help="JSON: per predictor and bound, at the configured engine")
    parser.add_argument("--slots-plot", required=True, help="CSV (slots, predictor, ...): stall against cache slots")
    parser.add_argument("--width-plot", required=True, help="CSV (width, predictor, ...): hit rate against width")
    args = parser.parse_args(argv)
    with stage("simulate_prefetch"):
        result = simulate_prefetch(read_traces(args.traces), read_predictions(args.predictions),
                                   load_params(args.params).simulate, args.traces, args.predictions)
        write_json(args.metrics, result.metrics)
        write_csv(args.slots_plot, SLOTS_COLUMNS, result.slots_rows)
        write_csv(args.width_plot, WIDTH_COLUMNS, result.width_rows)


if __name__ == "__main__":
    main()
