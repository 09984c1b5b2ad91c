"""routecast.Predictor, the engine-facing call: raw routing state in (ids, -1 unknown), checked;
entries past the current layer ignored; light to import; exports run with torch alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import routecast
from routecast.config.params import FeaturesParams, ModelParams, SplitParams, SyntheticParams, TrainParams
from routecast.data.features import encode_features
from routecast.data.split import split_features
from routecast.errors import InputError
from routecast.fit.training import fit_predictor, split_train_val
from routecast.predictors.checkpoints import save_checkpoint
from routecast.predictors.serve import Predictor
from routecast.sources.synthetic import generate


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    traces, _ = generate(SyntheticParams(num_sequences=16, tokens_per_sequence=32, num_layers=8, seed=1))
    train, _ = split_features(encode_features(traces, FeaturesParams()),
                              SplitParams(test_fraction=0.2, val_fraction=0.2))
    fit, val = split_train_val(train)
    params = ModelParams.of("mlp", lr=3e-3, layer_emb=3, expert_emb=4, architecture=[32], dropout=0.1)
    model = fit_predictor(params, TrainParams(epochs=1, batch_size=64, threads=1), fit,
                          val).model
    path = tmp_path_factory.mktemp("model") / "tuned.pt"
    save_checkpoint(path, model, {"position_scale": 2048.0})
    return routecast.Predictor.load(path)


LAYER = np.array([0, 3, 6])
HISTORY = np.array([[2, 5, 1, 7, 0, 0, 3, 4], [1, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]])
EXPERTS = np.array([[2, 3], [3, 1], [6, 0]])
WEIGHTS = np.array([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]])
POS = [0, 9, 4000]


def test_entries_past_the_layer_are_ignored(predictor: Predictor) -> None:
    garbage = HISTORY.copy()
    garbage[0, 1:] = 7
    garbage[1, 4:] = -1
    a = predictor.predict(LAYER, HISTORY, EXPERTS, WEIGHTS, POS)
    b = predictor.predict(LAYER, garbage, EXPERTS, WEIGHTS, POS)
    assert torch.equal(a.experts, b.experts) and torch.equal(a.scores, b.scores)
    assert a.experts.shape == (3, 2) and (a.scores[:, 0] >= a.scores[:, 1]).all()
    # a shorter history (only the layers known so far) is the same call
    short = predictor.predict(LAYER[:1], HISTORY[:1, :1], EXPERTS[:1], WEIGHTS[:1], POS[:1])
    assert torch.equal(short.experts, a.experts[:1])
    # the probabilities are a softmax over every expert: the best 8 of 8 sum to 1
    every = predictor.predict(LAYER, HISTORY, EXPERTS, WEIGHTS, POS, k=8)
    torch.testing.assert_close(every.scores.sum(1), torch.ones(3))


@pytest.mark.parametrize("change, message", [
    (dict(experts=np.array([[2, 8], [3, 1], [6, 0]])), r"experts: 8 out of range \[0, 7\]"),
    (dict(history=np.c_[HISTORY, HISTORY[:, :1]]), "history has 9 columns, the model reads 8 layers"),
    (dict(history=np.where(HISTORY == 5, 12, HISTORY)), r"history: 12 out of range \[-1, 7\]"),
    (dict(experts=EXPERTS[:, :1]), r"experts must have shape \[3, 2\], got \[3, 1\]"),
    (dict(layer=np.array([0, 3, 7])), r"layer: 7 out of range \[0, 6\]"),
    (dict(weights=WEIGHTS[:2]), r"weights must have shape \[3, 2\]"),
])
def test_bad_engine_input_is_refused_naming_the_argument(predictor: Predictor, change, message) -> None:
    args = dict(layer=LAYER, history=HISTORY, experts=EXPERTS, weights=WEIGHTS, token_pos=POS) | change
    with pytest.raises(InputError, match=message):
        predictor.predict(**args)
    with pytest.raises(InputError, match="k=9"):
        predictor.predict(LAYER, HISTORY, EXPERTS, WEIGHTS, POS, k=9)
    with pytest.raises(InputError, match="prev"):  # this model was trained without the previous token
        predictor.predict(LAYER, HISTORY, EXPERTS, WEIGHTS, POS, prev=np.zeros((3, 2), dtype=np.int64))


def test_import_routecast_stays_light() -> None:
    code = "import sys, routecast; assert 'torch' not in sys.modules; print(routecast.Predictor.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Predictor"


@pytest.mark.parametrize("suffix", [".pt2", ".ts"])
def test_exports_run_with_torch_alone(predictor: Predictor, tmp_path: Path, suffix: str) -> None:
    path = predictor.export(tmp_path / f"predictor{suffix}")
    want = predictor.predict(LAYER, HISTORY, EXPERTS, WEIGHTS, POS, k=3)
    # In a fresh interpreter with torch only: routecast is never imported by loading or running it.
    run = "torch.export.load(path).module()(*args)" if suffix == ".pt2" else "torch.jit.load(path).predict(*args, 3)"
    code = (f"import sys, json, torch\npath = {str(path)!r}\n"
            f"args = (torch.tensor({LAYER.tolist()}), torch.tensor({HISTORY.tolist()}), "
            f"torch.tensor({EXPERTS.tolist()}),"
            f" torch.tensor({WEIGHTS.tolist()}).float(), torch.tensor({POS}).float(), torch.zeros(3, 0),"
            f" torch.zeros(3, 0, dtype=torch.long), torch.full((3,), -1))\n"
            f"best, scores = {run}\n"
            "assert 'routecast' not in sys.modules\n"
            "print(json.dumps([best[:, :3].tolist(), scores[:, :3].tolist()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    best, scores = json.loads(out)
    assert best == want.experts.tolist()
    np.testing.assert_allclose(scores, want.scores.numpy(), atol=1e-6)
    one = Predictor.load(path).predict(LAYER[:1], HISTORY[:1], EXPERTS[:1], WEIGHTS[:1], POS[:1], k=3)  # batch of one
    assert one.experts.shape == (1, 3) and torch.equal(one.experts, want.experts[:1])
    with pytest.raises(InputError, match=r"\.onnx: export to \.pt2"):
        predictor.export(tmp_path / "predictor.onnx")
