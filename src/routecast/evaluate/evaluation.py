"""Score every predictor on held-out sequences, with intervals a reviewer can trust.

`evaluate(...)` scores the trained models and the reference predictors, all fitted on the same
samples (the fit part of the train split; validation sequences are for choosing only), on the
test split and on any `evaluate.extra_tests` traces, and returns one `EvaluationResult`:

    top1, top2     the true next primary among a predictor's best 1 / 2 experts
    set_recall     share of the true next top-k set among its predicted top-k (set scores)
    exact_set      its predicted top-k set equals the true one
    *_lo, *_hi     the 95% interval of each, from a bootstrap over test sequences (samples of a
                   sequence are correlated, so sequences, not samples, are resampled); null when
                   the test split holds one sequence
    vs.<other>     for `tuned`: the paired difference in top-2 against every other predictor
                   (`top2_diff`, `_lo`, `_hi`: the same resampled sequences on both sides)

A predictor is anything with `name` and `scores(feats)` (next primary, [N, E]); `set_scores`
(next top-k set) where it has them, else its `scores` rank the set too.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from routecast.config.params import EvaluateParams, ExtraTest, FeaturesParams
from routecast.data.batches import predict_logits
from routecast.data.features import Features, encode_features
from routecast.data.predictions import prediction_ranks
from routecast.data.traces import TraceError, TraceMeta, read_traces
from routecast.evaluate.names import MODELS
from routecast.evaluate.scoring import ranked, sample_hits
from routecast.predictors.oracle import OraclePredictor
from routecast.predictors.references import (
    BoostedTreesPredictor,
    FrequencyPredictor,
    ReferencePredictor,
    SpeculativeGatePredictor,
    lookup_ladder,
)

log = logging.getLogger(__name__)

METRICS = ("top1", "top2", "set_recall", "exact_set")


@dataclass
class ModelScorer:
    """A trained module (any kind) as a predictor: its probabilities (softmax of its output)."""

    name: str
    model: torch.nn.Module
    batch_size: int = 8192

    def fit(self, train: Features) -> ModelScorer:
        return self  # trained by train_full

    def scores(self, test: Features) -> np.ndarray:
        return torch.softmax(predict_logits(self.model, test, self.batch_size), dim=1).numpy()


def score_metrics(scores: np.ndarray, test: Features, set_scores: np.ndarray | None = None) -> dict[str, float]:
    """The point metrics (no intervals) of one predictor."""
    hits = sample_hits(scores, scores if set_scores is None else set_scores, test)
    return {**{m: float(v.mean()) for m, v in hits.items()}, "n_test": int(len(test))}


def per_layer_top2(scores: np.ndarray, test: Features) -> dict[int, float]:
    hits = (ranked(scores, 2) == test.target.astype(np.int64)[:, None]).any(axis=1)
    layers = test.layer.astype(np.int64)
    return {int(layer): float(hits[layers == layer].mean()) for layer in np.unique(layers)}


class SequenceBootstrap:
    """Resample test sequences with replacement; a metric of a resample is the ratio of its
    sequences' sums of per-sample values to their sample counts."""

    def __init__(self, seq_id: np.ndarray, resamples: int, seed: int) -> None:
        sequences, self.sequence_of = np.unique(seq_id, return_inverse=True)
        n = len(sequences)
        draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
        # weights[b, s]: how many times resample b drew sequence s
        self.weights = np.zeros((resamples, n))
        np.add.at(self.weights, (np.repeat(np.arange(resamples), n), draws.ravel()), 1.0)
        self.counts = self.weights @ np.bincount(self.sequence_of, minlength=n)
        self.n_sequences = n

    def interval(self, values: np.ndarray, level: float = 0.95) -> tuple[float | None, float | None]:
        """The percentile interval; None, None with one sequence (a resample of it is always itself)."""
        if self.n_sequences < 2:
            return None, None
        sums = np.bincount(self.sequence_of, weights=values, minlength=self.n_sequences)
        stats = self.weights @ sums / self.counts
        tail = (1 - level) / 2 * 100
        return float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))

    def ratio_interval(self, numer: np.ndarray, denom: np.ndarray,
                       level: float = 0.95) -> tuple[float | None, float | None]:
        """The interval of mean(numer) / mean(denom) (e.g. tuned top-2 / oracle top-2), paired."""
        if self.n_sequences < 2:
            return None, None
        a = self.weights @ np.bincount(self.sequence_of, weights=numer, minlength=self.n_sequences)
        b = self.weights @ np.bincount(self.sequence_of, weights=denom, minlength=self.n_sequences)
        stats = a / np.maximum(b, 1e-12)
        tail = (1 - level) / 2 * 100
        return float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))


@dataclass
class Scored:
    """One predictor on one test set: per-sample values and scores."""

    hits: dict[str, np.ndarray]
    scores: np.ndarray
    set_scores: np.ndarray


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]  # metrics/evaluate.json
    per_layer: dict[str, dict[int, float]]  # predictor -> layer -> test top-2
    confusion: list[tuple[int, int]]  # (actual, predicted top-1) of the tuned model, per test sample
    rankings: dict[str, np.ndarray] = field(default_factory=dict)  # predictor -> [N, R] best experts (set scores)


def score_all(predictors: list[Any], test: Features) -> dict[str, Scored]:
    out = {}
    for predictor in predictors:
        scores = predictor.scores(test)
        set_scores = predictor.set_scores(test) if hasattr(predictor, "set_scores") else scores
        out[predictor.name] = Scored(sample_hits(scores, set_scores, test), scores, set_scores)
    return out


def summarise(scored: dict[str, Scored], test: Features, params: EvaluateParams) -> dict[str, Any]:
    """Point metrics, intervals and the tuned model's paired differences, per predictor."""
    boot = SequenceBootstrap(test.seq_id, params.bootstrap, params.seed)
    out: dict[str, Any] = {}
    for name, s in scored.items():
        entry: dict[str, Any] = {}
        for metric in METRICS:
            lo, hi = boot.interval(s.hits[metric])
            entry.update({metric: float(s.hits[metric].mean()), f"{metric}_lo": lo, f"{metric}_hi": hi})
        entry["n_test"] = int(len(test))
        entry["n_test_sequences"] = boot.n_sequences
        out[name] = entry
    if "oracle" in scored:
        oracle = scored["oracle"].hits["top2"]
        for name in MODELS:
            if name in scored:
                lo, hi = boot.ratio_interval(scored[name].hits["top2"], oracle)
                ratio = float(scored[name].hits["top2"].mean() / max(oracle.mean(), 1e-12))
                out[name].update({"top2_vs_oracle": ratio, "top2_vs_oracle_lo": lo, "top2_vs_oracle_hi": hi})
    if "tuned" in scored:
        tuned = scored["tuned"].hits["top2"]
        vs = {}
        for name, s in scored.items():
            if name == "tuned":
                continue
            diff = tuned - s.hits["top2"]
            lo, hi = boot.interval(diff)
            vs[name] = {"top2_diff": float(diff.mean()), "top2_diff_lo": lo, "top2_diff_hi": hi}
        out["tuned"]["vs"] = vs
    return out


def reference_predictors(trace_meta: TraceMeta, train: Features) -> list[ReferencePredictor]:
    """Every reference predictor that applies to this trace, fitted on `train`.

    Always: frequency, lookup_1..3, boosted_trees. The oracle only for synthetic traces (it is
    rebuilt from `trace_meta.source_params`); the speculative gate only when `train` carries
    `spec_logits` and the target is the next layer (they are layer l + 1's router logits, so they
    say nothing direct about layer l + 2 or later).
    """
    predictors: list[ReferencePredictor] = [FrequencyPredictor(), *lookup_ladder(3), BoostedTreesPredictor()]
    if trace_meta.source == "synthetic":
        predictors.append(OraclePredictor.from_trace_meta(trace_meta))
    if train.spec_logits is not None:
        if train.meta.lookahead == 1:
            predictors.append(SpeculativeGatePredictor())
        else:
            log.info("speculative_gate skipped: spec_logits are layer l + 1's router, the target is layer l + %d",
                     train.meta.lookahead)
    fitted = []
    for predictor in predictors:
        start = time.perf_counter()
        fitted.append(predictor.fit(train))
        log.info("reference %s: fitted in %.1fs", predictor.name, time.perf_counter() - start)
    return fitted


def evaluate(models: dict[str, torch.nn.Module], trace_meta: TraceMeta, fit: Features, val: Features,
             test: Features, params: EvaluateParams, features: FeaturesParams) -> EvaluationResult:
    """Score the models and every reference predictor (fitted on `fit`, the models' training
    samples) on `test` and on each of `params.extra_tests`; and, under `validation`, on the
    validation sequences every choice was made on (kind, epochs, tune's trials)."""
    predictors: list[Any] = [ModelScorer(name, model, params.batch_size) for name, model in models.items()]
    references = reference_predictors(trace_meta, fit)
    predictors += references
    scored = score_all(predictors, test)
    metrics = summarise(scored, test, params)
    for name, m in metrics.items():
        interval = "" if m["top2_lo"] is None else f" [{m['top2_lo']:.4f}, {m['top2_hi']:.4f}]"
        log.info("%-16s top-1 %.4f  top-2 %.4f%s  set recall %.4f", name, m["top1"], m["top2"], interval,
                 m["set_recall"])
    if len(val):
        metrics["validation"] = {name: {m: float(v.mean()) for m, v in s.hits.items()} | {"n": len(val)}
                                 for name, s in score_all(predictors, val).items()}
    if params.extra_tests:
        metrics["extra_tests"] = {t.name: evaluate_extra(t, predictors, trace_meta, fit, features, params)
                                  for t in params.extra_tests}
    confusion = []
    if "tuned" in scored:
        confusion = list(zip(test.target.tolist(), ranked(scored["tuned"].scores, 1)[:, 0].tolist()))
    return EvaluationResult(
        metrics=metrics,
        per_layer={name: per_layer_top2(s.scores, test) for name, s in scored.items()},
        confusion=confusion,
        rankings={name: ranked(s.set_scores, prediction_ranks(test.meta.num_experts)) for name, s in scored.items()},
    )


def evaluate_extra(test: ExtraTest, predictors: list[Any], trace_meta: TraceMeta, fit: Features,
                   features: FeaturesParams, params: EvaluateParams) -> dict[str, Any]:
    """One extra trace, imported and encoded with the training trace's feature settings, scored
    by every predictor (a synthetic one also by its own oracle)."""
    from routecast.sources.logs import import_logs  # only when there are extra tests

    where = f"evaluate.extra_tests: {test.name}"
    tmp = Path(tempfile.mkdtemp(prefix="routecast-extra-"))
    try:
        import_logs(test.logs, tmp / "trace.parquet")
        traces = read_traces(tmp / "trace.parquet")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m, t = trace_meta, traces.meta
    for what in ("num_layers", "num_experts", "top_k"):
        if getattr(m, what) != getattr(t, what):
            raise TraceError(f"{where}: {test.logs.path} has {what}={getattr(t, what)}, the training trace "
                             f"{getattr(m, what)}: the predictors cannot score it")
    feats = encode_features(traces, features)
    if len(feats) == 0:
        raise TraceError(f"{where}: {test.logs.path} yields no samples")
    chosen = [p for p in predictors if p.name != "oracle"]
    if t.source == "synthetic":
        chosen.append(OraclePredictor.from_trace_meta(t))
    scored = score_all(chosen, feats)
    log.info("extra test %s: %d samples from %d sequences", test.name, len(feats), len(np.unique(feats.seq_id)))
    return summarise(scored, feats, params)
