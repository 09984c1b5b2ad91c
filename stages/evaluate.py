"""evaluate: score the trained models and the reference predictors on the held-out test split
(and on `evaluate.extra_tests`), with intervals from a bootstrap over test sequences."""

import argparse
from pathlib import Path

from routecast.config.params import load_params
from routecast.data.features import read_features
from routecast.data.predictions import write_predictions
from routecast.data.traces import read_trace_meta
from routecast.evaluate.evaluation import evaluate
from routecast.evaluate.names import CONFUSION_COLUMNS, per_horizon_columns, per_layer_columns
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
    parser.add_argument("--per-layer", required=True, help="CSV: test top-2 per source layer (layer, predictor, top2); "
                                                    "set recall (layer, predictor, set_recall) for a trace "
                                                    "without a primary")
    parser.add_argument("--per-horizon", required=True, help="CSV: test top-2 and set recall per horizon "
                                                      "(horizon, predictor, top2, set_recall; set recall alone "
                                                      "for a trace without a primary)")
    parser.add_argument("--confusion", required=True, help="CSV: (actual, predicted top-1) of the tuned model")
    parser.add_argument("--predictions", required=True,
                        help="Parquet: every predictor's ranked experts per test sample")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    with stage("evaluate"):
        params = load_params(args.params)
        checkpoints = {Path(path).stem: load_checkpoint(path) for path in args.models}
        models = {name: model for name, (model, _) in checkpoints.items()}
        fit, val = split_train_val(read_features(args.train))
        test = read_features(args.test)
        # the target each model trained on: train_full records it (settled: never auto); for a file
        # without it, params.train.target settled as train_full settles it
        targets = {name: str(checkpoint.get("target") or params.train.for_samples(fit.meta.weighted).target)
                   for name, (_, checkpoint) in checkpoints.items()}
        result = evaluate(models, read_trace_meta(args.traces), fit, val, test, params.evaluate, params.features,
                          targets)
        write_json(args.metrics, result.metrics)
        write_csv(args.per_layer, per_layer_columns(result.per_layer_metric),
                  [[layer, name, value] for name, layers in result.per_layer.items()
                   for layer, value in layers.items()])
        write_csv(args.per_horizon, per_horizon_columns(result.per_layer_metric), result.per_horizon)
        write_csv(args.confusion, CONFUSION_COLUMNS, result.confusion)
        write_predictions(args.predictions, test, result.rankings, result.target_rankings)


if __name__ == "__main__":
    main()
