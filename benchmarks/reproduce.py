"""The release check: a fresh clone of a commit, `dvc repro` from nothing, and its metrics compared
with the ones committed there. It must find them equal, byte for byte (training is bit-identical
across x86 CPUs with AVX2 at equal train.threads: see routecast/__init__.py), and records the wall
time of the default `dvc repro` into benchmarks/results/reproduce.json.

    .venv/bin/python benchmarks/reproduce.py            # HEAD; exits 1 if any metrics file differs
    .venv/bin/python benchmarks/reproduce.py --rev main

tests/test_lock.py checks in CI what can be checked without a run: that the committed dvc.lock
was made with this code and these params, and that the committed metrics are the ones it records.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import machine, write_result  # noqa: E402

METRICS = ("metrics/features.json", "metrics/tune.json", "metrics/evaluate.json", "metrics/prefetch.json",
           "metrics/train/baseline/metrics.json", "metrics/train/tuned/metrics.json",  # DVCLive's summaries
           "metrics/tune/live/metrics.json")
VOLATILE = {"metrics/tune.json": ("wall_seconds",)}  # a duration: never the same twice


def comparable(path: Path, name: str) -> object:
    data = json.loads(path.read_text())
    for key in VOLATILE.get(name, ()):
        data.pop(key, None)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--keep", help="copy the reproduced metrics/ folder here (to compare two revisions)")
    args = parser.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "checkout", "-q", args.rev], cwd=clone, check=True)
        committed = {name: comparable(clone / name, name) for name in METRICS if (clone / name).exists()}
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(clone / "src"),
               "HOME": str(Path.home())}
        start = time.perf_counter()
        proc = subprocess.run(["dvc", "repro", "--force"], cwd=clone, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"dvc repro failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        reproduced = {name: comparable(clone / name, name) for name in committed}
        if args.keep:
            shutil.copytree(clone / "metrics", args.keep, dirs_exist_ok=True)
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    differ = [name for name in committed if committed[name] != reproduced[name]]
    write_result("reproduce", {
        "rev": rev,
        "compared": sorted(committed),
        "differ": differ,
        "identical": not differ,
        "dvc_repro_seconds": round(seconds, 1),
        "peak_rss_gib_largest_process": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
        "machine": info,
    })
    if differ:
        raise SystemExit(f"a fresh clone's dvc repro differs from the committed {differ}")


if __name__ == "__main__":
    main()
