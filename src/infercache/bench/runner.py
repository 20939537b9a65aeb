"""``infercache bench``: methods x budgets x tasks x lengths x samples, side by side, resumable.

Every (method, budget) runs on the very same task instances (generated once from the seed) through our
engine; peers (kvpress) run the same token ids in their own environment. Results go to ``samples.jsonl``
(one line per sample, skipped on resume), then :mod:`.report` writes the summary, tables, plots and HTML.
"""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from .. import compressed_cache, methods as known_methods
from ..cache.budget import Budget
from .metrics import greedy_token_match, kl_divergence, top1_agreement, fidelity_text
from .records import RecordFile, record_key
from .tasks import get_task, render_prompt


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    methods: list[str] = field(default_factory=lambda: ["snapkv", "streaming_llm"])
    budgets: list[float | int] = field(default_factory=lambda: [0.25])
    tasks: list[str] = field(default_factory=lambda: ["niah_single"])
    lengths: list[int] = field(default_factory=lambda: [1024])
    samples: int = 4
    protocols: list[str] = field(default_factory=lambda: ["question_aware"])
    seed: int = 0
    fidelity: bool = False
    fidelity_tokens: int = 64
    peers: list[str] = field(default_factory=list)
    threads: int = 1
    device: str = "cpu"
    dtype: str = "float32"

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in known_methods()]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(known_methods())}")
        for b in self.budgets:
            Budget.parse(b)
        for t in self.tasks:
            get_task(t)
        for p in self.protocols:
            if p not in ("question_aware", "question_agnostic"):
                raise ValueError(f"unknown protocol {p!r}; use question_aware and/or question_agnostic")
        if self.samples < 1:
            raise ValueError("samples must be >= 1")
        for peer in self.peers:
            if peer != "kvpress":
                raise ValueError(f"unknown peer {peer!r}; available: kvpress")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dense_bytes(cache) -> int:
    return sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers if getattr(l, "keys", None) is not None)


def run_sample(model, tokenizer, prompt, sample, method: str, budget) -> dict:
    """Prefill (with compression) and greedy decode one rendered sample; quality and cost figures."""
    device = next(model.parameters()).device
    context = torch.tensor([prompt.context_ids], device=device)
    question = torch.tensor([prompt.question_ids], device=device) if prompt.question_ids else None
    cache = DynamicCache(config=model.config) if method == "full" else compressed_cache(model, method, budget)
    with torch.no_grad():
        start = time.perf_counter()
        out = model(context, cache=cache, use_cache=True)
        if question is not None:
            out = model(question, cache=cache, use_cache=True)
        prefill_s = time.perf_counter() - start
        bytes_after_prefill = dense_bytes(cache) if method == "full" else cache.nbytes()
        lengths = None if method == "full" else [None if t is None else t.tolist() for t in cache.lengths()]
        generated = [int(out.logits[0, -1].argmax())]
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        start = time.perf_counter()
        for _ in range(sample.max_new_tokens - 1):
            if generated[-1] in eos:
                break
            nxt = torch.tensor([[generated[-1]]], device=device)
            generated.append(int(model(nxt, cache=cache, use_cache=True).logits[0, -1].argmax()))
        decode_s = time.perf_counter() - start
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return {
        "prediction": text,
        "score": get_task(sample.task).score(text, sample),
        "cache_bytes": bytes_after_prefill,
        "lengths": lengths,
        "prefill_s": round(prefill_s, 4),
        "scoring_s": round(cache.engine.prefill_seconds, 4) if hasattr(cache, "engine") else 0.0,
        "decode_tok_s": round((len(generated) - 1) / decode_s, 2) if decode_s > 0 and len(generated) > 1 else None,
        "context_tokens": len(prompt.context_ids),
        "question_tokens": len(prompt.question_ids),
    }


def run_fidelity(model, tokenizer, length: int, n_cont: int, method: str, budget, seed: int) -> dict:
    """KL / top-1 agreement of next-token distributions over a natural-text continuation, and greedy match,
    against the full cache; the context is compressed alone (question-agnostic) before the continuation."""
    device = next(model.parameters()).device
    text = fidelity_text(tokenizer=tokenizer, n_tokens=length + n_cont, seed=seed)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : length + n_cont].to(device)
    return fidelity_on_ids(model, ids[:, :length], ids[:, length:], method, budget, pad_token_id=tokenizer.pad_token_id)


def fidelity_on_ids(model, context, continuation, method: str, budget, *, pad_token_id=None, greedy_tokens: int = 32,
                    reference: dict | None = None, **options) -> dict:
    """Fidelity of ``method`` at ``budget`` against the full cache on given ids ``[1, L]`` and ``[1, n]``.

    The context is compressed alone, then the continuation is teacher-forced (one multi-token forward) and
    ``greedy_tokens`` are generated from the context. Returns ``kl``, ``top1``, ``greedy_match``,
    ``first_divergence``, ``nll`` (the method's mean next-token loss on the continuation after its first token)
    and ``nbytes`` (held after the context and the continuation).
    ``reference`` (the ``"reference"`` entry of an earlier result) skips recomputing the full cache's run.
    """
    length = context.shape[1]

    def run(name):
        def cache():
            return DynamicCache(config=model.config) if name == "full" else compressed_cache(model, name, budget, **options)

        first = cache()
        with torch.no_grad():
            model(context, cache=first, use_cache=True)
            logits = model(continuation, cache=first, use_cache=True).logits[0]
            nbytes = first.nbytes() if hasattr(first, "nbytes") else None
            gen = model.generate(context, cache=cache(), max_new_tokens=greedy_tokens, min_new_tokens=greedy_tokens,
                                 do_sample=False, pad_token_id=pad_token_id)[0, length:]
        return {"logits": logits, "gen": gen, "nbytes": nbytes}

    ref = reference or run("full")
    test = run(method)
    match = greedy_token_match(ref["gen"], test["gen"])
    nll = torch.nn.functional.cross_entropy(test["logits"][:-1].float(), continuation[0, 1:].to(test["logits"].device))
    return {
        "kl": kl_divergence(ref["logits"], test["logits"]),
        "top1": top1_agreement(ref["logits"], test["logits"]),
        "greedy_match": match.match_fraction,
        "first_divergence": match.first_divergence,
        "nll": float(nll),
        "nbytes": test["nbytes"],
        "reference": ref,
    }


def run_bench(config: BenchConfig, out_dir: Path, *, progress: bool = True) -> list[dict]:
    """Measure everything in ``config`` not yet in ``out_dir/samples.jsonl``; returns all records."""
    from ..models import load

    config.validate()
    torch.set_num_threads(config.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = RecordFile(out_dir / "samples.jsonl")
    model, tokenizer = load(config.model, device=config.device, dtype=config.dtype)
    runs = [("full", 1.0)] + [(m, b) for m in config.methods if m != "full" for b in config.budgets]
    jobs = []
    for task_name in config.tasks:
        task = get_task(task_name)
        for length in config.lengths:
            for sample in task.generate(tokenizer, length, config.samples, seed=config.seed):
                for protocol in config.protocols:
                    prompt = render_prompt(sample, tokenizer, protocol=protocol)
                    for method, budget in runs:
                        if method == "full" and protocol != config.protocols[0]:
                            continue  # the full cache does not depend on the protocol
                        jobs.append((task_name, length, sample, protocol, prompt, method, budget))
    base = {"kind": "task", "engine": "infercache", "model": config.model}
    todo = [j for j in jobs if record_key({**base, "method": j[5], "budget": j[6], "protocol": j[3] if j[5] != "full" else "-",
                                            "task": j[0], "length": j[1], "sample_id": j[2].sample_id}) not in records.done]
    for task_name, length, sample, protocol, prompt, method, budget in tqdm(
        todo, desc=f"bench {config.model}", disable=not progress, unit="run"
    ):
        result = run_sample(model, tokenizer, prompt, sample, method, budget)
        records.add({**base, "method": method, "budget": budget, "protocol": protocol if method != "full" else "-",
                     "task": task_name, "length": length, "sample_id": sample.sample_id, "depth": sample.depth,
                     "answers": sample.answers, **result, "peak_rss_mib": round(peak_rss_mib(), 1)})
    if config.fidelity:
        fid_jobs = [(length, m, b) for length in config.lengths for m, b in runs if m != "full"]
        for length, method, budget in tqdm(fid_jobs, desc="fidelity", disable=not progress, unit="run"):
            rec = {"kind": "fidelity", "engine": "infercache", "model": config.model, "method": method, "budget": budget,
                   "protocol": "question_agnostic", "task": "fidelity", "length": length, "sample_id": config.seed}
            if record_key(rec) in records.done:
                continue
            fid = run_fidelity(model, tokenizer, length, config.fidelity_tokens, method, budget, config.seed)
            fid.pop("reference")
            records.add({**rec, **fid})
    if "kvpress" in config.peers:
        run_kvpress_peer(config, model, tokenizer, records, jobs, progress)
    return records.records


def run_kvpress_peer(config, model, tokenizer, records, jobs, progress) -> None:
    """The same rendered samples through kvpress 0.5.5 in its own environment (see docs/peers.md)."""
    from ..models import model_dir
    from .peers.kvpress import KVPRESS_METHODS, run_kvpress

    requests, meta = [], {}
    for task_name, length, sample, protocol, prompt, method, budget in jobs:
        if method not in KVPRESS_METHODS:
            continue
        rec = {"kind": "task", "engine": "kvpress", "model": config.model, "method": method, "budget": budget,
               "protocol": protocol if method != "full" else "-", "task": task_name, "length": length,
               "sample_id": sample.sample_id}
        if record_key(rec) in records.done:
            continue
        rid = "|".join(str(x) for x in (method, budget, protocol, task_name, length, sample.sample_id))
        requests.append({"id": rid, "method": method, "budget": budget, "context_ids": prompt.context_ids,
                         "question_ids": prompt.question_ids, "max_new_tokens": sample.max_new_tokens})
        meta[rid] = (rec, sample)
    if not requests:
        return
    results = run_kvpress(model_dir(config.model), requests, Path(records.path).parent / "kvpress")
    for res in results:
        rec, sample = meta[res["id"]]
        text = tokenizer.decode(res.get("prediction_ids") or [], skip_special_tokens=True)
        records.add({**rec, "depth": sample.depth, "answers": sample.answers, "prediction": text,
                     "score": get_task(sample.task).score(text, sample) if not res.get("error") else None,
                     "cache_bytes": res.get("cache_bytes"), "prefill_s": res.get("prefill_s"),
                     "error": res.get("error")})


def run_meta(config: BenchConfig) -> dict:
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": config.threads,
        "torch": torch.__version__,
        "device": config.device,
        "dtype": config.dtype,
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
