"""Why do observation-window scorers lose the needle? SnapKV variants side by side on the same samples.

Varies one thing at a time from our SnapKV defaults (window 32, kernel 7, max pooling, GQA mean) towards
kvpress's SnapKVPress (window 64, kernel 5, avg pooling), under both protocols, and reports the task score.

    python benchmarks/needle_analysis.py --model smollm2-135m --samples 6 --budget 0.25 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

import infercache
from infercache.bench.tasks import get_task, render_prompt
from infercache.models import load

VARIANTS = {
    "ours (w32 k7 max mean)": {},
    "kvpress-like (w64 k5 avg mean)": {"window": 64, "kernel": 5, "pooling": "avg"},
    "w64": {"window": 64},
    "avg pooling": {"pooling": "avg"},
    "no pooling (k1)": {"kernel": 1},
    "GQA max": {"gqa_reduce": "max"},
    "w8": {"window": 8},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = load(args.model)
    samples = get_task("niah_single").generate(tok, args.length, args.samples, seed=0)
    task = get_task("niah_single")
    rows = []
    for protocol in ("question_aware", "question_agnostic"):
        prompts = [render_prompt(s, tok, protocol=protocol) for s in samples]
        for name, opts in tqdm(VARIANTS.items(), desc=protocol):
            scores = []
            start = time.perf_counter()
            for s, p in zip(samples, prompts):
                out, _ = infercache.generate(model, torch.tensor([p.context_ids]),
                                             torch.tensor([p.question_ids]) if p.question_ids else None,
                                             method="snapkv", budget=args.budget, protocol=protocol,
                                             max_new_tokens=s.max_new_tokens, **opts)
                text = tok.decode(out[0, len(p.input_ids):], skip_special_tokens=True)
                scores.append(task.score(text, s))
            rows.append({"protocol": protocol, "variant": name, "options": opts,
                         "score": sum(scores) / len(scores), "seconds": round(time.perf_counter() - start, 1)})
    meta = {"date": date.today().isoformat(), "model": args.model, "samples": args.samples, "length": args.length,
            "budget": args.budget, "machine": "2-core x86_64 CPU, 1 torch thread"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "needle_analysis.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"SnapKV variants, {args.model}, niah_single at {args.length} tokens, {args.samples} samples, "
             f"budget {args.budget}, {meta['date']}, {meta['machine']}", "",
             "| variant | question-aware | question-agnostic |", "|---|---|---|"]
    for name in VARIANTS:
        a = next(r for r in rows if r["variant"] == name and r["protocol"] == "question_aware")
        b = next(r for r in rows if r["variant"] == name and r["protocol"] == "question_agnostic")
        lines.append(f"| {name} | {a['score']:.2f} | {b['score']:.2f} |")
    table = "\n".join(lines)
    (out / "needle_analysis.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
