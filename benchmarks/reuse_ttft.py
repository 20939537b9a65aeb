"""Time to first token of KV reuse modes on a RAG-style prompt, with their distance to a full prefill.

Not a test: it prints a table and writes JSON. The prompt is SmolLM2's chat template around a system header, four
documents of about 500 tokens (public-domain text from ``infercache/bench/data`` with one planted fact each) and a
question, about 2K tokens in all. Each document is one segment.

Requests, in one process on one store (``memory://``):

* ``full``: plain prefill (the baseline);
* cold: the first request with question 1 stores the prefix chunks (``prefix``), the segments with their Cache-Craft
  attention statistics (``cachecraft``; chunk and CacheBlend reuse the same blobs) and APE's encodings (``ape``);
* ``same order``: the same documents in the same order, a new question -> every mode can reuse;
* ``reordered``: the documents in another order, a new question -> prefix reuse misses, chunk modes reuse.

Every timed request also runs with ``verify=True``: KL(full || mode) of the first token, top-1 agreement over the
generated tokens (teacher-forced), and the greedy-token match with the full prefill (the verify pass is not timed).

    python benchmarks/reuse_ttft.py --out benchmarks/results/reuse_ttft.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from importlib import resources
from pathlib import Path

import torch

from infercache import reuse, store
from infercache.models import load

FACTS = [
    ("The Harbour Ledger", "The harbour master of Port Wendel is a woman named Elena Varga."),
    ("Notes on the Orchard", "The oldest tree in the orchard is a pear tree planted by Tomas Reed."),
    ("The Bell Tower Chronicle", "The great bell of the tower was cast from melted cannons and is called Old Mercy."),
    ("A Letter from the Valley", "The valley school is heated by a stove that burns only walnut shells."),
]
SOURCES = ["milton_areopagitica.txt", "shakespeare_sonnets.txt", "milton_paradise_lost_1-4.txt",
           "milton_areopagitica.txt"]
QUESTIONS = ["What is the name of the great bell of the tower?", "Who is the harbour master of Port Wendel?",
             "What does the stove of the valley school burn?"]
SYSTEM = ("<|im_start|>system\nYou are a helpful assistant. Answer from the documents.<|im_end|>\n"
          "<|im_start|>user\nRead the documents, then answer the question.\n\n")


def documents(tokenizer, tokens: int) -> list[str]:
    data = resources.files("infercache.bench") / "data"
    docs = []
    for index, ((title, fact), source) in enumerate(zip(FACTS, SOURCES)):
        text = (data / source).read_text(encoding="utf-8")
        offset = 20000 * (index // 2 + 1) if source == SOURCES[0] else 3000 * (index + 1)
        body_ids = tokenizer(text[offset: offset + 8 * tokens], add_special_tokens=False).input_ids
        body = tokenizer.decode(body_ids[: tokens - 40])
        half = len(body) // 2
        cut = body.find(" ", half)
        docs.append(f"Document {index + 1}: {title}\n{body[:cut]} {fact}{body[cut:]}\n\n")
    return docs


def question(text: str) -> str:
    return f"Question: {text}<|im_end|>\n<|im_start|>assistant\n"


def run(model, tok, segments, kv_store, mode: str, *, verify: bool, new_tokens: int, repeats: int = 1) -> dict:
    ttfts, result = [], None
    for attempt in range(repeats):
        result = reuse.generate(model, tok, segments, store=kv_store, mode=mode, max_new_tokens=new_tokens,
                                verify=verify and attempt == repeats - 1)
        ttfts.append(result.report.ttft_s)
    rep = result.report
    row = {"mode": mode, "prompt_tokens": rep.prompt_tokens, "reused": rep.reused_tokens,
           "recomputed": rep.recomputed_tokens, "fresh": rep.fresh_tokens, "ttft_s": min(ttfts), "ttft_all_s": ttfts,
           "store_read_s": rep.store_read_s, "store_hits": rep.store_hits, "store_misses": rep.store_misses,
           "store_writes": rep.store_writes, "text": result.text, "ids": result.ids}
    if rep.verify is not None:
        v = rep.verify
        row.update(kl_first=v.kl_first, kl_mean=v.kl_mean, top1_first=v.top1_first, top1_agreement=v.top1_agreement,
                   greedy_match=v.greedy_match, greedy_identical=v.greedy_identical, full_ttft_s=v.full_ttft_s,
                   full_text=tok.decode(v.full_ids, skip_special_tokens=True))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--doc-tokens", type=int, default=500)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs of each full prefill (min is reported); a reuse request runs once, since a "
                             "repeat would hit what its first run stored")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reuse_ttft.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    docs = documents(tok, args.doc_tokens)
    order = [2, 0, 3, 1]
    kv_store = store.open("memory://?max_bytes=4GiB")
    rows: list[dict] = []

    def record(scenario: str, row: dict) -> None:
        row["scenario"] = scenario
        rows.append(row)
        print(f"{scenario:10s} {row['mode']:10s} ttft {row['ttft_s']:6.2f}s  reused {row['reused']:5d} "
              f"recomputed {row['recomputed']:4d} fresh {row['fresh']:5d}  kl {row.get('kl_first', float('nan')):.4f}",
              flush=True)

    first = [SYSTEM, *docs, question(QUESTIONS[0])]
    record("baseline", run(model, tok, first, None, "full", verify=False, new_tokens=args.new_tokens,
                           repeats=args.repeats))
    for mode in ("prefix", "cachecraft", "ape"):  # cold requests fill the store (cachecraft: segments + statistics)
        record("cold", run(model, tok, first, kv_store, mode, verify=False, new_tokens=args.new_tokens))
    same = [SYSTEM, *docs, question(QUESTIONS[1])]
    shuffled = [SYSTEM, *[docs[i] for i in order], question(QUESTIONS[2])]
    for scenario, segments in (("same order", same), ("reordered", shuffled)):
        record(scenario, run(model, tok, segments, None, "full", verify=False, new_tokens=args.new_tokens,
                             repeats=args.repeats))
        for mode in ("prefix", "chunk", "cacheblend", "cachecraft", "ape"):
            record(scenario, run(model, tok, segments, kv_store, mode, verify=True, new_tokens=args.new_tokens))
    print()
    print(table(rows))
    meta = {"date": date.today().isoformat(), "model": args.model, "threads": args.threads,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
            "torch": torch.__version__, "doc_tokens": args.doc_tokens, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "load_avg": os.getloadavg(), "unix_time": time.time()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


def table(rows: list[dict]) -> str:
    baseline = {r["scenario"]: r["ttft_s"] for r in rows if r["mode"] == "full"}
    lines = ["| request | mode | reused / recomputed / fresh | TTFT s | speed-up | KL first | top-1 agree | "
             "greedy match |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = baseline.get(r["scenario"], baseline.get("baseline"))
        speed = f"{base / r['ttft_s']:.1f}x" if base else "-"
        kl = f"{r['kl_first']:.4f}" if "kl_first" in r else "-"
        agree = f"{r['top1_agreement']:.2f}" if "top1_agreement" in r else "-"
        match = f"{r['greedy_match']:.2f}" if "greedy_match" in r else "-"
        lines.append(f"| {r['scenario']} | {r['mode']} | {r['reused']} / {r['recomputed']} / {r['fresh']} | "
                     f"{r['ttft_s']:.2f} | {speed} | {kl} | {agree} | {match} |")
    if rows:
        lines.append(f"\nmedian full-prefill TTFT: {statistics.median(baseline.values()):.2f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
