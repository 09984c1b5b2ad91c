"""train_full: fit one predictor (the `baseline` or `tuned` params block) on the train split.

Every kind fits on the train split's fit part and chooses (early stopping, the mixture's
restarts) on its validation sequences; per-epoch metrics go through DVCLive.
"""

import argparse
import logging
import math
from dataclasses import replace

from dvclive import Live

from routecast.config.params import load_params
from routecast.data.features import read_features
from routecast.fit.selection import cache_key, model_path
from routecast.fit.training import fit_predictor, split_train_val
from routecast.fit.tuning import file_digest, trial_code_digest
from routecast.pipeline.artifacts import copy_file
from routecast.pipeline.stage import stage
from routecast.predictors.checkpoints import load_checkpoint, save_trained


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=["baseline", "tuned"], help="which params block builds the model")
    parser.add_argument("--train", required=True, help="train split (Parquet)")
    parser.add_argument("--out", required=True, help="model file")
    parser.add_argument("--live", required=True, help="DVCLive directory for the per-epoch metrics")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--finalists", help="tune's final selection models: one trained exactly so is copied")
    args = parser.parse_args(argv)
    with stage(f"train_full {args.name}"):
        params = load_params(args.params)
        model_params = params.model(args.name)
        fit, val = split_train_val(read_features(args.train))
        train_params = params.train.for_samples(fit.meta.weighted)
        finalist = cache_key(model_params, replace(params, train=train_params), file_digest(args.train),
                             trial_code_digest())
        trained = model_path(args.finalists, finalist) if args.finalists else None
        with Live(dir=args.live, save_dvc_exp=False, dvcyaml=False) as live:
            def log_epoch(epoch: int, row: dict[str, float]) -> None:
                live.step = epoch  # DVCLive's step is the epoch (0: lookup_mlp's table before any step)
                for key, value in row.items():
                    # not the epoch's duration (in the log): committed metrics must reproduce byte for
                    # byte; nor what a kind does not have (the mixture's train loss and lr are NaN)
                    if key not in ("epoch", "seconds") and math.isfinite(value):
                        live.log_metric(key, value)
                live.next_step()

            if trained is not None and trained.exists():
                # tune's final selection trained this very configuration on this split with this code
                # and these training params: the same model, so copied rather than trained twice.
                _, checkpoint = load_checkpoint(trained)
                for row in checkpoint["history"]:
                    log_epoch(int(row["epoch"]), row)
                best_epoch, best_value = checkpoint["best_epoch"], checkpoint["best_value"]
                copy_file(trained, args.out)
                logging.getLogger("routecast").info("%s: tune's finalist %s, copied (trained there in full)",
                                                    args.name, trained.name)
            else:
                result = fit_predictor(model_params, train_params, fit, val, on_epoch=log_epoch, desc=args.name)
                best_epoch, best_value = result.best_epoch, result.best_value
                save_trained(args.out, result, fit.meta, train_params.target)
            live.summary.update({"best_epoch": best_epoch, "best_value": best_value, "kind": model_params.kind})


if __name__ == "__main__":
    main()
