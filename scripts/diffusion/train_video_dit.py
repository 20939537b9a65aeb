"""Train the ``video-dit-moving-digits`` reference model: a causal video DiT on procedural moving-digit clips.

    .venv/bin/python scripts/diffusion/train_video_dit.py            # <= 13 min on 1 CPU thread

Model: :class:`infercache.diffusion.video.CausalVideoDiT` (adaLN-Zero blocks, temporal RoPE), 16 x 16 frames,
unconditional, generated chunk by chunk (2 frames per chunk) with rectified flow.

Objective: *teacher forcing* as in CausVid / Self-Forcing's teacher-forcing baseline, in one pass per batch. The
token sequence is ``[clean clip ; noisy clip]``; chunk ``j`` of the noisy half (its own noise level ``s_j``,
logit-normal) attends to the clean chunks ``< j`` and to itself; the clean half attends block-causally to clean
chunks ``<= j`` at timestep 0. This is exactly what chunk-by-chunk sampling sees: the cache holds the K/V of the
finished clean chunks, written by a forward at timestep 0 (``context_noise`` 0). Loss: MSE of the velocity
``noise - x0`` on every noisy chunk. Clips are generated fresh for every batch (``moving_digits``, 8 frames, one
digit bouncing at up to 2 px per frame), so there is no fixed training set.

Writes ``src/infercache/diffusion/checkpoints/video-dit-moving-digits/{model.safetensors,config.json}`` (EMA
weights, fp32) and a sample grid ``scripts/diffusion/video-dit-moving-digits-samples.png`` (one row per clip,
16 generated frames, full-history cache).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from infercache.diffusion.video import ARCacheConfig, CausalVideoDiT, generate_video, moving_digits  # noqa: E402
from infercache.diffusion.video.model import _masked  # noqa: E402
from infercache.diffusion.training import train_step  # noqa: E402
from infercache.diffusion.video.pretrained import (  # noqa: E402
    VIDEO_CHECKPOINT_DIR,
    VIDEO_DIT_CONFIG,
    VIDEO_SAMPLING,
    save_video_grid,
    video_quality,
)

HERE = Path(__file__).resolve().parent


def teacher_forcing_loss(
    model: CausalVideoDiT, x0: torch.Tensor, chunk_frames: int, gen: torch.Generator
) -> torch.Tensor:
    b, _, f = x0.shape[:3]
    n_chunks = f // chunk_frames
    per = model.tokens_per_frame
    tok_chunk = chunk_frames * per
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.sigmoid(torch.randn(b, n_chunks, generator=gen))  # logit-normal per (clip, chunk)
    s = sigma.repeat_interleave(chunk_frames, dim=1)[:, None, :, None, None]  # (B, 1, F, 1, 1)
    xt = (1 - s) * x0 + s * noise
    h = torch.cat([model._tokens(x0), model._tokens(xt)], dim=1)  # (B, 2N, D)
    n = f * per
    c_clean = model._cond(0.0, b, x0.device)  # (B, D)
    c_noisy = model._cond((sigma * 1000.0).reshape(-1), b * n_chunks, x0.device).reshape(b, n_chunks, -1)
    chunk_cond = torch.cat([c_clean[:, None].expand(b, n_chunks, -1), c_noisy], dim=1)  # (B, 2 * chunks, D)
    chunk_of = (torch.arange(n) // tok_chunk).repeat(2)
    noisy = torch.arange(2 * n) >= n
    q_c, k_c = chunk_of[:, None], chunk_of[None, :]
    q_n, k_n = noisy[:, None], noisy[None, :]
    mask = (~q_n & ~k_n & (k_c <= q_c)) | (q_n & ~k_n & (k_c < q_c)) | (q_n & k_n & (k_c == q_c))
    pos = (torch.arange(n) // per).float().repeat(2)
    for blk in model.blocks:
        h = blk(h, chunk_cond, lambda q, k, v: _masked(q, k, v, pos, mask), tokens_per_cond=tok_chunk)
    hn = h[:, n:]
    pred = torch.cat(
        [
            model._head(hn[:, j * tok_chunk : (j + 1) * tok_chunk], c_noisy[:, j], chunk_frames)
            for j in range(n_chunks)
        ],
        dim=2,
    )
    return torch.nn.functional.mse_loss(pred, noise - x0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--max-minutes", type=float, default=13.0, help="stop early (and save) after this wall time")
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--frames", type=int, default=8, help="training clip length (frames)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init",
        "--resume",
        dest="init",
        type=Path,
        nargs="?",
        const=VIDEO_CHECKPOINT_DIR,
        default=None,
        help="start from this checkpoint folder (a further stage; its training record is chained); "
        "`--resume` alone resumes from the shipped checkpoint. Weights only: the optimizer and schedule restart",
    )
    p.add_argument(
        "--data-offset",
        type=int,
        default=0,
        help="clip seeds are 10000 + data_offset + step (0: the clips of stages 1-3; a new value gives new clips)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=VIDEO_CHECKPOINT_DIR)
    p.add_argument("--grid", type=Path, default=HERE / "video-dit-moving-digits-samples.png")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    arch = VIDEO_DIT_CONFIG
    chunk = VIDEO_SAMPLING["chunk_frames"]
    model = CausalVideoDiT(**arch, zero_init=True)
    model.train()
    previous = None
    if args.init is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(args.init / "model.safetensors")))
        previous = json.loads((args.init / "config.json").read_text()).get("training")
        print(f"starting from {args.init} (stage trained {previous and previous.get('steps')} steps)", flush=True)
    ema = CausalVideoDiT(**arch, zero_init=True)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    n_params = sum(q.numel() for q in model.parameters())
    print(f"video-dit-moving-digits: {n_params / 1e6:.2f} M params; fresh clips every batch", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
        ),
    )
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    running = None
    step = 0
    for step in range(1, args.steps + 1):
        x0 = moving_digits(
            args.batch_size, num_frames=args.frames, size=arch["frame_size"], seed=10_000 + args.data_offset + step
        ).clips
        loss = teacher_forcing_loss(model, x0, chunk, gen)
        value = train_step(loss, model, ema, opt, sched, step, args.ema)
        running = value if running is None else 0.98 * running + 0.02 * value
        elapsed = time.time() - t0
        if step % 100 == 0:
            print(
                f"step {step:6d}  loss {running:.4f}  lr {sched.get_last_lr()[0]:.2e}  {step / elapsed:.2f} it/s",
                flush=True,
            )
        if elapsed > args.max_minutes * 60:
            print(f"time budget reached at step {step}")
            break
    minutes = (time.time() - t0) / 60

    n_eval = 32
    video, _ = generate_video(
        ema,
        num_chunks=VIDEO_SAMPLING["eval_frames"] // chunk,
        chunk_frames=chunk,
        num_steps=VIDEO_SAMPLING["num_steps"],
        batch_size=n_eval,
        cache_config=ARCacheConfig.unbounded(),
        generator=torch.Generator().manual_seed(1),
    )
    q = video_quality(video)
    print(f"eval on {n_eval} generated clips ({video.shape[2]} frames): {q}")

    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(args.out / "model.safetensors"))
    info = {
        "name": "video-dit-moving-digits",
        "model_class": "CausalVideoDiT",
        "model": arch,
        "sampling": VIDEO_SAMPLING,
        "objective": "rectified flow, teacher forcing: noisy chunk j attends to clean chunks < j (timestep 0) and "
        "itself; x_t = (1-s) x0 + s noise, target noise - x0, timestep 1000 s, s ~ logit-normal per chunk",
        "data": f"moving_digits: fresh clips per batch, {args.frames} frames, 16x16, 1 digit, max speed 2 px/frame",
        "training": {
            "steps": step,
            "schedule_steps": args.steps,
            "max_minutes": args.max_minutes,
            "batch_size": args.batch_size,
            "frames": args.frames,
            "lr": args.lr,
            "ema": args.ema,
            "seed": args.seed,
            "minutes": round(minutes, 2),
            "final_loss": round(running, 4),
            "threads": args.threads,
            "data_offset": args.data_offset,
            "init": None if args.init is None else str(args.init.name),
            "previous_stage": previous,
        },
        "eval": {"num_clips": n_eval, "full_history_cache": q},
        "params": n_params,
    }
    (args.out / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    save_video_grid(video[:8], args.grid)
    print(f"saved {args.out} ({(args.out / 'model.safetensors').stat().st_size / 1e6:.2f} MB) and {args.grid}")


if __name__ == "__main__":
    main()
