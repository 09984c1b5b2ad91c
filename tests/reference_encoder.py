"""A plain per-row Python encoder: the definition the vectorised `encode_features` must equal
(tests/test_encode_exact.py, benchmarks/bench_encode.py). Slow on purpose: one dict lookup per
(token, layer), written to be read against the feature table in `routecast.data.features`."""

from __future__ import annotations

import numpy as np

from routecast.config.params import NEXT_TOKEN, FeaturesParams
from routecast.data.features import FeatureMeta, Features
from routecast.data.traces import Traces

M64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64's finaliser on a Python int (mod 2^64)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def content_reference(traces: Traces, rows: dict[tuple[int, int], dict[int, int]]) -> dict[int, int]:
    """Each sequence's content hash: from its routing (the trace has no tokens here). A token's value
    is the sum over (layer, slot) of (expert + 1) times that cell's odd multiplier (0 for a missing
    row); the sequence's hash mixes each value with its position, sums them, and mixes in the count."""
    L, k = traces.meta.num_layers, traces.meta.top_k
    weights = [int(w) for w in np.random.default_rng(0x5EED).integers(1, 2**62, size=L * k, dtype=np.uint64) | 1]
    sums: dict[int, list[int]] = {}
    for (seq, pos), by_layer in sorted(rows.items()):
        value = 0
        for layer, i in by_layer.items():
            for j in range(k):
                value += (int(traces.experts[i, j]) + 1) * weights[layer * k + j]
        mixed = mix64((value & M64) ^ mix64((pos + 0x9E3779B97F4A7C15) & M64))
        total = sums.setdefault(seq, [0, 0])
        total[0] = (total[0] + mixed) & M64
        total[1] += 1
    return {seq: mix64(s ^ n) >> 1 for seq, (s, n) in sums.items()}


def encode_features_reference(traces: Traces, params: FeaturesParams) -> Features:
    meta = traces.meta
    L, k, la = meta.num_layers, meta.top_k, params.lookahead
    H = params.history_len or L
    rows: dict[tuple[int, int], dict[int, int]] = {}
    for i in range(len(traces)):
        rows.setdefault((int(traces.seq_id[i]), int(traces.token_pos[i])), {})[int(traces.layer[i])] = i
    names = ("seq_id", "token_pos", "layer", "primary", "secondary", "gating", "history", "position", "target",
             "target_set", "spec_logits", "prev_experts", "current_set", "content", "horizon_set")
    content = content_reference(traces, rows)
    out: dict[str, list] = {n: [] for n in names}
    for (seq, pos), by_layer in sorted(rows.items()):
        prev_rows = rows.get((seq, pos - 1), {})
        for layer in range(L - la):
            if layer not in by_layer or layer + la not in by_layer:
                continue
            i, j = by_layer[layer], by_layer[layer + la]
            history = [0] * H
            for h in range(min(layer + 1, H)):
                if h in by_layer:
                    history[h] = int(traces.experts[by_layer[h], 0]) + 1
            out["seq_id"].append(seq)
            out["token_pos"].append(pos)
            out["layer"].append(layer)
            out["primary"].append(int(traces.experts[i, 0]))
            out["secondary"].append(int(traces.experts[i, 1]) if k > 1 else -1)
            out["gating"].append(traces.weights[i])
            out["history"].append(history)
            out["position"].append(min(pos / params.position_scale, 1.0))
            out["target"].append(int(traces.experts[j, 0]))
            out["target_set"].append(traces.experts[j])
            out["current_set"].append(traces.experts[i])
            out["content"].append(content[seq])
            if traces.spec_logits is not None:
                out["spec_logits"].append(traces.spec_logits[i])
            ahead = []  # the top-k at layer + d for every horizon d, -1 where it is past the end or missing
            for d in params.targets:  # NEXT_TOKEN (0): the next position of the sequence, at this layer
                if d == NEXT_TOKEN:
                    row = rows.get((seq, pos + 1), {}).get(layer)
                else:
                    row = by_layer.get(layer + d) if layer + d < L else None
                ahead.append([-1] * k if row is None else traces.experts[row].tolist())
            out["horizon_set"].append(ahead)
            prev = prev_rows.get(layer + la)
            out["prev_experts"].append([0] * k if prev is None else (traces.experts[prev].astype(int) + 1).tolist())
    return Features(
        meta=FeatureMeta(L, meta.num_experts, k, H, la, float(params.position_scale), meta.source,
                         horizons=params.targets),
        seq_id=np.array(out["seq_id"], dtype=np.int32),
        token_pos=np.array(out["token_pos"], dtype=np.int32),
        layer=np.array(out["layer"], dtype=np.int16),
        primary=np.array(out["primary"], dtype=np.int16),
        secondary=np.array(out["secondary"], dtype=np.int16),
        gating=np.array(out["gating"], dtype=np.float32).reshape(-1, k),
        history=np.array(out["history"], dtype=np.int16).reshape(-1, H),
        position=np.array(out["position"], dtype=np.float32),
        target=np.array(out["target"], dtype=np.int16),
        target_set=np.array(out["target_set"], dtype=np.int16).reshape(-1, k),
        spec_logits=(np.array(out["spec_logits"], dtype=np.float32).reshape(-1, meta.num_experts)
                     if traces.spec_logits is not None else None),
        prev_experts=np.array(out["prev_experts"], dtype=np.int16).reshape(-1, k) if params.prev_token else None,
        current_set=np.array(out["current_set"], dtype=np.int16).reshape(-1, k),
        content=np.array(out["content"], dtype=np.int64),
        horizon_set=(np.array(out["horizon_set"], dtype=np.int16).reshape(-1, len(params.targets), k)
                     if len(params.targets) > 1 else None),
    )
