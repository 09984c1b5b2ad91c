"""`extract.source: hf`: tiny Mixtral, Qwen2-MoE and OLMoE models, routing checked against the model itself."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from routecast.config.params import ExtractParams, HFParams
from routecast.data.traces import read_traces
from routecast.sources.extract import extract_traces

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
torch = pytest.importorskip("torch")

from routecast.sources.hf import UnsupportedModelError, find_routers  # noqa: E402
from routecast.sources.tiny_model import save_tiny_model  # noqa: E402

# Different lengths, so a batch of them is padded; one blank line (skipped).
DOCS = ["def add(a, b):", "    return a + b  # the sum of two numbers, returned to the caller", "",
        "The quick brown fox jumps over the lazy dog.", "x", "Mixture-of-experts routing, layer by layer."]

FAMILIES = {
    "mixtral": dict(family="mixtral", num_layers=3, num_experts=8, top_k=2),
    # a dense layer between MoE layers: MoE layers are re-based to 0..L-1
    "qwen2_moe": dict(family="qwen2_moe", num_layers=4, num_experts=6, top_k=3, mlp_only_layers=[1]),
    "olmoe": dict(family="olmoe", num_layers=2, num_experts=8, top_k=2, norm_topk_prob=True),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def extracted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(family kwargs, model dir, corpus, the trace written by the hf source with batch_size 2)."""
    tmp = tmp_path_factory.mktemp(request.param)
    kwargs = dict(FAMILIES[request.param])
    model_dir = save_tiny_model(tmp / "model", kwargs.pop("family"), seed=1, **kwargs)
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(DOCS) + "\n")
    params = HFParams(model=str(model_dir), corpus=str(corpus), batch_size=2, device="cpu", max_length=40)
    extract_traces(ExtractParams(source="hf", hf=params), tmp / "traces.parquet")
    return FAMILIES[request.param], model_dir, read_traces(tmp / "traces.parquet")


@functools.lru_cache(maxsize=1)
def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()


def reference_run(model_dir: Path, text: str):
    """One document alone (no padding): token ids, per-layer router logits [T, E] and router inputs [T, H]."""
    tok, model = load(model_dir)
    _, routers, _ = find_routers(model)
    inputs: list[torch.Tensor] = []
    handles = [r.register_forward_pre_hook(lambda m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
               for r in routers]
    ids = tok(text, truncation=True, max_length=40, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True, use_cache=False)
    for h in handles:
        h.remove()
    return ids[0].numpy(), [lg.float() for lg in out.router_logits], inputs, routers


def test_routing_equals_topk_of_the_models_router_logits(extracted) -> None:
    kwargs, model_dir, traces = extracted
    L = kwargs["num_layers"] - len(kwargs.get("mlp_only_layers", []))
    k, E = kwargs["top_k"], kwargs["num_experts"]
    assert (traces.meta.num_layers, traces.meta.num_experts, traces.meta.top_k) == (L, E, k)
    renorm = kwargs["family"] == "mixtral" or kwargs.get("norm_topk_prob", False)
    assert traces.meta.source_params["renormalizes_topk"] == renorm
    if "mlp_only_layers" in kwargs:
        assert traces.meta.source_params["moe_layers"] == [0, 2, 3]

    docs = [d for d in DOCS if d.strip()]
    total = 0
    for seq, text in enumerate(docs):
        ids, logits, _, _ = reference_run(model_dir, text)
        T = len(ids)
        total += T
        sel = traces.seq_id == seq
        # padding produced no rows: exactly T tokens x L layers, positions 0..T-1
        assert sel.sum() == T * L
        order = np.lexsort((traces.layer[sel], traces.token_pos[sel]))
        pos = traces.token_pos[sel][order].reshape(T, L)
        assert (pos == np.arange(T)[:, None]).all()
        assert (traces.token_id[sel][order].reshape(T, L)[:, 0] == ids).all()
        experts = traces.experts[sel][order].reshape(T, L, k)
        weights = traces.weights[sel][order].reshape(T, L, k)
        assert len(logits) == L
        for layer, lg in enumerate(logits):
            assert lg.shape == (T, E)
            probs = torch.softmax(lg, dim=-1)
            top, idx = torch.topk(probs, k, dim=-1)
            np.testing.assert_array_equal(experts[:, layer], idx.numpy())
            np.testing.assert_allclose(weights[:, layer], (top / top.sum(-1, keepdim=True)).numpy(), atol=1e-5)
    assert len(traces) == total * L


def test_spec_logits_are_the_next_router_on_this_layers_input(extracted) -> None:
    kwargs, model_dir, traces = extracted
    L = traces.meta.num_layers
    text = DOCS[1]  # the longest document, seq_id 1
    ids, _, inputs, routers = reference_run(model_dir, text)
    sel = traces.seq_id == 1
    order = np.lexsort((traces.layer[sel], traces.token_pos[sel]))
    spec = traces.spec_logits[sel][order].reshape(len(ids), L, -1)
    for layer in range(L - 1):
        with torch.no_grad():
            by_hand = torch.nn.functional.linear(inputs[layer], routers[layer + 1].weight).numpy()
        np.testing.assert_allclose(spec[:, layer], by_hand, atol=1e-5)
    assert (spec[:, L - 1] == 0).all()


def test_max_tokens_caps_the_trace(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "m", "mixtral", num_layers=2)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(f'{{"body": "{d}"}}\n' for d in DOCS if d))
    params = HFParams(model=str(model_dir), corpus=str(corpus), text_column="body", max_tokens=30, batch_size=4,
                      device="cpu", spec_logits=False)
    extract_traces(ExtractParams(source="hf", hf=params), tmp_path / "t.parquet")
    traces = read_traces(tmp_path / "t.parquet")
    assert len(traces) == 30 * 2 and traces.spec_logits is None


def test_unsupported_architecture_fails_clearly() -> None:
    fake = SimpleNamespace(config=SimpleNamespace(model_type="llama"))
    with pytest.raises(UnsupportedModelError, match=r"architecture 'llama' .* not supported; supported: mixtral"):
        find_routers(fake)


def test_default_pipeline_does_not_import_transformers() -> None:
    code = ("import sys, routecast.sources.extract, routecast.sources.logs, routecast.sources.hf, "
            "routecast.config.params; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
