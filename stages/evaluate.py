"""evaluate: score the trained models and the reference predictors on the held-out test split."""

import argparse
import logging

from routecast.artifacts import write_csv, write_json
from routecast.evaluation import ModelScorer, per_layer_top2, ranked, score_metrics
from routecast.features import read_features
from routecast.model import load_model
from routecast.params import load_params
from routecast.predictions import prediction_ranks, write_predictions
from routecast.reference import reference_predictors
from routecast.stage import stage
from routecast.traces import read_trace_meta

log = logging.getLogger("routecast.evaluate")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", default="data/traces.parquet", help="for the trace's source (the oracle)")
    parser.add_argument("--train", default="data/train.parquet", help="fits the reference predictors")
    parser.add_argument("--test", default="data/test.parquet")
    parser.add_argument("--models", nargs="+", default=["data/models/baseline.pt", "data/models/tuned.pt"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics", default="metrics/evaluate.json")
    parser.add_argument("--per-layer", default="metrics/evaluate/per_layer_top2.csv")
    parser.add_argument("--per-layer-long", default="metrics/evaluate/per_layer_top2_long.csv",
                        help="the same in long form (layer, predictor, top2), for a plot whatever the predictors")
    parser.add_argument("--confusion", default="metrics/evaluate/confusion_tuned.csv",
                        help="one row per test sample (actual, predicted top-1) of the --confusion-model")
    parser.add_argument("--confusion-model", default="tuned")
    parser.add_argument("--predictions", required=True,
                        help="every predictor's ranked experts per test sample (read by simulate_prefetch)")
    args = parser.parse_args()
    with stage("evaluate"):
        params = load_params(args.params)
        train, test = read_features(args.train), read_features(args.test)
        predictors = [ModelScorer(path.rsplit("/", 1)[-1].removesuffix(".pt"), load_model(path)[0],
                                  params.evaluate.batch_size) for path in args.models]
        predictors += reference_predictors(read_trace_meta(args.traces), train)
        names = [p.name for p in predictors]
        if args.confusion_model not in names:
            raise ValueError(f"--confusion-model {args.confusion_model}: no such predictor (have {', '.join(names)})")
        metrics, per_layer, confusion, rankings = {}, {}, None, {}
        for predictor in predictors:
            scores = predictor.scores(test)
            metrics[predictor.name] = score_metrics(scores, test)
            per_layer[predictor.name] = per_layer_top2(scores, test)
            rankings[predictor.name] = ranked(scores, prediction_ranks(test.meta.num_experts))
            if predictor.name == args.confusion_model:
                confusion = list(zip(test.target.tolist(), ranked(scores, 1)[:, 0].tolist()))
            log.info("%-16s top-1 %.4f  top-2 %.4f", predictor.name, metrics[predictor.name]["top1"],
                     metrics[predictor.name]["top2"])
        if "oracle" in metrics and "tuned" in metrics:
            metrics["tuned"]["top2_vs_oracle"] = metrics["tuned"]["top2"] / metrics["oracle"]["top2"]
        write_json(args.metrics, metrics)
        write_predictions(args.predictions, test, rankings)
        layers = sorted(per_layer[names[0]])
        write_csv(args.per_layer, ["layer", *names], [[layer, *(per_layer[n][layer] for n in names)] for layer in layers])
        write_csv(args.per_layer_long, ["layer", "predictor", "top2"],
                  [[layer, n, per_layer[n][layer]] for n in names for layer in layers])
        write_csv(args.confusion, ["actual", "predicted"], confusion)
