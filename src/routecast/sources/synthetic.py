"""A seeded synthetic router with hidden structure: a mixture of Markov chains.

Each token draws a latent type `z` (never a feature) from a prior tilted by its position,
`P(z | pos) ~ exp(prior_logits[z] + pos_slope[z] * min(pos / POSITION_SCALE, 1))` (slopes spread by
`position_effect`). Its primary expert at layer 0 comes from `init[z]`; at layer l+1 from
`trans[z, l, e_l]`, a mix of a per-layer table shared by all types (weight `shared_weight`,
Dirichlet `shared_concentration`) and a sharp per-type table (Dirichlet `type_concentration`).
The secondary expert at layer l is drawn from `second[z, l, e_l]` (same mix, primary excluded),
the remaining k-2 experts likewise without replacement. Gate weights are drawn independently
of the type (sorted, highest first), so they carry no information about the next layer.

Calibration (defaults, train/test split by sequence, test top-1 / top-2 of the lookup ladder):
published Mixtral-8x7B 25.8/44.5, 33.4/52.8, 39.0/58.2 for (layer, e), (layer, e-1, e),
(layer, e-2, e-1, e); this generator gives about 26.3/44.8, 31.8/52.3, 38.1/58.4 at the default
48 sequences and 26.3/44.7, 32.0/52.7, 39.2/60.0 at 170 (the deepest table gains with data), with
a Bayes-optimal ceiling near 59/79 (`routecast.predictors.oracle`). tests/test_synthetic.py checks this.

Because every table is known, `SyntheticRouter` also defines the exact Bayes-optimal predictor
(see `routecast.predictors.oracle`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from routecast.config.params import POSITION_SCALE, SyntheticParams
from routecast.data.traces import TraceMeta, Traces

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class SyntheticRouter:
    """The generator's probability tables (all float64, rows sum to 1)."""

    params: SyntheticParams
    prior_logits: np.ndarray  # [Z]
    pos_slope: np.ndarray  # [Z]
    init: np.ndarray  # [Z, E]           P(e_0 | z)
    trans: np.ndarray  # [Z, L-1, E, E]   P(e_{l+1} | z, e_l)
    second: np.ndarray  # [Z, L, E, E]    P(secondary_l | z, e_l), zero on the diagonal
    gate_concentration: float

    @property
    def num_layers(self) -> int:
        return self.params.num_layers

    def type_prior(self, position: np.ndarray) -> np.ndarray:
        """P(z | position feature) for each row of `position` (already min(pos/scale, 1)): [N, Z]."""
        logits = self.prior_logits[None, :] + self.pos_slope[None, :] * position[:, None]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


def build_router(params: SyntheticParams) -> SyntheticRouter:
    """The generator's tables, a pure function of `params` (so the oracle can rebuild them)."""
    rng = np.random.default_rng(params.seed)
    Z, L, E, w = params.num_types, params.num_layers, params.num_experts, params.shared_weight
    shared, per_type = np.full(E, params.shared_concentration), np.full(E, params.type_concentration)

    def mix(shared_table: np.ndarray, type_tables: np.ndarray) -> np.ndarray:
        return w * shared_table[None] + (1 - w) * type_tables

    prior_logits = rng.normal(0.0, 0.5, size=Z)
    pos_slope = params.position_effect * rng.normal(0.0, 1.0, size=Z)
    init = mix(rng.dirichlet(shared), rng.dirichlet(per_type, size=Z))
    trans = mix(rng.dirichlet(shared, size=(L - 1, E)), rng.dirichlet(per_type, size=(Z, L - 1, E)))
    second = mix(rng.dirichlet(shared, size=(L, E)), rng.dirichlet(per_type, size=(Z, L, E)))
    # Tiny Dirichlet concentrations can underflow to exact zeros; keep every path possible.
    init, trans, second = (np.maximum(t, 1e-12) for t in (init, trans, second))
    eye = np.eye(E, dtype=bool)
    second[..., eye] = 0.0
    init, trans, second = (t / t.sum(axis=-1, keepdims=True) for t in (init, trans, second))
    return SyntheticRouter(params, prior_logits, pos_slope, init, trans, second, gate_concentration=2.0)


def _sample_rows(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of `probs` [N, E] by inverse CDF."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(len(probs))[:, None] * cdf[:, -1:]
    return np.minimum((u > cdf).sum(axis=1), probs.shape[1] - 1)


def _repeat_sources(rng: np.random.Generator, token_pos: np.ndarray, persistence: float) -> np.ndarray:
    """For each token, the token whose routing it takes: itself (a fresh draw), or, with probability
    `persistence`, the same as the previous token of its sequence (a sequence's first token draws)."""
    repeat = rng.random(len(token_pos)) < persistence
    repeat[token_pos == 0] = False
    return np.maximum.accumulate(np.where(repeat, 0, np.arange(len(token_pos))))


def generate(params: SyntheticParams) -> tuple[Traces, SyntheticRouter]:
    """Generate a full trace (every token routed at every layer) and the router behind it."""
    start = time.perf_counter()
    router = build_router(params)
    rng = np.random.default_rng([params.seed, 1])
    S, T = params.num_sequences, params.tokens_per_sequence
    L, E, k = params.num_layers, params.num_experts, params.top_k
    n_tokens = S * T
    seq_id = np.repeat(np.arange(S, dtype=np.int32), T)
    token_pos = np.tile(np.arange(T, dtype=np.int32), S)
    position = np.minimum(token_pos / POSITION_SCALE, 1.0)

    z = _sample_rows(rng, router.type_prior(position))
    experts = np.empty((n_tokens, L, k), dtype=np.int16)
    primary = _sample_rows(rng, router.init[z])
    for layer in range(L):
        if layer > 0:
            primary = _sample_rows(rng, router.trans[z, layer - 1, primary])
        experts[:, layer, 0] = primary
        if k > 1:
            # Gumbel top-(k-1) over the secondary table (primary has probability 0): the first
            # pick is an exact draw from second[z, layer, primary], the rest follow without replacement.
            with np.errstate(divide="ignore"):
                logp = np.log(router.second[z, layer, primary])
            keys = logp + rng.gumbel(size=logp.shape)
            experts[:, layer, 1:] = np.argsort(-keys, axis=1)[:, : k - 1]

    # Token-to-token persistence (decode): a token may repeat the previous token's routing. Drawn
    # from a stream of its own, so the fresh draws do not depend on `route_persistence`.
    source = _repeat_sources(np.random.default_rng([params.seed, 2]), token_pos, params.route_persistence)
    experts = experts[source]
    weights = np.sort(rng.dirichlet(np.full(k, router.gate_concentration), size=(n_tokens, L)), axis=-1)[..., ::-1]
    weights = (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)

    spec_logits = None
    if params.spec_noise is not None:
        # The next layer's router applied to this layer's hidden state: its logits favour the
        # experts the token will really take at layer l+1, blurred by `spec_noise`.
        nxt = np.zeros((n_tokens, L, E), dtype=np.float32)
        rows = np.arange(n_tokens)[:, None]
        for layer in range(L - 1):
            nxt[rows, layer, experts[:, layer + 1].astype(np.int64)] = np.log(weights[:, layer + 1] + 1e-3) + 4.0
        nxt += rng.normal(0.0, params.spec_noise, size=nxt.shape).astype(np.float32)
        nxt[:, L - 1] = 0.0  # no next layer after the last
        spec_logits = nxt.reshape(n_tokens * L, E)

    meta = TraceMeta(num_layers=L, num_experts=E, top_k=k, source="synthetic", source_params=asdict(params))
    traces = Traces(
        meta=meta,
        seq_id=np.repeat(seq_id, L),
        token_pos=np.repeat(token_pos, L),
        layer=np.tile(np.arange(L, dtype=np.int16), n_tokens),
        experts=experts.reshape(n_tokens * L, k),
        weights=weights.reshape(n_tokens * L, k),
        spec_logits=spec_logits,
    )
    log.info("synthetic: %d sequences x %d tokens x %d layers = %d rows in %.1fs", S, T, L, len(traces),
             time.perf_counter() - start)
    return traces, router
