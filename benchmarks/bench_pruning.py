"""Pruning benchmark: the same trial budget with per-kind median pruning (the default), Hyperband and
no pruning, on the default data.

Builds the train split the default params.yaml describes (synthetic traces -> features -> split,
through the library, as `dvc repro` would), then runs the `tune` search twice in fresh journal
studies, `tune.pruner: none`, `median` and `hyperband`, everything else as in params.yaml.
Writes benchmarks/results/pruning.json: wall time of each, the ratios to no pruning, each best
validation top-2 and the kind it picked.

    .venv/bin/python benchmarks/bench_pruning.py [--params params.yaml] [--n-trials N] [--epochs E]
                                                 [--max-train-samples M]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from routecast.config.params import load_params
from routecast.data.features import encode_features, write_features
from routecast.data.split import split_features
from routecast.fit.training import set_threads
from routecast.fit.tuning import file_digest, tune
from routecast.sources.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--n-trials", type=int, help="override tune.n_trials")
    parser.add_argument("--epochs", type=int, help="override tune.epochs")
    parser.add_argument("--max-train-samples", type=int, help="override tune.max_train_samples (per-trial subsample)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pruning.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")

    params = load_params(args.params)
    overrides = {k: v for k, v in (("n_trials", args.n_trials), ("epochs", args.epochs),
                                   ("max_train_samples", args.max_train_samples)) if v is not None}
    start = time.perf_counter()
    traces, _ = generate(params.extract.synthetic)
    train, _ = split_features(encode_features(traces, params.features), params.split)
    print(f"data: {len(train)} train samples (incl. validation) in {time.perf_counter() - start:.1f}s")

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_features(Path(tmp) / "train.parquet", train)
        digest = file_digest(Path(tmp) / "train.parquet")
        for pruner in ("none", "median", "hyperband"):
            tune_params = dataclasses.replace(params.tune, pruner=pruner, storage=f"{tmp}/{pruner}.log", **overrides)
            run_params = dataclasses.replace(params, tune=tune_params)
            start = time.perf_counter()
            result = tune(run_params, train, digest)
            wall = time.perf_counter() - start
            s = result.summary
            runs[pruner] = {"wall_seconds": round(wall, 1), "best_val_top2": round(result.best_value, 4),
                            "best_kind": result.best.kind,
                            "best_trial": s["best_trial"], "n_complete": s["n_complete"], "n_pruned": s["n_pruned"],
                            "epochs_trained": s["epochs_trained"]}
            print(f"pruner={pruner:9s} wall {wall:7.1f}s  best val top-2 {result.best_value:.4f}  "
                  f"complete {s['n_complete']}, pruned {s['n_pruned']}, epochs trained {s['epochs_trained']}")

    tune_params = dataclasses.replace(params.tune, **overrides)
    report = {
        "command": "python benchmarks/bench_pruning.py" + "".join(
            f" --{k.replace('_', '-')} {v}" for k, v in overrides.items()),
        "n_trials": tune_params.n_trials,
        "epochs_per_trial": tune_params.epochs,
        "sampler": tune_params.sampler,
        "max_train_samples": tune_params.max_train_samples,
        "train_samples": s["train_samples"],
        "val_samples": s["val_samples"],
        "runs": runs,
        "wall_ratio_over_none": {p: round(runs[p]["wall_seconds"] / runs["none"]["wall_seconds"], 3)
                                 for p in ("median", "hyperband")},
        "best_val_top2_delta_vs_none": {p: round(runs[p]["best_val_top2"] - runs["none"]["best_val_top2"], 4)
                                        for p in ("median", "hyperband")},
        "machine": {"cpus": os.cpu_count(), "torch_threads": set_threads(params.train.threads),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wall-time ratio to no pruning: {report['wall_ratio_over_none']}; best val top-2: "
          + ", ".join(f"{p} {r['best_val_top2']:.4f} ({r['best_kind']})" for p, r in runs.items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
