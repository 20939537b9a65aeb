"""Check that an UNCOMPRESSED model solves the tasks: plain greedy ``model.generate`` with a full cache.

    python -m infercache.bench.tasks.calibrate --model smollm2-135m --task niah_single --lengths 512,1024 --samples 5

Prints one line per sample (with ``-v``) and an accuracy table per task and length; ``--json`` also
writes the rows and the summary to a file.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from . import TASKS, get_task
from .prompts import PROTOCOLS, render_prompt


def run_sample(model, tokenizer, task, sample, protocol: str, prompt_format: str) -> dict:
    """Generate an answer for one sample (greedy, full cache) and score it."""
    prompt = render_prompt(sample, tokenizer, protocol=protocol, prompt_format=prompt_format)
    ids = torch.tensor([prompt.input_ids])
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=sample.max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    prediction = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return {
        "task": sample.task, "sample_id": sample.sample_id, "length": sample.length_tokens,
        "prompt_tokens": ids.shape[1], "depth": sample.depth, "answers": sample.answers,
        "prediction": prediction, "score": task.score(prediction, sample),
        "seconds": round(time.perf_counter() - started, 2),
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Mean score and time per (task, length)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["length"]), []).append(row)
    return [
        {"task": task, "length": length, "n": len(group),
         "accuracy": round(sum(r["score"] for r in group) / len(group), 3),
         "seconds_per_sample": round(sum(r["seconds"] for r in group) / len(group), 2)}
        for (task, length), group in groups.items()
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="niah_single", help="comma-separated task names, or 'all'")
    parser.add_argument("--lengths", default="512,1024", help="comma-separated context lengths in tokens")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=float, default=None, help="fixed needle depth 0..1 (default: spread)")
    parser.add_argument("--filler", default=None, help="override the haystack filler (literary, pydoc, repeat)")
    parser.add_argument("--protocol", default="question_aware", choices=PROTOCOLS)
    parser.add_argument("--format", default="auto", choices=("auto", "chat", "completion"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write rows and summary to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every prediction")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    from ...models import load

    names = list(TASKS) if args.task == "all" else [t.strip() for t in args.task.split(",") if t.strip()]
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    tasks = [get_task(n, **({"filler": args.filler} if args.filler and "filler" in _fields(n) else {})) for n in names]
    model, tokenizer = load(args.model)

    rows = []
    for task in tasks:
        for length in lengths:
            depth = args.depth if task.uses_depth else None
            for sample in task.generate(tokenizer, length, args.samples, seed=args.seed, depth=depth):
                row = run_sample(model, tokenizer, task, sample, args.protocol, args.format)
                rows.append(row)
                if args.verbose:
                    print(f"{row['sample_id']:<32} score={row['score']:.2f} {row['seconds']:>6.1f}s "
                          f"answers={row['answers']} prediction={row['prediction']!r}", flush=True)
    summary = summarize(rows)
    print(f"\nmodel={args.model} protocol={args.protocol} format={args.format} seed={args.seed}")
    print(f"{'task':<20} {'length':>7} {'n':>3} {'accuracy':>9} {'s/sample':>9}")
    for line in summary:
        print(f"{line['task']:<20} {line['length']:>7} {line['n']:>3} {line['accuracy']:>9.3f} "
              f"{line['seconds_per_sample']:>9.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows, "summary": summary}, handle, indent=2)
    return summary


def _fields(name: str) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(TASKS[name])}


if __name__ == "__main__":
    main()
