"""evaluate: score the trained models and the reference predictors on the held-out test split
(and on `evaluate.extra_tests`), with intervals from a bootstrap over test sequences."""

import argparse
from pathlib import Path

from routecast.config.params import load_params
from routecast.data.features import read_features
from routecast.data.predictions import write_predictions
from routecast.data.traces import read_trace_meta
from routecast.evaluate.evaluation import evaluate
from routecast.evaluate.names import CONFUSION_COLUMNS, PER_LAYER_COLUMNS
from routecast.fit.training import split_train_val
from routecast.pipeline.artifacts import write_csv, write_json
from routecast.pipeline.stage import stage
from routecast.predictors.checkpoints import load_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", required=True, help="the canonical trace (its source: the oracle)")
    parser.add_argument("--train", required=True, help="train split: its fit part fits the reference predictors, "
                                                       "its validation part is scored too")
    parser.add_argument("--test", required=True, help="test split")
    parser.add_argument("--models", nargs="+", required=True, help="model files; each is named after its file")
    parser.add_argument("--metrics", required=True, help="metrics JSON")
    parser.add_argument("--per-layer", required=True, help="CSV: test top-2 per source layer (layer, predictor, top2)")
    parser.add_argument("--confusion", required=True, help="CSV: (actual, predicted top-1) of the tuned model")
    parser.add_argument("--predictions", required=True,
                        help="Parquet: every predictor's ranked experts per test sample")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    with stage("evaluate"):
        params = load_params(args.params)
        models = {Path(path).stem: load_checkpoint(path)[0] for path in args.models}
        fit, val = split_train_val(read_features(args.train))
        test = read_features(args.test)
        result = evaluate(models, read_trace_meta(args.traces), fit, val, test, params.evaluate, params.features)
        write_json(args.metrics, result.metrics)
        write_csv(args.per_layer, PER_LAYER_COLUMNS,
                  [[layer, name, top2] for name, layers in result.per_layer.items() for layer, top2 in layers.items()])
        write_csv(args.confusion, CONFUSION_COLUMNS, result.confusion)
        write_predictions(args.predictions, test, result.rankings)


if __name__ == "__main__":
    main()
