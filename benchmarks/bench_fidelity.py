"""Fidelity benchmark (issue 23): which trial budget ranks a slow learner fairly, at what cost.

The same data and search, in fresh studies, under three fidelities:

- `short+final` (the default before): trials of 4 epochs on 150,000 samples, the per-kind
  median pruner, then final selection: the best complete trial of each kind and the
  baseline's configuration trained as train_full trains them, the best on validation picked.
  The search's own pick (`tune.final_selection: false`, the behaviour before) is read from the
  same run: the search's best trial is the best of its kind, so it is a finalist, trained in full.
- `full_length` (the default now): every trial is full training (`tune.epochs` null, that is
  `train.epochs` with early stopping, on the whole fit part, no pruner); each trial is its own
  finalist, so the best trial is the pick and nothing is trained twice.
- `hyperband_full`: Hyperband (min 1 epoch, reduction factor 3) whose top rung is the full
  training budget (`tune.epochs` null, the whole fit part); the best complete trial is the pick.

For each: the wall time of `tune` (search and selection), the pick, its validation top-2 under
full training, and the baseline configuration's (the seed's MLP trained in full) for comparison.

Data (`--data`, any of): `default` (the synthetic default of params.yaml) and `flame` (issue 23's
command: the shared FLAME-MoE log in 64-token sequences; skipped when ../shared is absent).
Writes benchmarks/results/fidelity.json.

    .venv/bin/python benchmarks/bench_fidelity.py [--data default flame] [--variants ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from common import machine, peak_rss_gib, write_result  # noqa: E402
from conftest import SHARED_TRACES, set_params  # noqa: E402
from routecast.config.params import ModelParams, Params, load_params  # noqa: E402
from routecast.data.features import encode_features_file, read_features, write_features  # noqa: E402
from routecast.data.split import split_features  # noqa: E402
from routecast.fit.tuning import file_digest, tune  # noqa: E402
from routecast.predictors.mlp import SEED_BASELINE  # noqa: E402
from routecast.sources.extract import extract_traces  # noqa: E402

FLAME = SHARED_TRACES / "flame-moe-290m" / "prefill-32seqs-2048tokens"
DATA = {
    "default": {},
    "flame": {"extract.source": "import", "extract.logs.format": "flame_csv", "extract.logs.path": str(FLAME),
              "extract.logs.tokens_per_sequence": 64, "simulate.cache.slots_per_layer": 16},
}
# Each variant's tune params (everything else as in params.yaml).
VARIANTS = {
    # the default before issue 23's fidelity: short trials on a subsample, judged early, then final selection
    "short+final": {"epochs": 4, "max_train_samples": 150_000, "pruner": "median", "final_selection": True},
    # the default now: every trial is full training (a finalist by itself), no pruner
    "full_length": {"epochs": None, "max_train_samples": None, "pruner": "none", "final_selection": True},
    # Hyperband from 1 epoch up to full training, the best complete trial picked
    "hyperband_full": {"epochs": None, "max_train_samples": None, "pruner": "hyperband", "final_selection": False},
}


def variant_params(params: Params, variant: str, storage: str) -> Params:
    return dataclasses.replace(params, tune=dataclasses.replace(params.tune, storage=storage, **VARIANTS[variant]))


def build(name: str, tmp: Path) -> tuple[Params, Path]:
    """params.yaml with the data's overrides, and the train split it describes (built through the
    library, as `dvc repro` would)."""
    (tmp / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(tmp / "params.yaml", DATA[name])
    params = load_params(tmp / "params.yaml")
    extract_traces(params.extract, tmp / "traces.parquet")
    encode_features_file(tmp / "traces.parquet", params.features, tmp / "features.parquet")
    train, _ = split_features(read_features(tmp / "features.parquet"), params.split)
    write_features(tmp / "train.parquet", train)
    return params, tmp / "train.parquet"


def run_variant(params: Params, train_path: Path, variant: str, storage: str) -> dict[str, object]:
    run_params = variant_params(params, variant, storage)
    train = read_features(train_path)
    start = time.perf_counter()
    result = tune(run_params, train, file_digest(train_path))
    wall = time.perf_counter() - start
    s = result.summary
    row: dict[str, object] = {"wall_seconds": round(wall, 1), "n_complete": s["n_complete"], "n_pruned": s["n_pruned"],
                              "epochs_trained_in_search": s["epochs_trained"], "pick_kind": result.best.kind,
                              "pick_val_top2_full": round(result.best_value, 4)}
    if variant == "short+final":
        finalists = s["finalists"]
        search_best = next(f for f in finalists if f["origin"] == f"trial {s['best_trial']}")
        baseline = next(f for f in finalists if f["params"] == ModelParams("mlp", SEED_BASELINE).to_plain())
        row.update(finalists=[{k: f[k] for k in ("origin", "kind", "trial_value", "value", "best_epoch")}
                              for f in finalists],
                   search_pick_kind=search_best["kind"], search_pick_val_top2_full=round(search_best["value"], 4),
                   baseline_val_top2_full=round(baseline["value"], 4))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", choices=sorted(DATA), default=["default", "flame"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", default="fidelity", help="the results file's name under benchmarks/results/ (.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    report: dict[str, object] = {"machine": machine(), "data": {}}
    for name in args.data:
        if name == "flame" and not FLAME.is_dir():
            print(f"flame: skipped, {FLAME} is absent")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            params, train_path = build(name, Path(tmp))
            block: dict[str, object] = {"train_epochs": params.train.epochs, "n_trials": params.tune.n_trials,
                                        "variant_params": VARIANTS, "variants": {}}
            for variant in args.variants:
                row = run_variant(params, train_path, variant, f"{tmp}/{variant}.log")
                block["variants"][variant] = row
                print(f"{name:8s} {variant:15s} {row['wall_seconds']:7.1f}s  pick {row['pick_kind']:10s} "
                      f"val top-2 (full training) {row['pick_val_top2_full']:.4f}"
                      + (f"  [search's pick {row['search_pick_kind']} {row['search_pick_val_top2_full']:.4f}, "
                         f"baseline {row['baseline_val_top2_full']:.4f}]" if "search_pick_kind" in row else ""),
                      flush=True)
            report["data"][name] = block
    report["peak_rss_gib"] = peak_rss_gib()
    write_result(args.out, report)


if __name__ == "__main__":
    main()
