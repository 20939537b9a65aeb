"""RAG workload for the KV reuse modes: a fixed corpus of fact-bearing chunks, k retrieved per question, shuffled.

Not a test: it prints tables and writes JSON + Markdown. The workload the issue asks for:

* a fixed synthetic corpus of ``--chunks`` documents (default 16) of about ``--chunk-tokens`` tokens (default 200):
  public-domain filler text (``infercache/bench/data``) with one distinct planted fact each;
* ``--questions`` questions (default 8), each about one document's fact; the "retriever" returns that document
  and ``k - 1`` others (default k = 4, seeded), **in shuffled order**, so different questions share documents at
  different offsets and the chunk modes really reuse KV at new positions;
* two passes over the same questions, each mode with its own ``memory://`` store, mode after mode on each request
  (so load swings on the shared machine hit every mode alike):

  - **cold pass**: the stores start empty and fill as requests come in (a document seen by an earlier question is
    a hit, a new one is computed and stored); this is what a fresh server sees;
  - **warm pass**: the same questions again, each with its documents in a *new* order (every document is stored by
    then; prefix reuse hits only when the first document happens to head a stored chain).

For every request and mode: TTFT, reused / recomputed / fresh tokens, store hits, the answer, whether it contains the
planted fact (accuracy), and agreement with the full prefill of the same prompt: same first token, identical greedy
tokens. In the warm pass the approximate modes also run with ``verify=True`` (KL of the first token, top-1 agreement
over the generated tokens, teacher-forced; the verify pass is not timed; ``prefix`` is exact and only compared by
tokens, to save a prefill per request). The prompt and the per-request runner come from
``reuse_ttft.py``.

    python benchmarks/rag_bench.py            # about 10 minutes of CPU (1 thread); longer on a busy machine
    python benchmarks/rag_bench.py --quick    # 8 documents of ~120 tokens, k = 3, 2 questions: about 1-2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reuse_ttft import SYSTEM, question, run  # noqa: E402 - the prompt format and the runner are shared
from store_tiers import cpu_name  # noqa: E402

from infercache import store  # noqa: E402
from infercache.models import load  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("full", "prefix", "chunk", "cacheblend", "cachecraft", "ape")
REUSE_MODES = MODES[1:]

#: (title, planted fact, question, accepted answers; an answer is correct when it contains one of them)
FACTS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("The Harbour Ledger", "The harbour master of Port Wendel is a woman named Elena Varga.",
     "Who is the harbour master of Port Wendel?", ("varga",)),
    ("Notes on the Orchard", "The oldest tree in the orchard is a pear tree planted by Tomas Reed.",
     "Who planted the oldest tree in the orchard?", ("reed",)),
    ("The Bell Tower Chronicle", "The great bell of the tower was cast from melted cannons and is called Old Mercy.",
     "What is the great bell of the tower called?", ("old mercy",)),
    ("A Letter from the Valley", "The valley school is heated by a stove that burns only walnut shells.",
     "What does the stove of the valley school burn?", ("walnut",)),
    ("The Miller's Account", "The mill on the Ashby river grinds only barley, never wheat.",
     "What grain does the mill on the Ashby river grind?", ("barley",)),
    ("Records of the Guild", "The weavers' guild of Lorn chose a blue heron as its emblem.",
     "What is the emblem of the weavers' guild of Lorn?", ("heron",)),
    ("The Lighthouse Diary", "The lighthouse on Carrow Point is kept by a man named Jonas Pike.",
     "Who keeps the lighthouse on Carrow Point?", ("pike",)),
    ("The Bridge Survey", "The stone bridge at Hollin Ford has exactly nine arches.",
     "How many arches does the stone bridge at Hollin Ford have?", ("nine", "9")),
    ("A Baker's Almanac", "The bakery on Tanner Street is famous for its saffron buns.",
     "What is the bakery on Tanner Street famous for?", ("saffron",)),
    ("The Festival Program", "The summer festival of Elmsworth always opens with a boat race.",
     "How does the summer festival of Elmsworth open?", ("boat",)),
    ("Observatory Notes", "The observatory on Mount Ferrow was built by the astronomer Clara Nyman.",
     "Who built the observatory on Mount Ferrow?", ("nyman",)),
    ("The Ferry Timetable", "The ferry to Gull Island leaves every morning at seven o'clock.",
     "When does the ferry to Gull Island leave?", ("seven", "7")),
    ("Garden Society Minutes", "The prize rose of the garden society is a yellow rose named Morning Gold.",
     "What is the prize rose of the garden society called?", ("morning gold",)),
    ("The Copper Mine Report", "The copper mine at Dunmore was closed after a flood in the spring.",
     "Why was the copper mine at Dunmore closed?", ("flood",)),
    ("A Traveller's Journal", "The inn at Redwater Crossing is called The Sleeping Fox.",
     "What is the inn at Redwater Crossing called?", ("sleeping fox",)),
    ("The Library Catalogue", "The oldest book in the town library is a herbal written by Brother Anselm.",
     "Who wrote the oldest book in the town library?", ("anselm",)),
    ("Letters of the Clockmaker", "The pendulum of the town clock of Brisbury is made of glass.",
     "What is the pendulum of the town clock of Brisbury made of?", ("glass",)),
    ("The Shepherd's Calendar", "The sheep of the high moor are a black-faced breed called Moorlings.",
     "What are the sheep of the high moor called?", ("moorling",)),
    ("Canal Company Papers", "The canal from Whitby Lock to Sorrel Mill is twelve miles long.",
     "How long is the canal from Whitby Lock to Sorrel Mill?", ("twelve", "12")),
    ("The Painter's Sketchbook", "The painter Ida Lorne painted only the sea at dawn.",
     "What did the painter Ida Lorne paint?", ("sea",)),
    ("Orchestra Notes", "The town orchestra of Velmont is led by the violinist Marco Bellini.",
     "Who leads the town orchestra of Velmont?", ("bellini",)),
    ("Railway Gazette", "The night train to Karsk is pulled by an engine named the Iron Swan.",
     "What is the engine of the night train to Karsk named?", ("iron swan",)),
    ("The Beekeeper's Log", "The beekeeper of Oldfield keeps exactly forty hives.",
     "How many hives does the beekeeper of Oldfield keep?", ("forty", "40")),
    ("The Quarry Ledger", "The quarry at Penmoor produces only green slate.",
     "What does the quarry at Penmoor produce?", ("green slate", "slate")),
]
SOURCES = ("milton_areopagitica.txt", "shakespeare_sonnets.txt", "milton_paradise_lost_1-4.txt")


@dataclass(frozen=True)
class Request:
    """One question: the document it asks about and the retrieved documents, in the cold and warm pass orders."""

    number: int
    target: int
    cold_order: tuple[int, ...]
    warm_order: tuple[int, ...]


def build_corpus(tokenizer, chunks: int, chunk_tokens: int) -> list[str]:
    """``chunks`` documents of about ``chunk_tokens`` tokens: a title, filler text, the planted fact in the middle."""
    if not 1 <= chunks <= len(FACTS):
        raise ValueError(f"--chunks must be between 1 and {len(FACTS)} (one planted fact each), got {chunks}")
    data = resources.files("infercache.bench") / "data"
    texts = {name: (data / name).read_text(encoding="utf-8") for name in SOURCES}
    docs = []
    for index in range(chunks):
        title, fact, _, _ = FACTS[index]
        text = texts[SOURCES[index % len(SOURCES)]]
        offset = 4000 + (index // len(SOURCES)) * 9000  # distinct filler for every document
        budget = chunk_tokens - len(tokenizer(f"Document: {title}\n{fact}\n\n", add_special_tokens=False).input_ids)
        body_ids = tokenizer(text[offset: offset + 8 * chunk_tokens], add_special_tokens=False).input_ids
        body = tokenizer.decode(body_ids[: max(budget, 16)])
        cut = body.find(" ", len(body) // 2)
        cut = len(body) // 2 if cut < 0 else cut
        docs.append(f"Document: {title}\n{body[:cut]} {fact}{body[cut:]}\n\n")
    return docs


def build_requests(questions: int, chunks: int, k: int, seed: int) -> list[Request]:
    """Question ``i`` asks about document ``i % chunks``; it retrieves it plus ``k - 1`` others, shuffled twice."""
    if not 1 <= k <= chunks:
        raise ValueError(f"-k must be between 1 and --chunks ({chunks}), got {k}")
    requests = []
    for number in range(questions):
        rng = random.Random(seed * 1000 + number)
        target = number % chunks
        picked = [target, *rng.sample([d for d in range(chunks) if d != target], k - 1)]
        cold = picked[:]
        rng.shuffle(cold)
        warm = cold[:]
        for _ in range(100):  # a different order for the warm pass (when k > 1)
            rng.shuffle(warm)
            if warm != cold or k == 1:
                break
        requests.append(Request(number=number, target=target, cold_order=tuple(cold), warm_order=tuple(warm)))
    return requests


def correct(text: str, target: int) -> bool:
    lowered = text.lower()
    return any(answer in lowered for answer in FACTS[target][3])


def run_pass(name: str, model, tok, docs: list[str], requests: list[Request], stores: dict, *, verify: bool,
             new_tokens: int, bar: tqdm, on_request=None) -> list[dict]:
    rows = []
    for request in requests:
        order = request.cold_order if name == "cold" else request.warm_order
        segments = [SYSTEM, *[docs[i] for i in order], question(FACTS[request.target][2])]
        full = None
        for mode in MODES:
            bar.set_postfix_str(f"{name} q{request.number} {mode}")
            row = run(model, tok, segments, stores.get(mode), mode, verify=verify and mode not in ("full", "prefix"),
                      new_tokens=new_tokens)
            full = row if mode == "full" else full
            row.update(scenario=name, question=request.number, target=request.target, order=list(order),
                       correct=correct(row["text"], request.target),
                       first_token_agree=bool(row["ids"][:1] == full["ids"][:1]),
                       greedy_identical_to_full=row["ids"] == full["ids"], speedup=full["ttft_s"] / row["ttft_s"])
            row.pop("full_text", None)
            rows.append(row)
            bar.update(1)
        if on_request is not None:
            on_request(rows)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for scenario in ("cold", "warm"):
        for mode in MODES:
            sel = [r for r in rows if r["scenario"] == scenario and r["mode"] == mode]
            if not sel:
                continue
            n = len(sel)
            verified = [r for r in sel if "kl_first" in r]
            out.append({
                "scenario": scenario, "mode": mode, "requests": n,
                "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in sel),
                "reused": statistics.mean(r["reused"] for r in sel),
                "recomputed": statistics.mean(r["recomputed"] for r in sel),
                "fresh": statistics.mean(r["fresh"] for r in sel),
                "hits": sum(r["store_hits"] for r in sel), "lookups": sum(r["store_hits"] + r["store_misses"]
                                                                         for r in sel),
                "ttft_median_s": statistics.median(r["ttft_s"] for r in sel),
                "speedup_median": statistics.median(r["speedup"] for r in sel),
                "store_read_median_s": statistics.median(r["store_read_s"] for r in sel),
                "first_token_agree": sum(r["first_token_agree"] for r in sel) / n,
                "greedy_identical": sum(r["greedy_identical_to_full"] for r in sel) / n,
                "accuracy": sum(r["correct"] for r in sel) / n,
                "kl_first_median": statistics.median(r["kl_first"] for r in verified) if verified else None,
                "kl_first_max": max(r["kl_first"] for r in verified) if verified else None,
                "top1_agreement_mean": (statistics.mean(r["top1_agreement"] for r in verified)
                                        if verified else None),
            })
    return out


def table(summary: list[dict], meta: dict) -> str:
    lines = [f"# RAG workload: KV reuse modes on {meta['model']}", "",
             f"{meta['date_utc']}, {meta['cpu']} ({meta['cpu_count']} cores, shared with other jobs; load average "
             f"{meta['load_avg_start'][0]:.1f} at the start, {meta['load_avg_end'][0]:.1f} at the end), "
             f"torch {meta['torch']}, {meta['threads']} thread, float32. Corpus: {meta['chunks']} documents of "
             f"~{meta['chunk_tokens']} tokens with one planted fact each; {meta['questions']} questions, k = "
             f"{meta['k']} documents each in shuffled order (prompt ~{meta['prompt_tokens_mean']:.0f} tokens); "
             f"{meta['new_tokens']} new tokens, greedy. Token counts are means per request; TTFT and speed-up "
             "(full-prefill TTFT of the same prompt / mode TTFT) are medians; agreement is against the full "
             "prefill of the same prompt; KL (first token, nats) and top-1 agreement come from `verify=True` "
             "(warm pass)." + ("" if meta.get("complete") else " **Partial: the run did not finish.**"), "",
             "| pass | mode | reused / recomputed / fresh | segment or chunk hits | TTFT s | speed-up | "
             "first token = full | greedy = full | KL first (median / max) | top-1 agree | accuracy |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        kl = (f"{s['kl_first_median']:.4f} / {s['kl_first_max']:.4f}" if s["kl_first_median"] is not None else "-")
        top1 = f"{s['top1_agreement_mean']:.2f}" if s["top1_agreement_mean"] is not None else "-"
        hits = f"{s['hits']}/{s['lookups']}" if s["mode"] != "full" else "-"
        lines.append(f"| {s['scenario']} | {s['mode']} | {s['reused']:.0f} / {s['recomputed']:.0f} / "
                     f"{s['fresh']:.0f} | {hits} | {s['ttft_median_s']:.2f} | {s['speedup_median']:.1f}x | "
                     f"{s['first_token_agree']:.2f} | {s['greedy_identical']:.2f} | {kl} | {top1} | "
                     f"{s['accuracy']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--chunks", type=int, default=16, help=f"corpus documents (at most {len(FACTS)})")
    parser.add_argument("--chunk-tokens", type=int, default=200)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("-k", type=int, default=4, help="documents retrieved per question")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-verify", action="store_true", help="skip the verify runs (no KL; faster)")
    parser.add_argument("--quick", action="store_true", help="8 documents of ~120 tokens, k = 3, 2 questions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "rag_bench.json",
                        help="JSON output; the Markdown table goes next to it (.md)")
    args = parser.parse_args()
    if args.quick:
        args.chunks, args.chunk_tokens, args.k, args.questions = 8, 120, 3, 2
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    model, tok = load(args.model)
    docs = build_corpus(tok, args.chunks, args.chunk_tokens)
    requests = build_requests(args.questions, args.chunks, args.k, args.seed)
    stores = {mode: store.open("memory://?max_bytes=4GiB") for mode in REUSE_MODES}
    meta = {"model": args.model, "threads": args.threads, "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "cpu": cpu_name(), "torch": torch.__version__, "chunks": args.chunks, "chunk_tokens": args.chunk_tokens,
            "doc_tokens": [len(tok(d, add_special_tokens=False).input_ids) for d in docs],
            "questions": args.questions, "k": args.k, "new_tokens": args.new_tokens, "seed": args.seed,
            "requests": [asdict(r) for r in requests], "load_avg_start": load_start}
    done: list[dict] = []

    def save(rows: list[dict], final: bool = False) -> str:
        everything = done + rows
        meta.update(date_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), load_avg_end=os.getloadavg(),
                    complete=final, prompt_tokens_mean=statistics.mean(r["prompt_tokens"] for r in everything
                                                                       if r["mode"] == "full"))
        summary = summarize(everything)
        markdown = table(summary, meta)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": everything}, indent=2))
        args.out.with_suffix(".md").write_text(markdown + "\n")
        return markdown

    try:
        with tqdm(total=2 * len(requests) * len(MODES), desc="rag bench", unit="run") as bar:
            done += run_pass("cold", model, tok, docs, requests, stores, verify=False, new_tokens=args.new_tokens,
                             bar=bar, on_request=save)
            done += run_pass("warm", model, tok, docs, requests, stores, verify=not args.no_verify,
                             new_tokens=args.new_tokens, bar=bar, on_request=save)
    finally:
        for tier in stores.values():
            tier.close()
    markdown = save([], final=True)
    print()
    print(markdown)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
