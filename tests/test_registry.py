"""Adding a predictor kind is one registered module: a kind declared here, in the test suite alone,
goes through params checks, tune, training, checkpoints and the engine `Predictor` and its exports,
with no line of src/ naming it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT, set_params
from routecast.config.fields import FloatRange, check
from routecast.config.params import ModelParams, ParamsError, load_params, write_tuned
from routecast.data.features import encode_features
from routecast.data.split import split_features
from routecast.fit.training import TrainResult, scored_once, split_train_val
from routecast.fit.tuning import file_digest, tune
from routecast.predictors import registry
from routecast.predictors.checkpoints import load_checkpoint, save_checkpoint
from routecast.predictors.serve import Predictor
from routecast.sources.synthetic import generate

NAME = "layer_prior"


# --------------------------------------------------------------------------- the kind: one module's worth


@dataclass(frozen=True)
class PriorParams:
    smoothing: float = 1.0  # pseudo-count per expert

    def validate(self, key: str) -> None:
        check(self.smoothing > 0, f"{key}.smoothing", f"must be > 0, got {self.smoothing}")


@dataclass(frozen=True)
class PriorSpace:
    smoothing: FloatRange = field(default_factory=lambda: FloatRange(0.1, 10.0, log=True))

    def validate(self, key: str) -> None:
        self.smoothing.validate(f"{key}.smoothing")


@dataclass(frozen=True)
class PriorConfig:
    """What the Predictor reads of a module's config (the prior reads no optional feature)."""

    kind: ClassVar[str] = NAME
    num_prev: ClassVar[int] = 0
    num_extra: ClassVar[int] = 0
    reads_token: ClassVar[bool] = False
    num_layers: int
    num_experts: int
    top_k: int
    history_len: int
    lookahead: int


class LayerPrior(nn.Module):
    """log P(next primary | source layer): a table of counts, the same for every token."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("log_prior", torch.zeros(config.num_layers, config.num_experts))

    def forward(self, layer: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor, history: torch.Tensor,
                gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor,
                token: torch.Tensor) -> torch.Tensor:
        return self.log_prior[layer]


def fit_prior(params: PriorParams, train: Any, fit: Any, val: Any, epochs: int, on_epoch: Any,
              desc: str) -> TrainResult:
    m = fit.meta
    module = LayerPrior(PriorConfig(m.num_layers, m.num_experts, m.top_k, m.history_len, m.lookahead)).eval()
    counts = np.full((m.num_layers, m.num_experts), params.smoothing)
    np.add.at(counts, (fit.layer.astype(np.int64), fit.target.astype(np.int64)), 1.0)
    module.log_prior = torch.from_numpy(np.log(counts / counts.sum(1, keepdims=True))).float()
    return scored_once(module, train, fit, val, epochs, 0.0, on_epoch)


KIND = registry.Kind(
    NAME, PriorParams, PriorSpace,
    suggest=lambda trial, space: PriorParams(trial.suggest_float("smoothing", space.smoothing.low, space.smoothing.high,
                                                                 log=space.smoothing.log)),
    trial_params=lambda p: {"smoothing": p.smoothing},
    from_trial=lambda t: PriorParams(float(t["smoothing"])),
    starting_points=lambda space: [("prior_default", PriorParams(space.smoothing.clip(1.0)))],
    fit=fit_prior,
    load=lambda config: LayerPrior(PriorConfig(**config)),
)


@pytest.fixture
def layer_prior():
    registry.register(KIND)
    yield KIND
    registry._KINDS.pop(NAME)


# --------------------------------------------------------------------------- the pipeline takes it


def test_no_source_file_names_the_test_kind() -> None:
    assert NAME not in registry.names()
    for path in (ROOT / "src").rglob("*.py"):
        assert NAME not in path.read_text(), path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(tmp_path / "params.yaml", {
        "extract.synthetic.num_sequences": 12, "extract.synthetic.tokens_per_sequence": 32,
        "extract.synthetic.num_layers": 8, "train.threads": 1, "tune.max_train_samples": None,
        "tune.n_trials": 4, "tune.epochs": 1,
        "tune.search_space": {NAME: {"smoothing": {"low": 0.5, "high": 4.0, "log": True}}, "mixture": None},
        "tuned": {"kind": NAME, NAME: {"smoothing": 2.0}}})
    return tmp_path


def test_params_tune_train_checkpoint_and_predictor(layer_prior, project: Path) -> None:
    params = load_params(project / "params.yaml")
    assert params.tuned == ModelParams(NAME, PriorParams(2.0))
    traces, _ = generate(params.extract.synthetic)
    train, test = split_features(encode_features(traces, params.features), params.split)

    # tune searches it beside a built-in kind, starting from its own starting point
    from routecast.data.features import write_features

    write_features(project / "train.parquet", train)
    cwd = os.getcwd()
    os.chdir(project)
    try:
        result = tune(params, train, file_digest("train.parquet"))
    finally:
        os.chdir(cwd)
    kinds = [t.params["kind"] for t in result.trials]
    assert kinds[0] == NAME and result.trials[0].user_attrs["origin"] == "prior_default" and "mixture" in kinds
    write_tuned(ModelParams(NAME, PriorParams(3.0)), project / "params.yaml")
    assert load_params(project / "params.yaml").tuned == ModelParams(NAME, PriorParams(3.0))

    # train_full's path: fit, checkpoint, Predictor, exports
    from routecast.fit.training import fit_predictor

    fit, val = split_train_val(train)
    trained = fit_predictor(params.tuned, params.train, fit, val)
    save_checkpoint(project / "prior.pt", trained.model, {"position_scale": test.meta.position_scale})
    loaded, checkpoint = load_checkpoint(project / "prior.pt")
    assert checkpoint["kind"] == NAME and isinstance(loaded, LayerPrior)
    predictor = Predictor.load(project / "prior.pt")
    got = predictor.predict_features(test, k=2)
    best = trained.model.log_prior[torch.from_numpy(test.layer.astype(np.int64))].topk(2, 1).indices
    assert torch.equal(got.experts, best)
    for suffix in (".ts", ".pt2"):
        exported = Predictor.load(predictor.export(project / f"prior{suffix}")).predict_features(test, k=2)
        assert torch.equal(exported.experts, got.experts)


def test_its_knobs_are_checked_like_any_kinds(layer_prior, project: Path) -> None:
    set_params(project / "params.yaml", {f"tuned.{NAME}.smoothing": -1.0})
    with pytest.raises(ParamsError, match=rf"tuned\.{NAME}\.smoothing: must be > 0"):
        load_params(project / "params.yaml")
    set_params(project / "params.yaml", {f"tuned.{NAME}.smoothing": 1.0, f"tuned.{NAME}.lr": 1e-3})
    with pytest.raises(ParamsError, match=rf"tuned\.{NAME}\.lr: unknown key \(known: smoothing\)"):
        load_params(project / "params.yaml")


def test_check_params_says_when_a_kind_ignores_the_token(layer_prior, project: Path) -> None:
    """Every built-in kind reads the token; a kind that does not is named, with the ones that do."""
    assert load_params(project / "params.yaml").idle_knobs() == []
    set_params(project / "params.yaml", {"features.token": True})
    notes = load_params(project / "params.yaml").idle_knobs()
    assert len(notes) == 1 and f"tuned (kind {NAME}) does not read the token" in notes[0], notes
    assert "the kinds context, gru, lookup_mlp, mixture, mlp and the token_table reference" in notes[0]
    set_params(project / "params.yaml", {"tuned": {"kind": "mixture"}})
    assert load_params(project / "params.yaml").idle_knobs() == []
    set_params(project / "params.yaml", {"features.horizons": [1, 2], "features.next_token": True})
    assert load_params(project / "params.yaml").idle_knobs() == []  # every built-in kind predicts every target
    set_params(project / "params.yaml", {"tuned": {"kind": NAME}, "features.token": False})
    notes = load_params(project / "params.yaml").idle_knobs()
    assert notes == [f"features.horizons: tuned (kind {NAME}) predicts the first horizon only; the kinds context, gru, "
                     "lookup_mlp, mixture, mlp and the references predict every horizon",
                     f"features.next_token: tuned (kind {NAME}) does not predict the next token; the kinds context, "
                     "gru, lookup_mlp, mixture, mlp and the references predict it"], notes
    set_params(project / "params.yaml", {"simulate.link.queue": "fifo"})
    assert load_params(project / "params.yaml").idle_knobs()[-1].startswith(
        "simulate.link.chunk_mb, simulate.link.slot_on: not read by the FIFO link")
    set_params(project / "params.yaml", {"simulate.link.queue": "priority", "simulate.cpu.gb_per_s": 80.0,
                                         "simulate.cache.expert_gb": 20.0, "simulate.cache.slots_per_layer": 4})
    assert load_params(project / "params.yaml").idle_knobs()[-2:] == [
        "simulate.cpu.gb_per_s, simulate.cpu.ms_per_expert: not read while simulate.cpu.fallback is false (no expert "
        "runs on the CPU)", "simulate.cache.expert_gb: not read: simulate.cache.slots_per_layer sets the slots"]
    set_params(project / "params.yaml", {"simulate.cache.scope": "model", "simulate.cache.slots_per_layer": None,
                                         "simulate.cache.slots_total": 80})
    assert load_params(project / "params.yaml").idle_knobs()[-1] == \
        "simulate.cache.expert_gb: not read: simulate.cache.slots_total sets the slots"


def test_an_unregistered_kind_is_refused_naming_the_known_ones(project: Path) -> None:
    with pytest.raises(ParamsError, match=rf"tuned\.kind: unknown kind '{NAME}' \(known: .*mixture"):
        load_params(project / "params.yaml")
