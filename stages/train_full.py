"""train_full: train one model (`baseline` or `tuned` params) on the whole train split."""

import argparse

from routecast.artifacts import write_csv
from routecast.features import read_features
from routecast.model import save_model
from routecast.params import load_params
from routecast.stage import stage
from routecast.training import split_train_val, train_model

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=["baseline", "tuned"], help="which params block builds the model")
    parser.add_argument("--train", default="data/train.parquet")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", help="model file (default: data/models/NAME.pt)")
    parser.add_argument("--history", help="per-epoch CSV (default: metrics/train/NAME.csv)")
    args = parser.parse_args()
    with stage(f"train_full {args.name}"):
        params = load_params(args.params)
        fit, val = split_train_val(read_features(args.train))
        result = train_model(params.model(args.name), params.train, fit, val, desc=args.name)
        save_model(args.out or f"data/models/{args.name}.pt", result.model,
                   {"history": result.history, "best_epoch": result.best_epoch, "best_val_top2": result.best_val_top2,
                    "position_scale": fit.meta.position_scale})
        columns = list(result.history[0])
        write_csv(args.history or f"metrics/train/{args.name}.csv", columns,
                  [[row[c] for c in columns] for row in result.history])
