"""Streams on a real model: accuracy on planted facts, bytes held and tokens/s per policy.

Not a test: it prints tables and writes JSON. Two parts, on SmolLM2-135M-Instruct (8K context):

* **text**: a 16K-token stream of literary filler with 8 facts of distinct kinds ("The secret colour is
  turquoise.") planted at 5%, 15%, ... 95% of it. At checkpoints (4,000 and 8,000 tokens) and at the end, every fact
  planted so far is asked (read-only questions: all see the same state). Methods: ``full`` (transformers'
  ``DynamicCache``; only at the checkpoints, within the model's 8K context), ``sliding`` (``streaming_llm`` with
  ``sinks=0``: the plain window), ``streaming_llm`` (4 sinks + window) and ``rekv`` (window + offloaded 32-token
  blocks, top 8 per layer), all holding ``--budget`` (1024) entries.
* **video** (mechanics): "frames" of 32 input embeddings: a static scene (embeddings of a scene sentence plus
  small noise, so consecutive frames are near-duplicates) with two event frames (embeddings of a caption naming
  an unguessable zeppelin, "Kelimo") planted at 10% and 50%, text time stamps in between. Reports bytes,
  tokens/s, how many layers' retrieved blocks contain the event (ReKV), and tokens merged by ``merge_frames``.

    python benchmarks/stream_bench.py --out benchmarks/results/stream_bench.json
    python benchmarks/stream_bench.py --quick      # a 2-minute smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from datetime import date
from pathlib import Path

import torch
from transformers import DynamicCache

import infercache.stream as stream_api
from infercache.bench.tasks.haystack import Haystack
from infercache.models import load

#: Distinct kinds of fact (a 135M model confuses facts that share a wording, e.g. several pass keys).
FACTS = [("pass key", "48213"), ("secret colour", "turquoise"), ("hidden animal", "giraffe"), ("magic city", "Lisbon"),
         ("lucky fruit", "mango"), ("code word", "pineapple"), ("mystery metal", "cobalt"),
         ("chosen instrument", "violin")]
DEPTHS = [0.05, 0.15, 0.3, 0.45, 0.55, 0.7, 0.85, 0.95]  # fractions of the whole stream
QUESTION = "What is the {name}?"
TEMPLATE = stream_api.DEFAULT_TEMPLATE  # "\n\nQuestion: {question}\nAnswer:"


def fact_text(name: str, key: str) -> str:
    return f"\n\nThe {name} is {key}. Remember it. The {name} is {key}.\n\n"


def prefix(fact) -> str:
    return f" The {fact['name']} is"


def build_text_stream(tokenizer, n_tokens: int, seed: int):
    """``n_tokens`` of literary filler with the facts planted at :data:`DEPTHS`; returns (ids, facts)."""
    rng = random.Random(seed)
    hay = Haystack.load("literary")
    filler = tokenizer(hay.excerpt(rng.choice(hay.paragraph_starts), n_tokens), add_special_tokens=False)["input_ids"]
    kinds = rng.sample(FACTS, len(FACTS))
    facts, pieces, cursor, made = [], [], 0, 0
    for depth, (name, key) in zip(DEPTHS, kinds):
        fact = tokenizer(fact_text(name, key), add_special_tokens=False)["input_ids"]
        take = max(0, int(depth * n_tokens) - made)
        pieces.append(filler[cursor : cursor + take])
        cursor += take
        made += take
        facts.append({"name": name, "key": key, "at_token": made})
        pieces.append(fact)
        made += len(fact)
    pieces.append(filler[cursor : cursor + max(0, n_tokens - made)])
    return torch.tensor([t for p in pieces for t in p], dtype=torch.long), facts


# ---------------------------------------------------------------------------------------------- full context
@torch.no_grad()
def run_full(model, tokenizer, ids, facts, checkpoints: list[int], max_new: int, chunk: int = 512) -> list[dict]:
    """transformers' DynamicCache over the stream up to each checkpoint (it must fit the model), asking there."""
    cache = DynamicCache(config=model.config)
    results, fed, feed_s = [], 0, 0.0
    for checkpoint in checkpoints:
        start = time.perf_counter()
        for i in range(fed, checkpoint, chunk):
            model(ids[None, i : min(i + chunk, checkpoint)], cache=cache, use_cache=True, logits_to_keep=1)
        fed = checkpoint
        feed_s += time.perf_counter() - start
        nbytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
        answers = []
        for fact in [f for f in facts if f["at_token"] < checkpoint]:
            text = TEMPLATE.replace("{question}", QUESTION.format(name=fact["name"])) + prefix(fact)
            q = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            out = model(q, cache=cache, use_cache=True, logits_to_keep=1)
            tokens = []
            for _ in range(max_new):
                token = int(out.logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                tokens.append(token)
                out = model(torch.tensor([[token]]), cache=cache, use_cache=True)
            answers.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
            cache.crop(-(cache.get_seq_length() - checkpoint))  # drop the question and answer
        results.append({"answers": answers, "feed_s": feed_s, "bytes_held": nbytes, "tokens": checkpoint})
    return results


# ---------------------------------------------------------------------------------------------- streams
def run_stream(model, tokenizer, ids, facts, checkpoints: list[int], policy: str, budget: int, max_new: int,
               **options) -> list[dict]:
    """Feed ``ids`` in 1024-token pieces; at each checkpoint ask every fact planted so far (read-only)."""
    results = []
    with stream_api.open(model, tokenizer, policy, budget=budget, **options) as stream:
        feed_s, peak, fed = 0.0, 0, 0
        for checkpoint in checkpoints:
            start = time.perf_counter()
            while fed < checkpoint:
                piece = ids[fed : min(fed + 1024, checkpoint)]
                stream.feed(ids=piece)
                fed += piece.numel()
                peak = max(peak, stream.nbytes())
            feed_s += time.perf_counter() - start
            asked = [f for f in facts if f["at_token"] < checkpoint]
            answers, hits = [], []
            for fact in asked:
                answers.append(stream.ask(QUESTION.format(name=fact["name"]), max_new_tokens=max_new,
                                          prefix=prefix(fact)))
                if policy == "rekv":
                    hits.append(retrieval_hit(stream, fact["at_token"], options.get("block_size", 32)))
            results.append({"answers": answers, "feed_s": feed_s, "bytes_held": peak, "tokens": checkpoint,
                            "stats": stream.stats(), "fact_retrieved_by_layers": hits})
    return results


def retrieval_hit(stream, at_token: int, block_size: int) -> float:
    """Fraction of layers whose retrieved blocks hold stream token ``at_token + 4`` (inside the fact)."""
    fetched = stream.policy.last_fetched
    if not fetched:
        return float("nan")
    hits = sum(any(s <= at_token + 4 < s + block_size for s in starts) for starts in fetched.values())
    return hits / len(fetched)


def text_part(model, tokenizer, args) -> list[dict]:
    ids, facts = build_text_stream(tokenizer, args.tokens, args.seed)
    checkpoints = sorted({min(c, args.tokens) for c in args.checkpoints} | {args.tokens})
    runs = []
    fits = [c for c in checkpoints if c + 64 <= model.config.max_position_embeddings]
    if fits:
        print(f"[text] full context, up to {fits[-1]} tokens ...", flush=True)
        runs.append(("full", run_full(model, tokenizer, ids, facts, fits, args.max_new)))
    for name, policy, options in [("sliding", "streaming_llm", {"sinks": 0}), ("streaming_llm", "streaming_llm", {}),
                                  ("rekv", "rekv", {"block_size": 32, "topk": 8})]:
        print(f"[text] {name}, {args.tokens} tokens, budget {args.budget} ...", flush=True)
        runs.append((name, run_stream(model, tokenizer, ids, facts, checkpoints, policy, args.budget, args.max_new,
                                      **options)))
    rows = []
    for name, results in runs:
        for res in results:
            asked = [f for f in facts if f["at_token"] < res["tokens"]]
            correct = [f["key"].lower() in a.lower() for f, a in zip(asked, res["answers"])]
            in_window = [res["tokens"] - f["at_token"] <= args.budget for f in asked]
            row = {"part": "text", "at_tokens": res["tokens"], "method": name,
                   "budget": None if name == "full" else args.budget, "correct": sum(correct), "asked": len(asked),
                   "per_fact": "".join("x" if ok else "." for ok in correct),
                   "correct_outside_window": sum(ok for ok, w in zip(correct, in_window) if not w),
                   "outside_window": sum(not w for w in in_window),
                   "bytes_held": res["bytes_held"], "tokens_per_s": res["tokens"] / res["feed_s"],
                   "answers": res["answers"], "facts": asked,
                   **{k: v for k, v in res.items() if k in ("stats", "fact_retrieved_by_layers")}}
            print(f"   {name} @ {res['tokens']}: {row['correct']}/{row['asked']} {row['per_fact']} "
                  f"{row['bytes_held'] / 2**20:.1f} MiB {row['tokens_per_s']:.0f} tok/s {res['answers']}", flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- video
def video_part(model, tokenizer, args) -> list[dict]:
    """Mechanics on frame embeddings: bytes, speed, event retrieval and merging."""
    g = torch.Generator().manual_seed(args.seed)
    embed = model.get_input_embeddings().weight.detach()
    tokens = 32

    def frame_of(sentence: str, noise: float) -> torch.Tensor:
        ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        ids = (ids * (tokens // len(ids) + 1))[:tokens]
        base = embed[torch.tensor(ids)]
        return base + noise * base.std() * torch.randn(base.shape, generator=g)

    scene = "A quiet street with parked cars, grey houses and a wet pavement under the evening sky."
    event = "A zeppelin named Kelimo floats over the river."
    frames = args.frames
    events = [int(frames * d) for d in (0.1, 0.5)]
    rows = []
    for name, policy, options in [
        ("streaming_vlm", "streaming_vlm", {}),
        ("rekv", "rekv", {"block_size": 32, "topk": 8}),
        ("rekv+merge", "rekv", {"block_size": 32, "topk": 8, "merge_frames": True, "merge_threshold": 0.9}),
    ]:
        print(f"[video] {frames} frames, {name} ...", flush=True)
        g.manual_seed(args.seed)
        event_at = []
        with stream_api.open(model, tokenizer, policy, budget=args.budget, **options) as stream:
            start, peak = time.perf_counter(), 0
            for f in range(frames):
                stream.feed(text=f"\n[t={f}s]")
                if f in events:
                    event_at.append(stream.seen)
                stream.feed(embeds=frame_of(event if f in events else scene, 0.05), modality="vision")
                peak = max(peak, stream.nbytes())
            feed_s = time.perf_counter() - start
            answer = stream.ask("What was the name of the zeppelin?", max_new_tokens=args.max_new,
                                prefix=" The zeppelin was named")
            hits = [retrieval_hit(stream, at, options["block_size"]) for at in event_at] if policy == "rekv" else []
            stats = stream.stats()
        rows.append({"part": "video", "method": name, "frames": frames, "tokens": stats["seen_tokens"],
                     "budget": args.budget, "bytes_held": peak, "tokens_per_s": stats["seen_tokens"] / feed_s,
                     "answer": answer, "answer_correct": "kelimo" in answer.lower(),
                     "event_retrieved_by_layers": hits, "stats": stats})
        print(f"   {peak / 2**20:.1f} MiB, {rows[-1]['tokens_per_s']:.0f} tok/s, answer {answer!r}, hits {hits}",
              flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    lines = ["| stream position | method | budget | correct | per fact, oldest first | beyond the window | "
             "bytes held (MiB) | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["part"] == "text"), key=lambda r: r["at_tokens"]):
        lines.append(f"| {r['at_tokens']} | {r['method']} | {r['budget'] or 'all'} | {r['correct']}/{r['asked']} | "
                     f"`{r['per_fact']}` | {r['correct_outside_window']}/{r['outside_window']} | "
                     f"{r['bytes_held'] / 2**20:.1f} | {r['tokens_per_s']:.0f} |")
    video = [r for r in rows if r["part"] == "video"]
    if video:
        lines += ["", "| video | method | bytes held (MiB) | store (MiB) | merged tokens | event retrieved (layers) | "
                      "answer | tokens/s |", "|---|---|---|---|---|---|---|---|"]
        for r in video:
            s = r["stats"]
            hits = ", ".join(f"{h:.0%}" for h in r["event_retrieved_by_layers"]) or "-"
            lines.append(f"| {r['frames']} frames, {r['tokens']} tokens | {r['method']} | "
                         f"{r['bytes_held'] / 2**20:.1f} | "
                         f"{s.get('store_bytes', 0) / 2**20:.1f} | {s.get('merged_tokens', '-')} | {hits} | "
                         f"{r['answer']!r} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=16384, help="text stream length")
    parser.add_argument("--checkpoints", default="4000,8000",
                        help="also ask at these points (full context runs where it fits the model's 8K window)")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=80)
    parser.add_argument("--max-new", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", default="text,video")
    parser.add_argument("--quick", action="store_true", help="3K-token stream (checkpoint 1.5K), budget 512, 30 frames")
    parser.add_argument("--out", default="benchmarks/results/stream_bench.json")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.checkpoints, args.budget, args.frames = 3072, "1536", 512, 30
    args.checkpoints = [int(c) for c in str(args.checkpoints).split(",") if c]
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    started = time.perf_counter()
    rows = []
    if "text" in args.parts:
        rows += text_part(model, tokenizer, args)
    if "video" in args.parts:
        rows += video_part(model, tokenizer, args)
    total = time.perf_counter() - started
    report = table(rows)
    print(report)
    print(f"total {total:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "date": date.today().isoformat(), "machine": platform.machine(),
            "processor": platform.processor(), "threads": args.threads, "seconds": total,
            "args": {k: v for k, v in vars(args).items()}}
    out.write_text(json.dumps({"meta": meta, "rows": rows, "table": report}, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
