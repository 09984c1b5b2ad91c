"""The default synthetic pipeline predicting several layers ahead and the next token
(`features.horizons: [1, 2, 4, 8]`, `features.next_token: true`), into benchmarks/results/horizons.json:

- one plain `dvc repro` in a fresh copy of the repository with only that knob changed (the
  default trace, tune, both models, every reference, the oracle, the prefetch stage), timed whole
  and per stage (each stage logs its own time and peak memory);
- per horizon, and for the next token: the tuned and baseline models' test top-2 and set recall with their intervals,
  their share of the oracle, the best table (the reference with the highest top-2, the oracle
  and the models aside) and the tuned model's paired difference over it.

    .venv/bin/python benchmarks/horizons.py
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from common import machine, peak_rss_gib, write_result  # noqa: E402
from conftest import copy_repo, run  # noqa: E402

HORIZONS = [1, 2, 4, 8]
MODELS = ("tuned", "baseline")
NOT_TABLES = {*MODELS, "oracle"}


def horizon_summary(block: dict, d: int) -> dict[str, object]:
    """One horizon's figures from evaluate.json (the top level for the first horizon)."""
    tables = {name: entry["top2"] for name, entry in block.items()
              if isinstance(entry, dict) and "top2" in entry and name not in NOT_TABLES}
    best = max(tables, key=tables.get)
    out: dict[str, object] = {"horizon": d if d else "next_token", "n_test": block["tuned"]["n_test"],
                              "best_table": best}
    for name in (*MODELS, "oracle", best):
        entry = block.get(name)
        if entry is None:
            continue
        out[name] = {k: entry.get(k) for k in ("top2", "top2_lo", "top2_hi", "set_recall", "set_recall_lo",
                                                "set_recall_hi", "top2_vs_oracle", "top2_vs_oracle_lo",
                                                "top2_vs_oracle_hi") if k in entry}
    out["tuned_vs_best_table"] = block["tuned"]["vs"][best]
    return out


def main() -> None:
    result: dict[str, object] = {"machine": machine(), "horizons": HORIZONS, "next_token": True}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_repo(Path(tmp) / "repo", {"features.horizons": HORIZONS, "features.next_token": True}, tiny=False)
        proc = run(["dvc", "repro"], repo)
        result["repro_seconds"] = round(time.perf_counter() - start, 1)
        stages: dict[str, dict[str, float]] = {}
        for m in re.finditer(r"(\S+) done in ([\d.]+)s, peak memory ([\d.]+) GiB", proc.stdout + proc.stderr):
            stages[m[1]] = {"seconds": float(m[2]), "peak_gib": float(m[3])}
        result["stages"] = stages
        evaluate = json.loads((repo / "metrics" / "evaluate.json").read_text())
        tune = json.loads((repo / "metrics" / "tune.json").read_text())
        result["tuned_kind"] = tune["best_params"]["kind"]
        result["per_horizon"] = [horizon_summary(evaluate, HORIZONS[0])] + [
            horizon_summary(evaluate["horizons"][str(d)], d) for d in HORIZONS[1:]] + [
            horizon_summary(evaluate["horizons"]["next_token"], 0)]
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["peak_rss_gib"] = peak_rss_gib()
    write_result("horizons", result)


if __name__ == "__main__":
    main()
