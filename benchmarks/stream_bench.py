"""Streams on a real model: accuracy on planted facts, bytes held and tokens/s per policy.

Not a test: it prints tables and writes JSON. Two parts, on SmolLM2-135M-Instruct (8K context):

* **text**: a ``--tokens`` (default 32,768) stream of literary filler with 8 facts of distinct kinds ("The secret
  colour is turquoise.") planted at 5%, 15%, ... 95% of it. At checkpoints (4,000, 8,000 and 16,384 tokens)
  and at the end, every fact planted so far is asked (read-only questions: all see the same state), each timed.
  Methods: ``full`` (transformers' ``DynamicCache``; only at the checkpoints within the model's 8K context),
  ``sliding`` (``streaming_llm`` with ``sinks=0``: the plain window), ``streaming_llm`` (4 sinks + window) and
  ``rekv`` (window + offloaded 32-token blocks, top 8 per layer, ``--max-blocks`` summaries), all holding
  ``--budget`` (1024) entries. Every ``--trace-every`` tokens the bytes held are recorded (KV + metadata + ReKV's
  summaries, and ReKV's store per tier), and plotted against the stream length (``--plot``).
* **video** (mechanics): "frames" of 32 input embeddings: a static scene (embeddings of a scene sentence plus
  small noise, so consecutive frames are near-duplicates) with two event frames (embeddings of a caption naming
  an unguessable zeppelin, "Kelimo") planted at 10% and 50%, text time stamps in between. Reports bytes,
  tokens/s, how many layers' retrieved blocks contain the event (ReKV), and tokens merged by ``merge_frames``.

    python benchmarks/stream_bench.py              # 27 min on a loaded 2-core CPU, 1 thread (JSON + memory plot)
    python benchmarks/stream_bench.py --quick      # a 4-minute smoke run (results/stream_bench_quick.*)
    python benchmarks/stream_bench.py --plot-only  # redraw the plot from the JSON
    python benchmarks/stream_bench.py --tokens 65536 --checkpoints 16384,32768 --methods streaming_llm,rekv \
        --max-blocks 2048 --parts text --out benchmarks/results/stream_bench_64k.json \
        --plot docs/img/stream_memory_64k.png      # the 64K run in docs/stream.md (17 min)
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
from tqdm.auto import tqdm
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
def dynamic_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers if getattr(layer, "keys", None) is not None)


@torch.no_grad()
def run_full(model, tokenizer, ids, facts, checkpoints: list[int], max_new: int, chunk: int = 512,
             trace_every: int = 1024) -> tuple[list[dict], list[dict]]:
    """transformers' DynamicCache over the stream up to each checkpoint (it must fit the model), asking there.
    Returns (results per checkpoint, memory trace)."""
    cache = DynamicCache(config=model.config)
    results, trace, fed, feed_s = [], [{"tokens": 0, "bytes_held": 0}], 0, 0.0
    bar = tqdm(total=checkpoints[-1], desc="full", unit="tok", leave=False)
    for checkpoint in checkpoints:
        start = time.perf_counter()
        for i in range(fed, checkpoint, chunk):
            end = min(i + chunk, checkpoint)
            model(ids[None, i:end], cache=cache, use_cache=True, logits_to_keep=1)
            bar.update(end - i)
            if end // trace_every > i // trace_every or end == checkpoint:  # crossed a trace point
                trace.append({"tokens": end, "bytes_held": dynamic_bytes(cache)})
        fed = checkpoint
        feed_s += time.perf_counter() - start
        nbytes = dynamic_bytes(cache)
        answers, ask_s = [], []
        for fact in [f for f in facts if f["at_token"] < checkpoint]:
            t0 = time.perf_counter()
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
            ask_s.append(time.perf_counter() - t0)
        results.append({"answers": answers, "feed_s": feed_s, "bytes_held": nbytes, "tokens": checkpoint,
                        "ask_s": ask_s})
    bar.close()
    return results, trace


# ---------------------------------------------------------------------------------------------- streams
def store_tiers(stream) -> tuple[int, int]:
    """(RAM, disk) bytes of ReKV's store (0, 0 for the other policies)."""
    archive = getattr(stream.policy, "archive", None)
    if archive is None:
        return 0, 0
    tiers = getattr(archive.tier, "tiers", [archive.tier])
    ram = tiers[0].nbytes()
    return ram, sum(t.nbytes() for t in tiers[1:])


def run_stream(model, tokenizer, ids, facts, checkpoints: list[int], policy: str, budget: int, max_new: int,
               trace_every: int = 1024, label: str = "", **options) -> tuple[list[dict], list[dict]]:
    """Feed ``ids`` in ``trace_every``-token pieces, recording the bytes held after each; at each checkpoint ask
    every fact planted so far (read-only), timing each question. Returns (results per checkpoint, memory trace)."""
    results, trace = [], [{"tokens": 0, "bytes_held": 0, "kv_bytes": 0, "store_ram": 0, "store_disk": 0}]
    bar = tqdm(total=checkpoints[-1], desc=label or policy, unit="tok", leave=False)
    with stream_api.open(model, tokenizer, policy, budget=budget, **options) as stream:
        feed_s, peak, fed = 0.0, 0, 0
        for checkpoint in checkpoints:
            start = time.perf_counter()
            while fed < checkpoint:
                piece = ids[fed : min(fed + trace_every - fed % trace_every, checkpoint)]
                stream.feed(ids=piece)
                fed += piece.numel()
                bar.update(piece.numel())
                peak = max(peak, stream.nbytes())
                ram, disk = store_tiers(stream)
                trace.append({"tokens": fed, "bytes_held": stream.nbytes(), "kv_bytes": stream.cache.nbytes(),
                              "store_ram": ram, "store_disk": disk})
            feed_s += time.perf_counter() - start
            asked = [f for f in facts if f["at_token"] < checkpoint]
            answers, hits, ask_s = [], [], []
            for fact in asked:
                t0 = time.perf_counter()
                answers.append(stream.ask(QUESTION.format(name=fact["name"]), max_new_tokens=max_new,
                                          prefix=prefix(fact)))
                ask_s.append(time.perf_counter() - t0)
                if policy == "rekv":
                    hits.append(retrieval_hit(stream, fact["at_token"], options.get("block_size", 32)))
            ram, disk = store_tiers(stream)
            results.append({"answers": answers, "feed_s": feed_s, "bytes_held": peak, "tokens": checkpoint,
                            "stats": stream.stats(), "fact_retrieved_by_layers": hits, "ask_s": ask_s,
                            "store_ram": ram, "store_disk": disk})
    bar.close()
    return results, trace


def retrieval_hit(stream, at_token: int, block_size: int) -> float:
    """Fraction of layers whose retrieved blocks hold stream token ``at_token + 4`` (inside the fact)."""
    fetched = stream.policy.last_fetched
    if not fetched:
        return float("nan")
    hits = sum(any(s <= at_token + 4 < s + block_size for s in starts) for starts in fetched.values())
    return hits / len(fetched)


def position_of(depth: float) -> str:
    return "early" if depth < 1 / 3 else "middle" if depth < 2 / 3 else "late"


def text_part(model, tokenizer, args) -> tuple[list[dict], dict]:
    ids, facts = build_text_stream(tokenizer, args.tokens, args.seed)
    for fact, depth in zip(facts, DEPTHS):
        fact["depth"], fact["part"] = depth, position_of(depth)
    checkpoints = sorted({min(c, args.tokens) for c in args.checkpoints} | {args.tokens})
    runs, traces = [], {}
    methods = set(args.methods.split(","))
    fits = [c for c in checkpoints if c + 64 <= model.config.max_position_embeddings]
    if fits and "full" in methods:
        print(f"[text] full context, up to {fits[-1]} tokens ...", flush=True)
        results, traces["full"] = run_full(model, tokenizer, ids, facts, fits, args.max_new,
                                           trace_every=args.trace_every)
        runs.append(("full", results))
    for name, policy, options in [("sliding", "streaming_llm", {"sinks": 0}), ("streaming_llm", "streaming_llm", {}),
                                  ("rekv", "rekv", {"block_size": 32, "topk": 8, "max_blocks": args.max_blocks})]:
        if name not in methods:
            continue
        print(f"[text] {name}, {args.tokens} tokens, budget {args.budget} ...", flush=True)
        results, traces[name] = run_stream(model, tokenizer, ids, facts, checkpoints, policy, args.budget,
                                           args.max_new, trace_every=args.trace_every, label=name, **options)
        runs.append((name, results))
    rows = []
    for name, results in runs:
        for res in results:
            asked = [f for f in facts if f["at_token"] < res["tokens"]]
            correct = [f["key"].lower() in a.lower() for f, a in zip(asked, res["answers"])]
            in_window = [res["tokens"] - f["at_token"] <= args.budget for f in asked]
            by_part = {part: [sum(ok for ok, f in zip(correct, asked) if f["part"] == part),
                              sum(f["part"] == part for f in asked)] for part in ("early", "middle", "late")}
            row = {"part": "text", "at_tokens": res["tokens"], "method": name,
                   "budget": None if name == "full" else args.budget, "correct": sum(correct), "asked": len(asked),
                   "per_fact": "".join("x" if ok else "." for ok in correct), "by_part": by_part,
                   "correct_outside_window": sum(ok for ok, w in zip(correct, in_window) if not w),
                   "outside_window": sum(not w for w in in_window),
                   "bytes_held": res["bytes_held"], "tokens_per_s": res["tokens"] / res["feed_s"],
                   "ask_s": res["ask_s"], "ask_s_mean": sum(res["ask_s"]) / max(len(res["ask_s"]), 1),
                   "answers": res["answers"], "facts": asked,
                   **{k: v for k, v in res.items() if k in ("stats", "fact_retrieved_by_layers", "store_ram",
                                                             "store_disk")}}
            print(f"   {name} @ {res['tokens']}: {row['correct']}/{row['asked']} {row['per_fact']} "
                  f"{row['bytes_held'] / 2**20:.1f} MiB {row['tokens_per_s']:.0f} tok/s "
                  f"ask {row['ask_s_mean']:.2f} s {res['answers']}", flush=True)
            rows.append(row)
    return rows, traces


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
def mib(n) -> str:
    return f"{n / 2**20:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| stream position | method | budget | correct | per fact, oldest first | early / middle / late | "
             "beyond the window | bytes held (MiB) | store RAM + disk (MiB) | s per question | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["part"] == "text"), key=lambda r: r["at_tokens"]):
        parts = " / ".join(f"{ok}/{n}" if n else "-" for ok, n in r["by_part"].values())
        store = f"{mib(r['store_ram'])} + {mib(r['store_disk'])}" if r.get("store_ram") or r.get("store_disk") else "-"
        lines.append(f"| {r['at_tokens']} | {r['method']} | {r['budget'] or 'all'} | {r['correct']}/{r['asked']} | "
                     f"`{r['per_fact']}` | {parts} | {r['correct_outside_window']}/{r['outside_window']} | "
                     f"{mib(r['bytes_held'])} | {store} | {r['ask_s_mean']:.2f} | {r['tokens_per_s']:.0f} |")
    video = [r for r in rows if r["part"] == "video"]
    if video:
        lines += ["", "| video | method | bytes held (MiB) | store (MiB) | merged tokens | event retrieved (layers) | "
                      "answer | tokens/s |", "|---|---|---|---|---|---|---|---|"]
        for r in video:
            s = r["stats"]
            hits = ", ".join(f"{h:.0%}" for h in r["event_retrieved_by_layers"]) or "-"
            lines.append(f"| {r['frames']} frames, {r['tokens']} tokens | {r['method']} | "
                         f"{mib(r['bytes_held'])} | "
                         f"{mib(s.get('store_bytes', 0))} | {s.get('merged_tokens', '-')} | {hits} | "
                         f"{r['answer']!r} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def plot(traces: dict, meta: dict, path: Path) -> None:
    """Memory held vs stream length, from the recorded traces (left: RAM held by the stream; right: ReKV's store)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    styles = {"full": ("black", "-", "full context (DynamicCache)"), "sliding": ("tab:orange", "-", "sliding window"),
              "streaming_llm": ("tab:blue", "--", "streaming_llm"),
              "rekv": ("tab:green", "-", "rekv: KV + block summaries (RAM)")}
    for name, (color, ls, label) in styles.items():
        trace = traces.get(name)
        if not trace:
            continue
        x = [t["tokens"] / 1000 for t in trace]
        left.plot(x, [t["bytes_held"] / 2**20 for t in trace], color=color, ls=ls, lw=2, label=label)
        longest = max(t["tokens"] for tr in traces.values() for t in tr)
        if name == "full" and trace[-1]["tokens"] < longest:
            left.annotate(f"stops: the model's context\nis {meta.get('context', 8192)} tokens",
                          (x[-1], trace[-1]["bytes_held"] / 2**20), textcoords="offset points", xytext=(8, -12),
                          fontsize=8)
    rekv = traces.get("rekv")
    if rekv:
        x = [t["tokens"] / 1000 for t in rekv]
        left.plot(x, [t["kv_bytes"] / 2**20 for t in rekv], color="tab:green", ls=":", lw=1.5,
                  label="rekv: KV only")
        ram = [t["store_ram"] / 2**20 for t in rekv]
        disk = [t["store_disk"] / 2**20 for t in rekv]
        right.stackplot(x, ram, disk, labels=["RAM tier (capped)", "disk tier"], colors=["tab:green", "#b5d9b5"])
        right.set_title("rekv: offloaded blocks (store)", fontsize=10)
        right.set_xlabel("stream length (K tokens)")
        right.set_ylabel("MiB")
        right.legend(loc="upper left", fontsize=8)
        right.grid(alpha=0.3)
    left.set_title(f"RAM held by the stream (budget {meta.get('budget')} entries)", fontsize=10)
    left.set_xlabel("stream length (K tokens)")
    left.set_ylabel("MiB")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8, loc="center right")
    left.grid(alpha=0.3)
    fig.suptitle(f"{meta.get('model')} fp32, {meta.get('date')}: memory vs stream length", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=32768, help="text stream length")
    parser.add_argument("--checkpoints", default="4000,8000,16384",
                        help="also ask at these points (full context runs where it fits the model's 8K window)")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--max-blocks", type=int, default=1024, help="rekv: blocks (and summaries) kept")
    parser.add_argument("--trace-every", type=int, default=1024, help="record the bytes held every N tokens")
    parser.add_argument("--frames", type=int, default=80)
    parser.add_argument("--max-new", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", default="text,video")
    parser.add_argument("--methods", default="full,sliding,streaming_llm,rekv", help="text part: methods to run")
    parser.add_argument("--quick", action="store_true",
                        help="3K-token stream (checkpoint 1.5K), budget 512, 30 frames; writes *_quick files")
    parser.add_argument("--out", default=None, help="JSON (default benchmarks/results/stream_bench.json)")
    parser.add_argument("--plot", default=None, help="memory plot (default docs/img/stream_memory.png)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from --out and exit")
    args = parser.parse_args()
    suffix = "_quick" if args.quick else ""
    out = Path(args.out or f"benchmarks/results/stream_bench{suffix}.json")
    plot_path = Path(args.plot or ("benchmarks/results/stream_bench_quick.png" if args.quick
                                   else "docs/img/stream_memory.png"))
    if args.plot_only:
        saved = json.loads(out.read_text())
        plot(saved["memory_trace"], saved["meta"], plot_path)
        return
    if args.quick:
        args.tokens, args.checkpoints, args.budget, args.frames, args.trace_every = 3072, "1536", 512, 30, 256
    args.checkpoints = [int(c) for c in str(args.checkpoints).split(",") if c]
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    started = time.perf_counter()
    rows, traces = [], {}
    if "text" in args.parts:
        text_rows, traces = text_part(model, tokenizer, args)
        rows += text_rows
    if "video" in args.parts:
        rows += video_part(model, tokenizer, args)
    total = time.perf_counter() - started
    report = table(rows)
    print(report)
    print(f"total {total:.0f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "date": date.today().isoformat(), "machine": platform.machine(),
            "processor": platform.processor(), "threads": args.threads, "torch": torch.__version__,
            "seconds": total, "budget": args.budget, "context": model.config.max_position_embeddings,
            "args": {k: v for k, v in vars(args).items()}}
    out.write_text(json.dumps({"meta": meta, "rows": rows, "table": report, "memory_trace": traces}, indent=1,
                              default=str))
    print(f"wrote {out}")
    if traces:
        plot(traces, meta, plot_path)


if __name__ == "__main__":
    main()
