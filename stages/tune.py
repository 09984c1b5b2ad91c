"""tune: Optuna search across predictor kinds on the train split; writes the best configuration
into params.yaml's `tuned:` block.

With `--worker` it only joins the study (same params.yaml and train split, e.g. on another
machine against a PostgreSQL `tune.storage`) and runs trials until the study holds
`tune.n_trials` finished ones; it writes nothing else.
"""

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from dvclive import Live

from routecast.config.params import load_params, write_tuned
from routecast.data.features import read_features
from routecast.fit.study_storage import redact
from routecast.fit.tuning import (
    IMPORTANCE_COLUMNS,
    INTERMEDIATE_COLUMNS,
    file_digest,
    importance_rows,
    intermediate_rows,
    tune,
    tune_worker,
)
from routecast.pipeline.artifacts import write_csv, write_json
from routecast.pipeline.stage import stage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train", help="train split (Parquet)")
    parser.add_argument("--worker", action="store_true", help="only run trials of the study; write no outputs")
    parser.add_argument("--study-dir", help="where study.json names the study and its storage")
    parser.add_argument("--metrics", help="the study's summary (JSON)")
    parser.add_argument("--live", help="DVCLive directory: one step per trial (its value, the best so far)")
    parser.add_argument("--importances", help="CSV: fANOVA importance per parameter")
    parser.add_argument("--intermediate", help="CSV: every value a trial reported (trial, epoch, value, state)")
    parser.add_argument("--finalists", help="directory: the final selection's models, which train_full reuses")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    outputs = ("study_dir", "metrics", "live", "importances", "intermediate", "finalists")
    if not args.worker and any(getattr(args, name) is None for name in outputs):
        parser.error("the tune stage needs --" + ", --".join(n.replace("_", "-") for n in outputs) +
                     " (a --worker needs none)")
    # A worker writes nothing here, and several may share the workspace with the running stage.
    with stage("tune-worker" if args.worker else "tune", exclusive=not args.worker):
        params = load_params(args.params)
        train, digest = read_features(args.train), file_digest(args.train)
        params = replace(params, train=params.train.for_samples(train.meta.weighted))  # target auto: settled
        if args.worker:
            tune_worker(params, train, digest)
        else:
            with Live(dir=args.live, save_dvc_exp=False, dvcyaml=False) as live:
                best = [float("-inf")]

                def log_trial(trial) -> None:
                    value = trial.value if trial.value is not None else float("nan")
                    if trial.value is not None:
                        best[0] = max(best[0], trial.value)
                    live.step = trial.number
                    live.log_metric("value", value)
                    live.log_metric("best_so_far", best[0] if best[0] > float("-inf") else float("nan"))
                    live.next_step()

                Path(args.finalists).mkdir(parents=True, exist_ok=True)  # an output even without final selection
                result = tune(params, train, digest, on_trial=log_trial, finalists=args.finalists)
            write_tuned(result.best, args.params)
            # Always written (also for a database storage), so DVC's study output exists. The name is
            # the one the trials ran under, not recomputed: the code's digest is part of it.
            write_json(f"{args.study_dir}/study.json",
                       {"study": result.summary["study"], "storage": redact(params.tune.storage)})
            write_csv(args.importances, IMPORTANCE_COLUMNS, importance_rows(result.importances))
            write_csv(args.intermediate, INTERMEDIATE_COLUMNS, intermediate_rows(result.trials))
            write_json(args.metrics, result.summary)
            logging.getLogger("routecast").info("tuned: %s", result.best)


if __name__ == "__main__":
    main()
