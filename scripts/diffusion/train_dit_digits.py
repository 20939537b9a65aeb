"""Train the ``dit-digits`` reference model (class-conditional DiT on scikit-learn digits, rectified flow).

    .venv/bin/python scripts/diffusion/train_dit_digits.py            # <= 7.5 min on 1 CPU thread

Trains for ``--steps`` (cosine LR schedule over that many steps) or until ``--max-minutes`` of wall time,
whichever comes first; the shipped checkpoint stopped at the time limit (see ``training`` in its config.json).
Writes ``src/infercache/diffusion/checkpoints/dit-digits/{model.safetensors,config.json}`` (EMA weights, fp32,
about 3.3 MB) and a sample grid ``scripts/diffusion/dit-digits-samples.png`` (row = class 0..9, 20 Euler steps).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from infercache.diffusion import hooks as _hooks  # noqa: E402,F401  (imported up front; sample() uses it)
from infercache.diffusion.models import (  # noqa: E402
    CHECKPOINT_DIR,
    DIT_DIGITS_CONFIG,
    SCHEDULER_CONFIG,
    build_dit_digits,
    build_scheduler,
    sample,
)
from infercache.diffusion.quality import digit_accuracy  # noqa: E402
from infercache.diffusion.training import train_step  # noqa: E402

HERE = Path(__file__).resolve().parent


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # (1797, 1, 8, 8) in [-1, 1]
    return x, torch.tensor(d.target, dtype=torch.long)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10, scale: int = 4) -> None:
    from PIL import Image

    b, _, h, w = images.shape
    ncol = math.ceil(b / nrow)
    grid = torch.ones(ncol * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = (images[i, 0] + 1) / 2
    arr = (255 * (1 - grid.clamp(0, 1))).to(torch.uint8).numpy()  # dark digits on white
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    img.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--max-minutes", type=float, default=7.5, help="stop early (and save) after this wall time")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    p.add_argument("--grid", type=Path, default=HERE / "dit-digits-samples.png")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    data, labels = load_data()
    model = build_dit_digits()
    model.train()
    ema = build_dit_digits()
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    n_params = sum(q.numel() for q in model.parameters())
    print(f"dit-digits: {n_params / 1e6:.2f} M params, {len(data)} training images")

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
        idx = torch.randint(0, len(data), (args.batch_size,), generator=gen)
        x0, y = data[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(args.batch_size, generator=gen))  # logit-normal(0, 1)
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * noise
        pred = model(xt, timestep=sigma * 1000.0, class_labels=y).sample  # 10% label dropout is built into DiT
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        value = train_step(loss, model, ema, opt, sched, step, args.ema)
        running = value if running is None else 0.98 * running + 0.02 * value
        elapsed = time.time() - t0
        if step % 500 == 0:
            print(
                f"step {step:6d}  loss {running:.4f}  lr {sched.get_last_lr()[0]:.2e}  {step / elapsed:.1f} it/s",
                flush=True,
            )
        if elapsed > args.max_minutes * 60:
            print(f"time budget reached at step {step}")
            break
    minutes = (time.time() - t0) / 60

    eval_labels = torch.arange(100) % 10
    scheduler = build_scheduler()
    acc = {}
    for g in (1.0, 2.0):
        imgs = sample(
            ema, scheduler, eval_labels, num_steps=20, guidance_scale=g, generator=torch.Generator().manual_seed(1)
        )
        acc[str(g)] = digit_accuracy(imgs, eval_labels)
    print(f"classifier accuracy of 100 samples (20 steps): cfg 1.0 -> {acc['1.0']:.2f}, cfg 2.0 -> {acc['2.0']:.2f}")

    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(args.out / "model.safetensors"))
    info = {
        "name": "dit-digits",
        "model_class": "DiTTransformer2DModel",
        "model": DIT_DIGITS_CONFIG,
        "scheduler_class": "FlowMatchEulerDiscreteScheduler",
        "scheduler": SCHEDULER_CONFIG,
        "objective": "rectified flow: x_t = (1-s) x0 + s noise, target noise - x0, timestep 1000 s, s ~ logit-normal",
        "data": "sklearn.datasets.load_digits, 8x8, scaled to [-1, 1]",
        "training": {
            "steps": step,
            "schedule_steps": args.steps,
            "max_minutes": args.max_minutes,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "ema": args.ema,
            "seed": args.seed,
            "minutes": round(minutes, 2),
            "final_loss": round(running, 4),
            "threads": 1,
        },
        "eval": {"classifier_accuracy_20_steps": acc, "num_samples": 100},
        "params": n_params,
    }
    (args.out / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    grid_imgs = sample(
        ema,
        scheduler,
        torch.arange(100) // 10,
        num_steps=20,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(2),
    )
    save_grid(grid_imgs, args.grid)
    print(f"saved {args.out} ({(args.out / 'model.safetensors').stat().st_size / 1e6:.2f} MB) and {args.grid}")


if __name__ == "__main__":
    main()
