"""RoPE re-rotation: exact in math, equal to re-encoding on the first layer, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from infercache import reuse, store
from infercache.models.tiny import TINY_CONFIGS
from infercache.reuse import UnsupportedModelError, UnsupportedRopeError, check_rotation, rope_info, rotate_keys
from infercache.reuse.rope import delta_cos_sin, layer0_keys, rotate_half


def tiny_llama(**overrides):
    cfg = dict(TINY_CONFIGS["llama"])
    cfg.pop("model_type")
    cfg.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg)).eval()


def test_delta_rotation_is_exact_in_float64() -> None:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    raw = torch.randn(2, 5, 16, dtype=torch.float64)  # pre-RoPE keys [heads, tokens, dim]

    def encode(start: int) -> torch.Tensor:
        cos, sin = delta_cos_sin(torch.arange(start, start + 5), inv_freq)
        return raw * cos + rotate_half(raw) * sin

    for start, delta in [(0, 1), (3, 1000), (1000, -997), (7, 0)]:
        moved = rotate_keys(encode(start), delta, inv_freq)
        assert torch.allclose(moved, encode(start + delta), rtol=0, atol=1e-10), (start, delta)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_rotation_equals_reencoding_on_the_first_layer(tiny, arch) -> None:
    """Keys are equal up to HF's float32 angle rounding (pos·θ in fp32: ~1e-7·pos rad); values bit-identical."""
    model, _ = tiny(arch)
    info = rope_info(model)
    ids = torch.arange(3, 40)
    here = layer0_keys(model, ids, 5)
    for delta, tolerance in [(1, 1e-6), (-5, 1e-6), (37, 1e-6), (1000, 1e-5)]:
        there = layer0_keys(model, ids, 5 + delta)
        error = float((rotate_keys(here, delta, info.inv_freq) - there).norm() / there.norm())
        assert error < tolerance, (delta, error)
    assert check_rotation(model) < 1e-6


def test_values_do_not_depend_on_position(llama) -> None:
    from transformers import DynamicCache

    model, _ = llama
    ids = torch.arange(3, 20)[None]
    caches = []
    for start in (0, 300):
        cache = DynamicCache()
        model(ids, cache=cache, position_ids=torch.arange(start, start + 17)[None])
        caches.append(cache)
    assert torch.equal(caches[0].layers[0].values, caches[1].layers[0].values)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 512, "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0},
])
def test_static_scaled_ropes_are_handled(rope) -> None:
    model = tiny_llama(rope_parameters=rope)
    assert rope_info(model).rope_type == rope["rope_type"]
    assert check_rotation(model) < 1e-6


def test_yarn_needs_unscaled_cos_sin() -> None:
    """The pitfall from the research notes: HF's cos/sin carry YaRN's attention scaling (1.1386 here)."""
    model = tiny_llama(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                                        "rope_theta": 10000.0})
    scaling = model.model.rotary_emb.attention_scaling
    assert scaling > 1.1
    ids = torch.arange(3, 20)
    here, there = layer0_keys(model, ids, 0), layer0_keys(model, ids, 50)
    cos, sin = model.model.rotary_emb(here, torch.tensor([[50]]))
    wrong = here * cos[0] + rotate_half(here) * sin[0]
    assert float((wrong - there).norm() / there.norm()) > 0.1
    right = rotate_keys(here, 50, rope_info(model).inv_freq)
    assert float((right - there).norm() / there.norm()) < 1e-6


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, "dynamic NTK"),
    ({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
      "original_max_position_embeddings": 512}, "LongRoPE"),
])
def test_dynamic_ropes_are_refused_clearly(rope, match, memory_store) -> None:
    model = tiny_llama(rope_parameters=rope)
    from infercache.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    with pytest.raises(UnsupportedRopeError, match=match):
        reuse.generate(model, tok, ["context. ", "question"], store=memory_store, mode="chunk", max_new_tokens=2)
    out = reuse.generate(model, tok, ["context. ", "question"], store=memory_store, mode="prefix", max_new_tokens=2)
    assert len(out.ids) == 2, "prefix reuse is exact for any RoPE and stays available"


def test_partial_rotary_is_refused() -> None:
    cfg = dict(TINY_CONFIGS["phi3"])
    cfg.pop("model_type")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "phi3", rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, **cfg))
    with pytest.raises(UnsupportedRopeError, match="partial rotary"):
        rope_info(model)


def test_gemma3_sliding_layers_are_refused_for_chunk_modes(tiny, rag) -> None:
    model, tok = tiny("gemma3")
    for mode in ("chunk", "cacheblend", "cachecraft", "ape"):
        with pytest.raises(UnsupportedModelError, match="sliding"):
            reuse.generate(model, tok, rag(), store=store.open("memory://"), mode=mode, max_new_tokens=1)


def test_sliding_window_accepted_only_when_the_prompt_fits(memory_store) -> None:
    from infercache.models.tiny import byte_tokenizer

    cfg = dict(TINY_CONFIGS["mistral"])
    cfg.pop("model_type")
    cfg["sliding_window"] = 48
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mistral", **cfg)).eval()
    tok = byte_tokenizer()
    short = ["Short context. ", "Q?"]
    reuse.generate(model, tok, short, store=memory_store, mode="chunk", max_new_tokens=2)
    out = reuse.generate(model, tok, short, store=memory_store, mode="cacheblend", recompute_ratio=1.0,
                         max_new_tokens=2, verify=True)
    assert out.report.store_hits == 1 and out.report.verify.max_abs_logit_diff == 0.0
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        reuse.generate(model, tok, ["A much longer context. " * 3, "Q?"], store=memory_store, mode="chunk")
