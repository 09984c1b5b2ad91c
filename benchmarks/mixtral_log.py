"""The whole pipeline on the real Mixtral-8x7B routing log in ../shared/traces: the predictors'
accuracy (validation, where every choice is made, and test) for several split seeds, train on one
HumanEval problem and test on the other (`evaluate.extra_tests`), and what each buys an engine
(simulate_prefetch), into benchmarks/results/mixtral_log.json.

The log holds two problems (83 and 254 decode tokens); `extract.logs.tokens_per_sequence: 64` cuts
them into 6 sequences of up to 64 tokens, so a split by sequence has units (1 test, 1 validation,
4 fit). Each run is a plain `dvc repro` in a fresh copy of the repository with these params:

    .venv/bin/python benchmarks/mixtral_log.py            # 5 split seeds + the cross-problem run
    .venv/bin/python benchmarks/mixtral_log.py --seeds 0   # one seed
    .venv/bin/python benchmarks/mixtral_log.py --horizons 1 2 4 8 --next-token --no-cross

With `--horizons` (and `--next-token`) each seed trains every target and the result
(benchmarks/results/mixtral_log_horizons.json) adds, per target, the validation and test top-2 of
the tuned model, the baseline and the best table on validation (the references, oracle aside).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from common import machine, write_result  # noqa: E402
from conftest import copy_repo, run  # noqa: E402

LOG = ROOT.parent / "shared" / "traces" / "mixtral-8x7b-instruct" / "humaneval_2_routing.jsonl"
# A small log trains in seconds an epoch: a trial's budget and full training get many epochs.
PARAMS = {
    "extract.source": "import",
    "extract.logs.format": "jsonl",
    "extract.logs.path": str(LOG),
    "extract.logs.tokens_per_sequence": 64,
    "tune.epochs": 30,
    "tune.n_trials": 12,
    "tune.max_train_samples": None,
    "train.epochs": 60,
    "train.early_stopping_patience": 10,
}
COMPARED = ("tuned", "baseline", "lookup_3", "boosted_trees", "boosted_trees_full", "frequency")


MODELS = ("tuned", "baseline")


def target_summary(block: dict) -> dict[str, object]:
    """One target's figures: the models' and the best table's (by validation top-2) validation and test
    top-2, and whether the tuned model is at or above that table on validation."""
    val = block["validation"]
    tables = {p: m["top2"] for p, m in val.items() if p not in (*MODELS, "oracle") and m.get("top2") is not None}
    best = max(tables, key=tables.get)
    out: dict[str, object] = {"best_table": best, "tuned_at_or_above_best_table_on_validation":
                              val["tuned"]["top2"] >= val[best]["top2"]}
    for p in (*MODELS, best):
        out[p] = {"validation_top2": val[p]["top2"], "test_top2": block[p]["top2"],
                  "test_top2_lo": block[p].get("top2_lo"), "test_top2_hi": block[p].get("top2_hi")}
    return out


def reproduce(params: dict[str, object], workdir: Path) -> dict[str, object]:
    repo = copy_repo(workdir, params, tiny=False)
    start = time.perf_counter()
    run(["dvc", "repro"], repo)
    evaluate = json.loads((repo / "metrics" / "evaluate.json").read_text())
    tune = json.loads((repo / "metrics" / "tune.json").read_text())
    prefetch = json.loads((repo / "metrics" / "prefetch.json").read_text())
    out = {
        "seconds": round(time.perf_counter() - start, 1),
        "tuned_kind": tune["best_params"]["kind"],
        "tuned_params": tune["best_params"],
        "validation_top2": {p: evaluate["validation"][p]["top2"] for p in COMPARED},
        "test": {p: {k: evaluate[p][k] for k in ("top2", "top2_lo", "top2_hi", "set_recall", "n_test")}
                 for p in COMPARED},
        "tuned_vs": evaluate["tuned"]["vs"],
        "prefetch": prefetch,
    }
    if "horizons" in evaluate:
        main = {p: evaluate[p] for p in evaluate["validation"]} | {"validation": evaluate["validation"]}
        out["per_horizon"] = {"main": target_summary(main)} | {
            name: target_summary(block) for name, block in evaluate["horizons"].items()}
    if "extra_tests" in evaluate:
        out["extra_tests"] = {name: {p: {k: m[p][k] for k in ("top2", "top2_lo", "top2_hi", "set_recall")}
                                     for p in COMPARED} for name, m in evaluate["extra_tests"].items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="split.seed values")
    parser.add_argument("--no-cross", action="store_true", help="skip the train-on-problem-1, test-on-problem-0 run")
    parser.add_argument("--horizons", type=int, nargs="+", help="features.horizons (default: the params' [1])")
    parser.add_argument("--next-token", action="store_true", help="features.next_token: true")
    args = parser.parse_args()
    params = dict(PARAMS)
    if args.horizons:
        params["features.horizons"] = args.horizons
    if args.next_token:
        params["features.next_token"] = True
    name = "mixtral_log_horizons" if args.horizons or args.next_token else "mixtral_log"
    if not LOG.is_file():
        raise SystemExit(f"{LOG}: not found (the shared traces sit beside the repository as ../shared)")
    result: dict[str, object] = {"machine": machine(), "params": params, "seeds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            print(f"split seed {seed} ...", flush=True)
            result["seeds"][seed] = reproduce({**params, "split.seed": seed}, Path(tmp) / f"seed{seed}")
        if not args.no_cross:
            print("train on problem 1, test on problem 0 ...", flush=True)
            problem0 = {"format": "jsonl", "path": str(LOG), "tokens_per_sequence": 64, "sequences": [0]}
            result["cross_problem"] = reproduce(
                {**params, "extract.logs.sequences": [1],
                 "evaluate.extra_tests": [{"name": "problem_0", "logs": problem0}]}, Path(tmp) / "cross")
    write_result(name, result)


if __name__ == "__main__":
    main()
