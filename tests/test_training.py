"""The training loop: the best epoch's weights come back, the set target, optimizer groups, devices."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from routecast.config.params import FeaturesParams, ModelParams, SplitParams, SyntheticParams, TrainParams
from routecast.data.batches import predict_logits, token_view
from routecast.data.features import encode_features
from routecast.data.split import split_features
from routecast.fit.training import configure_optimizer, fit_predictor, pick_device, split_train_val, validation_metrics
from routecast.predictors.neural import ModelConfig, build_model
from routecast.sources.synthetic import generate


@pytest.fixture(scope="module")
def data():
    traces, _ = generate(SyntheticParams(num_sequences=30, tokens_per_sequence=32, num_layers=8, seed=3))
    train, _ = split_features(encode_features(traces, FeaturesParams()), SplitParams(seed=0, val_fraction=0.2))
    return split_train_val(train)


def test_the_returned_model_is_the_best_epochs(data) -> None:
    """Re-score the returned model on validation: it is the best epoch's, not the last one's (an lr
    so large that later epochs get worse)."""
    fit, val = data
    params = ModelParams.of("mlp", lr=3.0, layer_emb=5, expert_emb=7, architecture=[64], dropout=0.0)
    result = fit_predictor(params, TrainParams(epochs=8, batch_size=128, lr_patience=10, early_stopping_patience=8,
                                               threads=1), fit, val)
    values = [row["val_top2"] for row in result.history]
    assert values.index(max(values)) + 1 == result.best_epoch and values[-1] < max(values)  # not the last epoch
    rescored = validation_metrics(predict_logits(result.model, val), val, "primary")["val_top2"]
    assert rescored == pytest.approx(max(values), abs=1e-9)


def test_set_target_optimises_set_recall(data) -> None:
    fit, val = data
    params = ModelParams.of("mlp", lr=3e-3, layer_emb=5, expert_emb=7, architecture=[64], dropout=0.1)
    train = TrainParams(epochs=3, batch_size=128, threads=1)
    as_set = fit_predictor(params, dataclasses.replace(train, target="set"), fit, val)
    as_primary = fit_predictor(params, train, fit, val)
    assert as_set.best_value == max(row["val_set_recall"] for row in as_set.history)
    assert as_primary.best_value == max(row["val_top2"] for row in as_primary.history)
    # trained for the set, it covers more of the next layer's set than trained for the primary
    assert as_set.history[-1]["val_set_recall"] > as_primary.history[-1]["val_set_recall"]


def test_no_weight_decay_on_embeddings_norms_and_biases() -> None:
    model = build_model(ModelConfig("mlp", 8, 8, 2, 8, architecture=(32, 16)))
    decay, plain = configure_optimizer(model, 1e-3, 0.01, torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    for name, p in model.named_parameters():
        wants = p.dim() >= 2 and "emb" not in name
        assert (id(p) in decayed) == wants, name


def test_devices() -> None:
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device: cuda"):
            pick_device("cuda")


def test_subsample_keeps_whole_tokens(data) -> None:
    fit, _ = data
    train = dataclasses.replace(fit, is_val=np.zeros(len(fit), dtype=bool))
    train.is_val[:200] = True
    sub, _ = split_train_val(train, max_train_samples=500, seed=1)
    view = token_view(sub)
    assert (view.present.sum(1) == view.present.shape[1]).all()  # every kept token has all its samples
    assert len(sub) <= 500


def test_torch_runs_its_avx2_code_paths() -> None:
    """routecast pins torch's CPU kernels to AVX2 (its __init__), so training is bit-identical across
    x86 CPUs; this process imported routecast first (tests/conftest.py), as every stage script does."""
    import os

    if os.environ.get("ROUTECAST_NATIVE_ISA") == "1":
        pytest.skip("ROUTECAST_NATIVE_ISA=1: native code paths asked for")
    assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT")  # DEFAULT: a CPU without AVX2
    assert os.environ["MKL_CBWR"] == "AVX2" and os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_an_epoch_gathers_in_chunks_with_the_same_batches(data, monkeypatch) -> None:
    """SampleBatches gathers a chunk of whole batches at a time (memory bounded by the chunk): the
    batches are exactly those of one gather of the whole shuffled set, in the same order."""
    from routecast.data.batches import sample_inputs, targets
    from routecast.fit import training

    train, _ = data
    batches = training.SampleBatches(sample_inputs(train), targets(train, "set"), 64, torch.device("cpu"))

    def epoch() -> list:
        return list(batches.epoch(torch.Generator().manual_seed(3)))

    monkeypatch.setattr(training, "GATHER_SAMPLES", 10 ** 9)  # one gather
    whole = epoch()
    monkeypatch.setattr(training, "GATHER_SAMPLES", 200)  # chunks of 3 batches
    chunked = epoch()
    assert len(whole) == len(chunked) == -(-batches.n_used // 64) > 3
    for (x1, y1), (x2, y2) in zip(whole, chunked):
        assert all(torch.equal(a, b) for a, b in zip(x1, x2)) and torch.equal(y1, y2)
