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
functions here, never by the default pipeline. `save_tiny_model` builds a small random model
(with a byte-level tokenizer) for tests and for trying the source without a download:

    python -m routecast.hf_extract tiny-model models/tiny-mixtral --family mixtral
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from routecast.errors import InputError
from routecast.params import HFParams
from routecast.traces import TraceError, TraceMeta, TraceWriter

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


# --------------------------------------------------------------------------- tiny models


def _byte_tokenizer() -> Any:
    """A byte-level tokenizer (259 ids: <pad>, <s>, </s>, then the 256 bytes): any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_config(family: str, num_layers: int = 3, num_experts: int = 8, top_k: int = 2,
                hidden_size: int = 32, norm_topk_prob: bool = False, vocab_size: int = 264, **extra: Any) -> Any:
    """A tiny config of `family` (mixtral, qwen2_moe, qwen3_moe, olmoe); `extra` goes to the config."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=top_k, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False, **extra)
    if family == "mixtral":
        return AutoConfig.for_model("mixtral", num_local_experts=num_experts, **common)
    if family in ("qwen2_moe", "qwen3_moe"):
        extra = {"shared_expert_intermediate_size": 2 * hidden_size} if family == "qwen2_moe" else {}
        return AutoConfig.for_model(family, num_experts=num_experts, moe_intermediate_size=hidden_size,
                                    norm_topk_prob=norm_topk_prob, decoder_sparse_step=1, **extra, **common)
    if family == "olmoe":
        return AutoConfig.for_model("olmoe", num_experts=num_experts, norm_topk_prob=norm_topk_prob, **common)
    raise UnsupportedModelError(f"no tiny config for {family!r}; supported: {', '.join(sorted(ROUTERS))}")


def save_tiny_model(path: str | Path, family: str = "mixtral", seed: int = 0, **config_kwargs: Any) -> Path:
    """Build a small randomly initialised MoE causal LM and its tokenizer, save both to `path`.

    Router weights are drawn with a larger scale than the default init so that routing is
    decisive (no near-ties). Random routing has no cross-layer structure: this model is for
    testing the capture, not for accuracy.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **config_kwargs)
    model = AutoModelForCausalLM.from_config(config)
    _, routers, _ = find_routers(model)
    with torch.no_grad():
        for r in routers:
            r.weight.normal_(0.0, 2.0 / config.hidden_size ** 0.5)
    path = Path(path)
    model.save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m routecast.hf_extract", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny-model", help="save a tiny random MoE model and tokenizer to a directory")
    tiny.add_argument("path")
    tiny.add_argument("--family", default="mixtral", choices=sorted(ROUTERS))
    tiny.add_argument("--layers", type=int, default=4)
    tiny.add_argument("--experts", type=int, default=8)
    tiny.add_argument("--top-k", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = save_tiny_model(args.path, args.family, args.seed, num_layers=args.layers, num_experts=args.experts,
                           top_k=args.top_k)
    print(f"saved a tiny {args.family} model ({args.layers} layers, {args.experts} experts, top-{args.top_k}) "
          f"to {path}")


if __name__ == "__main__":
    main()
