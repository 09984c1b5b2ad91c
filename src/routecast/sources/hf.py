"""Record the routing of a Hugging Face transformers MoE model over a text corpus (`extract.source: hf`).

The model is loaded from a local directory and run (inference, no cache) over the corpus in
batches of documents, right-padded; forward hooks on the router modules (never a change to the
model's code) capture, for every real token and MoE layer:

    experts      the ids the router chose, exactly as the model routed them (its own top-k
                 indices, highest probability first)
    weights      their softmax probabilities (computed in float32 from the router's logits, as
                 the model does), renormalised over the top-k. The canonical trace always stores
                 renormalised weights; whether the model itself renormalises (Mixtral always,
                 Qwen2-MoE / Qwen3-MoE / OLMoE only with config.norm_topk_prob) is recorded in the
                 trace metadata (`renormalizes_topk`); without it the model mixes the experts with
                 the un-renormalised probabilities, which differ from these by one factor per row.
    token_id     the vocabulary id
    spec_logits  the NEXT MoE layer's router applied to THIS layer's router input (the hidden
                 state after this layer's post-attention norm): what a speculative prefetcher
                 could compute once layer l has routed. Zeros at the last MoE layer (no next one).

Pad tokens produce no rows. MoE layers are numbered 0..L-1 in model order; their decoder-layer
indices are recorded in the metadata (`moe_layers`), as Qwen2-MoE can interleave dense layers.

transformers is an optional extra (`pip install -e ".[hf]"`): it is imported inside the
functions here, never by the default pipeline. To try the source without a download,
`routecast tiny-model models/tiny-mixtral --family mixtral` saves a tiny random model
(`routecast.sources.tiny_model`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from routecast.config.params import HFParams
from routecast.data.traces import TraceError, TraceMeta, TraceWriter
from routecast.errors import InputError

log = logging.getLogger(__name__)

# model_type -> where each decoder layer keeps its router, and whether the model renormalises
# its top-k weights (None: config.norm_topk_prob decides). Every router here computes
# softmax(logits) in float32, takes the top-k and returns (router_logits [T, E], weights [T, k],
# indices [T, k]) in transformers >= 5.
ROUTERS: dict[str, tuple[tuple[str, ...], bool | None]] = {
    "mixtral": (("mlp.gate", "block_sparse_moe.gate"), True),
    "qwen2_moe": (("mlp.gate",), None),
    "qwen3_moe": (("mlp.gate",), None),
    "olmoe": (("mlp.gate",), None),
}


class UnsupportedModelError(InputError):
    """The model's architecture has no known router layout."""


# --------------------------------------------------------------------------- corpus


def read_corpus(path: str | Path, text_column: str = "text") -> Iterator[str]:
    """Documents of a .txt (one per line), .jsonl or .parquet corpus, blank ones skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"extract.hf.corpus: {path}: no such file")
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield line.rstrip("\n")
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"{path}: line {n}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or text_column not in obj:
                    raise TraceError(f"{path}: line {n}: no field {text_column!r} (extract.hf.text_column)")
                if str(obj[text_column]).strip():
                    yield str(obj[text_column])
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_column not in pf.schema_arrow.names:
            raise TraceError(f"{path}: no column {text_column!r} (extract.hf.text_column); "
                             f"columns: {pf.schema_arrow.names}")
        for batch in pf.iter_batches(columns=[text_column], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text and text.strip():
                    yield text
    else:
        raise InputError(f"extract.hf.corpus: {path}: expected a .txt, .jsonl or .parquet file")


# --------------------------------------------------------------------------- model


def find_routers(model: Any) -> tuple[list[int], list[Any], bool | None]:
    """The MoE layers' decoder indices, their router modules, and the renormalisation rule."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ROUTERS:
        raise UnsupportedModelError(
            f"extract.hf.model: architecture {model_type!r} ({type(model).__name__}) is not supported; "
            f"supported: {', '.join(sorted(ROUTERS))}")
    paths, renorm = ROUTERS[model_type]
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"extract.hf.model: {type(model).__name__} has no model.layers")
    indices, routers = [], []
    for i, layer in enumerate(layers):
        for dotted in paths:
            module = layer
            for part in dotted.split("."):
                module = getattr(module, part, None)
            if module is not None and hasattr(module, "top_k") and hasattr(module, "weight"):
                indices.append(i)
                routers.append(module)
                break
    if not routers:
        raise UnsupportedModelError(f"extract.hf.model: no router found at {paths} in any of the "
                                    f"{len(layers)} decoder layers of {type(model).__name__}")
    return indices, routers, renorm


def _device_and_dtype(params: HFParams) -> tuple[Any, Any]:
    import torch

    device = params.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "auto" if params.dtype == "auto" else getattr(torch, params.dtype)
    return torch.device(device), dtype


def load_model(params: HFParams) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(params.model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"extract.hf.model: {path}: not a local model directory (no config.json); "
                                "download it first, e.g. `hf download <repo> --local-dir <dir>`")
    device, dtype = _device_and_dtype(params)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------- capture


class RouterCapture:
    """Forward hooks on the routers: per layer, the last call's indices, weights and spec logits."""

    def __init__(self, routers: list[Any], spec_logits: bool) -> None:
        self.routers = routers
        self.spec_logits = spec_logits
        self.calls: list[dict[str, Any] | None] = [None] * len(routers)
        self._handles = [r.register_forward_hook(self._hook(i), with_kwargs=True) for i, r in enumerate(routers)]

    def _hook(self, layer: int):
        import torch

        def hook(module, args, kwargs, output):
            if not (isinstance(output, tuple) and len(output) == 3):
                raise UnsupportedModelError(
                    f"router {type(module).__name__} returned {type(output).__name__}, expected "
                    "(router_logits, weights, indices) as in transformers >= 5")
            logits, _, indices = output
            x = args[0] if args else kwargs["hidden_states"]
            x = x.reshape(-1, x.shape[-1])
            # The model's own softmax in float32, read at the experts it chose (its top-k order).
            probs = torch.softmax(logits.float(), dim=-1)
            top = probs.gather(1, indices.long()).double()
            call = {"experts": indices.detach().cpu().numpy(),
                    "weights": (top / top.sum(dim=1, keepdim=True)).float().cpu().numpy(),
                    "tokens": x.shape[0]}
            if self.spec_logits:
                if layer + 1 < len(self.routers):
                    # .forward() bypasses the next router's hook; [0] is its logits.
                    spec = self.routers[layer + 1].forward(x)[0].float()
                    call["spec_logits"] = spec.detach().cpu().numpy()
                else:
                    call["spec_logits"] = np.zeros((x.shape[0], logits.shape[-1]), dtype=np.float32)
            self.calls[layer] = call

        return hook

    def take(self) -> list[dict[str, Any]]:
        calls, self.calls = self.calls, [None] * len(self.routers)
        missing = [i for i, c in enumerate(calls) if c is None]
        if missing:
            raise TraceError(f"routers of MoE layers {missing} were not called in the forward pass")
        return calls  # type: ignore[return-value]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _batches(params: HFParams, tokenizer: Any) -> Iterator[list[tuple[int, list[int]]]]:
    """Batches of (seq_id, token ids), at most max_tokens tokens in all."""
    budget = params.max_tokens
    batch: list[tuple[int, list[int]]] = []
    seq = 0
    for text in read_corpus(params.corpus, params.text_column):
        ids = tokenizer(text, truncation=True, max_length=params.max_length)["input_ids"]
        if budget is not None:
            ids = ids[:budget]
            budget -= len(ids)
        if ids:
            batch.append((seq, ids))
            seq += 1
        if len(batch) == params.batch_size:
            yield batch
            batch = []
        if budget is not None and budget <= 0:
            break
    if batch:
        yield batch


def extract_hf(params: HFParams, out: str | Path) -> dict[str, Any]:
    """Run the model over the corpus and write the canonical trace `out`; return counts."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(params.seed)
    model, tokenizer = load_model(params)
    moe_layers, routers, renorm = find_routers(model)
    config = model.config
    renormalizes = bool(getattr(config, "norm_topk_prob", False)) if renorm is None else renorm
    num_experts = int(routers[0].weight.shape[0])
    top_k = int(routers[0].top_k)
    L = len(routers)
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    meta = TraceMeta(
        num_layers=L, num_experts=num_experts, top_k=top_k, source=str(getattr(config, "_name_or_path", params.model)),
        source_params={**asdict(params), "model_type": config.model_type, "moe_layers": moe_layers,
                       "renormalizes_topk": renormalizes,
                       "spec_logits_last_layer": "zeros (no next MoE layer)"})
    device = next(model.parameters()).device
    capture = RouterCapture(routers, params.spec_logits)
    docs = tokens = 0
    try:
        with TraceWriter(out, meta, with_token_id=True, with_spec_logits=params.spec_logits) as writer, \
                tqdm(total=params.max_tokens, unit="tok", desc="hf routing") as bar, torch.no_grad():
            for batch in _batches(params, tokenizer):
                width = max(len(ids) for _, ids in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for b, (_, ids) in enumerate(batch):  # right padding: real tokens keep positions 0..n-1
                    input_ids[b, : len(ids)] = torch.tensor(ids)
                    mask[b, : len(ids)] = 1
                model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False,
                      logits_to_keep=1)
                calls = capture.take()
                real = mask.reshape(-1).bool().numpy()
                if calls[0]["tokens"] != real.size:
                    raise TraceError(f"router saw {calls[0]['tokens']} tokens for a {len(batch)} x {width} batch")
                n = int(real.sum())
                seq_id = np.repeat([s for s, _ in batch], width)[real]
                token_pos = np.tile(np.arange(width), len(batch))[real]
                token_id = input_ids.reshape(-1).numpy()[real]
                # rows in (sequence, token, layer) order: stack layers on axis 1
                experts = np.stack([c["experts"][real] for c in calls], axis=1).reshape(n * L, top_k)
                weights = np.stack([c["weights"][real] for c in calls], axis=1).reshape(n * L, top_k)
                spec = (np.stack([c["spec_logits"][real] for c in calls], axis=1).reshape(n * L, num_experts)
                        if params.spec_logits else None)
                writer.write(np.repeat(seq_id, L), np.repeat(token_pos, L), np.tile(np.arange(L), n), experts,
                             weights, token_id=np.repeat(token_id, L), spec_logits=spec,
                             where=f"{params.model} on {params.corpus}")
                docs += len(batch)
                tokens += n
                bar.update(n)
    finally:
        capture.close()
    report = {"documents": docs, "tokens": tokens, "rows": tokens * L, "moe_layers": L,
              "num_experts": num_experts, "top_k": top_k}
    log.info("hf: %s over %s: %d documents, %d tokens, %d rows (%d MoE layers x %d experts, top-%d)",
             params.model, params.corpus, docs, tokens, tokens * L, L, num_experts, top_k)
    return report
