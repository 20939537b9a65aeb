"""Load throughput of each KV store tier against the time to recompute the same KV by prefill.

Not a test: it prints a table and writes JSON + Markdown. For each chunk length (256 and 1024 tokens by default) it
computes the real KV of that many tokens of English text with the model (SmolLM2-135M, float32: 45 KiB per token,
11.25 MiB per 256-token chunk), then, for every tier (``memory://``, ``disk:<temp dir>``, ``redis://`` on a
throwaway ``redis-server``) and every compression (none, zlib-1, lzma-1; all lossless), times

* ``put``: ``KVStore.put_chunk`` = encode (safetensors + SHA-256 checksum [+ compression]) + the tier's write
  (disk: temp file, fsync, rename, fsync of the folder);
* ``get``: ``KVStore.get_chunk`` = the tier's read + decode (checksum check [+ decompression]) + the namespace /
  shape checks: what a reuse mode pays to have the chunk's KV tensors in hand;
* ``read``: the tier's raw ``get`` of the blob bytes only (transport, no decode);

against ``recompute``: a one-shot prefill of the same tokens (``infercache.reuse.verify.full_prefill``, position 0,
no preceding context; a chunk in the middle of a long prompt costs more, since its tokens also attend to the
context). Each number is the median of ``--repeats`` runs, each run on a fresh key (so disk writes a new file), and
the cells (tier x compression) and one recompute run round-robin, round after round, so that every cell and the
recompute see the same swings of load (the machine is shared). Disk reads come from the page cache (the file was
just written); a cold disk is slower. lzma (about 10x slower than zlib; its cost does not depend on the tier) is run
only on ``memory://`` and only up to ``--lzma-max-tokens`` (256).

    python benchmarks/store_tiers.py                # ~5-10 minutes on the shared 2-core CPU
    python benchmarks/store_tiers.py --quick        # 256 tokens, no lzma, 3 repeats

``redis-server`` must be on PATH for the Redis rows (``apt-get install redis-server``); without it they are
skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from infercache import store
from infercache.store.local_redis import LocalRedis
from infercache.models import load
from infercache.reuse import namespace_for
from infercache.reuse.verify import full_prefill

RESULTS = Path(__file__).resolve().parent / "results"
COMPRESSIONS = (None, "zlib", "lzma")
MB = 1e6  # throughput in decimal MB/s; sizes in MiB


def text_ids(tokenizer, tokens: int) -> torch.Tensor:
    """``tokens`` token ids of public-domain English text (the benchmark corpus shipped with infercache)."""
    text = (resources.files("infercache.bench") / "data" / "milton_areopagitica.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[5000: 5000 + 12 * tokens], add_special_tokens=False).input_ids[:tokens]
    if len(ids) < tokens:
        raise ValueError(f"the corpus text gave only {len(ids)} tokens, {tokens} were asked for")
    return torch.tensor(ids)


def chunk_kv(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(K, V)``, ``[kv_heads, tokens, head_dim]``, of ``ids`` prefilled from position 0."""
    _, cache, _ = full_prefill(model, ids)
    return [(layer.keys[0].contiguous(), layer.values[0].contiguous()) for layer in cache.layers]


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def one_run(tier, kv_store: store.KVStore, kv, tokens: int, *, check: bool) -> tuple[float, float, float, int]:
    """Put one chunk's KV under a fresh key, read the raw blob, get it back decoded; returns seconds and blob size."""
    key = f"bench-{tokens}-{kv_store.compress or 'none'}-{os.getpid()}-{time.time_ns()}"
    start = time.perf_counter()
    if not kv_store.put_chunk(key, kv, start=0):
        raise RuntimeError(f"{type(tier).__name__} dropped a {tokens}-token put (see the log above)")
    put_s = time.perf_counter() - start
    start = time.perf_counter()
    blob = tier.get(key)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    found = kv_store.get_chunk(key, start=0, num_tokens=tokens)
    get_s = time.perf_counter() - start
    if blob is None or found is None:
        raise RuntimeError(f"{type(tier).__name__}: the chunk just stored under {key} was not found again")
    if check:  # lossless formats only: the KV must come back bit-identical
        for (k, v), (k2, v2) in zip(kv, found[0]):
            if not (torch.equal(k, k2) and torch.equal(v, v2)):
                raise AssertionError(f"{type(tier).__name__} / {kv_store.compress}: KV did not come back bit-identical")
    tier.delete(key)
    return put_s, read_s, get_s, len(blob)


def time_cells(model, tok, namespace, tiers: dict, cells: list[tuple[str, str | None]], tokens: int, repeats: int,
               bar: tqdm) -> list[dict]:
    """Round-robin over ``cells`` (tier, compression) and one recompute per round, ``repeats`` rounds after a
    warm-up round, so every cell and the recompute see the same swings of load on the shared machine."""
    ids = text_ids(tok, tokens)
    kv = chunk_kv(model, ids)
    kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
    stores = {cell: store.KVStore(tiers[cell[0]], namespace, compress=cell[1]) for cell in cells}
    times: dict = {cell: {"put": [], "read": [], "get": [], "size": 0} for cell in cells}
    recompute: list[float] = []
    for attempt in range(repeats + 1):  # attempt 0 is a warm-up (and the round-trip check), not recorded
        for cell in cells:
            bar.set_postfix_str(f"{tokens} tok, round {attempt}, {cell[0]} {cell[1] or 'none'}")
            put_s, read_s, get_s, size = one_run(tiers[cell[0]], stores[cell], kv, tokens, check=attempt == 0)
            if attempt:
                times[cell]["put"].append(put_s)
                times[cell]["read"].append(read_s)
                times[cell]["get"].append(get_s)
            times[cell]["size"] = size
            bar.update(1)
        bar.set_postfix_str(f"{tokens} tok, round {attempt}, recompute")
        seconds = full_prefill(model, ids)[2]
        if attempt:
            recompute.append(seconds)
        bar.update(1)
    recompute_ms = median_ms(recompute)
    rows = []
    for (tier_name, compress), t in times.items():
        get_ms = median_ms(t["get"])
        rows.append({"tokens": tokens, "tier": tier_name, "compress": compress or "none", "kv_bytes": kv_bytes,
                     "blob_bytes": t["size"], "put_ms": median_ms(t["put"]), "read_ms": median_ms(t["read"]),
                     "get_ms": get_ms, "get_MBps": kv_bytes / MB / (get_ms / 1000),
                     "put_MBps": kv_bytes / MB / (median_ms(t["put"]) / 1000),
                     "read_MBps": t["size"] / MB / (median_ms(t["read"]) / 1000), "ratio": t["size"] / kv_bytes,
                     "recompute_ms": recompute_ms, "recompute_over_get": recompute_ms / get_ms,
                     "put_all_ms": [1000 * x for x in t["put"]], "read_all_ms": [1000 * x for x in t["read"]],
                     "get_all_ms": [1000 * x for x in t["get"]], "recompute_all_ms": [1000 * x for x in recompute]})
    return rows


def open_tiers(workdir: Path, with_redis: bool) -> tuple[dict, LocalRedis | None, str | None]:
    tiers = {"memory://": store.open("memory://?max_bytes=4GiB"),
             "disk:TMP": store.open(f"disk:{workdir / 'disk'}?max_bytes=8GiB")}
    server, note = None, None
    if with_redis:
        try:
            server = LocalRedis(workdir / "redis").start()
            tiers["redis://"] = store.open(server.url, timeout=30.0, strict=True)
        except (FileNotFoundError, RuntimeError) as exc:
            note = f"Redis rows skipped: {exc}"
            print(note, file=sys.stderr)
    else:
        note = "Redis rows skipped: --no-redis"
    return tiers, server, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="chunk lengths (tokens)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median reported)")
    parser.add_argument("--compress", nargs="+", default=["none", "zlib", "lzma"], choices=["none", "zlib", "lzma"])
    parser.add_argument("--lzma-max-tokens", type=int, default=256, help="run lzma only up to this chunk length")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis tier")
    parser.add_argument("--quick", action="store_true", help="256 tokens, no lzma, 3 repeats (about a minute)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "store_tiers.json",
                        help="JSON output; the Markdown table goes next to it (.md)")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats = [256], 3
        args.compress = [c for c in args.compress if c != "lzma"]
    compressions = [None if c == "none" else c for c in args.compress]
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    namespace = namespace_for(model, tok)
    rows: list[dict] = []
    meta = {"model": args.model, "dtype": str(next(model.parameters()).dtype), "threads": args.threads,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "cpu": cpu_name(), "torch": torch.__version__,
            "python": platform.python_version(), "repeats": args.repeats, "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="infercache-tiers-") as tmp:
        tiers, server, note = open_tiers(Path(tmp), not args.no_redis)
        try:
            meta.update(redis_server=server.version() if server is not None else None, note=note)
            plan = {tokens: [(tier_name, compress) for tier_name in tiers for compress in compressions
                             if compress != "lzma" or (tokens <= args.lzma_max_tokens and tier_name == "memory://")]
                    for tokens in args.tokens}
            total = sum((len(cells) + 1) * (args.repeats + 1) for cells in plan.values())
            with tqdm(total=total, desc="store tiers", unit="op") as bar:
                for tokens, cells in plan.items():
                    rows += time_cells(model, tok, namespace, tiers, cells, tokens, args.repeats, bar)
                    write_results(args.out, meta, rows, final=False)  # partial results survive an interrupt
        finally:
            for tier in tiers.values():
                tier.close()
            if server is not None:
                server.stop()
    markdown = write_results(args.out, meta, rows, final=True)
    print()
    print(markdown)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")


def write_results(out: Path, meta: dict, rows: list[dict], *, final: bool) -> str:
    meta = {**meta, "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_avg_end": os.getloadavg(), "complete": final}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    markdown = table(rows, meta)
    out.with_suffix(".md").write_text(markdown + "\n")
    return markdown


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"# KV store tiers vs recompute ({meta['model']}, {meta['dtype']})", "",
             f"{meta['date_utc']}, {meta['cpu']} ({meta['cpu_count']} cores, shared with other jobs; load average "
             f"{meta['load_avg_start'][0]:.1f} at the start, {meta['load_avg_end'][0]:.1f} at the end), torch "
             f"{meta['torch']}, {meta['threads']} thread, redis-server {meta.get('redis_server') or '-'} on loopback. "
             f"Medians of {meta['repeats']} runs. `put` = encode + write; `read` = raw bytes from the tier; "
             "`get` = read + decode + checks (KV tensors in hand); MB/s = uncompressed KV MB per second of `get`; "
             "`recompute` = prefill of the same tokens from position 0, timed in the same rounds; ratio = recompute / "
             "get (> 1: loading pays)." + ("" if meta.get("complete") else " **Partial: the run did not finish.**"),
             ""]
    if meta.get("note"):
        lines += [f"**{meta['note']}**", ""]
    lines += ["| tokens | tier | compression | KV MiB | blob MiB | put ms | read ms | get ms | get MB/s | "
              "recompute ms | recompute / get |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['tier']} | {r['compress']} | {r['kv_bytes'] / 2**20:.2f} | "
                     f"{r['blob_bytes'] / 2**20:.2f} | {r['put_ms']:.1f} | {r['read_ms']:.1f} | {r['get_ms']:.1f} | "
                     f"{r['get_MBps']:.0f} | {r['recompute_ms']:.0f} | {r['recompute_over_get']:.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
