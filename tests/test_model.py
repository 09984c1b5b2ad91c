"""The seed's model shape, checkpoints, and a training loop that learns and is deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from routecast.features import FeatureMeta, encode_features
from routecast.model import ModelConfig, RoutePredictor, SeededDropout, load_model, save_model
from routecast.params import FeaturesParams, ModelParams, SplitParams, SyntheticParams, TrainParams
from routecast.reference import FrequencyPredictor
from routecast.split import split_features
from routecast.training import split_train_val, topk_accuracy, train_model

META = FeatureMeta(num_layers=32, num_experts=8, top_k=2, history_len=32, lookahead=1, position_scale=2048.0)


@pytest.mark.parametrize(("layer_emb", "expert_emb", "width"), [(5, 7, 239), (10, 5, 178)])
def test_input_width_matches_the_seed(layer_emb: int, expert_emb: int, width: int) -> None:
    config = ModelConfig.build(META, ModelParams(1e-3, layer_emb, expert_emb, [64], 0.1))
    assert config.input_width == width
    assert RoutePredictor(config).mlp[0].in_features == width


def test_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    model = RoutePredictor(ModelConfig.build(META, ModelParams(1e-3, 5, 7, [512, 512], 0.18)))
    save_model(tmp_path / "m.pt", model, {"best_epoch": 3})
    loaded, checkpoint = load_model(tmp_path / "m.pt")
    assert checkpoint["best_epoch"] == 3 and loaded.config == model.config
    x = (torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long), torch.ones(4, 32, dtype=torch.long),
         torch.full((4, 2), 0.5), torch.zeros(4), torch.zeros(4, 0))
    model.eval()
    assert torch.equal(model(*x), loaded(*x))


@pytest.mark.parametrize("p", [0.05, 0.0739, 0.4])
def test_seeded_dropout_rate_scale_and_stream(p: float) -> None:
    drop = SeededDropout(p)
    drop.reseed(11)
    x = torch.ones(613, 517, requires_grad=True)  # an odd element count: the last 64-bit word is cut
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5  # binomial: within 4 sigma
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))  # kept units scaled by 1 / (1 - p)
    y.sum().backward()  # the gradient is the mask itself
    assert torch.equal(x.grad, y.detach())
    again = SeededDropout(p)
    again.reseed(11)
    assert torch.equal(again(torch.ones(613, 517)), y.detach())  # same seed, same masks
    assert not torch.equal(drop(torch.ones(613, 517)), y.detach())  # the stream moves on
    drop.eval()
    z = torch.randn(8, 3)
    assert drop(z) is z  # eval mode: the identity


@pytest.fixture(scope="module")
def data():
    traces, _ = generate_small()
    train, test = split_features(encode_features(traces, FeaturesParams()), SplitParams(seed=0))
    return train, test


def generate_small():
    from routecast.synthetic import generate

    return generate(SyntheticParams(num_sequences=30, tokens_per_sequence=64, num_layers=8))


def test_training_learns_beyond_frequency_and_is_deterministic(data) -> None:
    train, _ = data
    fit, val = split_train_val(train)
    params = ModelParams(3e-3, 5, 7, [128, 64], 0.1)
    tp = TrainParams(epochs=4, batch_size=256, early_stopping_patience=5, threads=1)
    first = train_model(params, tp, fit, val)
    second = train_model(params, tp, fit, val)
    def without_time(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert without_time(first.history) == without_time(second.history)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    assert first.history[-1]["train_loss"] < first.history[0]["train_loss"]
    freq = FrequencyPredictor().fit(fit).scores(val)
    freq_top2 = topk_accuracy(torch.from_numpy(freq), torch.from_numpy(val.target.astype(np.int64)), 2)
    assert first.best_val_top2 > freq_top2 + 0.03


def test_early_stopping_keeps_the_best_epoch(data) -> None:
    train, _ = data
    fit, val = split_train_val(train)
    # lr so large that training diverges after the first epochs.
    result = train_model(ModelParams(5.0, 5, 7, [64], 0.0),
                         TrainParams(epochs=20, batch_size=256, early_stopping_patience=2, lr_patience=0, threads=1), fit, val)
    best = max(row["val_top2"] for row in result.history)
    assert result.best_val_top2 == best
    assert result.history[result.best_epoch - 1]["val_top2"] == best
    assert len(result.history) <= result.best_epoch + 2
