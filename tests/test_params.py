"""The typed params loader: every bad key stops the stage with one error naming it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, set_params
from routecast.config.params import ModelParams, ParamsError, load_params, write_tuned


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


def test_repository_params_load(params_file: Path) -> None:
    params = load_params(params_file)
    assert params.tuned.kind == "mixture" and params.baseline.config.lr == pytest.approx(0.001)


def test_dvc_style_exponent_is_a_float(params_file: Path) -> None:
    # What `dvc exp run -S baseline.mlp.lr=1e-6` writes: the plain scalar 1e-06.
    text = re.sub(r"(\nbaseline:.*\n(?:  .*\n)*?    lr: )\S+", r"\g<1>1e-06", params_file.read_text())
    assert "    lr: 1e-06\n" in text
    params_file.write_text(text)
    params = load_params(params_file)
    assert isinstance(params.baseline.config.lr, float) and params.baseline.config.lr == 1e-6


@pytest.mark.parametrize(
    ("updates", "key"),
    [
        ({"baseline.mlp.dropout": 1.5}, "baseline.mlp.dropout"),
        ({"baseline.mlp.architecture": []}, "baseline.mlp.architecture"),
        ({"baseline.mlp.lr": "fast"}, "baseline.mlp.lr"),
        ({"tuned.mixture.num_types": 0}, "tuned.mixture.num_types"),
        ({"tuned.kind": "forest"}, "tuned.kind"),
        ({"train.epochs": 2.5}, "train.epochs"),
        ({"train.optimizer": "sgd"}, "train.optimizer"),
        ({"tune.search_space.mlp.lr.low": 0.1}, "tune.search_space.mlp.lr"),  # low > high
        ({"tune.search_space.mlp.layer_emb.low": 30}, "tune.search_space.mlp.layer_emb"),
        ({"tune.search_space.forest": None}, "tune.search_space.forest"),
        ({"split.by": "token"}, "split.by"),
        ({"extract.synthetic.top_k": 9}, "extract.synthetic.top_k"),
        ({"features.horizons": []}, "features.horizons"),
        ({"features.horizons": [2, 1]}, "features.horizons"),
        ({"features.horizons": [0, 1]}, "features.horizons"),
        ({"features.horizons": [1, 2], "features.prev_token": True}, "features.prev_token"),
        ({"features.next_token": True, "features.prev_token": True}, "features.prev_token"),
        ({"simulate.link.queue": "lifo"}, "simulate.link.queue"),
        ({"simulate.link.chunk_mb": 0}, "simulate.link.chunk_mb"),
        ({"simulate.link.slot_on": "never"}, "simulate.link.slot_on"),
        ({"simulate.prefetch.depth": 0}, "simulate.prefetch.depth"),
        ({"simulate.prefetch.depth": 2, "simulate.link.queue": "fifo"}, "simulate.prefetch.depth"),
        ({"simulate.cpu.gb_per_s": -1.0}, "simulate.cpu.gb_per_s"),
        ({"simulate.cpu.fallback": True, "simulate.link.queue": "fifo"}, "simulate.cpu.fallback"),
    ],
)
def test_bad_value_names_the_key(params_file: Path, updates: dict, key: str) -> None:
    set_params(params_file, updates)
    with pytest.raises(ParamsError) as info:
        load_params(params_file)
    assert info.value.key == key
    assert key in str(info.value) and str(params_file) in str(info.value)


def test_unknown_key_is_named(params_file: Path) -> None:
    set_params(params_file, {"train.epoch": 3})
    with pytest.raises(ParamsError, match=r"train\.epoch: unknown key"):
        load_params(params_file)


def test_a_renamed_key_says_what_replaced_it(params_file: Path) -> None:
    text = params_file.read_text().replace("  horizons:\n  - 1\n", "  lookahead: 2\n")
    params_file.write_text(text)
    with pytest.raises(ParamsError, match=r"features\.lookahead: replaced by features\.horizons \(lookahead d is "
                                          r"`horizons: \[d\]`\)"):
        load_params(params_file)


def test_missing_block_is_named(params_file: Path) -> None:
    text = params_file.read_text()
    start = text.index("\nbaseline:")
    end = text.index("\n\n", start + 1)
    params_file.write_text(text[:start] + text[end:])
    with pytest.raises(ParamsError, match=r": baseline: missing"):
        load_params(params_file)


def test_write_tuned_keeps_comments_and_other_blocks(params_file: Path) -> None:
    before = params_file.read_text()
    config = ModelParams.of("mlp", lr=0.0021, layer_emb=9, expert_emb=4, architecture=[320, 96, 32], dropout=0.11)
    write_tuned(config, params_file)
    after = params_file.read_text()
    assert load_params(params_file).tuned == config
    assert "\ntuned:\n  kind: mlp\n  mlp:\n    lr: 0.0021\n" in after
    assert "mixture" not in after.split("\ntuned:")[1][:200]
    comments = [line for line in before.splitlines() if line.lstrip().startswith("#")]
    assert comments and all(line in after for line in comments)
    assert load_params(params_file).baseline == ModelParams.of("mlp", lr=0.001, layer_emb=10, expert_emb=5,
                                                               architecture=[256, 128, 64], dropout=0.2)


@pytest.mark.parametrize(("updates", "key", "says"), [
    # a knob of another kind: the error names the kind and the knobs it does read
    ({"tuned.lr": 1e-6}, "tuned.lr", "unknown key: kind mixture reads tuned.mixture.{num_types, smoothing, restarts, "
                                     "iterations}"),
    ({"tuned.gru": {"lr": 1e-3}}, "tuned.gru", "tuned.kind is mixture, which reads only tuned.mixture"),
    ({"tuned.kind": "gru"}, "tuned.mixture", "drop tuned.mixture (dvc exp run -S '~tuned.mixture')"),
    ({"baseline.mlp.hidden": 64}, "baseline.mlp.hidden", "unknown key (known: lr, layer_emb, expert_emb, "
                                                        "architecture, dropout)"),
    # the design's bare `dvc exp run -S +lr=...`: told where a learning rate lives
    ({"lr": 1e-3}, "lr", "set baseline.mlp.lr or tuned.<kind>.lr (tuned.kind is mixture)"),
])
def test_a_knob_the_kind_does_not_read_is_a_one_line_error(params_file: Path, updates: dict, key: str,
                                                           says: str) -> None:
    set_params(params_file, updates)
    with pytest.raises(ParamsError) as info:
        load_params(params_file)
    assert info.value.key == key and says in str(info.value) and "\n" not in str(info.value)


def test_an_empty_kind_block_takes_the_kinds_defaults(params_file: Path) -> None:
    set_params(params_file, {"tuned": {"kind": "gru"}})
    from routecast.predictors.gru import GRUParams

    assert load_params(params_file).tuned == ModelParams("gru", GRUParams())


def test_stage_stops_before_any_work_naming_the_key(params_file: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    set_params(params_file, {"baseline.mlp.dropout": 1.5})
    out = tmp_path / "models" / "baseline.pt"
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "train_full.py"), "baseline", "--params",
                           str(params_file),
                           "--train", str(tmp_path / "absent.parquet"), "--out", str(out), "--live",
                           str(tmp_path / "live")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert "baseline.mlp.dropout: must be in [0, 1), got 1.5" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
