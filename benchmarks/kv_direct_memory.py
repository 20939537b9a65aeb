"""KV-Direct memory and recompute cost per architecture, measured by walking the cache tensors.

    python benchmarks/kv_direct_memory.py                 # all models below (~3-6 min on one CPU thread)
    python benchmarks/kv_direct_memory.py --models stories260k tiny-mha

For each model: prefill a prompt, decode ``--steps`` greedy tokens with ``DynamicCache`` and with KV-Direct
(window ``--window``; "batched" and "replay" recompute), check the tokens agree, and report

* bytes per token per layer of a checkpoint (hidden_size) vs K+V (2 x kv_heads x head_dim), measured:
  checkpoint store bytes / (old tokens x KV-Direct layers) and DynamicCache bytes / (tokens x layers);
* whole-cache bytes of both (KV-Direct: checkpoints + window K/V + window checkpoints + positions +
  sliding layers);
* median decode step time of both and the recompute time per step.

``tiny-mha`` is a random-init Llama with as many KV heads as query heads (MHA), built here for mechanics: the
only MHA model we can run offline. Rows under "analytic" use published configs and are not measured.
Writes ``benchmarks/results/kv_direct_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from infercache.cache.kv_direct import KVDirectLayer, build_kv_direct_cache, tensor_nbytes
from infercache.models import load

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["tiny-random-llama", "tiny-random-qwen3", "tiny-random-phi3", "tiny-random-gemma3", "tiny-mha",
          "stories260k", "smollm2-135m", "gemma3-270m"]
# Published configs (hidden, kv_heads, head_dim), bf16: not run here.
ANALYTIC = {
    "Llama-2-7B (MHA)": (4096, 32, 128),
    "Phi-3-mini (MHA)": (3072, 32, 96),
    "Llama-3-8B / Mistral-7B (GQA 8)": (4096, 8, 128),
    "Qwen2.5-7B (GQA 4)": (3584, 4, 128),
    "Gemma-3-4B (GQA 4, hd 256)": (2560, 4, 256),
}


def _load(name):
    if name == "tiny-mha":
        config = AutoConfig.for_model("llama", vocab_size=259, hidden_size=128, intermediate_size=256,
                                      num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                                      num_hidden_layers=4, max_position_embeddings=2048)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).eval()
        return model
    return load(name)[0]


def _decode(model, ids, cache, steps):
    """Prefill then ``steps`` greedy forwards; returns (tokens, per-step seconds)."""
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        tokens, times = [nxt], []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(nxt, cache=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(nxt)
    return torch.cat(tokens, 1), times


def measure(name: str, prompt: int, steps: int, window: int) -> dict:
    model = _load(name)
    cfg = model.config.get_text_config(decoder=True)
    ctx = getattr(cfg, "max_position_embeddings", 4096)
    prompt = min(prompt, ctx - steps - 1)
    ids = torch.randint(3, min(cfg.vocab_size, 250), (1, prompt), generator=torch.Generator().manual_seed(0))
    elem = next(model.parameters()).element_size()

    full = DynamicCache(config=model.config)
    ref_tokens, full_times = _decode(model, ids, full, steps)
    full_bytes = tensor_nbytes(t for layer in full.layers for t in (layer.keys, layer.values))
    seen = prompt + steps

    row = {"model": name, "arch": cfg.model_type, "hidden": cfg.hidden_size, "kv_heads": cfg.num_key_value_heads,
           "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
           "layers": cfg.num_hidden_layers, "dtype_bytes": elem, "prompt": prompt, "steps": steps, "window": window,
           "full_bytes": full_bytes, "full_decode_ms": 1e3 * statistics.median(full_times)}
    row["kv_bytes_per_token_layer_formula"] = 2 * row["kv_heads"] * row["head_dim"] * elem
    row["ckpt_bytes_per_token_layer_formula"] = row["hidden"] * elem
    for mode in ("batched", "replay"):
        cache = build_kv_direct_cache(model, window, recompute=mode)
        tokens, times = _decode(model, ids, cache, steps)
        direct = [layer for layer in cache.layers if isinstance(layer, KVDirectLayer)]
        parts = cache.nbytes_breakdown()
        old = direct[0].n_old
        row[f"{mode}_tokens_match"] = bool(torch.equal(tokens, ref_tokens))
        row[f"{mode}_decode_ms"] = 1e3 * statistics.median(times)
        row[f"{mode}_recompute_ms_per_step"] = 1e3 * cache.recompute_seconds() / (steps + 1)
        if mode == "batched":
            row["kv_direct_layers"] = len(direct)
            row["old_tokens"] = old
            row["breakdown"] = parts
            row["kv_direct_bytes"] = cache.nbytes()
            row["ckpt_bytes_per_token_layer_measured"] = parts["checkpoints"] / (old * len(direct))
            full_direct = sum(tensor_nbytes([full.layers[layer.layer_idx].keys, full.layers[layer.layer_idx].values])
                              for layer in direct)
            row["kv_bytes_per_token_layer_measured"] = full_direct / (seen * len(direct))
    row["ckpt_over_kv"] = row["ckpt_bytes_per_token_layer_measured"] / row["kv_bytes_per_token_layer_measured"]
    row["kv_direct_over_full"] = row["kv_direct_bytes"] / full_bytes
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"KV-Direct, window {meta['window']}, {meta['steps']} decode steps after the prompt; fp32; "
        f"{meta['threads']} CPU thread(s); {meta['date']}.",
        "",
        "| model | d | KV heads x hd | ckpt B/tok/layer | K+V B/tok/layer | ckpt / KV | cache bytes full | KV-Direct | "
        "KV-Direct / full | decode ms full | KV-Direct batched (recompute) | replay (recompute) | tokens match |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} (prompt {r['prompt']}) | {r['hidden']} | {r['kv_heads']}x{r['head_dim']} | "
            f"{r['ckpt_bytes_per_token_layer_measured']:.0f} | {r['kv_bytes_per_token_layer_measured']:.0f} | "
            f"{r['ckpt_over_kv']:.2f} | {r['full_bytes']:,} | {r['kv_direct_bytes']:,} | {r['kv_direct_over_full']:.2f} | "
            f"{r['full_decode_ms']:.1f} | {r['batched_decode_ms']:.1f} ({r['batched_recompute_ms_per_step']:.1f}) | "
            f"{r['replay_decode_ms']:.1f} ({r['replay_recompute_ms_per_step']:.1f}) | "
            f"{'yes' if r['batched_tokens_match'] and r['replay_tokens_match'] else 'NO'} |"
        )
    lines += ["", "Analytic (published configs, bf16, not run): checkpoint vs K+V bytes per token per layer", "",
              "| model | d | KV heads x hd | ckpt B | K+V B | ckpt / KV |", "|---|---|---|---|---|---|"]
    for name, (d, kv, hd) in ANALYTIC.items():
        lines.append(f"| {name} | {d} | {kv}x{hd} | {2 * d} | {4 * kv * hd} | {d / (2 * kv * hd):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--prompt", type=int, default=448)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kv_direct_memory")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        start = time.time()
        rows.append(measure(name, args.prompt, args.steps, args.window))
        rows[-1]["seconds"] = round(time.time() - start, 1)
        print(f"{name}: {rows[-1]['seconds']}s", flush=True)
    meta = {"window": args.window, "steps": args.steps, "prompt": args.prompt, "threads": args.threads,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                         "analytic": ANALYTIC}, indent=2))
    text = markdown(rows, meta)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
