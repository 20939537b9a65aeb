"""``infercache diffusion ...``: the caching benchmark and the calibration command.

    infercache diffusion bench --model dit-digits --policies easycache,teacache,peers --out runs/diffusion
    infercache diffusion bench --model video-dit-moving-digits --policies full,sink_recent,recent --out runs/video
    infercache diffusion calibrate --model dit-digits --policy teacache --out teacache.json
    infercache diffusion list

Wire it into a top-level parser with ``add_parser(subparsers)``; every action returns 0 on success.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

VIDEO_MODELS = ("video-dit-moving-digits",)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``diffusion`` command (actions ``bench``, ``calibrate``, ``list``) on ``subparsers``."""
    p = subparsers.add_parser(
        "diffusion",
        help="diffusion caching: benchmark policies and peers, calibrate TeaCache / MagCache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="diffusion_action", required=True)

    b = actions.add_parser(
        "bench",
        help="quality (PSNR, SSIM, digit accuracy) vs speed-up of caching policies and peers; JSON, Markdown, PNG",
        description="Methods: NAME (its default sweep), NAME:key=value:key=value (one setting), or the groups "
        "ours, peers, all. For video-dit-moving-digits the methods are KV-cache layouts: "
        "full, sink_recent, recent, sink_mid_recent, sink_mid_recent_absolute, recent_absolute (or all).",
    )
    b.add_argument("--model", default="dit-digits", help="dit-digits or video-dit-moving-digits")
    b.add_argument("--policies", default="all", help="comma-separated methods (see above)")
    b.add_argument("--out", required=True, help="output folder (bench.json, bench.md, *.png)")
    b.add_argument("--num-samples", type=int, default=None, help="samples / clips (default 100 / 32)")
    b.add_argument("--steps", type=int, default=None, help="denoising steps (default 20 / the model's)")
    b.add_argument("--guidance", type=float, default=2.0, help="CFG scale (image model)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--repeats", type=int, default=3, help="timed repeats per setting (best of)")
    b.add_argument("--calib-runs", type=int, default=2, help="full runs used by calibrated methods")
    b.add_argument("--frames", type=int, default=None, help="clip length to generate (video; default 16)")
    b.add_argument("--no-timing", action="store_true", help="one untimed run per setting (quality only)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)

    c = actions.add_parser(
        "calibrate",
        help="fit TeaCache coefficients or MagCache ratios for a model from a few full runs; save them as JSON",
        description="The JSON file can be passed straight to enable_cache: "
        "enable_cache(model, 'teacache', coefficients='FILE.json') or enable_cache(model, 'magcache', "
        "mag_ratios='FILE.json').",
    )
    c.add_argument("--model", default="dit-digits", help="dit-digits, or a checkpoint folder in its format")
    c.add_argument("--policy", required=True, choices=["teacache", "magcache"])
    c.add_argument("--out", required=True, help="JSON file to write")
    c.add_argument("--runs", type=int, default=2, help="full sampling runs to record")
    c.add_argument("--num-samples", type=int, default=32, help="samples per run")
    c.add_argument("--steps", type=int, default=20, help="denoising steps (MagCache ratios are per step count)")
    c.add_argument("--guidance", type=float, default=2.0)
    c.add_argument("--degree", type=int, default=4, help="TeaCache polynomial degree")
    c.add_argument("--probe", default="modulated", choices=["modulated", "timestep", "input"], help="TeaCache probe")
    c.add_argument("--seed", type=int, default=1000, help="seed of the first run (runs use seed, seed+1, ...)")
    c.set_defaults(func=cmd_calibrate)

    ls = actions.add_parser("list", help="list our policies, the peers and the default sweeps")
    ls.set_defaults(func=cmd_list)
    return p


def _load_image_model(name: str) -> tuple[Any, Any]:
    from .models import load_dit_digits

    if name == "dit-digits":
        return load_dit_digits()
    if Path(name).is_dir():
        return load_dit_digits(name)
    raise ValueError(f"unknown diffusion model {name!r}: use dit-digits or a checkpoint folder in its format")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    if args.model in VIDEO_MODELS:
        from .video.bench import VideoBenchSetup, parse_layouts, run_video_bench

        setup = VideoBenchSetup(
            num_clips=args.num_samples or 32,
            frames=args.frames or 16,
            num_steps=args.steps,
            seed=args.seed,
            repeats=args.repeats,
            timing=not args.no_timing,
        )
        doc = run_video_bench(setup, parse_layouts(args.policies), args.out, progress=not args.quiet)
        from .video.bench import render_markdown as render_video

        print(render_video(doc))
    else:
        from .bench import BenchSetup, parse_methods, render_markdown, run_bench

        methods = parse_methods(args.policies)
        setup = BenchSetup(
            model=args.model,
            num_samples=args.num_samples or 100,
            steps=args.steps or 20,
            guidance=args.guidance,
            seed=args.seed,
            repeats=args.repeats,
            calib_runs=args.calib_runs,
            timing=not args.no_timing,
        )
        doc = run_bench(setup, methods, args.out, progress=not args.quiet)
        print(render_markdown(doc))
    print(f"\nwrote {args.out}/bench.json, bench.md and PNGs", file=sys.stderr)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .calibration import (
        calibrate_magcache,
        fit_teacache_polynomial,
        record_calibration,
        save_calibration,
        teacache_pairs,
    )
    from .models import sample

    torch.set_num_threads(1)
    if args.runs < 1:
        raise ValueError("--runs must be >= 1")
    transformer, scheduler = _load_image_model(args.model)
    gen = torch.Generator().manual_seed(args.seed)
    labels = [torch.randint(0, 10, (args.num_samples,), generator=gen) for _ in range(args.runs)]
    done = [0]

    def run() -> None:
        for i, lab in enumerate(labels):
            sample(transformer, scheduler, lab, args.steps, args.guidance, torch.Generator().manual_seed(args.seed + i))
            done[0] += 1
            print(f"\rcalibration run {done[0]}/{args.runs}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)

    meta: dict[str, Any] = {
        "model": args.model,
        "num_inference_steps": args.steps,
        "runs": args.runs,
        "num_samples": args.num_samples,
        "guidance_scale": args.guidance,
        "seed": args.seed,
    }
    if args.policy == "teacache":
        traces = record_calibration(transformer, run, probe=args.probe)
        x, y = teacache_pairs(traces)
        coeffs = fit_teacache_polynomial(x, y, degree=args.degree)
        resid = np.asarray(y) - np.polyval(coeffs, x)
        r2 = 1.0 - float(np.sum(resid**2) / max(float(np.sum((np.asarray(y) - np.mean(y)) ** 2)), 1e-30))
        meta.update(degree=args.degree, probe=args.probe, pairs=len(x), r2=round(r2, 4),
                    probe_change_range=[min(x), max(x)])
        save_calibration(args.out, "teacache", coeffs, **meta)
        print(f"TeaCache: degree-{args.degree} fit on {len(x)} pairs, R^2 = {r2:.3f}; coefficients {coeffs}")
        print(f"use: enable_cache(model, 'teacache', coefficients={str(args.out)!r}, threshold=...)")
    else:
        ratios = calibrate_magcache(transformer, run)
        save_calibration(args.out, "magcache", ratios, **meta)
        print(f"MagCache: ratios for {args.steps} steps, branches {sorted(ratios)}: {json.dumps(ratios)}")
        print(f"use: enable_cache(model, 'magcache', mag_ratios={str(args.out)!r}, threshold=...)")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .bench import SWEEPS
    from .peers import PEERS
    from .registry import policies

    for title, names in (("ours", policies()), ("peers", PEERS)):
        print(f"{title}:")
        for n in names:
            sweep = "; ".join(",".join(f"{k}={v}" for k, v in c.items()) for c in SWEEPS.get(n, []))
            print(f"  {n:30s} default sweep: {sweep or '-'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m infercache.diffusion.cli ...``), same as ``infercache diffusion``."""
    parser = argparse.ArgumentParser(prog="infercache")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"infercache: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
