"""Tiny random Hugging Face MoE models, to try `extract.source: hf` without a download and to
test the capture (`routecast tiny-model DIR --family mixtral`). Random routing has no cross-layer
structure: these are for exercising the extraction, never for accuracy. Needs the [hf] extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routecast.sources.hf import ROUTERS, UnsupportedModelError, find_routers


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
