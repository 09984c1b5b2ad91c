"""Every predictor kind: causal, learns a tiny problem, deterministic, round-trips through a
checkpoint, and scores the same through the engine Predictor and its exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import deterministic_router_trace
from routecast.config.params import NEXT_TOKEN, FeaturesParams, ModelParams, SplitParams, SyntheticParams, TrainParams
from routecast.data.batches import predict_logits, sample_inputs, token_view
from routecast.data.features import FeatureMeta, encode_features
from routecast.data.split import split_features
from routecast.data.traces import TraceMeta, Traces
from routecast.errors import InputError
from routecast.evaluate.evaluation import ModelScorer
from routecast.fit.training import fit_predictor, split_train_val
from routecast.predictors.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from routecast.predictors.neural import ModelConfig, build_model
from routecast.predictors.references import LookupPredictor
from routecast.predictors.serve import Predictor
from routecast.sources.synthetic import generate

KINDS = ["mlp", "lookup_mlp", "gru", "mixture"]


class Payload:  # what a crafted pickle would smuggle into a model file
    pass
TINY_TRAIN = TrainParams(epochs=2, batch_size=64, threads=1)


SMALL = {"mlp": {"lr": 3e-3, "layer_emb": 3, "expert_emb": 4, "architecture": [32, 16], "dropout": 0.1},
         "gru": {"lr": 3e-3, "dropout": 0.1, "hidden": 32, "emb": 8, "batch_tokens": 16},
         "mixture": {"num_types": 4, "restarts": 1}}
SMALL["lookup_mlp"] = SMALL["mlp"]


def small_params(kind: str, **knobs: object) -> ModelParams:
    return ModelParams.of(kind, **{**SMALL[kind], **knobs})


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "prev_short_history_token"])
def data(request):
    """A small synthetic split; `prev_short_history_token`: the previous token's experts as a feature,
    a history shorter than the layers (the current primary then comes from its own column), and
    the token (features.token: ids 0..9, so the vocabulary has seen and unseen rows)."""
    traces, _ = generate(SyntheticParams(num_sequences=24, tokens_per_sequence=32, num_layers=8,
                                         route_persistence=0.25, seed=1))
    if request.param:
        traces.token_id = ((traces.seq_id * 7 + traces.token_pos) % 10).astype(np.int32)
    features = FeaturesParams(prev_token=True, history_len=4, token=True) if request.param else FeaturesParams()
    train, test = split_features(encode_features(traces, features), SplitParams(test_fraction=0.2, val_fraction=0.2))
    return (*split_train_val(train), test)


@pytest.fixture(scope="module")
def trained(data):
    fit, val, test = data
    return {kind: fit_predictor(small_params(kind), TINY_TRAIN, fit, val, desc=kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_causal_prediction_for_layer_l_ignores_layers_after_l(trained, data, kind: str) -> None:
    """Scramble every history entry past each sample's layer (and, in the engine call, the
    previous token's experts are the only other input): the prediction does not move."""
    _, _, test = data
    model = trained[kind].model
    x = sample_inputs(test, use_prev=test.prev_experts is not None, use_token=test.token is not None)
    scrambled = x.history.clone()
    later = torch.arange(x.history.shape[1]).unsqueeze(0) > x.layer.unsqueeze(1)
    scrambled[later] = torch.randint(1, test.meta.num_experts + 1, scrambled.shape)[later]
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(*x._replace(history=scrambled)), model(*x), rtol=0, atol=1e-6)


def test_gru_reads_a_token_once_and_equals_the_per_sample_call(trained, data) -> None:
    _, _, test = data
    model = trained["gru"].model
    per_token = predict_logits(model, test)  # token batches (forward_tokens)
    with torch.no_grad():
        per_sample = model(*sample_inputs(test, use_prev=test.prev_experts is not None,
                                          use_token=test.token is not None))
    torch.testing.assert_close(per_token, per_sample, rtol=0, atol=1e-5)
    # and changing a later layer of the token's path changes nothing before it
    view = token_view(test)
    history = torch.from_numpy(view.history.astype(np.int64))
    states = model.path_states(history)
    changed = history.clone()
    changed[:, 3:] = (changed[:, 3:] % test.meta.num_experts) + 1
    torch.testing.assert_close(model.path_states(changed)[:, :3], states[:, :3])


@pytest.mark.parametrize("kind", KINDS)
def test_the_token_is_an_input_of_every_kind(kind: str) -> None:
    """Layer 0 routes at random and layer 1 by the token alone (token_id 0..5 -> expert): from
    layer 0, the next primary is knowable only from the token. With features.token each kind gets
    it (the mixture as a per-type emission, with a type for each token); without, it cannot beat
    chance by much. A token never seen in training reads the unseen-token row."""
    rng = np.random.default_rng(0)
    L, E, n_tokens = 3, 6, 1200
    token = rng.integers(0, 6, n_tokens)
    primary = np.stack([rng.integers(0, E, n_tokens), (token * 5 + 1) % E, rng.integers(0, E, n_tokens)], 1)
    secondary = (primary + rng.integers(1, E, primary.shape)) % E
    traces = Traces(TraceMeta(L, E, 2, source="test"), np.repeat(np.arange(n_tokens) // 20, L).astype(np.int32),
                    np.repeat(np.arange(n_tokens) % 20, L).astype(np.int32),
                    np.tile(np.arange(L), n_tokens).astype(np.int16),
                    np.stack([primary, secondary], -1).reshape(-1, 2).astype(np.int16),
                    np.tile([0.6, 0.4], (n_tokens * L, 1)).astype(np.float32),
                    token_id=np.repeat(token, L).astype(np.int32))
    train_params = TrainParams(epochs=30, batch_size=64, threads=1, early_stopping_patience=30)
    accuracy = {}
    for use_token in (True, False):
        feats = encode_features(traces, FeaturesParams(token=use_token))
        train, test = split_features(feats, SplitParams(test_fraction=0.2))
        fit, val = split_train_val(train)
        knobs = {"num_types": 8, "restarts": 3} if kind == "mixture" else {"lr": 1e-2}
        model = fit_predictor(small_params(kind, **knobs), train_params, fit, val).model
        first = test.take(test.layer == 0)
        accuracy[use_token] = (ModelScorer(kind, model).scores(first).argmax(1) == first.target).mean()
        if use_token:
            assert model.config.reads_token and model.config.vocab_size == 6
            unseen = first.take(np.arange(len(first)))
            unseen.token = np.full(len(first), 10 ** 9, dtype=np.int64)
            predictor = Predictor.from_model(model)
            np.testing.assert_allclose(predictor.predict_features(unseen, k=E).scores.numpy().sum(1), 1.0, atol=1e-5)
            unseen.token = None
            with pytest.raises(InputError, match="trained with features.token"):
                predictor.predict_features(unseen)
            with pytest.raises(InputError, match="pass token"):
                predictor.predict([0], [[1]], [[1, 2]], [[0.6, 0.4]], [0])
    assert accuracy[True] > 0.95 and accuracy[False] < 0.5, (kind, accuracy)


@pytest.mark.parametrize("kind", KINDS)
def test_learns_a_deterministic_router_at_every_horizon(kind: str, tmp_path: Path) -> None:
    """Next primary = (primary + layer + 1) mod E, secondary random, and a token's routing repeats
    the previous token's with probability 0.9: every kind gets it right, one layer ahead and three
    (`features.horizons: [1, 3]`: one model, a head per horizon; the mixture pushes its posterior
    three steps), and the next token at this layer (`features.next_token`: one more head; the
    mixture's fitted persistence)."""
    L, E = 6, 5
    traces = deterministic_router_trace(L, E)
    feats = encode_features(traces, FeaturesParams(horizons=[1, 3], next_token=True))
    train, test = split_features(feats, SplitParams(test_fraction=0.2))
    fit, val = split_train_val(train)
    params = small_params(kind, **({"num_types": 2, "restarts": 2} if kind == "mixture" else {"lr": 1e-2}))
    result = fit_predictor(params, TrainParams(epochs=40, batch_size=64, threads=1, early_stopping_patience=40), fit,
                           val)
    assert result.model.config.horizons == (1, 3, NEXT_TOKEN)
    scores = ModelScorer(kind, result.model).scores(test)
    assert (scores.argmax(1) == test.target).mean() > 0.97, kind
    # the Predictor and its TorchScript export run the main horizon's head (the first of the horizons)
    predictor = Predictor.from_model(result.model)
    got = predictor.predict_features(test, k=E)
    np.testing.assert_allclose(got.scores.numpy(), np.take_along_axis(scores, got.experts.numpy(), 1), atol=1e-5)
    script = Predictor.load(predictor.export(tmp_path / "m.ts"))
    torch.testing.assert_close(script.predict_features(test, k=E).scores, got.scores, rtol=0, atol=1e-5)
    ahead = test.at_horizon(3)
    assert len(ahead) == len(test) * 3 // 5  # layers 0..2 of the five with a next layer
    np.testing.assert_array_equal(ahead.target, (ahead.primary + 3 * ahead.layer + 6) % E)
    scores = ModelScorer(kind, result.model.at_horizon(3)).scores(ahead)
    assert (scores.argmax(1) == ahead.target).mean() > 0.97, kind
    nxt = test.at_horizon(NEXT_TOKEN)  # the next token at this layer: a repeat 90% of the time
    next_scores = ModelScorer(kind, result.model.at_horizon(NEXT_TOKEN)).scores(nxt)
    # (> 0.9: the epoch kept is the first with the main horizon's best validation, here 1.0 from epoch 1)
    assert (next_scores.argmax(1) == nxt.primary).mean() > 0.9, kind
    assert 0.85 < (nxt.target == nxt.primary).mean() < 0.95
    # one engine call per layer gives every target: the first's `predict`, horizon 3's head, the next token's
    assert predictor.horizons == script.horizons == [1, 3] and predictor.next_token and script.next_token
    for engine in (predictor, script):
        every = engine.predict_features(test, k=E, every_horizon=True)
        assert every.experts.shape == (len(test), 3, E)
        torch.testing.assert_close(every.scores[:, 0], got.scores, rtol=0, atol=1e-5)
        rows = np.flatnonzero(test.horizon_set[:, 1, 0] >= 0)  # the samples with a layer l + 3
        want = np.take_along_axis(scores, every.experts[rows, 1].numpy(), 1)
        np.testing.assert_allclose(every.scores[rows, 1].numpy(), want, atol=1e-5)
        rows = np.flatnonzero(test.horizon_set[:, 2, 0] >= 0)  # the samples with a next token
        want = np.take_along_axis(next_scores, every.experts[rows, 2].numpy(), 1)
        np.testing.assert_allclose(every.scores[rows, 2].numpy(), want, atol=1e-5)
    one = test.take(np.arange(3))
    alone = predictor.predict_next_token(one.layer, one.history.astype(np.int64) - 1,
                                         np.stack([one.primary, one.secondary], 1), one.gating, one.token_pos, k=E)
    torch.testing.assert_close(alone.experts, predictor.predict_features(one, k=E, every_horizon=True).experts[:, 2])
    with pytest.raises(ValueError, match=r"horizon 2: this .* predicts \['1', '3', 'next_token'\]"):
        result.model.at_horizon(2)
    save_checkpoint(tmp_path / "m.pt", result.model, {"position_scale": test.meta.position_scale})
    loaded, _ = load_checkpoint(tmp_path / "m.pt")  # every head comes back
    np.testing.assert_array_equal(ModelScorer(kind, loaded.at_horizon(3)).scores(ahead), scores)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_model(data, kind: str) -> None:
    fit, val, test = data
    a = fit_predictor(small_params(kind), TINY_TRAIN, fit, val)
    b = fit_predictor(small_params(kind), TINY_TRAIN, fit, val)
    def strip(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    np.testing.assert_equal(strip(a.history), strip(b.history))  # NaN (no training loss) equals NaN
    torch.testing.assert_close(predict_logits(a.model, test), predict_logits(b.model, test), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_predictor_and_exports_agree_with_evaluate(trained, data, kind: str, tmp_path: Path) -> None:
    _, _, test = data
    model = trained[kind].model
    scores = ModelScorer("tuned", model).scores(test)
    save_checkpoint(tmp_path / "m.pt", model, {"position_scale": test.meta.position_scale})
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    np.testing.assert_array_equal(ModelScorer("tuned", loaded).scores(test), scores)
    predictor = Predictor.load(tmp_path / "m.pt")
    E = test.meta.num_experts
    got = predictor.predict_features(test, k=E)
    np.testing.assert_allclose(got.scores.numpy(), np.take_along_axis(scores, got.experts.numpy(), 1), atol=1e-5)
    for suffix in (".pt2", ".ts"):
        exported = Predictor.load(predictor.export(tmp_path / f"m{suffix}")).predict_features(test, k=E)
        torch.testing.assert_close(exported.scores, got.scores, rtol=0, atol=1e-5)


def test_lookup_mlp_starts_at_the_lookup_table(data) -> None:
    """Epoch 0 (before any step) is the three-deep lookup table fitted on the same samples."""
    fit, val, _ = data
    result = fit_predictor(small_params("lookup_mlp"), TINY_TRAIN, fit, val)
    table = LookupPredictor(3).fit(fit).scores(val)
    top2 = float((np.argsort(-table, 1, kind="stable")[:, :2] == val.target[:, None]).any(1).mean())
    # float32 here, float64 there: a tie may break the other way for a sample or two
    tolerance = 2.5 / len(val)
    assert result.history[0]["epoch"] == 0
    assert result.history[0]["val_top2"] == pytest.approx(top2, abs=tolerance)
    assert result.best_value >= top2 - tolerance  # never below the table on validation


def test_mlp_keeps_the_seed_shape() -> None:
    meta = FeatureMeta(num_layers=32, num_experts=8, top_k=2, history_len=32, lookahead=1, position_scale=2048.0)
    for (layer_emb, expert_emb), width in (((5, 7), 239), ((10, 5), 178)):
        config = ModelConfig("mlp", meta.num_layers, meta.num_experts, meta.top_k, meta.history_len,
                             layer_emb=layer_emb, expert_emb=expert_emb, architecture=(64,))
        assert config.input_width == width
        assert build_model(config).mlp[0].in_features == width


def test_a_damaged_or_foreign_checkpoint_is_refused_clearly(trained, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "m.pt", trained["mlp"].model)
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt: not a readable routecast model"):
        load_checkpoint(tmp_path / "cut.pt")

    torch.save({"config": Payload(), "state_dict": {}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: not a routecast model") as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only" not in str(info.value)
