"""A plain per-row Python encoder: the definition the vectorised `encode_features` must equal
(tests/test_encode_exact.py, benchmarks/bench_encode.py). Slow on purpose: one dict lookup per
(token, layer), written to be read against the feature table in `routecast.data.features`."""

from __future__ import annotations

import numpy as np

from routecast.config.params import FeaturesParams
from routecast.data.features import FeatureMeta, Features
from routecast.data.traces import Traces


def encode_features_reference(traces: Traces, params: FeaturesParams) -> Features:
    meta = traces.meta
    L, k, la = meta.num_layers, meta.top_k, params.lookahead
    H = params.history_len or L
    rows: dict[tuple[int, int], dict[int, int]] = {}
    for i in range(len(traces)):
        rows.setdefault((int(traces.seq_id[i]), int(traces.token_pos[i])), {})[int(traces.layer[i])] = i
    names = ("seq_id", "token_pos", "layer", "primary", "secondary", "gating", "history", "position", "target",
             "target_set", "spec_logits", "prev_experts")
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
            if traces.spec_logits is not None:
                out["spec_logits"].append(traces.spec_logits[i])
            prev = prev_rows.get(layer + la)
            out["prev_experts"].append([0] * k if prev is None else (traces.experts[prev].astype(int) + 1).tolist())
    return Features(
        meta=FeatureMeta(L, meta.num_experts, k, H, la, float(params.position_scale), meta.source),
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
    )
