"""Benchmark the diffusion caching policies next to the peers on the trained ``dit-digits`` model.

    .venv/bin/python scripts/diffusion/bench_digits.py --repeats 3 --out scripts/diffusion/bench_digits

A thin wrapper over ``infercache.diffusion.bench`` (the same code as ``infercache diffusion bench``): every policy's
default sweep, every peer's default sweep, and the ERTACache ablation (no rectification, no timestep adjustment).
Writes ``bench.json``, ``bench.md``, ``quality_vs_speedup.png``, ``samples.png`` and the calibrated artefacts
(TeaCache coefficients, MagCache ratios, ProfilingDiT profile, ERTACache schedules) to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

torch.set_num_threads(1)

from infercache.diffusion.bench import BenchSetup, parse_methods, render_markdown, run_bench  # noqa: E402

DEFAULT = "all,ertacache:threshold=0.2:rectify=False:adjust_timestep=False"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default=DEFAULT)
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calib-runs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/bench_digits"))
    args = p.parse_args()
    setup = BenchSetup(
        model="dit-digits",
        num_samples=args.num_samples,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        repeats=args.repeats,
        calib_runs=args.calib_runs,
    )
    doc = run_bench(setup, parse_methods(args.policies), args.out)
    print(render_markdown(doc))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
