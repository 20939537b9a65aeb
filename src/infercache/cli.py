"""The ``infercache`` command: ``models list|prepare``, ``methods``, ``run``, ``bench``, ``train-gates``, ``store``, ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_budget(text: str) -> float | int:
    """``"0.25"`` -> fraction kept; ``"256"`` -> tokens kept."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a ratio like 0.25 or a token count like 256, got {text!r}")


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    line = "  ".join(c.ljust(widths[c]) for c in columns)
    sep = "  ".join("-" * widths[c] for c in columns)
    body = ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join([line, sep, *body])


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def cmd_models(args) -> int:
    from . import models

    if args.action == "list":
        rows = models.list_models()
        for r in rows:
            r["prepared"] = "yes" if r["prepared"] else "no"
            r["context"] = f"{r['context']:,}" if isinstance(r["context"], int) else r["context"]
        print(_table(rows, ["name", "architecture", "params", "context", "license", "source", "prepared"]))
        print(
            "\nsmollm2-135m and gemma3-270m are dequantized from 4-bit GGUF weights (real trained models, not the "
            "bf16 originals).\nstories260k is optional: it is read from the project's shared/models/stories260K "
            "folder (or $INFERCACHE_STORIES260K) once, then cached.\ntiny-random-* are random-init: mechanics "
            "tests only, never quality."
        )
        return 0
    for name in args.names or []:
        start = time.perf_counter()
        path = models.prepare(name, force=args.force)
        took = time.perf_counter() - start
        print(f"{name}: {'nothing to prepare (built in code or bundled)' if path is None else path} ({took:.1f} s)")
    return 0


def cmd_methods(args) -> int:
    from .policies import POLICIES

    for name, cls in POLICIES.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:20s} {doc}")
    return 0


def generate_once(model, tokenizer, input_ids, *, method, budget, max_new_tokens, **options) -> dict:
    """One greedy generation with a full (``method=None``) or compressed cache; bytes, timings, text."""
    import torch
    from transformers import DynamicCache

    from . import compressed_cache

    cache = DynamicCache(config=model.config) if method is None else compressed_cache(model, method, budget, **options)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, cache=cache,
                             pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    new = out[0, input_ids.shape[1] :]
    if method is None:
        nbytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.keys is not None)
        lengths = None
    else:
        nbytes = cache.nbytes()
        lengths = [None if t is None else t.tolist() for t in cache.lengths()]
    return {
        "method": method or "full (DynamicCache)",
        "budget": budget if method else "-",
        "cache_bytes": nbytes,
        "seconds": round(seconds, 2),
        "new_tokens": int(new.numel()),
        "text": tokenizer.decode(new, skip_special_tokens=True).strip(),
        "lengths": lengths,
    }


def _load(args):
    import torch

    from .models import load

    torch.set_num_threads(args.threads) if args.threads else None
    return load(args.model, device=args.device, dtype=args.dtype)


def _chat_ids(tokenizer, prompt: str, answer_prefix: str = ""):
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        return tokenizer(text + answer_prefix, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt + answer_prefix, return_tensors="pt").input_ids


def cmd_run(args) -> int:
    if args.prompt_file:
        prompt = Path(args.prompt_file).read_text()
    elif args.prompt:
        prompt = args.prompt
    else:
        raise SystemExit("infercache run: give --prompt TEXT or --prompt-file FILE")
    model, tokenizer = _load(args)
    ids = _chat_ids(tokenizer, prompt).to(args.device)
    print(f"model {args.model}: prompt of {ids.shape[1]} tokens, {args.max_new_tokens} new tokens, greedy\n")
    rows = [generate_once(model, tokenizer, ids, method=None, budget=None, max_new_tokens=args.max_new_tokens)]
    rows.append(generate_once(model, tokenizer, ids, method=args.method, budget=args.budget,
                              max_new_tokens=args.max_new_tokens))
    _print_rows(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _print_rows(rows: list[dict]) -> None:
    full = rows[0]["cache_bytes"]
    table = [
        {"cache": r["method"], "budget": r["budget"], "KV bytes held": _mib(r["cache_bytes"]),
         "vs full": f"{r['cache_bytes'] / full:.1%}", "seconds": r["seconds"]}
        for r in rows
    ]
    print(_table(table, ["cache", "budget", "KV bytes held", "vs full", "seconds"]))
    for r in rows:
        print(f"\n[{r['method']} {r['budget']}] {r['text']}")


def cmd_profile_heads(args) -> int:
    from .policies.razor_heads import default_profile_path, plot_profile, profile_heads

    model, _ = _load(args)
    profile = profile_heads(model, segment=args.segment, repeats=args.repeats)
    path = Path(args.out) if args.out else default_profile_path(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1))
    hkv = profile["num_kv_heads"]
    retrieval = {tuple(x) for x in profile["retrieval_heads"]}
    print(f"RazorAttention head profile of {args.model}: segment {profile['segment']} x {profile['repeats']}, "
          f"{len(retrieval)} of {len(profile['layers']) * hkv} KV heads are retrieval heads (R)\n")
    print("layer  " + "  ".join(f"head {h:<2d}       " for h in range(hkv)))
    for i, layer in enumerate(profile["layers"]):
        cells = [f"{'R' if (layer, h) in retrieval else ' '} ind {profile['induction'][i][h]:.3f} "
                 f"echo {profile['echo'][i][h]:.3f}" for h in range(hkv)]
        print(f"{layer:5d}  " + "  ".join(cells))
    png = plot_profile(profile, path.with_suffix(".png"))
    print(f"\nsaved {path} and {png}")
    return 0


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_bench(args) -> int:
    from .bench.report import write_report
    from .bench.runner import BenchConfig, run_bench, run_meta

    protocols = ["question_aware", "question_agnostic"] if args.protocol == "both" else [args.protocol]
    config = BenchConfig(
        model=args.model, methods=_csv(args.methods), budgets=[parse_budget(b) for b in _csv(args.budgets)],
        tasks=_csv(args.tasks), lengths=[int(x) for x in _csv(args.lengths)], samples=args.samples,
        protocols=protocols, seed=args.seed, fidelity=args.fidelity, peers=_csv(args.peers) if args.peers else [],
        threads=args.threads or 1, device=args.device, dtype=args.dtype,
    )
    out = Path(args.out)
    records = run_bench(config, out)
    meta = {"model": args.model, **run_meta(config)}
    write_report(records, meta, out)
    print((out / "results.md").read_text())
    print(f"per-sample results: {out / 'samples.jsonl'}\nplots: {out / 'score_vs_budget.png'}, "
          f"{out / 'needle_heatmap.png'}\nreport: {out / 'report.html'}")
    return 0


def cmd_store(args) -> int:
    from . import store

    kv = store.open(args.url)
    try:
        if args.action == "stats":
            stats = kv.stats()
            print(f"{args.url}: {len(kv)} entries, {_mib(kv.nbytes())} held")
            print(json.dumps(stats if isinstance(stats, dict) else getattr(stats, "__dict__", str(stats)),
                             indent=2, default=str))
        else:
            keys = kv.keys()
            removed = sum(1 for key in keys if kv.delete(key))
            print(f"{args.url}: removed {removed} of {len(keys)} entries")
    finally:
        kv.close()
    return 0


def cmd_train_gates(args) -> int:
    import torch

    from .models import load
    from .policies.razor_heads import model_fingerprint
    from .policies.retention_gate_modules import default_gates_path
    from .training.retention_gates import GateTrainingConfig, train_gates

    if args.threads:
        torch.set_num_threads(args.threads)
    config = GateTrainingConfig(memory=args.memory, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                                lr=args.lr, data=args.data, num_sequences=args.sequences, seed=args.seed,
                                capacity_weight=args.capacity_weight)
    config.validate()
    model, tokenizer = load(args.model, device=args.device, dtype=args.dtype)
    gates, summary = train_gates(model, tokenizer, config)
    summary["model"] = args.model
    out = Path(args.out) if args.out else default_gates_path(model)
    gates.save(out, fingerprint=model_fingerprint(model), training=summary)
    first, last = summary["first_losses"], summary["last_losses"]
    print(f"trained {config.steps} steps in {summary['seconds']} s on {summary['sequences']} sequences "
          f"({config.data}); losses first 10% -> last 10%:")
    for key in ("kl", "lm", "capacity", "loss"):
        print(f"  {key:9s} {first[key]:.4f} -> {last[key]:.4f}")
    print(f"saved {out}; use it with compressed_cache(model, 'retention_gates', budget)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infercache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from .diffusion.cli import add_parser as add_diffusion_parser

    add_diffusion_parser(sub)

    p = sub.add_parser("models", help="list or prepare the reference models")
    p.add_argument("action", choices=["list", "prepare"])
    p.add_argument("names", nargs="*", help="models to prepare")
    p.add_argument("--force", action="store_true", help="convert again even if prepared")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("methods", help="list the KV compression methods")
    p.set_defaults(func=cmd_methods)

    def model_opts(p, default_model="smollm2-135m"):
        p.add_argument("--model", default=default_model)
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
        p.add_argument("--max-new-tokens", type=int, default=24)

    p = sub.add_parser("run", help="generate with and without a compressed KV cache; print memory and output")
    model_opts(p)
    p.add_argument("--method", default="snapkv")
    p.add_argument("--budget", type=parse_budget, default=0.25, help="fraction kept (0.25) or tokens kept (256)")
    p.add_argument("--prompt")
    p.add_argument("--prompt-file")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("profile-heads", help="RazorAttention: find a model's retrieval heads, save and plot them")
    model_opts(p)
    p.add_argument("model_name", nargs="?", help="model name (same as --model)")
    p.add_argument("--segment", type=int, default=None, help="random segment length (authors: 2500)")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--out", help="JSON path (default: next to the converted model)")
    p.set_defaults(func=cmd_profile_heads)

    p = sub.add_parser("train-gates", help="retention_gates: train the gates of a model by distillation (CPU, minutes)")
    model_opts(p, default_model="stories260k")
    p.add_argument("--memory", type=int, default=128, help="entries per layer and KV head the capacity loss aims at")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--capacity-weight", type=float, default=1.0)
    p.add_argument("--data", default="self", choices=["self", "haystack"],
                   help="self: the model's own samples; haystack: the shipped public-domain passages")
    p.add_argument("--sequences", type=int, default=256, help="training sequences to sample or cut")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="weights file (default: next to the converted model, where retention_gates looks)")
    p.set_defaults(func=cmd_train_gates)

    p = sub.add_parser("store", help="inspect or empty a KV store (memory://, disk:PATH, redis://..., or a list)")
    p.add_argument("action", choices=["stats", "clear"])
    p.add_argument("url")
    p.set_defaults(func=cmd_store)

    p = sub.add_parser("bench", help="quality, memory and speed of methods side by side on offline tasks")
    model_opts(p)
    p.add_argument("--methods", default="snapkv,streaming_llm,h2o")
    p.add_argument("--budgets", default="0.25", help="comma-separated ratios (0.25) or token counts (256)")
    p.add_argument("--tasks", default="niah_single")
    p.add_argument("--lengths", default="1024")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--protocol", default="question_aware", choices=["question_aware", "question_agnostic", "both"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fidelity", action="store_true", help="also KL / top-1 / greedy match vs the full cache")
    p.add_argument("--peers", default="", help="kvpress: run kvpress 0.5.5 on the same inputs (own venv)")
    p.add_argument("--out", default="runs/bench", help="run folder (resumes: finished samples are skipped)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the README's main job: a short bench on the default model")
    model_opts(p)
    p.set_defaults(func=cmd_bench, methods="snapkv,adakv,streaming_llm", budgets="0.25", tasks="niah_single",
                   lengths="1024", samples=3, protocol="question_aware", seed=0, fidelity=False, peers="",
                   out="runs/demo", threads=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "model_name", None):
        args.model = args.model_name
    from .models import ModelNotAvailableError, UnknownModelError
    from .policies import UnknownMethodError
    from .policies.retention_gate_modules import GatesNotFoundError

    try:
        return args.func(args)
    except (UnknownModelError, ModelNotAvailableError, UnknownMethodError, GatesNotFoundError, ValueError) as err:
        print(f"infercache: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
