"""Convert a GGUF checkpoint into a plain HF folder (safetensors + tokenizer), once.

transformers can read GGUF (``gguf_file=``) and dequantizes the weights, but the resulting model refuses
``save_pretrained`` ("quantized with gguf"). We rebuild a plain model from the same config without its
``quantization_config``, load the dequantized state dict, re-tie the embeddings and save that.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def gguf_to_hf(gguf_path: Path, out_dir: Path, *, extra_meta: dict | None = None) -> Path:
    folder, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("transformers_version", None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {"source_gguf": name, **(extra_meta or {})}
    (tmp / "infercache.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
