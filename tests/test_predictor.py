"""routecast.Predictor: the fused inference path and its TorchScript export agree with the model
the evaluate stage scores (ModelScorer), on the same samples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import routecast
from routecast.evaluation import ModelScorer, ranked
from routecast.features import encode_features
from routecast.model import predict_logits
from routecast.params import FeaturesParams, ModelParams, SplitParams, SyntheticParams, TrainParams
from routecast.predictor import Predictor
from routecast.split import split_features
from routecast.synthetic import generate
from routecast.training import inputs_for, split_train_val, train_model

LOGIT_ATOL = 1e-4  # fused (BatchNorm folded, embeddings pre-multiplied) vs eager, float32


def trained(spec: bool, history_len: int | None, top_k: int = 2, architecture: list[int] | None = None):
    traces, _ = generate(SyntheticParams(num_sequences=24, tokens_per_sequence=32, num_layers=8, top_k=top_k,
                                         spec_noise=1.0 if spec else None, seed=1))
    feats = encode_features(traces, FeaturesParams(history_len=history_len))
    train, test = split_features(feats, SplitParams(test_fraction=0.2, val_fraction=0.2))
    fit, val = split_train_val(train)
    result = train_model(ModelParams(lr=3e-3, layer_emb=3, expert_emb=4, architecture=architecture or [32, 16],
                                     dropout=0.1), TrainParams(epochs=2, batch_size=64, threads=1), fit, val)
    return result.model, test


CASES = {"default": (False, None, 2), "spec_short_history": (True, 5, 2), "top1": (False, None, 1)}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return trained(*CASES[request.param])


def test_same_top_k_as_the_evaluate_stage(case) -> None:
    model, test = case
    k = max(test.meta.top_k, 2)
    scores = ModelScorer("tuned", model).scores(test)
    want = ranked(scores, k)
    got = Predictor.from_model(model).predict_features(test, k=k)
    # Rank ties within float32 rounding may order either way; every row with a clear margin must agree.
    top = np.sort(scores, axis=1)[:, ::-1]
    clear = (np.diff(-top[:, : k + 1], axis=1) > 1e-5).all(axis=1)
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(got.experts.numpy()[clear], want[clear])
    np.testing.assert_allclose(got.scores.numpy(), np.take_along_axis(scores, got.experts.numpy(), 1), atol=1e-5)


def test_fused_and_exported_logits_match_eager(case, tmp_path: Path) -> None:
    model, test = case
    eager = predict_logits(model, inputs_for(model, test))
    predictor = Predictor.from_model(model)
    history = test.history.astype(np.int64) - 1
    experts = np.zeros((len(test), test.meta.top_k), np.int64)
    if test.meta.top_k > 1:
        experts[:, 1] = test.secondary
    token_pos = test.position * 2048.0  # positions under 2048 encode exactly
    extra = test.spec_logits if model.config.num_extra else None
    fused = predictor.logits(test.layer, history, experts, test.gating, token_pos, extra)
    torch.testing.assert_close(fused, eager, atol=LOGIT_ATOL, rtol=0)

    path = predictor.export(tmp_path / "predictor.ts")
    exported = Predictor.load(path)
    torch.testing.assert_close(exported.logits(test.layer, history, experts, test.gating, token_pos, extra), eager,
                               atol=LOGIT_ATOL, rtol=0)
    # The artifact runs with torch alone (no routecast import): what an engine does.
    raw = torch.jit.load(str(path))
    n = 5
    best, probs = raw.predict(torch.from_numpy(test.layer[:n].astype(np.int64)), torch.from_numpy(history[:n]),
                              torch.from_numpy(experts[:n]), torch.from_numpy(test.gating[:n]),
                              torch.from_numpy(token_pos[:n]),
                              torch.from_numpy(extra[:n]) if extra is not None else torch.zeros(n, 0), 2)
    assert best.shape == (n, 2) and torch.all(probs[:, 0] >= probs[:, 1])
    torch.testing.assert_close(best, torch.softmax(eager[:n], 1).topk(2).indices)


def test_load_checkpoint_and_raw_engine_inputs(tmp_path: Path) -> None:
    """From a train_full checkpoint; history wider than needed and entries past `layer` are ignored."""
    from routecast.model import save_model

    model, test = trained(False, None)
    save_model(tmp_path / "tuned.pt", model)
    predictor = routecast.Predictor.load(tmp_path / "tuned.pt")
    layer = np.array([0, 3, 6])
    history = np.array([[2, 5, 1, 7, 0, 0, 3, 4], [1, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]])
    garbage = history.copy()
    garbage[0, 1:] = 7
    garbage[1, 4:] = 0
    experts, weights, pos = np.array([[2, 3], [3, 1], [6, 0]]), np.array([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]]), [0, 9, 4000]
    a = predictor.predict(layer, history, experts, weights, pos)
    b = predictor.predict(layer, garbage, experts, weights, pos)
    assert torch.equal(a.experts, b.experts) and torch.equal(a.scores, b.scores)
    assert a.experts.shape == (3, 2) and torch.all(a.scores.sum(1) <= 1.0 + 1e-6)
    with pytest.raises(FileNotFoundError):
        Predictor.load(tmp_path / "missing.pt")


def test_import_routecast_stays_light() -> None:
    code = "import sys, routecast; assert 'torch' not in sys.modules; print(routecast.Predictor.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Predictor"


def test_torch_export_pt2_matches_fused(tmp_path: Path) -> None:
    model, test = trained(True, 5)
    predictor = Predictor.from_model(model)
    path = predictor.export(tmp_path / "predictor.pt2")
    exported = Predictor.load(path)
    want, got = predictor.predict_features(test), exported.predict_features(test)
    assert torch.equal(got.experts, want.experts)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-6, rtol=0)
    one = exported.predict_features(test.take(np.arange(1)), k=3)  # batch of one, k up to num_experts
    assert one.experts.shape == (1, 3)
