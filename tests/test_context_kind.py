"""The `context` kind: causal over tokens and layers, learns its token vocabulary from the fit split
only (unseen tokens share one row), trains to a set target on an unweighted trace, round-trips
through a checkpoint, and is deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import deterministic_router_trace
from routecast.config.params import NEXT_TOKEN, FeaturesParams, ModelParams, SplitParams, TrainParams
from routecast.data.batches import predict_logits
from routecast.data.features import encode_features
from routecast.data.split import split_features
from routecast.data.traces import TraceMeta, Traces
from routecast.fit.training import fit_predictor, split_train_val
from routecast.predictors.checkpoints import load_checkpoint, save_checkpoint
from routecast.predictors.context.model import ContextConfig, ContextPredictor
from routecast.predictors.tokens import build_vocab

L, E, K = 5, 8, 2
TINY = {"width": 16, "layers": 1, "heads": 2, "window": 8, "batch_windows": 4, "lr": 1e-2, "dropout": 0.0}


def set_trace(n_seq: int = 40, n_tok: int = 12, seed: int = 0) -> Traces:
    """An unweighted trace where token t's set at layer l + 1 is its set at layer l shifted by the
    token's word (a word w in 0..3 adds w + 1), so the token and the current set decide the next set."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 4, (n_seq, n_tok))
    rows = []
    for s in range(n_seq):
        for t in range(n_tok):
            first = rng.choice(E, K, replace=False)
            for layer in range(L):
                experts = np.sort((first + layer * (words[s, t] + 1)) % E)
                rows.append((s, t, layer, experts, f"w{words[s, t]}"))
    seq, pos, layer, experts, text = zip(*rows)
    meta = TraceMeta(L, E, K, source="test", weighted=False)
    return Traces(meta, np.array(seq, np.int32), np.array(pos, np.int32), np.array(layer, np.int16),
                  np.array(experts, np.int16), np.full((len(seq), K), 1 / K, np.float32),
                  token_text=np.array(text, dtype=object))


@pytest.fixture(scope="module")
def split():
    feats = encode_features(set_trace(), FeaturesParams(token=True))
    train, test = split_features(feats, SplitParams(test_fraction=0.2, val_fraction=0.2))
    return (*split_train_val(train), test)


def test_prediction_for_token_t_layer_l_reads_nothing_after_it() -> None:
    """Change token t's experts past layer l, and everything of later tokens: logit (t, l) stays."""
    torch.manual_seed(0)
    config = ContextConfig("context", L, E, K, 1, L, width=16, layers=2, heads=2, window=6, vocab_size=3)
    model = ContextPredictor(config).eval()
    model.vocab.copy_(torch.tensor([11, 22, 33]))
    route = torch.randint(1, E + 1, (1, 6, L, K))
    key = torch.tensor([[11, 22, 99, 33, 11, 22]])
    with torch.no_grad():
        base = model(route, key)
        for t, layer in [(0, 0), (2, 1), (3, 3), (5, 2)]:
            changed, changed_key = route.clone(), key.clone()
            changed[0, t, layer + 1:] = torch.randint(1, E + 1, changed[0, t, layer + 1:].shape)
            changed[0, t + 1:] = torch.randint(1, E + 1, changed[0, t + 1:].shape)
            changed_key[0, t + 1:] = 33
            torch.testing.assert_close(model(changed, changed_key)[0, t, layer], base[0, t, layer], rtol=0, atol=1e-6)
        # and an earlier token's routing does reach it
        changed = route.clone()
        changed[0, 1] = (changed[0, 1] % E) + 1
        assert not torch.allclose(model(changed, key)[0, 3, 2], base[0, 3, 2])


def test_vocabulary_comes_from_the_fit_split_and_unseen_tokens_share_row_zero() -> None:
    feats = encode_features(set_trace(n_seq=6), FeaturesParams(token=True))
    vocab = build_vocab(feats, min_count=1)
    assert len(vocab) == 4  # the four words
    rare = build_vocab(feats.take(feats.seq_id == 0), min_count=10**6)
    assert len(rare) == 0
    config = ContextConfig("context", L, E, K, 1, L, width=8, layers=1, heads=2, window=4, vocab_size=2)
    model = ContextPredictor(config)
    model.vocab.copy_(torch.from_numpy(np.sort(vocab[:2])))
    index = model.token_index(torch.from_numpy(vocab))
    assert sorted(index.tolist()) == [0, 0, 1, 2]


def test_learns_the_next_set_from_token_and_routing(split) -> None:
    fit, val, test = split
    train = TrainParams(epochs=60, threads=1, early_stopping_patience=60)
    result = fit_predictor(ModelParams.of("context", **TINY), train, fit, val)
    logits = predict_logits(result.model, test).numpy()
    predicted = np.argsort(-logits, axis=1, kind="stable")[:, :K]
    recall = (predicted[:, :, None] == test.target_set[:, None, :]).any(axis=2).mean()
    assert recall > 0.9, recall  # set_lookup alone cannot: the shift depends on the token's word


def test_checkpoint_round_trip_and_determinism(split, tmp_path: Path) -> None:
    fit, val, test = split
    a = fit_predictor(ModelParams.of("context", **TINY), TrainParams(epochs=1, threads=1), fit, val)
    b = fit_predictor(ModelParams.of("context", **TINY), TrainParams(epochs=1, threads=1), fit, val)
    expected = predict_logits(a.model, test)
    torch.testing.assert_close(predict_logits(b.model, test), expected, rtol=0, atol=0)
    save_checkpoint(tmp_path / "c.pt", a.model)
    loaded, _ = load_checkpoint(tmp_path / "c.pt")
    torch.testing.assert_close(predict_logits(loaded, test), expected, rtol=0, atol=0)


def test_a_model_trained_with_tokens_refuses_samples_without_them(split) -> None:
    fit, val, test = split
    model = fit_predictor(ModelParams.of("context", **TINY), TrainParams(epochs=1, threads=1), fit, val).model
    bare = test.take(np.arange(len(test)))
    bare.token = None
    with pytest.raises(ValueError, match="features.token"):
        predict_logits(model, bare)


def test_without_earlier_tokens_nothing_of_them_is_read() -> None:
    torch.manual_seed(0)
    config = ContextConfig("context", L, E, K, 1, L, width=16, layers=1, heads=2, window=6, earlier_tokens=False)
    model = ContextPredictor(config).eval()
    route = torch.randint(1, E + 1, (1, 6, L, K))
    key = torch.zeros((1, 6), dtype=torch.long)
    changed = route.clone()
    changed[0, :3] = torch.randint(1, E + 1, changed[0, :3].shape)
    with torch.no_grad():
        torch.testing.assert_close(model(changed, key)[0, 3:], model(route, key)[0, 3:], rtol=0, atol=1e-6)


def test_predictor_per_layer_call_and_exports_agree_with_whole_sequences(split, tmp_path: Path) -> None:
    """predict_context (the engine's call: the last tokens' routing, the predicted token's layers past
    l unknown) gives what evaluate gives for whole sequences, and so does its .pt2 export (a .ts is
    refused with a clear error: TorchScript does not compile the transformer)."""
    from routecast.errors import InputError
    from routecast.predictors.context.model import tokens_of
    from routecast.predictors.serve import Predictor

    fit, val, test = split
    model = fit_predictor(ModelParams.of("context", **TINY), TrainParams(epochs=1, threads=1), fit, val).model
    save_checkpoint(tmp_path / "c.pt", model)
    predictor = Predictor.load(tmp_path / "c.pt")
    got = predictor.predict_features(test, k=E)
    expected = torch.softmax(predict_logits(model, test), dim=1)
    torch.testing.assert_close(got.scores, torch.gather(expected, 1, got.experts), rtol=0, atol=1e-6)
    # one test sequence's first `window` tokens: evaluate reads token t with tokens 0..t before it
    seq = test.take(test.seq_id == test.seq_id[0])
    tokens = tokens_of(seq, TINY["window"])
    with pytest.raises(InputError, match=r"c\.ts: the context kind exports to \.pt2 only"):
        predictor.export(tmp_path / "c.ts")
    exported = Predictor.load(predictor.export(tmp_path / "c.pt2"))
    for t in range(min(len(tokens.row), TINY["window"])):
        route, key = tokens.route[None, :t + 1] - 1, tokens.key[None, :t + 1]
        for layer in np.flatnonzero(tokens.row[t] >= 0):
            now = route.clone()
            now[0, t, layer + 1:] = -1  # what an engine knows of token t at layer l
            call = predictor.predict_context(now, key, k=E)
            want = expected[tokens.row[t, layer]]
            torch.testing.assert_close(call.scores[0, layer], want[call.experts[0, layer]], rtol=0, atol=1e-5)
            from_export = exported.predict_context(now, key, k=E)
            torch.testing.assert_close(from_export.scores, call.scores, rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="predict_context"):
        predictor.predict([0], [[1]], [[1, 2]], [[0.5, 0.5]], [0])
    with pytest.raises(InputError, match="pass key"):
        predictor.predict_context(route)
    with pytest.raises(InputError, match="window=8"):
        predictor.predict_context(torch.zeros((1, 9, L, K), dtype=torch.long), torch.zeros((1, 9), dtype=torch.long))


def test_one_head_per_target_every_layer_ahead_and_the_next_token(tmp_path: Path) -> None:
    """`features.horizons: [1, 3]` and `features.next_token`: one context model, a head per target,
    each right on a router where every one is determined (the next token repeats this one 90% of
    the time); the engine's call (and the checkpoint) give the main horizon's head."""
    from routecast.evaluate.evaluation import ModelScorer
    from routecast.predictors.serve import Predictor

    traces = deterministic_router_trace(6, 5)
    feats = encode_features(traces, FeaturesParams(horizons=[1, 3], next_token=True))
    train, test = split_features(feats, SplitParams(test_fraction=0.2))
    fit, val = split_train_val(train)
    model = fit_predictor(ModelParams.of("context", **TINY), TrainParams(epochs=15, threads=1), fit, val).model
    assert model.config.horizons == (1, 3, NEXT_TOKEN) and model.heads == 3
    def top2(scores: np.ndarray, target: np.ndarray) -> float:
        return float((np.argsort(-scores, axis=1)[:, :2] == target[:, None]).any(axis=1).mean())

    main = ModelScorer("context", model).scores(test)
    assert top2(main, test.target) > 0.93
    for d, j, least in ((3, 1, 0.93), (NEXT_TOKEN, 2, 0.85)):  # the next token: a repeat 90% of the time
        rows = np.flatnonzero(test.horizon_set[:, j, 0] >= 0)
        head = ModelScorer("context", model.at_horizon(d)).scores(test)[rows]
        assert top2(head, test.horizon_set[rows, j, 0]) > least, d
    save_checkpoint(tmp_path / "m.pt", model, {"position_scale": test.meta.position_scale})
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    torch.testing.assert_close(predict_logits(loaded.at_horizon(3), test), predict_logits(model.at_horizon(3), test))
    predictor = Predictor.from_model(model)
    got = predictor.predict_features(test, k=5)
    np.testing.assert_allclose(got.scores.numpy(), np.take_along_axis(main, got.experts.numpy(), 1), atol=1e-5)
    assert predictor.horizons == [1, 3] and predictor.next_token
    # the engine's call with every target: the last token of a window, at every layer, each head's answer
    from routecast.predictors.context.model import tokens_of

    seq = test.take(test.seq_id == test.seq_id[0])
    tokens = tokens_of(seq, TINY["window"])
    t = min(len(tokens.row), TINY["window"]) - 1
    every = predictor.predict_context(tokens.route[None, :t + 1] - 1, tokens.key[None, :t + 1], k=5,
                                      every_horizon=True)
    assert every.experts.shape == (1, model.slots, 3, 5)
    torch.testing.assert_close(every.scores[:, :, 0], predictor.predict_context(
        tokens.route[None, :t + 1] - 1, tokens.key[None, :t + 1], k=5).scores)
    for j, d in enumerate((1, 3, NEXT_TOKEN)):
        want = torch.softmax(predict_logits(model.at_horizon(d), seq), dim=1)
        for layer in np.flatnonzero(tokens.row[t] >= 0):
            row = want[tokens.row[t, layer]]
            torch.testing.assert_close(every.scores[0, layer, j], row[every.experts[0, layer, j]], rtol=0, atol=1e-5)
