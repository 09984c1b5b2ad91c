"""Params are checked once, for every key, before any stage touches an output (see dvc.yaml)."""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from pathlib import Path

import optuna
import pytest
from ruamel.yaml import YAML

from conftest import ROOT, set_params
from routecast.config.fields import FloatRange, IntRange
from routecast.config.params import Params, ParamsError, SearchSpace, load_params
from routecast.fit.tuning import suggest_config
from routecast.predictors.mlp import MLPSpace, UnitsRange


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


def rejected(path: Path) -> ParamsError:
    with pytest.raises(ParamsError) as err:
        load_params(path)
    return err.value


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("key", ["train.weight_decay", "features.position_scale", "tune.timeout",
                                 "tune.search_space.mlp.lr.high", "tune.search_space.gru.dropout.low",
                                 "baseline.mlp.lr",
                                 "train.lr_factor", "extract.synthetic.spec_noise"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_floats_are_refused_everywhere(params_file: Path, key: str, value: float) -> None:
    set_params(params_file, {key: value})  # ruamel writes .inf / -.inf / .nan
    err = rejected(params_file)
    assert err.key == key and "must be a finite number" in str(err)


def test_a_float_overflowing_in_the_file_is_refused(params_file: Path) -> None:
    text = params_file.read_text()
    params_file.write_text(re.sub(r"weight_decay: \S+", "weight_decay: 1e400", text))
    assert rejected(params_file).key == "train.weight_decay"


@pytest.mark.parametrize("key, value", [("train.epochs", 10**30), ("train.weight_decay", 10**400),
                                        ("extract.synthetic.seed", -(2**63) - 1)])
def test_numbers_beyond_64_bits_are_refused(params_file: Path, key: str, value: int) -> None:
    set_params(params_file, {key: value})
    assert rejected(params_file).key == key


def test_largest_64_bit_int_passes(params_file: Path) -> None:
    set_params(params_file, {"extract.synthetic.seed": 2**63 - 1})
    assert load_params(params_file).extract.synthetic.seed == 2**63 - 1


# --------------------------------------------------------------------------- the units search space


def space(first: list[int], later: list[int]) -> SearchSpace:
    return SearchSpace.of(mlp=MLPSpace(lr=FloatRange(1e-3, 1e-2, True), layer_emb=IntRange(2, 4),
                                       expert_emb=IntRange(2, 4), n_layers=IntRange(2, 4),
                                       units=UnitsRange(IntRange(*first), IntRange(*later)),
                                       dropout=FloatRange(0.0, 0.5)))


def widest_later_ratio(s: SearchSpace, n: int = 300) -> float:
    """The largest width[i] / width[i-1] over `n` random draws of `suggest_config`."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    ratio = 0.0
    for _ in range(n):
        widths = suggest_config(study.ask(), s).config.architecture
        ratio = max([ratio, *(b / a for a, b in zip(widths, widths[1:]))])
    return ratio


@pytest.mark.filterwarnings("ignore:The distribution is specified by")
@pytest.mark.parametrize("first, later", [([128, 512, 64], [32, 512, 32]), ([64, 256, 64], [64, 1024, 32]),
                                          ([100, 300, 50], [10, 90, 7])])
def test_accepted_spaces_never_widen(first: list[int], later: list[int]) -> None:
    s = space(first, later)
    s.validate("tune.search_space")
    assert widest_later_ratio(s) <= 1.0


def test_a_later_low_above_the_first_low_is_refused_because_it_widens(params_file: Path) -> None:
    bad = space([32, 512, 32], [64, 512, 32])
    assert widest_later_ratio(bad) > 1.0  # what the rule prevents: a 32-wide layer followed by a 64-wide one
    set_params(params_file, {"tune.search_space.mlp.units.first": {"low": 32, "high": 512, "step": 32},
                             "tune.search_space.mlp.units.later": {"low": 64, "high": 512, "step": 32}})
    err = rejected(params_file)
    assert err.key == "tune.search_space.mlp.units.later" and "must be <= first's low (32)" in str(err)


# --------------------------------------------------------------------------- dvc.yaml wiring


@pytest.fixture(scope="module")
def dvc_yaml() -> dict:
    return YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())


def test_check_params_tracks_every_section_but_tuned(dvc_yaml: dict) -> None:
    sections = [f.name for f in dataclasses.fields(Params)]
    assert "tuned" in sections
    assert dvc_yaml["stages"]["check_params"]["params"] == [s for s in sections if s != "tuned"]
    # The second check tracks the whole file (`- params.yaml:`), unknown sections included.
    assert dvc_yaml["stages"]["check_params_after_tune"]["params"] == [{"params.yaml": None}]
    assert "metrics/tune.json" in dvc_yaml["stages"]["check_params_after_tune"]["deps"]


def test_every_stage_waits_on_a_check(dvc_yaml: dict) -> None:
    stages = dvc_yaml["stages"]
    checks = {"check_params": "data/params.checked", "check_params_after_tune": "data/params_after_tune.checked"}
    for name, check in checks.items():
        assert stages[name]["outs"] == [check]
    for name, stage in stages.items():
        if name in checks:
            continue
        if "foreach" in stage:
            for key, item in stage["foreach"].items():
                assert "${item.checked}" in stage["do"]["deps"]
                # train_full@tuned reads `tuned`, which only the second check covers.
                assert item["checked"] == checks["check_params_after_tune" if key == "tuned" else "check_params"]
        else:
            assert checks["check_params"] in stage["deps"], name


def test_tune_depends_on_the_train_params_its_trials_use(dvc_yaml: dict) -> None:
    tracked = dvc_yaml["stages"]["tune"]["params"]
    assert {f"train.{f.name}" for f in dataclasses.fields(load_params(ROOT / "params.yaml").train)} - {"train.epochs"} \
        <= set(tracked)


def test_an_infinitely_fast_link_is_the_one_infinite_float(params_file: Path, tmp_path: Path) -> None:
    """`.inf` works where the docs offer it (simulate.link.gb_per_s), as DVC writes it from `-S ...=inf`."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(str(params_file), ["simulate.link.gb_per_s=inf"])
    assert "gb_per_s: .inf" in params_file.read_text()
    assert load_params(params_file).simulate.engine_numbers(32, 8, 2).gb_per_s == math.inf
    set_params(params_file, {"simulate.link.gb_per_s": -math.inf})
    assert rejected(params_file).key == "simulate.link.gb_per_s"
    set_params(params_file, {"simulate.link.gb_per_s": math.nan})
    assert rejected(params_file).key == "simulate.link.gb_per_s"
