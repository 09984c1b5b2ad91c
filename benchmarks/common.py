"""Shared helpers for the benchmarks: machine facts, repeated timing, results JSON.

Every figure a benchmark reports is paired with a reference measured in the same process, so a
busy machine inflates both; `load_before`/`load_after` (1-minute load average) say how busy it was.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, object]:
    import numpy as np
    import torch

    return {
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "load_before": os.getloadavg()[0],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """The shortest of `repeats` wall times of fn() (the least disturbed by other load), and all."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), times


def peak_rss_gib() -> float:
    """This process's peak resident memory, or its children's (dvc and the stages it ran) if larger: GiB."""
    import resource

    return round(max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                     resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20, 2)


def write_result(name: str, result: dict[str, object]) -> Path:
    result = {**result, "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}
    result.setdefault("machine", {})["load_after"] = os.getloadavg()[0]  # type: ignore[index]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path
