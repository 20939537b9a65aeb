"""KV-cache layouts on the trained ``video-dit-moving-digits`` model: quality vs full-history attention.

Every layout generates the same clips from the same noise (chunk by chunk, ``generate_video``); the reference is
the full-history cache (every frame kept at full resolution, absolute positions, the exact Ca2-VDM cache). Per
layout: PSNR and SSIM (per frame) vs the reference clips, the reference-free clip quality of
:func:`~infercache.diffusion.video.pretrained.video_quality` (digit confidence, identity and motion consistency),
the cache size at the end (tokens per layer, bytes) and the wall time (best of ``repeats``). A row "real clips"
gives the same reference-free metrics on real ``moving_digits`` clips (the ceiling).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .kv_cache import ARCacheConfig
from .model import generate_video
from .moving_digits import moving_digits
from .pretrained import VIDEO_SAMPLING, load_video_dit, psnr_video, save_video_grid, video_quality

#: Named layouts (``full`` is the reference). Budgets in frames; a chunk is 2 frames.
LAYOUTS: dict[str, ARCacheConfig] = {
    "full": ARCacheConfig.unbounded("absolute"),
    "sink_mid_recent": ARCacheConfig(sink_frames=2, recent_frames=4, mid_capacity=2, mid_pool=2, positions="rebased"),
    "sink_mid_recent_absolute": ARCacheConfig(
        sink_frames=2, recent_frames=4, mid_capacity=2, mid_pool=2, positions="absolute"
    ),
    "sink_recent": ARCacheConfig(sink_frames=2, recent_frames=4, mid_capacity=0, positions="rebased"),
    "sink_recent_absolute": ARCacheConfig(sink_frames=2, recent_frames=4, mid_capacity=0, positions="absolute"),
    "recent": ARCacheConfig(sink_frames=0, recent_frames=4, mid_capacity=0, positions="rebased"),
    "recent_absolute": ARCacheConfig(sink_frames=0, recent_frames=4, mid_capacity=0, positions="absolute"),
    "recent2": ARCacheConfig(sink_frames=0, recent_frames=2, mid_capacity=0, positions="rebased"),
    "sink_recent2": ARCacheConfig(sink_frames=2, recent_frames=2, mid_capacity=0, positions="rebased"),
}


def parse_layouts(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names or names == ["all"]:
        return [n for n in LAYOUTS if n != "full"]
    bad = [n for n in names if n not in LAYOUTS]
    if bad:
        raise ValueError(f"unknown KV-cache layout(s) {', '.join(bad)}; known: {', '.join(LAYOUTS)} (or all)")
    return [n for n in names if n != "full"]


@dataclass
class VideoBenchSetup:
    num_clips: int = 32
    frames: int = 16
    num_steps: int | None = None
    seed: int = 0
    repeats: int = 3
    timing: bool = True


def _ssim_frames(a: torch.Tensor, b: torch.Tensor) -> float:
    from ..quality import ssim

    return ssim(a[:, 0].flatten(0, 1)[:, None], b[:, 0].flatten(0, 1)[:, None])


def run_video_bench(
    setup: VideoBenchSetup,
    layouts: list[str],
    out_dir: str | Path | None = None,
    progress: bool = True,
    model: Any = None,
) -> dict[str, Any]:
    """Generate with each layout and the full-history reference; write ``bench.json``, ``bench.md`` and
    ``samples.png`` to ``out_dir``. ``model`` overrides the shipped checkpoint (tests)."""
    from ..bench import Progress

    torch.set_num_threads(1)
    model = model if model is not None else load_video_dit()
    chunk = VIDEO_SAMPLING["chunk_frames"]
    if setup.frames % chunk:
        raise ValueError(f"frames must be a multiple of the chunk size {chunk}")
    steps = setup.num_steps or VIDEO_SAMPLING["num_steps"]

    def gen(name: str) -> tuple[torch.Tensor, dict[str, Any], float]:
        best = math.inf
        video, cache = None, None
        for _ in range(setup.repeats if setup.timing else 1):
            t0 = time.perf_counter()
            video, cache = generate_video(
                model,
                num_chunks=setup.frames // chunk,
                chunk_frames=chunk,
                num_steps=steps,
                batch_size=setup.num_clips,
                cache_config=LAYOUTS[name],
                generator=torch.Generator().manual_seed(setup.seed),
            )
            best = min(best, time.perf_counter() - t0)
        return video, cache.summary(), best

    bar = Progress(len(layouts) + 1, progress)
    ref, ref_summary, ref_sec = gen("full")
    bar.step("full")
    real = moving_digits(setup.num_clips, num_frames=setup.frames, size=model.frame_size, seed=10**6 + setup.seed)
    per = model.tokens_per_frame
    rows = [
        {"layout": "real clips", "config": None, **video_quality(real.clips)},
        {
            "layout": "full",
            "config": asdict(LAYOUTS["full"]),
            "psnr": None,
            "ssim": 1.0,
            **video_quality(ref),
            "cache_tokens_per_layer": ref_summary["mid_tokens"] + ref_summary["recent_tokens"]
            + ref_summary["sink_frames"] * per,
            "cache_bytes": ref_summary["bytes"],
            "seconds": ref_sec if setup.timing else None,
        },
    ]
    grids = [("full", ref[:2])]
    for name in layouts:
        video, summ, sec = gen(name)
        rows.append(
            {
                "layout": name,
                "config": asdict(LAYOUTS[name]),
                "psnr": psnr_video(video, ref),
                "ssim": _ssim_frames(video, ref),
                **video_quality(video),
                "cache_tokens_per_layer": summ["mid_tokens"] + summ["recent_tokens"] + summ["sink_frames"] * per,
                "cache_bytes": summ["bytes"],
                "seconds": sec if setup.timing else None,
            }
        )
        grids.append((name, video[:2]))
        bar.step(name)
    doc = {
        "date": dt.date.today().isoformat(),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "setup": {**asdict(setup), "num_steps": steps, "chunk_frames": chunk, "model": "video-dit-moving-digits"},
        "results": rows,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out / "bench.md").write_text(render_markdown(doc) + "\n")
        clips = torch.cat([v for _, v in grids])
        save_video_grid(clips, out / "samples.png")
        (out / "samples.txt").write_text(
            "rows of samples.png, two clips per layout, top to bottom:\n"
            + "\n".join(f"{2 * i + 1}-{2 * i + 2}: {n}" for i, (n, _) in enumerate(grids))
            + "\n"
        )
    return doc


def render_markdown(doc: dict[str, Any]) -> str:
    s = doc["setup"]
    lines = [
        "# KV-cache layouts on video-dit-moving-digits",
        "",
        f"{s['num_clips']} clips of {s['frames']} frames ({s['chunk_frames']} per chunk, {s['num_steps']} Euler "
        f"steps per chunk), seed {s['seed']}; {'best of ' + str(s['repeats']) if s['timing'] else 'timing off'}. "
        f"Date {doc['date']}. Reference: the full-history cache.",
        "",
        "| layout | sink | recent | mid (pool) | positions | PSNR dB vs full | SSIM vs full | digit confidence "
        "| identity consistency | motion ok | cache tokens / layer | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        c = r.get("config")
        if c is None:
            lay = "– | – | – | –"
        else:
            recent = "all" if c["recent_frames"] >= 10**9 else c["recent_frames"]
            mid = "–" if c["mid_capacity"] in (0,) else f"{c['mid_capacity']} ({c['mid_pool']}x{c['mid_pool']})"
            mid = "–" if c["recent_frames"] >= 10**9 else mid
            lay = f"{c['sink_frames']} | {recent} | {mid} | {c['positions']}"
        ps = "–" if "psnr" not in r else ("ref" if r["psnr"] is None else f"{r['psnr']:.2f}")
        ss = "–" if "ssim" not in r else f"{r['ssim']:.4f}"
        tok = r.get("cache_tokens_per_layer", "–")
        sec = "–" if r.get("seconds") is None else f"{r['seconds']:.2f}"
        lines.append(
            f"| {r['layout']} | {lay} | {ps} | {ss} | {r['confidence']:.3f} | {r['identity_consistency']:.3f} "
            f"| {r['motion_ok']:.3f} | {tok} | {sec} |"
        )
    return "\n".join(lines)
