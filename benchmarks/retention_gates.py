"""Learned retention gates vs SnapKV, H2O and friends: fidelity to the full cache at equal budgets.

    python benchmarks/retention_gates.py                          # stories260k, gates saved with the model
    python benchmarks/retention_gates.py --model smollm2-135m --data haystack --context 1024

Held-out text (the model's own samples from other seeds than training, or haystack passages with other seeds)
is cut into a context and a continuation. Each method compresses the context alone (question-agnostic, the only
fair protocol for a query-agnostic method), then the continuation is teacher-forced and 32 tokens are generated
greedily. Reported per method and budget: KL(full || method) and top-1 agreement of next-token distributions
over the continuation, the continuation's loss (nll; the full cache's is the reference), greedy-token agreement
and the bytes the cache holds (after the continuation: methods that only compress the prompt, such as SnapKV, have
grown by it). ``retention_gates:untrained`` is the same global eviction with bias-only gates
(recency), the baseline the gates are trained away from.

Writes ``benchmarks/results/retention_gates_<model>.{json,md}`` and ``docs/img/retention_gates_<model>.png``.
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
from tqdm.auto import tqdm

from infercache.bench.runner import fidelity_on_ids
from infercache.models import load
from infercache.training.retention_gates import training_sequences

ROOT = Path(__file__).resolve().parents[1]
METHODS = "retention_gates,retention_gates:untrained,snapkv,h2o,tova,streaming_llm"


def gate_files(text: str | None) -> dict[str, str]:
    """``--gates``: ``PATH`` (for ``retention_gates``) or ``LABEL=PATH,...`` (for ``retention_gates:LABEL``)."""
    if not text:
        return {}
    if "=" not in text:
        return {"": text}
    return dict(item.split("=", 1) for item in text.split(","))


def method_options(spec: str, gates: dict[str, str]) -> tuple[str, dict]:
    name, _, variant = spec.partition(":")
    if name != "retention_gates":
        return name, {}
    if variant == "untrained":
        return name, {"gates": "untrained"}
    if variant and variant not in gates:
        raise SystemExit(f"no gates file for {spec}: pass --gates {variant}=PATH")
    return name, ({"gates": gates[variant]} if variant in gates else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stories260k")
    parser.add_argument("--gates", help="PATH, or LABEL=PATH,... for methods retention_gates:LABEL "
                        "(default: the gates saved with the model, else the ones we ship)")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--budgets", default="0.1,0.25,0.5")
    parser.add_argument("--context", type=int, default=384)
    parser.add_argument("--cont", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--data", default="self", choices=["self", "haystack"])
    parser.add_argument("--seed", type=int, default=1000, help="held out: training uses seed 0")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load(args.model)
    budgets = [float(b) if "." in b else int(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    seqs = training_sequences(model, tokenizer, data=args.data, n=args.samples, length=args.context + args.cont,
                              seed=args.seed)
    rows, raw = [], []
    start = time.perf_counter()
    jobs = [(i, m, b) for i in range(seqs.shape[0]) for b in budgets for m in methods]
    refs = {}
    for i, spec, budget in tqdm(jobs, desc="fidelity", unit="run"):
        ids = seqs[i : i + 1]
        context, cont = ids[:, : args.context], ids[:, args.context :]
        name, options = method_options(spec, gate_files(args.gates))
        res = fidelity_on_ids(model, context, cont, name, budget, pad_token_id=tokenizer.pad_token_id,
                              reference=refs.get(i), **options)
        refs[i] = res.pop("reference")
        raw.append({"sample": i, "method": spec, "budget": budget, **res})
    full_nll = []
    for i in range(seqs.shape[0]):  # the full cache's own continuation loss
        logits = refs[i]["logits"]
        cont = seqs[i, args.context :]
        full_nll.append(float(torch.nn.functional.cross_entropy(logits[:-1].float(), cont[1:])))
    for budget in budgets:
        for spec in methods:
            sel = [r for r in raw if r["method"] == spec and r["budget"] == budget]
            rows.append({
                "method": spec, "budget": budget,
                "kl_mean": statistics.mean(r["kl"] for r in sel),
                "kl_median": statistics.median(r["kl"] for r in sel),
                "top1": statistics.mean(r["top1"] for r in sel),
                "greedy_match": statistics.mean(r["greedy_match"] for r in sel),
                "nll": statistics.mean(r["nll"] for r in sel),
                "nbytes_mib": statistics.mean(r["nbytes"] for r in sel) / 2**20,
            })
    meta = {"model": args.model, "date": str(date.today()), "machine": f"{platform.machine()} CPU, "
            f"{torch.get_num_threads()} torch thread, torch {torch.__version__}", "seconds": round(time.perf_counter() - start, 1),
            "context": args.context, "continuation": args.cont, "samples": int(seqs.shape[0]), "data": args.data,
            "seed": args.seed, "full_nll": statistics.mean(full_nll), "gates": args.gates or "saved with the model"}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"retention_gates_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "raw": raw}, indent=1))
    table = markdown(rows, meta)
    out.with_suffix(".md").write_text(table)
    print(table)
    plot(rows, budgets, methods, meta, ROOT / "docs" / "img" / f"retention_gates_{args.model}.png")


def markdown(rows, meta) -> str:
    lines = [f"{meta['model']}, {meta['samples']} held-out sequences ({meta['data']}), context {meta['context']}, "
             f"continuation {meta['continuation']}; full-cache nll {meta['full_nll']:.3f}; {meta['machine']}; {meta['date']}",
             "", "| budget | method | KL mean | KL median | top-1 | greedy match | nll | MiB held |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['method']} | {r['kl_mean']:.4f} | {r['kl_median']:.4f} | {r['top1']:.3f} | "
                     f"{r['greedy_match']:.3f} | {r['nll']:.3f} | {r['nbytes_mib']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows, budgets, methods, meta, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for spec in methods:
        sel = sorted((r for r in rows if r["method"] == spec), key=lambda r: r["budget"])
        xs = [r["budget"] for r in sel]
        axes[0].plot(xs, [r["kl_mean"] for r in sel], marker="o", label=spec)
        axes[1].plot(xs, [r["top1"] for r in sel], marker="o", label=spec)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("KL(full || method), mean")
    axes[1].set_ylabel("top-1 agreement with full cache")
    for ax in axes:
        ax.set_xlabel("budget (fraction of context kept)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{meta['model']}: context {meta['context']}, {meta['samples']} held-out sequences ({meta['date']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
