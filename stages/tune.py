"""tune: Optuna search on the train split; writes the best config into params.yaml's `tuned:` block.

With `--worker` it only joins the study (same params.yaml and train split, e.g. on another
machine against a PostgreSQL `tune.storage`) and runs trials until the study holds
`tune.n_trials` finished ones; it writes nothing else.
"""

import argparse
import logging

from routecast.artifacts import write_csv, write_json
from routecast.features import read_features
from routecast.params import load_params, write_tuned
from routecast.stage import stage
from routecast.study_storage import redact
from routecast.tuning import (file_digest, history_rows, importance_rows, intermediate_rows, study_name, tune,
                              tune_worker)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train", help="train split (Parquet)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--worker", action="store_true", help="only run trials of the study; write no outputs")
    parser.add_argument("--study-dir", default="data/tune", help="where study.json names the study and its storage")
    parser.add_argument("--metrics", default="metrics/tune.json")
    parser.add_argument("--history", default="metrics/tune/history.csv")
    parser.add_argument("--importances", default="metrics/tune/importances.csv")
    parser.add_argument("--intermediate", default="metrics/tune/intermediate.csv")
    args = parser.parse_args()
    # A worker writes nothing here, and several may share the workspace with the running stage.
    with stage("tune-worker" if args.worker else "tune", exclusive=not args.worker):
        params = load_params(args.params)
        train, digest = read_features(args.train), file_digest(args.train)
        if args.worker:
            tune_worker(params, train, digest)
        else:
            result = tune(params, train, digest)
            write_tuned(result.best, args.params)
            # Always written (also for a database storage), so DVC's `data/tune` output exists.
            write_json(f"{args.study_dir}/study.json",
                       {"study": study_name(params, digest), "storage": redact(params.tune.storage)})
            write_csv(args.history, ["trial", "state", "val_top2", "best_so_far", "seconds"],
                      history_rows(result.trials))
            write_csv(args.importances, ["param", "importance"], importance_rows(result.importances))
            write_csv(args.intermediate, ["trial", "epoch", "val_top2", "state"], intermediate_rows(result.trials))
            write_json(args.metrics, result.summary)
            logging.getLogger("routecast").info("tuned: %s", result.best)
