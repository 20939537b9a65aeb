"""Cross-layer KV sharing: training-free quality, and a short random-routing fine-tune on stories260k (CPU).

    python scripts/train_cross_layer.py                       # stories260k: before/after fine-tune (~2-4 min)
    python scripts/train_cross_layer.py --eval-only --model smollm2-135m   # sharing without training

Data (stories260k): TinyStories-like text sampled from the model itself (seeded, temperature 1; greedy
decoding from BOS gives a single story, so we sample). Train and eval sets use disjoint seeds. Two arms
with the same data, steps and optimizer: ``p=0`` (plain fine-tune: the control), ``p`` (random routing,
default 0.5) and, for reference, training with the fixed every-other pattern itself. Each is evaluated with the full cache and with the fixed every-other sharing pattern.

smollm2 / any model with ``--eval-only``: perplexity and KL against the full cache on the natural text of
``infercache.bench.metrics.fidelity_text``.

Results go to ``benchmarks/results/cross_layer_<model>.json`` (and a Markdown table on stdout).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from infercache.cache.cross_layer import build_cross_layer_cache, resolve_pattern, sharing_quality
from infercache.models import load
from infercache.training import RoutingCache, StochasticKVRouting

ROOT = Path(__file__).resolve().parents[1]


def sample_texts(model, tokenizer, n: int, length: int, seed: int, batch: int = 32) -> torch.Tensor:
    """``[n, length]`` token ids sampled from the model from BOS (rows that end early are resampled)."""
    rows = []
    torch.manual_seed(seed)
    while len(rows) < n:
        bos = torch.full((batch, 1), tokenizer.bos_token_id, dtype=torch.long)
        with torch.no_grad():
            out = model.generate(bos, attention_mask=torch.ones_like(bos), max_new_tokens=length - 1, min_new_tokens=length - 1, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tokenizer.eos_token_id)
        rows.extend(out[:, :length])
    return torch.stack(rows[:n])


@torch.no_grad()
def perplexity(model, data: torch.Tensor, pattern, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        ids = data[i : i + batch]
        cache = build_cross_layer_cache(model, pattern)
        logits = model(ids, cache=cache, use_cache=True).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def evaluate(model, data, patterns) -> dict:
    return {name: perplexity(model, data, pattern) for name, pattern in patterns.items()}


def finetune(model, data: torch.Tensor, *, p: float | None, steps: int, batch: int, lr: float, seed: int,
             fixed_route: list[int] | None = None) -> dict:
    """AdamW fine-tune; ``p``: random routing probability, or ``fixed_route`` (train with the pattern itself)."""
    if fixed_route is not None:
        model.train()

        def routed(**kwargs):
            return model(**kwargs, cache=RoutingCache(model.config, fixed_route), use_cache=True)
    else:
        routed = StochasticKVRouting(model, p=p, seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses, start = [], time.time()
    for _ in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g)
        ids = data[idx]
        loss = routed(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return {"p": p, "fixed_route": fixed_route, "steps": steps, "batch": batch, "lr": lr, "seconds": round(time.time() - start, 1),
            "loss_first10": sum(losses[:10]) / 10, "loss_last10": sum(losses[-10:]) / 10}


def run_finetune(args) -> dict:
    model, tok = load(args.model)
    n_layers = model.config.num_hidden_layers
    layer_types = ["full_attention"] * n_layers
    patterns = {"full": "none", "every_other": "every_other", "all_share_layer0": "all"}
    donors = {name: resolve_pattern(p, layer_types) for name, p in patterns.items()}
    t0 = time.time()
    train = sample_texts(model, tok, args.train_seqs, args.length, seed=1000)
    held = sample_texts(model, tok, args.eval_seqs, args.length, seed=2000)
    sampling_s = time.time() - t0
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    result = {"model": args.model, "layers": n_layers, "donors": donors, "train_tokens": train.numel(),
              "eval_tokens": held.numel(), "sampling_seconds": round(sampling_s, 1),
              "before": evaluate(model, held, patterns), "arms": {}}
    arms = {"p=0 (plain fine-tune)": dict(p=0.0), f"random routing p={args.p}": dict(p=args.p)}
    if not args.no_fixed_arm:
        arms["fixed every_other pattern"] = dict(p=None, fixed_route=donors["every_other"])
    for arm, kw in arms.items():
        model.load_state_dict(base_state)
        info = finetune(model, train, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, **kw)
        info["after"] = evaluate(model, held, patterns)
        result["arms"][arm] = info
    model.load_state_dict(base_state)
    result["total_seconds"] = round(time.time() - t0, 1)
    return result


def run_eval_only(args) -> dict:
    from infercache.bench.metrics import fidelity_text

    model, tok = load(args.model)
    text = fidelity_text(tokenizer=tok, n_tokens=args.length, seed=args.seed)
    ids = tok(text, return_tensors="pt").input_ids[:, : args.length]
    rows = []
    for pattern, k in (("every_other", 1), ("every_other", 3), ("all", 1)):
        start = time.time()
        row = sharing_quality(model, ids, pattern, k=k)
        row["seconds"] = round(time.time() - start, 1)
        rows.append(row)
    return {"model": args.model, "text": "fidelity_text(seed=%d)" % args.seed, "rows": rows}


def markdown(result: dict) -> str:
    if "rows" in result:
        lines = ["| pattern | k | layers sharing | ppl full | ppl shared | KL (nats) | top-1 agree | KV bytes full -> shared |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            lines.append(f"| {r['pattern']} | {r['k']} | {r['sharing_fraction']:.0%} | {r['ppl_full']:.2f} | "
                         f"{r['ppl_shared']:.2f} | {r['kl']:.3f} | {r['top1_agreement']:.3f} | "
                         f"{r['nbytes_full']:,} -> {r['nbytes_shared']:,} |")
        return "\n".join(lines)
    names = list(result["before"])
    lines = ["| model state | " + " | ".join(f"ppl {n}" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    lines.append("| before fine-tune | " + " | ".join(f"{result['before'][n]:.3f}" for n in names) + " |")
    for arm, info in result["arms"].items():
        lines.append(f"| fine-tuned, {arm} | " + " | ".join(f"{info['after'][n]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stories260k")
    parser.add_argument("--eval-only", action="store_true", help="training-free sharing quality on fidelity_text")
    parser.add_argument("--p", type=float, default=0.5, help="routing probability of the random-routing arm")
    parser.add_argument("--no-fixed-arm", action="store_true", help="skip the arm trained with the fixed pattern")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--train-seqs", type=int, default=1600)
    parser.add_argument("--eval-seqs", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run_eval_only(args) if args.eval_only else run_finetune(args)
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    result["torch"] = torch.__version__
    out = args.out or ROOT / "benchmarks" / "results" / f"cross_layer_{args.model}{'_eval' if args.eval_only else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
