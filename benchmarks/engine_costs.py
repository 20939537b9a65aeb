"""Engine costs on real models: scoring overhead at prefill, decode speed, bytes held vs the budget.

Not a test: it prints a table and writes JSON. Methods run side by side in one process on the same
prompt, so their numbers compare; absolute times depend on the machine (quote medians and ratios).

    python benchmarks/engine_costs.py --models smollm2-135m,gemma3-270m --context 4096 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

import infercache
from infercache.cache.compressed_cache import CompressedLayer
from infercache.models import load
from infercache.policies import POLICIES


def filler_ids(tokenizer, n: int) -> torch.Tensor:
    import pydoc_data.topics as topics

    text = " ".join(topics.topics[k] for k in sorted(topics.topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise ValueError(f"not enough filler text for {n} tokens")
    return ids


def dense_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.keys is not None)


def theoretical_bytes(model, cache, kept_per_head: list[torch.Tensor | None]) -> int:
    """What the kept entries need with no slack: sum of kept lengths x head_dim x (K+V) x dtype size."""
    cfg = model.config.get_text_config(decoder=True)
    item = next(model.parameters()).element_size()
    total = 0
    for layer, lengths in zip(cache.layers, kept_per_head):
        if isinstance(layer, CompressedLayer):
            total += int(lengths.sum()) * cfg.head_dim * 2 * item
        elif layer.keys is not None:
            total += layer.keys.numel() * layer.keys.element_size() * 2
    return total


def run_one(model, ids, method, budget, decode_tokens, repeats):
    prefill, decode, overhead = [], [], []
    for _ in range(repeats):
        cache = DynamicCache(config=model.config) if method == "full" else infercache.compressed_cache(model, method, budget)
        with torch.no_grad():
            start = time.perf_counter()
            out = model(ids, cache=cache, use_cache=True)
            prefill.append(time.perf_counter() - start)
            nxt = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(decode_tokens):
                nxt = model(nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            decode.append(decode_tokens / (time.perf_counter() - start))
        if method != "full":
            overhead.append(cache.engine.prefill_seconds)
    row = {
        "method": method,
        "budget": budget if method != "full" else 1.0,
        "prefill_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
    }
    if method == "full":
        row["cache_bytes"] = dense_bytes(cache)
        row["theoretical_bytes"] = row["cache_bytes"]
    else:
        row["scoring_s"] = statistics.median(overhead)
        row["cache_bytes"] = cache.nbytes()
        row["theoretical_bytes"] = theoretical_bytes(model, cache, cache.lengths())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--methods", default=",".join(POLICIES))  # the scoring policies (kv_direct etc. differ)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
            "cpu_count": __import__("os").cpu_count(), "torch": torch.__version__, "context": args.context,
            "decode_tokens": args.decode_tokens, "budget": args.budget}
    results = []
    for name in args.models.split(","):
        model, tok = load(name)
        ids = filler_ids(tok, args.context)
        methods = ["full"] + [m for m in args.methods.split(",") if m != "full"]
        for method in tqdm(methods, desc=name):
            row = run_one(model, ids, method, args.budget, args.decode_tokens, args.repeats)
            row["model"] = name
            results.append(row)
        full = next(r for r in results if r["model"] == name and r["method"] == "full")
        for r in results:
            if r["model"] == name:
                r["decode_vs_full"] = r["decode_tok_s"] / full["decode_tok_s"]
                r["bytes_vs_full"] = r["cache_bytes"] / full["cache_bytes"]
                r["slack_vs_theoretical"] = r["cache_bytes"] / r["theoretical_bytes"] - 1
                if "scoring_s" in r:
                    r["scoring_pct_of_prefill"] = 100 * r["scoring_s"] / full["prefill_s"]
        del model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_costs.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [f"Engine costs, {meta['date']}, {meta['machine']}, context {args.context}, budget {args.budget}, "
             f"{args.decode_tokens} decode tokens", "",
             "| model | method | prefill s | scoring % of prefill | decode tok/s | decode vs full | KV MiB | bytes vs full | slack vs theoretical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['prefill_s']:.2f} | {r.get('scoring_pct_of_prefill', 0):.1f} | "
            f"{r['decode_tok_s']:.1f} | {r['decode_vs_full']:.2f}x | {r['cache_bytes'] / 2**20:.2f} | "
            f"{r['bytes_vs_full']:.1%} | {r['slack_vs_theoretical']:+.1%} |"
        )
    table = "\n".join(lines)
    (out / "engine_costs.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
