"""The DVC behaviours users rely on, each driving the real `dvc` command on a tiny copy of the repo."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, clone_pipeline, copy_repo, run, set_params
from routecast.config.params import load_params

pytestmark = pytest.mark.slow


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def redone(output: str) -> list[str]:
    """Stages run, or restored from DVC's run-cache (as good as run), in order."""
    return [a or b for a, b in re.findall(r"Running stage '([^']+)'|Stage '([^']+)' is cached - skipping run", output)]


@pytest.fixture(scope="module")
def repro_repo(pipeline_repo: Path) -> Path:
    return pipeline_repo


def test_repro_runs_every_stage_in_order(repro_repo: Path) -> None:
    out = (repro_repo.parent / "repro.log").read_text()
    assert stages_run(out) == ["check_params", "extract_traces", "encode_features", "split_95_5", "tune",
                               "check_params_after_tune", "train_full@baseline", "train_full@tuned", "evaluate",
                               "simulate_prefetch", "headline"]


def test_repro_then_status_clean_and_second_repro_runs_nothing(repro_repo: Path) -> None:
    status = run(["dvc", "status"], repro_repo).stdout
    assert "up to date" in status, status
    again = run(["dvc", "repro"], repro_repo).stdout
    assert stages_run(again) == [], again
    metrics = json.loads((repro_repo / "metrics" / "evaluate.json").read_text())
    for name in ("baseline", "tuned", "frequency", "lookup_1"):
        assert set(metrics[name]) >= {"top1", "top2", "set_recall", "exact_set", "n_test"}
        assert 0.0 <= metrics[name]["top1"] <= metrics[name]["top2"] <= 1.0


def readme_command(prefix: str) -> list[str]:
    """The README's command that starts with `prefix` (in a bash block), as arguments."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(prefix))
    return shlex.split(line.split("#")[0] if " #" in line else line)


def fits(table: str, columns: int = 100) -> None:
    """Every line of `table` fits `columns`, and no cell was cut to fit ("…")."""
    assert "…" not in table, table
    assert max(len(line.rstrip()) for line in table.splitlines()) <= columns, table


def test_metrics_show_is_the_headline_in_100_columns(repro_repo: Path) -> None:
    shown = run(readme_command("dvc metrics show"), repro_repo).stdout
    fits(shown)
    header, *rows = shown.strip().splitlines()
    assert [row.split()[0] for row in rows] == ["metrics/headline.json"], shown  # one row: the headline
    assert header.split()[1:] == sorted(json.loads((repro_repo / "metrics" / "headline.json").read_text())), shown
    # The detail stays one command away: any metrics file as a target.
    detail = run(["dvc", "metrics", "show", "metrics/evaluate.json", "metrics/prefetch.json"], repro_repo).stdout
    assert "baseline.top2" in detail and "tuned.top2" in detail, detail
    for name in ("on_demand", "perfect", "baseline", "tuned", "lookup_3"):
        assert f"{name}.stall_ms_per_token" in detail and f"{name}.gap_closed" in detail, detail


def test_exp_run_retrains_only_tuned_with_float_lr_and_metrics_diff(pipeline_repo: Path, tmp_path: Path) -> None:
    repro_repo = clone_pipeline(pipeline_repo, tmp_path / "repo")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run([*git, "add", "-A"], repro_repo)
    run([*git, "commit", "-qm", "pipeline results"], repro_repo)
    picked = load_params(repro_repo / "params.yaml").tuned.kind  # tune's pick: its block gives way to the GRU's
    to_gru = [] if picked == "gru" else ["-S", "tuned.kind=gru", "-S", f"~tuned.{picked}"]
    out = run(["dvc", "exp", "run", *to_gru, "-S", "++tuned.gru.lr=1e-6"], repro_repo).stdout
    assert stages_run(out) == ["check_params_after_tune", "train_full@tuned", "evaluate", "simulate_prefetch",
                               "headline"], out
    assert "lr: 1e-06" in (repro_repo / "params.yaml").read_text()
    checkpoint = torch.load(repro_repo / "data" / "models" / "tuned.pt", weights_only=True)
    assert checkpoint["kind"] == "gru"
    first_epoch_lr = checkpoint["history"][0]["lr"]
    assert isinstance(first_epoch_lr, float) and first_epoch_lr == pytest.approx(1e-6)
    # The metrics diff is the headline alone: a short table (the detail: `--targets <file>`).
    diff = run(["dvc", "metrics", "diff"], repro_repo).stdout
    fits(diff)
    rows = [line.split() for line in diff.strip().splitlines()[1:]]
    assert 1 <= len(rows) <= 8 and {row[0] for row in rows} == {"metrics/headline.json"}, diff
    assert ["metrics/headline.json", "kind", picked, "gru", "-"] in rows or picked == "gru", diff
    detail = run(["dvc", "metrics", "diff", "--md", "--targets", "metrics/evaluate.json"], repro_repo).stdout
    assert re.search(r"tuned\.top2\s*\|", detail), detail
    assert not re.search(r"\|\s*baseline\.top2\s*\|", detail), detail  # unchanged metrics are not listed
    # `dvc exp show` with the README's flags: the headline of the experiment and its baseline in 100 columns.
    with_env = dict(os.environ, COLUMNS="100")
    shown = subprocess.run(readme_command("dvc exp show"), cwd=repro_repo, env=with_env, capture_output=True,
                           text=True, check=True).stdout
    fits(shown)
    header = next(line for line in shown.splitlines() if "Experiment" in line).split()
    assert header == ["Experiment", *json.loads((repro_repo / "metrics" / "headline.json").read_text())], shown
    kinds = [line.split()[-5] for line in shown.splitlines() if line.strip().startswith(("workspace", "└──"))]
    assert kinds == ["gru", "gru"], shown  # the workspace and the experiment, beside the commit's pick
    for name in ("baseline", "tuned"):  # no "nan" for what a kind lacks (the mixture's train loss and lr)
        summary = json.loads((repro_repo / "metrics" / "train" / name / "metrics.json").read_text())
        assert all(isinstance(v, (int, float)) for k, v in summary.items() if k != "kind"), summary
    assert summary["step"] == len(checkpoint["history"]) and summary["kind"] == "gru"
    assert "seconds" not in summary  # a duration would differ on every run of the same params


def test_exp_run_on_the_baseline_never_retunes(pipeline_repo: Path, tmp_path: Path) -> None:
    """tune does not read the baseline block: an experiment on it retrains the baseline and what reads it."""
    repo = committed_clone(pipeline_repo, tmp_path / "repo")
    before = (repo / "params.yaml").read_text()
    out = run(["dvc", "exp", "run", "-S", "baseline.mlp.lr=1e-6"], repo).stdout
    assert stages_run(out) == ["check_params", "check_params_after_tune", "train_full@baseline", "evaluate",
                               "simulate_prefetch", "headline"], out
    after = (repo / "params.yaml").read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(before.splitlines()) == len(after.splitlines()) and len(changed) == 1, changed  # one line
    assert changed[0][1].strip() == "lr: 1e-06"


def committed_clone(pipeline_repo: Path, dest: Path) -> Path:
    """A private copy of the reproduced tiny pipeline with its results committed."""
    repo = clone_pipeline(pipeline_repo, dest)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run([*git, "add", "-A"], repo)
    run([*git, "commit", "-qm", "pipeline results"], repo)
    return repo


def outputs(repo: Path) -> dict[str, bytes]:
    """Every pipeline output (data/ and metrics/) but the params checks' markers, by path."""
    return {str(p.relative_to(repo)): p.read_bytes() for top in ("data", "metrics")
            for p in sorted((repo / top).rglob("*")) if p.is_file() and not p.name.endswith(".checked")}


# One case per stage and kind of error under dvc (the messages of the others, e.g. a non-finite weight decay or a
# knob of another kind, are unit-tested in tests/test_check_params.py and tests/test_params.py).
@pytest.mark.parametrize("override, check, message", [
    ("+trian.epochs=3", "check_params_after_tune", "trian: unknown key"),  # no stage tracks a new section
    ("train.epochs=abc", "check_params", "train.epochs: expected an integer, got 'abc'"),
    ("baseline.mlp.lr=abc", "check_params", "baseline.mlp.lr: expected a number, got 'abc'"),
    ("+lr=1e-3", "check_params_after_tune", "lr: not a section: lr is a knob of each predictor"),
    ("tune.storage=postgresql://me:pw-L3AK@db.example/rc", "check_params", "tune.storage: must not hold a password"),
])
def test_bad_params_stop_before_any_output_is_touched(pipeline_repo: Path, tmp_path: Path, override: str, check: str,
                                                      message: str) -> None:
    """DVC empties a stage's outputs before running it: the checks run first, so a bad value
    leaves every model, split and metric of the last good run byte-identical."""
    repo = committed_clone(pipeline_repo, tmp_path / "repo")
    before = outputs(repo)
    proc = run(["dvc", "exp", "run", "-S", override], repo, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in out, out
    assert stages_run(out) == [check], out
    assert "Traceback" not in out
    assert outputs(repo) == before
    assert "pw-L3AK" not in out and "pw-L3AK" not in (repo / "dvc.lock").read_text()
    # Undo the override: the next run only redoes the check (its marker is unchanged, so nothing after it runs).
    # From the commit's content: after a failed `dvc exp run`, git may take the edited file for unchanged
    # (DVC leaves the index with its size and time when the value kept the line's length).
    (repo / "params.yaml").write_text(run(["git", "show", "HEAD:params.yaml"], repo).stdout)
    again = run(["dvc", "repro"], repo).stdout
    assert redone(again) == [check], again
    assert "up to date" in run(["dvc", "status"], repo).stdout
    assert outputs(repo) == before


def test_a_bad_log_keeps_the_last_good_trace(pipeline_repo: Path, tmp_path: Path) -> None:
    """Bad input found only while extract_traces runs: its output is `persist: true` and written
    atomically, so under `dvc exp run` the last good trace (and all else) stays byte-identical."""
    repo = committed_clone(pipeline_repo, tmp_path / "repo")
    (repo / "bad.jsonl").write_text('{"problem_id": 0, "token_idx": 0, "layer": 0, "experts": [1, 2], '
                                    '"gating_probs": [0.6, 0.4]}\nnot json\n')
    before = outputs(repo)
    proc = run(["dvc", "exp", "run", "-S", "extract.source=import", "-S", "extract.logs.path=bad.jsonl"], repo,
               check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "bad.jsonl: line 2: not valid JSON" in out, out
    assert stages_run(out) == ["check_params", "extract_traces"], out
    assert "Traceback" not in out and "DVC removed" not in out  # nothing was removed
    assert outputs(repo) == before


def test_a_failure_mid_stage_says_how_to_restore_what_dvc_removed(pipeline_repo: Path, tmp_path: Path) -> None:
    """A value only the data can refute (a horizon past the trace's last layer) fails inside
    encode_features, after DVC removed its outputs; the error names them and the commands that
    bring back the locked versions, and following it restores every output byte for byte."""
    repo = committed_clone(pipeline_repo, tmp_path / "repo")
    before = outputs(repo)
    proc = run(["dvc", "exp", "run", "-S", "features.horizons=[100]"], repo, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and stages_run(out) == ["check_params", "encode_features"], out
    removed = "data/features.parquet, metrics/features.json"
    assert f"DVC removed {removed} before running encode_features" in out, out
    assert "`dvc checkout encode_features`" in out and "`git checkout -- FILE`" in out
    assert not (repo / "data" / "features.parquet").exists()  # what DVC does to a stage's outputs
    run(["git", "checkout", "params.yaml"], repo)
    run(["dvc", "checkout", "encode_features"], repo)
    run(["git", "checkout", "--", "metrics/features.json"], repo)
    assert outputs(repo) == before
    # check_params passed (and locked) the bad value: the next run redoes only that check.
    again = run(["dvc", "repro"], repo).stdout
    assert redone(again) == ["check_params"], again
    assert "up to date" in run(["dvc", "status"], repo).stdout
    assert outputs(repo) == before


def dvc_env() -> dict[str, str]:
    """This interpreter's environment with its bin/ first on PATH, as `conftest.run` uses."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_a_second_run_stops_while_a_first_holds_the_workspace(pipeline_repo: Path, tmp_path: Path) -> None:
    """DVC's own locks let `dvc repro -s` of another stage, or a stage script by hand, rewrite a
    running pipeline's inputs; the workspace claim stops them, and a killed run's claim lapses."""
    repo = committed_clone(pipeline_repo, tmp_path / "repo")
    set_params(repo / "params.yaml", {"tune.n_trials": 400})  # a long tune to overlap with
    traces = (repo / "data" / "traces.parquet").read_bytes()
    first = subprocess.Popen(["dvc", "repro"], cwd=repo, env=dvc_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        claim, deadline = repo / ".dvc" / "tmp" / "routecast-run.json", time.monotonic() + 120
        while not (claim.exists() and '"stage": "tune"' in claim.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never reached tune"
            time.sleep(0.2)
        second = run(["dvc", "repro", "-s", "-f", "extract_traces"], repo, check=False)
        by_hand = run([sys.executable, "stages/encode_features.py", "data/traces.parquet", "--out",
                       "data/features.parquet", "--report", "metrics/features.json"], repo, check=False)
        assert first.poll() is None  # the two overlapped
        for proc in (second, by_hand):
            out = proc.stdout + proc.stderr
            assert proc.returncode != 0, out
            assert "another run is using this workspace" in out and f"(pid {first.pid}) is at stage tune" in out, out
        assert (repo / "data" / "traces.parquet").read_bytes() == traces
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    again = run(["dvc", "repro", "-s", "-f", "extract_traces"], repo).stdout  # the killed run blocks nothing
    assert stages_run(again) == ["extract_traces"], again


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux /proc), children first."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        children += [int(c) for c in task.read_text().split()]
    return [d for c in children for d in (c, *descendants(c))]


# The line of a stage's log that says it is mid-work; default: its first line (imports done, data being made).
KILL_AT = {"tune": re.compile(r"trial \d+ \(\w+\) epoch 1:")}  # mid-trial: a RUNNING trial whose worker dies


def repro_killing(repo: Path, stage: str) -> str:
    """Run `dvc repro` and SIGKILL the process of `stage` (not DVC) once it is mid-work (`KILL_AT`);
    return the log."""
    dvc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    lines, current, killed = [], None, False
    assert dvc.stdout is not None
    try:
        for line in dvc.stdout:
            lines.append(line)
            started = re.match(r"Running stage '([^']+)'", line)
            if started:
                current = started.group(1)
            elif current == stage and not killed and not line.startswith(">") and \
                    (stage not in KILL_AT or KILL_AT[stage].search(line)):
                for pid in descendants(dvc.pid):
                    os.kill(pid, signal.SIGKILL)
                killed = True
        dvc.wait()
    finally:  # whatever happened, leave nothing of this run (its own session) behind the test
        try:
            os.killpg(dvc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        dvc.wait()
    log = "".join(lines)
    assert killed and dvc.returncode != 0, f"{stage} was not killed:\n{log}"
    return log


# One kill per kind of output: a persisted trace, the Optuna study (mid-trial, its journal locked
# or not), a cached model, uncached metrics. Each kill costs a DVC start and a rerun of the stage,
# so the rest (check_params, encode_features, split_95_5, train_full@baseline) are left out to
# keep the test near a minute; they write through the same atomic_path as the ones killed here.
KILLED_STAGES = ("extract_traces", "tune", "train_full@tuned", "evaluate")


def test_sigkill_in_a_stage_then_repro_gives_the_same_metrics(pipeline_repo: Path, tmp_path: Path) -> None:
    """A stage killed mid-work (SIGKILL) at each of several points of one pipeline: a plain `dvc repro`
    after each goes on, and finishes with the uninterrupted run's metrics and no temporaries left.
    It is also the determinism test: a second copy with the same params and seed, run apart, gives
    the same features, evaluate and prefetch metrics byte for byte, and tune the same pick."""
    repo = copy_repo(tmp_path)
    for stage in KILLED_STAGES:
        log = repro_killing(repo, stage)
        assert f"failed to reproduce '{stage}'" in log, log
    final = run(["dvc", "repro"], repo).stdout
    assert "up to date" in run(["dvc", "status"], repo).stdout, final
    for name in ("evaluate.json", "features.json", "prefetch.json"):
        assert (repo / "metrics" / name).read_text() == (pipeline_repo / "metrics" / name).read_text(), name
    tune, reference = (json.loads((r / "metrics" / "tune.json").read_text()) for r in (repo, pipeline_repo))
    assert tune["n_failed"] <= 1  # the killed trial, retried (0 if the kill came after its last epoch)
    assert (tune["best_params"], tune["best_value"]) == (reference["best_params"], reference["best_value"])
    assert list(repo.glob("data/**/.*.tmp")) == [] and list(repo.glob("metrics/**/.*.tmp")) == []


def test_dvc_artifacts_get_fetches_the_tuned_predictor_by_name(pipeline_repo: Path, tmp_path: Path) -> None:
    """dvc.yaml declares the tuned model as an artifact: once its results are committed and a version
    is registered (a GTO tag), `dvc artifacts get <repo> tuned-predictor` fetches it from a clone."""
    repo = clone_pipeline(pipeline_repo, tmp_path / "repo")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run([*git, "add", "-A"], repo)
    run([*git, "commit", "-qm", "pipeline results"], repo)
    run([*git, "tag", "-a", "tuned-predictor@v1.0.0", "-m", "Registering artifact tuned-predictor version v1.0.0"],
        repo)
    (tmp_path / "engine").mkdir()
    run(["dvc", "artifacts", "get", str(repo), "tuned-predictor", "-o", "tuned.pt"], tmp_path / "engine")
    fetched = (tmp_path / "engine" / "tuned.pt").read_bytes()
    assert fetched == (repo / "data" / "models" / "tuned.pt").read_bytes()
    from routecast import Predictor

    assert Predictor.load(tmp_path / "engine" / "tuned.pt").top_k == 2  # a usable predictor, not just bytes
