"""train_full: fit one predictor (the `baseline` or `tuned` params block) on the train split.

Every kind fits on the train split's fit part and chooses (early stopping, the mixture's
restarts) on its validation sequences; per-epoch metrics go through DVCLive.
"""

import argparse
import math

from dvclive import Live

from routecast.config.params import load_params
from routecast.data.features import read_features
from routecast.fit.training import fit_predictor, split_train_val
from routecast.pipeline.stage import stage
from routecast.predictors.checkpoints import save_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=["baseline", "tuned"], help="which params block builds the model")
    parser.add_argument("--train", required=True, help="train split (Parquet)")
    parser.add_argument("--out", required=True, help="model file")
    parser.add_argument("--live", required=True, help="DVCLive directory for the per-epoch metrics")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    with stage(f"train_full {args.name}"):
        params = load_params(args.params)
        model_params = params.model(args.name)
        fit, val = split_train_val(read_features(args.train))
        train_params = params.train.for_samples(fit.meta.weighted)
        with Live(dir=args.live, save_dvc_exp=False, dvcyaml=False) as live:
            def log_epoch(epoch: int, row: dict[str, float]) -> None:
                live.step = epoch  # DVCLive's step is the epoch (0: lookup_mlp's table before any step)
                for key, value in row.items():
                    # not the epoch's duration (in the log): committed metrics must reproduce byte for
                    # byte; nor what a kind does not have (the mixture's train loss and lr are NaN)
                    if key not in ("epoch", "seconds") and math.isfinite(value):
                        live.log_metric(key, value)
                live.next_step()

            result = fit_predictor(model_params, train_params, fit, val, on_epoch=log_epoch, desc=args.name)
            live.summary.update({"best_epoch": result.best_epoch, "best_value": result.best_value,
                                 "kind": model_params.kind})
        save_checkpoint(args.out, result.model,
                        {"history": result.history, "best_epoch": result.best_epoch, "best_value": result.best_value,
                         "position_scale": fit.meta.position_scale, "target": train_params.target})


if __name__ == "__main__":
    main()
