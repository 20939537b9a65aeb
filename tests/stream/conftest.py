import pytest
import torch


@pytest.fixture(scope="session")
def qwen2vl():
    """A tiny random-init Qwen2-VL (M-RoPE) built offline, with the byte tokenizer."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from infercache.models.tiny import byte_tokenizer

    config = Qwen2VLConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=2,
                           spatial_merge_size=1, temporal_patch_size=1, in_channels=3),
        image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(config).eval()
    return model, byte_tokenizer()


@pytest.fixture(scope="session")
def make_ids():
    """``make_ids(n, seed)``: ``n`` reproducible byte-tokenizer ids (no specials)."""

    def make(n: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, 250, (n,), generator=g)

    return make


@pytest.fixture(scope="session")
def one_layer():
    """``one_layer(arch)``: a one-layer tiny model (``llama``, ``qwen3``, or ``gemma3`` with its one layer a 32-token
    sliding window). Its keys and values depend on the token alone, so after any eviction the stream must equal a
    fresh forward over the kept tokens at positions ``0..N-1``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from infercache.models.tiny import TINY_CONFIGS, byte_tokenizer

    cache = {}

    def get(arch: str):
        if arch not in cache:
            cfg = {**TINY_CONFIGS[arch], "num_hidden_layers": 1}
            if arch == "gemma3":
                cfg["layer_types"] = ["sliding_attention"]
            config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(config).eval()
            cache[arch] = (model, byte_tokenizer())
        return cache[arch]

    return get
