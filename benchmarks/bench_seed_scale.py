"""The seed's scale end to end: `dvc exp run` of the whole pipeline at ~1.35M samples in a copy
of the repository, recording wall time, peak memory and the test metrics (the tuned predictor's
share of the oracle's top-2) into benchmarks/results/seed_scale.json.

    .venv/bin/python benchmarks/bench_seed_scale.py             # run it (quiet machine)

Peak memory is reported twice: the largest single process (getrusage RUSAGE_CHILDREN ru_maxrss;
DVC runs stages one at a time, so this is the heaviest stage) and the largest sum of RSS over the
whole process tree, sampled every 0.2 s (dvc itself plus the stage running under it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

try:
    import psutil  # installed with the project's dependencies; only the process-tree figure needs it
except ImportError:  # pragma: no cover
    psutil = None

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

SEED_PARAMS = {
    "extract.synthetic.num_sequences": 680,  # x 64 tokens x 31 = 1.35M samples, as the seed
    "extract.synthetic.tokens_per_sequence": 64,
    "split.test_fraction": 0.05,  # the seed's 95/5 (34 test sequences at this size)
    "train.epochs": 30,
    "tune.n_trials": 20,
    "tune.epochs": 10,
    "tune.max_train_samples": 50000,  # per trial: tune may subsample train; full training uses all of it
}


class TreeMemory(threading.Thread):
    """Peak of the summed RSS of a process and its descendants."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        if psutil is None:
            return
        while not self.stop.wait(0.2):
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:  # type: ignore[union-attr]
                return


def _block(params_yaml: Path, key: str) -> dict[str, object]:
    from ruamel.yaml import YAML

    return dict(YAML(typ="safe").load(params_yaml.read_text())[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="where to copy the repository (default: a temporary folder)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more -S overrides")
    args = parser.parse_args()
    params = dict(SEED_PARAMS)
    for item in args.set:
        key, value = item.split("=", 1)
        params[key] = value
    from conftest import copy_repo  # the tests' copy: tracked + new files, committed, fresh git

    work = Path(args.workdir or tempfile.mkdtemp(prefix="routecast-seed-"))
    work.mkdir(parents=True, exist_ok=True)
    copy_repo(work, tiny=False)  # the repository's own params.yaml
    cmd = [str(Path(sys.executable).parent / "dvc"), "exp", "run"]
    for key, value in params.items():
        cmd += ["-S", f"{key}={value}"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = TreeMemory(proc.pid)
    watcher.start()
    log_lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        log_lines.append(line)
        print(f"[{time.perf_counter() - start:7.0f}s] {line}", end="", flush=True)
    rc = proc.wait()
    wall = time.perf_counter() - start
    watcher.stop.set()
    max_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    metrics = work / "metrics" / "evaluate.json"
    tune = work / "metrics" / "tune.json"
    result = {
        "what": "dvc exp run of the whole pipeline at the seed's scale, in a copy of the repository",
        "command": "python benchmarks/bench_seed_scale.py " + " ".join(sys.argv[1:]),
        "dvc_command": " ".join(cmd[1:]),
        "params": params,
        "effective_train_params": _block(work / "params.yaml", "train"),
        "returncode": rc,
        "wall_minutes": wall / 60,
        "target_wall_minutes": 45,
        "peak_rss_gib_largest_process": max_child / 2**30,
        "peak_rss_gib_process_tree": watcher.peak / 2**30,
        "target_peak_gib": 4,
        "evaluate": json.loads(metrics.read_text()) if metrics.exists() else None,
        "tuned": json.loads(tune.read_text())["best_params"] if tune.exists() else None,
        "load_after": os.getloadavg()[0],
        "workdir": str(work),
        "log_tail": "".join(log_lines[-40:]),
    }
    out = HERE / "results" / "seed_scale.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}, indent=2))
    sys.exit(rc)


if __name__ == "__main__":
    main()
