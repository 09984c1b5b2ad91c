"""A shared real log runs through the whole pipeline at the default params: every stage's `main()`,
in dvc.yaml's order and with dvc.yaml's arguments, in a fresh project folder. Only the import
settings differ from params.yaml: the prefetch stage takes each log's model from its importer (the
default machine holds DeepSeek-V2-Lite's and FLAME-MoE's experts whole)."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import ROOT, set_params
from routecast.config.params import load_params

ORDER = ["check_params", "extract_traces", "encode_features", "split_95_5", "tune", "check_params_after_tune",
         "train_full@baseline", "train_full@tuned", "evaluate", "simulate_prefetch", "headline"]


def stage_commands() -> dict[str, list[str]]:
    """Each stage's command line from dvc.yaml, foreach stages expanded."""
    stages = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        if "foreach" in stage:
            for key in stage["foreach"]:
                out[f"{name}@{key}"] = shlex.split(" ".join(stage["do"]["cmd"].replace("${key}", key).split()))
        else:
            out[name] = shlex.split(" ".join(stage["cmd"].split()))
    return out


def run_pipeline(project: Path, updates: dict[str, object]) -> None:
    """params.yaml with `updates`, then every stage's main() in `project`."""
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    set_params(project / "params.yaml", updates)
    commands = stage_commands()
    cwd = os.getcwd()
    os.chdir(project)
    try:
        for name in ORDER:
            run_stage(commands[name])
    finally:
        os.chdir(cwd)


def run_stage(command: list[str]) -> None:
    """`python stages/<name>.py ARGS` as its main(ARGS), in this process."""
    script = ROOT / command[1]
    spec = importlib.util.spec_from_file_location(f"stage_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(command[2:])


def test_every_stage_is_in_the_order_run_here() -> None:
    assert sorted(stage_commands()) == sorted(ORDER)


def test_the_mixtral_log_runs_the_whole_pipeline_at_the_default_params(shared_traces: Path, tmp_path: Path) -> None:
    log = shared_traces / "mixtral-8x7b-instruct" / "humaneval_2_routing.jsonl"
    # The import settings: 64-token sequences, so that a split by sequence has units (6 of them).
    run_pipeline(tmp_path, {"extract.source": "import", "extract.logs.format": "jsonl", "extract.logs.path": str(log),
                            "extract.logs.tokens_per_sequence": 64})
    evaluate = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    prefetch = json.loads((tmp_path / "metrics" / "prefetch.json").read_text())
    tuned = load_params(tmp_path / "params.yaml").tuned
    assert evaluate["tuned"]["n_test"] > 0 and 0 < evaluate["tuned"]["top2"] <= 1
    assert evaluate["tuned"]["top2"] > evaluate["frequency"]["top2"]  # it learned something of the routing
    assert "oracle" not in evaluate  # a real log has no generator to be exact about
    assert prefetch["tuned"]["stall_ms_per_token"] >= prefetch["perfect"]["stall_ms_per_token"]
    assert tuned.to_plain() == json.loads((tmp_path / "metrics" / "tune.json").read_text())["best_params"]
    head = json.loads((tmp_path / "metrics" / "headline.json").read_text(encoding="utf-8"))
    assert head["tuned"] == round(100 * evaluate["tuned"]["top2"], 1) and head["kind"] == tuned.kind
    assert "oracle" not in head and "gain" in head and "speedup" in head


def test_the_deepseek_log_runs_the_whole_pipeline_at_the_default_params(shared_traces: Path,
                                                                       tmp_path: Path) -> None:
    """Eight of its prompts (283 tokens; the whole log is benchmarks/deepseek_log.py's), at the
    default params: sets without weights, so the target is the set and no primary figure exists."""
    logs = shared_traces / "deepseek-v2-lite-chat-puffin" / "prompt_2[0-7]_data.csv"
    run_pipeline(tmp_path, {"extract.source": "import", "extract.logs.format": "deepseek_csv",
                            "extract.logs.path": str(logs)})
    evaluate = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    prefetch = json.loads((tmp_path / "metrics" / "prefetch.json").read_text())
    tuned = evaluate["tuned"]
    assert tuned["top1"] is None and tuned["top2"] is None  # no primary in a set
    assert tuned["set_recall"] > evaluate["frequency"]["set_recall"]
    assert 0 <= tuned["macro_f1"] <= 1 and 0 <= tuned["expert_accuracy"] <= 1
    assert "set_lookup" in evaluate and "boosted_trees" not in evaluate
    assert 0 <= prefetch["tuned"]["hit_rate"] <= 1
    assert prefetch["engine"]["slots_per_layer"] == 64  # 26 x 64 bf16 experts of 17.3 MB fit in 37.9 GB
    head = json.loads((tmp_path / "metrics" / "headline.json").read_text(encoding="utf-8"))
    assert head["tuned"] == round(100 * tuned["set_recall"], 1)  # no primary: the headline is set recall
    assert "gain" in head and "oracle" not in head


def test_the_flame_log_runs_the_whole_pipeline_at_the_default_params(shared_traces: Path, tmp_path: Path) -> None:
    """The FLAME log's first 256 tokens (4 sequences of 64) of every layer, at the default params."""
    logs = tmp_path / "flame"
    logs.mkdir()
    for file in sorted((shared_traces / "flame-moe-290m" / "prefill-32seqs-2048tokens").glob("layer_*.csv")):
        (logs / file.name).write_text("".join(file.read_text().splitlines(keepends=True)[:257]))
    project = tmp_path / "project"
    project.mkdir()
    run_pipeline(project, {"extract.source": "import", "extract.logs.format": "flame_csv",
                           "extract.logs.path": str(logs), "extract.logs.tokens_per_sequence": 64})
    evaluate = json.loads((project / "metrics" / "evaluate.json").read_text())
    prefetch = json.loads((project / "metrics" / "prefetch.json").read_text())
    assert evaluate["tuned"]["n_test"] > 0 and 0 <= evaluate["tuned"]["set_recall"] <= 1
    head = json.loads((project / "metrics" / "headline.json").read_text(encoding="utf-8"))
    # One test sequence of four: no interval, so no half-widths; a real log has no oracle.
    assert set(head) == {"base", "tuned", "kind", "gain", "speedup"}, head
    assert prefetch["engine"]["expert_mb"] == pytest.approx(3 * 1024 * 704 * 2 / 1e6)  # FLAME-MoE-290M in bf16
    assert prefetch["engine"]["slots_per_layer"] == 64


@pytest.fixture(autouse=True)
def _quiet_logging():
    # Each stage's main() configures logging for a process; in one process, keep the test's own.
    import logging

    handlers = logging.getLogger().handlers[:]
    yield
    logging.getLogger().handlers[:] = handlers
