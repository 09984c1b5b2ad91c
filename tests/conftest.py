"""Shared fixtures: tiny params and a temporary copy of the repository for driving real `dvc`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

import routecast  # noqa: F401  -- before any test module loads torch: it pins torch's CPU code paths (its __init__)

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRACES = ROOT.parent / "shared" / "traces"

# Small enough for a whole `dvc repro` in about a minute on 2 cores.
TINY_PARAMS = {
    "extract.synthetic.num_sequences": 12,
    "extract.synthetic.tokens_per_sequence": 48,
    "extract.synthetic.num_layers": 8,
    "split.test_fraction": 0.25,  # 3 test sequences: enough for an interval (one gives none)
    "train.epochs": 3,
    "tune.n_trials": 3,
    # tune.epochs and max_train_samples stay at their defaults: every trial is full training (3 epochs
    # here), its own finalist, so nothing trains twice
    "train.threads": 1,  # tiny models gain nothing from more; and a busy machine makes OpenMP barriers crawl
}


def set_params(path: Path, updates: dict[str, object]) -> None:
    """Set dotted keys in a params.yaml, keeping its comments (as `dvc exp run -S` would)."""
    yaml = YAML()
    doc = yaml.load(path.read_text())
    for dotted, value in updates.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            if node.get(key) is None:  # an empty block (`mlp:`, its defaults) gets its first key
                node[key] = {}
            node = node[key]
        node[leaf] = value
    with open(path, "w") as fh:
        yaml.dump(doc, fh)


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with this interpreter's environment (its bin/ first on PATH)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def copy_repo(dest: Path, params: dict[str, object] | None = None, tiny: bool = True) -> Path:
    """A git repository at `dest` holding the project's files (tracked and new), committed; its
    params.yaml gets TINY_PARAMS (unless `tiny=False`), then `params`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for stale in ("dvc.lock", "metrics"):
        path = dest / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    updates = {**(TINY_PARAMS if tiny else {}), **(params or {})}
    if updates:
        set_params(dest / "params.yaml", updates)
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], dest)
    return dest


@pytest.fixture(scope="session")
def pipeline_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny `dvc repro` per test session, shared read-only (its output in ../repro.log);
    a test that changes the repository works on `clone_pipeline(...)` instead."""
    base = tmp_path_factory.mktemp("pipeline")
    (base / "repo").mkdir()
    repo = copy_repo(base / "repo")
    (base / "repro.log").write_text(run(["dvc", "repro"], repo).stdout)
    return repo


def clone_pipeline(pipeline_repo: Path, dest: Path) -> Path:
    """A private copy of the reproduced tiny pipeline (git history, DVC cache and outputs)."""
    shutil.copytree(pipeline_repo, dest, symlinks=True)
    return dest


@pytest.fixture
def shared_traces() -> Path:
    if not SHARED_TRACES.is_dir():
        pytest.skip(f"real traces absent: {SHARED_TRACES} does not exist (it sits beside the repository as ../shared)")
    return SHARED_TRACES


def stage_args(name: str) -> list[str]:
    """The arguments dvc.yaml gives the stage `name`'s script (paths live in dvc.yaml only)."""
    import shlex

    cmd = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"][name]["cmd"]
    return shlex.split(" ".join(cmd.split()))[2:]  # after `python stages/<name>.py`


def deterministic_router_trace(L: int = 6, E: int = 5, n_tokens: int = 1000, repeat: float = 0.9):
    """A trace whose next primary is (primary + layer + 1) mod E, secondary random, and whose token
    repeats the previous token's routing with probability `repeat` (sequences of 20 tokens): every
    layer ahead and the next token are predictable (tests/test_kinds.py, tests/test_context_kind.py)."""
    import numpy as np

    from routecast.data.traces import TraceMeta, Traces

    rng = np.random.default_rng(0)
    primary = np.zeros((n_tokens, L), dtype=np.int64)
    primary[:, 0] = rng.integers(0, E, n_tokens)
    for layer in range(1, L):
        primary[:, layer] = (primary[:, layer - 1] + layer) % E
    secondary = (primary + rng.integers(1, E, primary.shape)) % E
    again = (rng.random(n_tokens) < repeat) & (np.arange(n_tokens) % 20 > 0)  # not a sequence's first token
    source = np.maximum.accumulate(np.where(again, 0, np.arange(n_tokens)))
    primary, secondary = primary[source], secondary[source]
    return Traces(TraceMeta(L, E, 2, source="test"), np.repeat(np.arange(n_tokens) // 20, L).astype(np.int32),
                  np.repeat(np.arange(n_tokens) % 20, L).astype(np.int32),
                  np.tile(np.arange(L), n_tokens).astype(np.int16),
                  np.stack([primary, secondary], -1).reshape(-1, 2).astype(np.int16),
                  np.tile([0.6, 0.4], (n_tokens * L, 1)).astype(np.float32))
