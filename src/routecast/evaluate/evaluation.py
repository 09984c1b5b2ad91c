"""Score every predictor on held-out sequences, with intervals a reviewer can trust.

`evaluate(...)` scores the trained models and the reference predictors, all fitted on the same
samples (the fit part of the train split; validation sequences are for choosing only), on the
test split and on any `evaluate.extra_tests` traces, and returns one `EvaluationResult`:

    top1, top2     the true next primary among a predictor's best 1 / 2 experts
    set_recall     share of the true next top-k set among its predicted top-k (set scores)
    exact_set      its predicted top-k set equals the true one
    macro_f1       macro F1 over experts of its predicted top-k set (`macro_f1_p50`: of the
                   experts whose membership is >= 0.5, MoE-Beyond's definition)
    expert_accuracy  share of (sample, expert) memberships its top-k set gets right
                   (`expert_accuracy_p50`: its >= 0.5 set); see `routecast.evaluate.scoring`
    *_lo, *_hi     the 95% interval of each, from a bootstrap over test sequences (samples of a
                   sequence are correlated, so sequences, not samples, are resampled; F1 from each
                   resample's summed TP/FP/FN counts); null when the test split holds one sequence
    vs.<other>     for `tuned`: the paired difference in top-2 against every other predictor
                   (`top2_diff`, `_lo`, `_hi`: the same resampled sequences on both sides)

A trace without a primary (unweighted: `meta.weighted` False, its sets unordered) has no top-1 or
top-2: those and every figure built on them (`top2_vs_oracle`, the per-layer top-2, the confusion
of top-1) are null or absent; the paired differences are in set recall (`set_recall_diff`) and the
per-layer figure is set recall.

A predictor is anything with `name` and `scores(feats)` (next primary, [N, E]); `set_scores`
(next top-k set) where it has them, else its `scores` rank the set too; `memberships(feats)`
(P(e in the next set), rows summing to about k) where it has them, else `memberships` below
derives them from its set scores.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from routecast.config.params import NEXT_TOKEN, EvaluateParams, ExtraTest, FeaturesParams, target_key, target_name
from routecast.data.batches import predict_logits
from routecast.data.features import Features, encode_features
from routecast.data.predictions import prediction_ranks
from routecast.data.traces import TraceError, TraceMeta, read_traces
from routecast.evaluate.names import MODELS
from routecast.evaluate.scoring import (
    expert_accuracy,
    macro_f1,
    membership_matrix,
    predicted_sets,
    ranked,
    sample_hits,
    set_counts,
)
from routecast.predictors.horizons import every_head
from routecast.predictors.oracle import OraclePredictor
from routecast.predictors.references import (
    BoostedTreesFullPredictor,
    BoostedTreesPredictor,
    FrequencyPredictor,
    LookupPredictor,
    ReferencePredictor,
    SetLookupPredictor,
    SpeculativeGatePredictor,
    TokenTablePredictor,
    lookup_ladder,
)

log = logging.getLogger(__name__)

# Per-sample metrics (a mean, its interval from per-sequence sums) and count metrics (from summed
# TP/FP/FN per expert), in the order they are written per predictor.
METRICS = ("top1", "top2", "set_recall", "exact_set", "expert_accuracy", "expert_accuracy_p50")
F1_METRICS = ("macro_f1", "macro_f1_p50")
ORDER = ("top1", "top2", "set_recall", "exact_set", "macro_f1", "macro_f1_p50", "expert_accuracy",
         "expert_accuracy_p50")
PRIMARY_METRICS = ("top1", "top2")  # read the next primary: null on an unweighted trace
VALIDATION_METRICS = ("top1", "top2", "set_recall", "exact_set")  # the `validation` block, kept small
HORIZON_METRICS = ("top2", "set_recall")  # the `horizons` block: these, their intervals, the oracle share, vs


@dataclass
class ModelScorer:
    """A trained module (any kind) as a predictor: its probabilities (softmax of its output).

    `target` is the `train.target` it was trained on. Both train a softmax: `primary` cross-entropy
    on the next primary, `set` cross-entropy on the uniform distribution over the next set (see
    `routecast.fit.training.loss_fn`), whose optimum is P(e in set) / k. So its memberships are
    k * softmax either way (for `primary` a proxy: the primary's probability scaled to sum to k).
    A loss on independent sigmoids (BCE) would make them sigmoid(logits): a new target must say.
    """

    name: str
    model: torch.nn.Module
    batch_size: int = 8192
    target: str = "primary"

    def __post_init__(self) -> None:
        if self.target not in ("primary", "set"):
            raise ValueError(f"{self.name}: train.target {self.target!r}: no membership rule for it")

    def fit(self, train: Features) -> ModelScorer:
        return self  # trained by train_full

    def scores(self, test: Features) -> np.ndarray:
        return torch.softmax(predict_logits(self.model, test, self.batch_size), dim=1).numpy()

    def memberships(self, test: Features, scores: np.ndarray | None = None) -> np.ndarray:
        """P(e in the next set) [N, E]: k * softmax (see the class doc); `scores`: its `scores(test)`
        when already computed (saves a forward pass)."""
        return (self.scores(test) if scores is None else scores) * test.meta.top_k


@dataclass
class HeadScorer(ModelScorer):
    """One head of a trained module, its probabilities computed beforehand on the whole test set
    (`every_head_probs`) and taken at the rows of a target's samples (`Features.at_horizon`)."""

    probs: np.ndarray | None = None  # [n, E]: the rows of the samples it scores, in order

    def scores(self, test: Features) -> np.ndarray:
        assert self.probs is not None and len(self.probs) == len(test), "the probabilities of other samples"
        return self.probs


def every_head_probs(model: torch.nn.Module, test: Features, batch_size: int) -> np.ndarray:
    """[N, heads, E]: every head's probabilities on every test sample, from one pass. A kind that
    reads the sequences (context) reads each token's whole routing from the full samples, which a
    target's subset (`at_horizon`) no longer holds."""
    with every_head(model):
        logits = predict_logits(model, test, batch_size)
    return torch.softmax(logits.view(len(test), model.heads, -1), dim=2).numpy()


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def memberships(predictor: Any, test: Features, scores: np.ndarray, set_scores: np.ndarray) -> np.ndarray:
    """A predictor's P(e in the next set) [N, E] (the contract in `routecast.evaluate.scoring`):

    - its own `memberships(test)` where it has them (a trained model: k * softmax);
    - the oracle's set scores as they are (they are P(e in the set) already);
    - set scores that are a distribution over experts (rows summing to 1: the reference tables'
      normalised set counts, or a primary's probabilities where a predictor has no set scores)
      times k, and set scores that already sum to k (memberships: set_lookup, token_table on an
      unweighted trace) as they are;
    - anything else (logits: speculative_gate) through softmax, times k.
    Only the threshold figures (`*_p50`) read them; a positive scale per row changes no ranking.
    """
    k = test.meta.top_k
    if isinstance(predictor, ModelScorer):
        return predictor.memberships(test, scores)
    if hasattr(predictor, "memberships"):
        return np.asarray(predictor.memberships(test), dtype=np.float64)
    s = np.asarray(set_scores, dtype=np.float64)
    if isinstance(predictor, OraclePredictor) or len(s) == 0:
        return s
    if np.isfinite(s).all() and (s >= 0).all():
        sums = s.sum(axis=1)
        if np.allclose(sums, 1.0, rtol=0, atol=1e-3):
            return s * k
        if np.allclose(sums, k, rtol=0, atol=1e-3 * k):
            return s
    log.info("%s: set scores neither sum to 1 nor to k per row: memberships are k * softmax of them",
             getattr(predictor, "name", predictor))
    return _softmax(s) * k


def score_metrics(scores: np.ndarray, test: Features, set_scores: np.ndarray | None = None) -> dict[str, float]:
    """The point metrics (no intervals) of one predictor."""
    hits = sample_hits(scores, scores if set_scores is None else set_scores, test)
    return {**{m: float(v.mean()) for m, v in hits.items()}, "n_test": int(len(test))}


def per_layer_top2(top2: np.ndarray, test: Features) -> dict[int, float]:
    """Top-2 per source layer, from each sample's two best experts [N, 2]."""
    hits = (top2 == test.target.astype(np.int64)[:, None]).any(axis=1)
    layers = test.layer.astype(np.int64)
    return {int(layer): float(hits[layers == layer].mean()) for layer in np.unique(layers)}


def per_layer_mean(values: np.ndarray, test: Features) -> dict[int, float]:
    """The mean of a per-sample value (e.g. set recall) per source layer."""
    layers = test.layer.astype(np.int64)
    return {int(layer): float(values[layers == layer].mean()) for layer in np.unique(layers)}


def sequence_index(seq_id: np.ndarray) -> tuple[int, np.ndarray]:
    """(number of sequences, each sample's sequence index 0..n-1 in sorted seq_id order): the
    index `SequenceBootstrap` resamples and `set_counts` sums by."""
    sequences, sequence_of = np.unique(seq_id, return_inverse=True)
    return len(sequences), sequence_of.reshape(-1)


class SequenceBootstrap:
    """Resample test sequences with replacement; a metric of a resample is the ratio of its
    sequences' sums of per-sample values to their sample counts (`interval`), or a statistic of
    its sequences' summed counts (`summed_interval`: macro F1 from TP/FP/FN)."""

    def __init__(self, seq_id: np.ndarray, resamples: int, seed: int) -> None:
        n, self.sequence_of = sequence_index(seq_id)
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

    def resample_sums(self, per_sequence: np.ndarray) -> np.ndarray:
        """Each resample's sums of per-sequence values [n_sequences, ...] (a sequence drawn twice
        counts twice): [resamples, ...]."""
        if per_sequence.shape[0] != self.n_sequences:
            raise ValueError(f"expected {self.n_sequences} sequences, got {per_sequence.shape[0]}")
        return np.tensordot(self.weights, per_sequence, axes=1)

    def summed_interval(self, per_sequence: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray],
                        level: float = 0.95) -> tuple[float | None, float | None]:
        """The percentile interval of `statistic` (vectorised over a leading axis) of each resample's
        summed per-sequence counts (`per_sequence`: [n_sequences, ...], e.g. TP/FP/FN per expert):
        F1 is computed from a resample's totals, never averaged from per-sample values. None, None
        with one sequence."""
        if self.n_sequences < 2:
            return None, None
        stats = np.asarray(statistic(self.resample_sums(per_sequence)), dtype=np.float64)
        tail = (1 - level) / 2 * 100
        return float(np.nanpercentile(stats, tail)), float(np.nanpercentile(stats, 100 - tail))

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
    """One predictor on one test set: per-sample values, its two best experts for the primary
    (`top2`, [N, 2]), its ranking for the set (`ranking`, [N, R]: the predictions file's) and, per
    count metric (F1), its TP/FP/FN per test sequence and expert ([n_sequences, 3, E],
    `scoring.set_counts`). The rankings, not the [N, E] scores: at 64 experts those are half a
    kilobyte a sample, twice over, for every predictor."""

    hits: dict[str, np.ndarray]
    top2: np.ndarray
    ranking: np.ndarray
    counts: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]  # metrics/evaluate.json
    per_layer: dict[str, dict[int, float]]  # predictor -> layer -> test `per_layer_metric`
    confusion: list[tuple[int, int]]  # (actual, predicted top-1) of the tuned model, per test sample
    rankings: dict[str, np.ndarray] = field(default_factory=dict)  # predictor -> [N, R] best experts (set scores)
    # predictor -> target key (h<d>, next_token) -> [N, R] for a later target (rows of -1: no such target)
    target_rankings: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    per_layer_metric: str = "top2"  # set_recall for a trace without a primary
    per_horizon: list[list[Any]] = field(default_factory=list)  # [horizon, predictor, metric(s)] rows

    @staticmethod
    def horizon_rows(metrics: dict[str, Any], horizons: tuple[int, ...], weighted: bool) -> list[list[Any]]:
        """per_horizon.csv's rows from the metrics: the main horizon's, then the `horizons` block's layer
        horizons (the next token's block is in the JSON only: it is no layer l + d to plot against)."""
        values = ("top2", "set_recall") if weighted else ("set_recall",)
        blocks = [(horizons[0], metrics)] + [(int(d), block) for d, block in metrics.get("horizons", {}).items()
                                             if d != target_name(NEXT_TOKEN)]
        return [[d, name, *(entry.get(v) for v in values)] for d, block in blocks
                for name, entry in block.items() if isinstance(entry, dict) and "set_recall" in entry]


def score_all(predictors: list[Any], test: Features) -> dict[str, Scored]:
    n_sequences, sequence_of = sequence_index(test.seq_id)
    truth = membership_matrix(test.target_set, test.meta.num_experts)
    out = {}
    for predictor in predictors:
        scores = predictor.scores(test)
        set_scores = predictor.set_scores(test) if hasattr(predictor, "set_scores") else scores
        hits = sample_hits(scores, set_scores, test)
        pred = predicted_sets(set_scores, memberships(predictor, test, scores, set_scores), test)
        hits["expert_accuracy"] = expert_accuracy(pred["topk"], truth)
        hits["expert_accuracy_p50"] = expert_accuracy(pred["p50"], truth)
        counts = {"macro_f1": set_counts(pred["topk"], truth, sequence_of, n_sequences),
                  "macro_f1_p50": set_counts(pred["p50"], truth, sequence_of, n_sequences)}
        ranking = ranked(set_scores, prediction_ranks(test.meta.num_experts))
        out[predictor.name] = Scored(hits, ranked(scores, 2), ranking, counts)
    return out


def _number(value: Any) -> float | None:
    """A JSON-safe float: None for NaN (e.g. macro F1 with no expert to average)."""
    value = float(value)
    return value if np.isfinite(value) else None


def summarise(scored: dict[str, Scored], test: Features, params: EvaluateParams) -> dict[str, Any]:
    """Point metrics, intervals and the tuned model's paired differences, per predictor. On a trace
    without a primary (`test.meta.weighted` False) the primary's figures are null and the paired
    differences are in set recall."""
    boot = SequenceBootstrap(test.seq_id, params.bootstrap, params.seed)
    weighted = test.meta.weighted
    if not weighted:
        log.info("top-1 and top-2 (and top2_vs_oracle, top2_diff, per-layer top-2, the top-1 confusion) not "
                 "applicable: the trace has no primary (unweighted sets); they are written as null, set metrics "
                 "only")
    out: dict[str, Any] = {}
    for name, s in scored.items():
        entry: dict[str, Any] = {}
        for metric in ORDER:
            if metric in PRIMARY_METRICS and not weighted:
                value, lo, hi = None, None, None
            elif metric in s.hits:
                value, (lo, hi) = float(s.hits[metric].mean()), boot.interval(s.hits[metric])
            elif metric in s.counts:
                value = _number(macro_f1(s.counts[metric].sum(axis=0)))
                lo, hi = boot.summed_interval(s.counts[metric], macro_f1)
            else:
                continue
            entry.update({metric: value, f"{metric}_lo": lo, f"{metric}_hi": hi})
        entry["n_test"] = int(len(test))
        entry["n_test_sequences"] = boot.n_sequences
        out[name] = entry
    if "oracle" in scored:
        oracle = scored["oracle"].hits["top2"]
        for name in MODELS:
            if name in scored:
                if not weighted:
                    out[name].update({"top2_vs_oracle": None, "top2_vs_oracle_lo": None, "top2_vs_oracle_hi": None})
                    continue
                lo, hi = boot.ratio_interval(scored[name].hits["top2"], oracle)
                ratio = float(scored[name].hits["top2"].mean() / max(oracle.mean(), 1e-12))
                out[name].update({"top2_vs_oracle": ratio, "top2_vs_oracle_lo": lo, "top2_vs_oracle_hi": hi})
    if "tuned" in scored:
        paired = "top2" if weighted else "set_recall"
        tuned = scored["tuned"].hits[paired]
        vs = {}
        for name, s in scored.items():
            if name == "tuned":
                continue
            diff = tuned - s.hits[paired]
            lo, hi = boot.interval(diff)
            vs[name] = {f"{paired}_diff": float(diff.mean()), f"{paired}_diff_lo": lo, f"{paired}_diff_hi": hi}
        out["tuned"]["vs"] = vs
    return out


def validation_block(scored: dict[str, Scored], val: Features) -> dict[str, Any]:
    """Every predictor's point metrics on the validation sequences (the primary's null on a trace
    without one)."""
    return {name: {m: float(s.hits[m].mean()) if val.meta.weighted or m not in PRIMARY_METRICS else None
                   for m in VALIDATION_METRICS} | {"n": len(val)} for name, s in scored.items()}


def reference_predictors(trace_meta: TraceMeta, train: Features) -> list[ReferencePredictor]:
    """Every reference predictor that applies to this trace, fitted on `train`.

    Always: frequency, lookup_1..3. boosted_trees (the raw ids) and boosted_trees_full (every
    feature the models read) for a weighted trace (they learn the primary);
    set_lookup for an unweighted one (its sets have no primary); token_table when the samples carry
    the token (`features.token`), backing off to set_lookup (or lookup_1). The oracle only for
    synthetic traces (it is rebuilt from `trace_meta.source_params`); the speculative gate only
    when `train` carries `spec_logits` and the target is the next layer (they are layer l + 1's
    router logits, so they say nothing direct about layer l + 2 or later).
    """
    predictors: list[ReferencePredictor] = [FrequencyPredictor(), *lookup_ladder(3)]
    if trace_meta.weighted:
        predictors += [BoostedTreesPredictor(), BoostedTreesFullPredictor()]
    else:
        log.info("boosted_trees and boosted_trees_full skipped: they learn the primary expert, which a trace of "
                 "unordered sets lacks")
        predictors.append(SetLookupPredictor())
    if train.token is not None:
        predictors.append(TokenTablePredictor(SetLookupPredictor() if not trace_meta.weighted
                                              else LookupPredictor(1)))
    if trace_meta.source == "synthetic":
        predictors.append(OraclePredictor.from_trace_meta(trace_meta))
    if train.spec_logits is not None:
        if train.meta.lookahead == 1:
            predictors.append(SpeculativeGatePredictor())
        else:
            log.info("speculative_gate skipped: spec_logits are layer l + 1's router, the target is %s",
                     "the next token" if train.meta.lookahead == NEXT_TOKEN else f"layer l + {train.meta.lookahead}")
    fitted = []
    for predictor in predictors:
        start = time.perf_counter()
        fitted.append(predictor.fit(train))
        log.info("reference %s: fitted in %.1fs", predictor.name, time.perf_counter() - start)
    return fitted


def _log_line(name: str, m: dict[str, Any]) -> None:
    def show(metric: str) -> str:
        value, lo = m.get(metric), m.get(f"{metric}_lo")
        if value is None:
            return "n/a"
        return f"{value:.4f}" + ("" if lo is None else f" [{lo:.4f}, {m[f'{metric}_hi']:.4f}]")

    if m.get("top2") is not None:
        log.info("%-16s top-1 %s  top-2 %s  set recall %.4f  macro F1 %s", name, show("top1"), show("top2"),
                 m["set_recall"], show("macro_f1"))
    else:
        log.info("%-16s set recall %s  macro F1 %s  macro F1 (p >= 0.5) %s", name, show("set_recall"),
                 show("macro_f1"), show("macro_f1_p50"))


def evaluate(models: dict[str, torch.nn.Module], trace_meta: TraceMeta, fit: Features, val: Features,
             test: Features, params: EvaluateParams, features: FeaturesParams,
             targets: dict[str, str] | None = None) -> EvaluationResult:
    """Score the models and every reference predictor (fitted on `fit`, the models' training
    samples) on `test` and on each of `params.extra_tests`; and, under `validation`, on the
    validation sequences every choice was made on (kind, epochs, tune's trials). `targets`: each
    model's `train.target` (default `primary`), which says how its output becomes memberships."""
    targets = targets or {}
    predictors: list[Any] = [ModelScorer(name, model, params.batch_size, targets.get(name, "primary"))
                             for name, model in models.items()]
    references = reference_predictors(trace_meta, fit)
    predictors += references
    scored = score_all(predictors, test)
    metrics = summarise(scored, test, params)
    for name, m in metrics.items():
        _log_line(name, m)
    if len(val):
        metrics["validation"] = validation_block(score_all(predictors, val), val)
    target_rankings: dict[str, dict[str, np.ndarray]] = {}
    if len(test.meta.horizons) > 1:
        metrics["horizons"] = evaluate_horizons(models, targets, trace_meta, fit, val, test, params, target_rankings)
    if params.extra_tests:
        metrics["extra_tests"] = {t.name: evaluate_extra(t, predictors, trace_meta, fit, features, params)
                                  for t in params.extra_tests}
    weighted = test.meta.weighted
    confusion = []
    if "tuned" in scored and weighted:
        confusion = list(zip(test.target.tolist(), scored["tuned"].top2[:, 0].tolist()))
    per_layer = {name: per_layer_top2(s.top2, test) if weighted else per_layer_mean(s.hits["set_recall"], test)
                 for name, s in scored.items()}
    return EvaluationResult(
        metrics=metrics,
        per_layer=per_layer,
        confusion=confusion,
        rankings={name: s.ranking for name, s in scored.items()},
        target_rankings=target_rankings,
        per_layer_metric="top2" if weighted else "set_recall",
        per_horizon=EvaluationResult.horizon_rows(metrics, test.meta.horizons, weighted),
    )


def evaluate_horizons(models: dict[str, torch.nn.Module], targets: dict[str, str], trace_meta: TraceMeta,
                      fit: Features, val: Features, test: Features, params: EvaluateParams,
                      rankings: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Every horizon d after the main one (`features.horizons`) and the next token (`features.next_token`,
    key "next_token"): each model's head for it, and every reference fitted for it on the same training
    samples (`Features.at_horizon`), scored on the test samples with that target (the next token: in
    the trace's token order, a sequence's last token has none). Per predictor: HORIZON_METRICS with
    their intervals over sequences, the share of the oracle, and the tuned model's paired differences;
    and under `validation`, the point figures on the validation sequences (where choices are made).
    `rankings`, when given, receives each predictor's ranking per target over all test samples
    (rows of -1 where a sample has no such target): the predictions file's later targets."""
    out: dict[str, Any] = {}
    with_heads = [name for name, model in models.items()
                  if getattr(model, "heads", 1) == len(test.meta.horizons) and hasattr(model, "at_horizon")]
    every = {split: {name: every_head_probs(models[name], feats, params.batch_size) for name in with_heads}
             for split, feats in (("test", test), ("val", val)) if len(feats)}
    for j, d in enumerate(test.meta.horizons[1:], 1):
        start = time.perf_counter()
        name_d = target_name(d)
        for name, model in models.items():
            if name not in with_heads:
                log.info("%s: %s (kind %s) predicts %s only, not scored here", name_d, name, model.config.kind,
                         [target_name(h) for h in getattr(model.config, "horizons", (model.config.lookahead,))])
        references = reference_predictors(trace_meta, fit.at_horizon(d))

        def scored(split: str, feats: Features, j: int, d: int, references: list[Any]
                   ) -> tuple[Features, dict[str, Scored]]:
            rows = np.flatnonzero(feats.horizon_set[:, j, 0] >= 0)  # at_horizon(d)'s samples
            heads = [HeadScorer(name, models[name], params.batch_size, targets.get(name, "primary"),
                                probs=every[split][name][rows, j]) for name in with_heads]
            feats_d = feats.at_horizon(d)
            return feats_d, score_all([*heads, *references], feats_d)

        test_d, on_test = scored("test", test, j, d, references)
        if rankings is not None:
            rows = np.flatnonzero(test.horizon_set[:, j, 0] >= 0)
            for name, s in on_test.items():
                full = np.full((len(test), s.ranking.shape[1]), -1, dtype=np.int16)
                full[rows] = s.ranking
                rankings.setdefault(name, {})[target_key(d)] = full
        summary = summarise(on_test, test_d, params)
        keep = {f"{m}{suffix}" for m in HORIZON_METRICS for suffix in ("", "_lo", "_hi")}
        keep |= {"top2_vs_oracle", "top2_vs_oracle_lo", "top2_vs_oracle_hi", "n_test", "vs"}
        out[name_d] = {name: {k: v for k, v in entry.items() if k in keep} for name, entry in summary.items()}
        if "val" in every:
            val_d, on_val = scored("val", val, j, d, references)
            out[name_d]["validation"] = validation_block(on_val, val_d)
        label = "next" if d == NEXT_TOKEN else f"l+{d}"
        for name, m in summary.items():
            _log_line(f"{label} {name}", m)
        log.info("%s: %d test samples, scored in %.1fs", name_d, len(test_d), time.perf_counter() - start)
    return out


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
