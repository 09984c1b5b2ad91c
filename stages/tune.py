"""tune: Optuna search on the train split; writes the best config into params.yaml's `tuned:` block."""

import argparse

from routecast.artifacts import write_csv, write_json
from routecast.features import read_features
from routecast.params import load_params, write_tuned
from routecast.stage import stage
from routecast.tuning import file_digest, history_rows, tune

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("train", help="train split (Parquet)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics", default="metrics/tune.json")
    parser.add_argument("--history", default="metrics/tune/history.csv")
    args = parser.parse_args()
    with stage("tune"):
        params = load_params(args.params)
        result = tune(params, read_features(args.train), file_digest(args.train))
        write_tuned(result.best, args.params)
        write_csv(args.history, ["trial", "state", "val_top2", "best_so_far", "seconds"], history_rows(result.trials))
        write_json(args.metrics, result.summary)
