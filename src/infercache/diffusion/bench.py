"""The diffusion caching benchmark: our policies next to diffusers' hooks and cache-dit on ``dit-digits``.

Used by ``infercache diffusion bench`` and ``scripts/diffusion/bench_digits.py``. For each setting: sample a fixed
batch (labels ``i % 10``, fixed seed, Euler, CFG as one batched call) and compare with the uncached samples of the
same seed: PSNR, SSIM and MSE on ``[-1, 1]`` images, the accuracy of a digit classifier, the fraction of transformer
work that really ran ("work": rows through each block's attention and MLP, counted on ``attn1.to_q`` and
``ff.net[0]`` in one untimed extra run, so a skipped CFG half counts as half), the steps computed where the method
reports them, and wall / CPU time (best of ``repeats``, each cached run paired with an uncached run just before it,
since the machine is shared). Calibrated methods are calibrated first on other seeds and labels.

Method spec (``--policies``): comma-separated items, each ``NAME`` (its default sweep, see :data:`SWEEPS`) or
``NAME:key=value:key=value`` (one setting), plus the groups ``ours``, ``peers`` and ``all``. ``NAME`` is one of our
policies (``infercache.diffusion.policies()``) or a peer (``infercache.diffusion.peers.PEERS``).
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .hooks import cache_stats, disable_cache, enable_cache
from .peers import PEERS, enable_peer
from .quality import digit_accuracy, mse, psnr, ssim
from .registry import policies as our_policies

#: Default sweeps per method (what ``NAME`` alone runs). Values that need calibration are filled in at run time.
SWEEPS: dict[str, list[dict[str, Any]]] = {
    "easycache": [{"threshold": t} for t in (0.05, 0.1, 0.15, 0.2, 0.3)],
    "teacache": [{"threshold": t} for t in (0.1, 0.2, 0.3, 0.4, 0.6)],
    "magcache": [{"threshold": t} for t in (0.06, 0.12, 0.24, 0.5)],
    "first_block_cache": [{"threshold": t} for t in (0.1, 0.2, 0.3)],
    "taylorseer": [{"cache_interval": n} for n in (2, 3, 4, 5, 6)],
    "profiling_dit": [
        {"background_ratio": 0.25, "step_interval": 3, "warmup_steps": 3},
        {"background_ratio": 0.5, "step_interval": 3, "warmup_steps": 3},
        {"background_ratio": 0.5, "step_interval": 6, "warmup_steps": 3},
    ],
    "ertacache": [{"threshold": t} for t in (0.1, 0.2, 0.3, 0.4)],
    "diffusers_first_block_cache": [{"threshold": t} for t in (0.1, 0.2, 0.3)],
    "diffusers_magcache": [{"threshold": t} for t in (0.06, 0.12, 0.24, 0.5)],
    "diffusers_taylorseer": [{"cache_interval": n} for n in (2, 3, 4, 5, 6)],
    "diffusers_pab": [{"spatial_attention_block_skip_range": n} for n in (2, 3, 4)],
    "diffusers_fastercache": [
        {"spatial_attention_block_skip_range": 2},
        {"spatial_attention_block_skip_range": 2, "unconditional_batch_skip_range": 2},
        {"spatial_attention_block_skip_range": 3},
    ],
    "cachedit_dbcache": [{"residual_diff_threshold": t} for t in (0.1, 0.2, 0.3, 0.4)],
}
SUPPORTED_MODELS = ("dit-digits",)


@dataclass
class BenchSetup:
    model: str = "dit-digits"
    num_samples: int = 100
    steps: int = 20
    guidance: float = 2.0
    seed: int = 0
    repeats: int = 3
    calib_runs: int = 2
    timing: bool = True  # False: one untimed run per setting (tests)


@dataclass
class Method:
    name: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def is_peer(self) -> bool:
        return self.name in PEERS

    @property
    def label(self) -> str:
        shown = ",".join(f"{k}={v}".replace(" ", "") for k, v in self.config.items())
        return f"{self.name} {shown}".strip()


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_methods(spec: str) -> list[Method]:
    """``"easycache,teacache:threshold=0.3,peers"`` -> methods (see the module docstring); clear errors."""
    known = list(our_policies()) + list(PEERS)
    out: list[Method] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in ("all", "ours", "peers"):
            names = (list(our_policies()) if item != "peers" else []) + (list(PEERS) if item != "ours" else [])
            out += [Method(n, dict(c)) for n in names for c in SWEEPS.get(n, [{}])]
            continue
        name, *pairs = item.split(":")
        if name not in known:
            raise ValueError(f"unknown method {name!r}; ours: {', '.join(our_policies())}; peers: {', '.join(PEERS)}")
        if not pairs:
            out += [Method(name, dict(c)) for c in SWEEPS.get(name, [{}])]
            continue
        cfg = {}
        for pair in pairs:
            if "=" not in pair:
                raise ValueError(f"bad option {pair!r} in {item!r}: use NAME:key=value:key=value")
            k, v = pair.split("=", 1)
            cfg[k] = _parse_value(v)
        out.append(Method(name, cfg))
    if not out:
        raise ValueError("no methods given (e.g. --policies easycache,teacache,peers)")
    return out


class Progress:
    """A one-line progress bar on stderr (quiet when ``enabled`` is false)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled, time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        frac = self.done / max(self.total, 1)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        el = time.perf_counter() - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {el:5.0f}s eta {eta:4.0f}s  {what[:50]:<50}")
        sys.stderr.flush()
        if self.done >= self.total:
            sys.stderr.write("\n")


class WorkCounter:
    """Counts the batch rows that go through each block's attention and MLP (hooks on ``to_q`` and ``ff.net[0]``)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.rows = 0
        self._handles = []
        for blk in transformer.transformer_blocks:
            for mod in (blk.attn1.to_q, blk.ff.net[0]):
                self._handles.append(mod.register_forward_hook(self._hook))

    def _hook(self, module: torch.nn.Module, inp: tuple, out: Any) -> None:
        self.rows += int(inp[0].shape[0])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class DigitsBench:
    """State of one benchmark run on ``dit-digits`` (model, batch, calibrations)."""

    def __init__(self, setup: BenchSetup, progress: bool = True) -> None:
        if setup.model not in SUPPORTED_MODELS:
            raise ValueError(
                f"unknown model {setup.model!r}: the caching bench runs on {', '.join(SUPPORTED_MODELS)} "
                "(class-conditional image DiT); `--model video-dit-moving-digits` runs the video KV-cache bench"
            )
        from .models import load_dit_digits

        self.setup = setup
        self.progress = progress
        self.transformer, self.scheduler = load_dit_digits()
        self.labels = torch.arange(setup.num_samples) % 10
        self.calib_labels = torch.randint(0, 10, (setup.num_samples,), generator=torch.Generator().manual_seed(999))
        self.calibration: dict[str, Any] = {}
        self.calib_seconds: dict[str, float] = {}
        self._cache: dict[str, Any] = {}

    # --- sampling -------------------------------------------------------------------------------------------
    def run(self, seed: int | None = None, labels: torch.Tensor | None = None, cfg_mode: str = "batch") -> torch.Tensor:
        from .models import sample

        s = self.setup
        return sample(
            self.transformer,
            self.scheduler,
            self.labels if labels is None else labels,
            s.steps,
            s.guidance,
            torch.Generator().manual_seed(s.seed if seed is None else seed),
            cfg_mode=cfg_mode,
        )

    def calib_run(self) -> list[torch.Tensor]:
        return [self.run(1000 + i, self.calib_labels) for i in range(self.setup.calib_runs)]

    # --- calibration (lazy, once per run) ---------------------------------------------------------------
    def _calibrated(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            t0 = time.perf_counter()
            self._cache[key] = fn()
            self.calib_seconds[key] = round(time.perf_counter() - t0, 2)
        return self._cache[key]

    def teacache_coefficients(self) -> list[float]:
        from .calibration import calibrate_teacache

        c = self._calibrated("teacache", lambda: calibrate_teacache(self.transformer, self.calib_run, degree=4))
        self.calibration["teacache_coefficients"] = c
        return c

    def mag_ratios(self) -> dict[str, list[float]]:
        from .calibration import calibrate_magcache

        r = self._calibrated("magcache", lambda: calibrate_magcache(self.transformer, self.calib_run))
        self.calibration["mag_ratios"] = r
        return r

    def block_profile(self) -> Any:
        from .profiling import profile_blocks

        p = self._calibrated("profiling_dit", lambda: profile_blocks(self.transformer, self.calib_run))
        self.calibration["profiling_dit"] = {"preference": p.preference, "background_blocks": p.background_blocks}
        return p

    def erta_schedule(self, threshold: float) -> Any:
        from .calibration_erta import calibrate_ertacache

        key = f"ertacache@{threshold}"
        sch = self._calibrated(
            key, lambda: calibrate_ertacache(self.transformer, self.calib_run, threshold, scheduler=self.scheduler)
        )
        self.calibration.setdefault("ertacache", {})[str(threshold)] = {"mask": sch.mask(), "phi": sch.phi}
        return sch

    def resolve(self, m: Method) -> dict[str, Any]:
        """The keyword arguments that enable ``m`` (calibrated values filled in)."""
        cfg = dict(m.config)
        if m.name == "teacache" and "coefficients" not in cfg:
            cfg["coefficients"] = self.teacache_coefficients()
        elif m.name == "magcache" and "mag_ratios" not in cfg:
            cfg["mag_ratios"] = self.mag_ratios()
        elif m.name == "diffusers_magcache":
            cfg["mag_ratios"] = self.mag_ratios()
        elif m.name == "profiling_dit" and not {"profile", "background_blocks", "foreground_blocks"} & set(cfg):
            ratio = cfg.pop("background_ratio", None)
            prof = self.block_profile()
            cfg["profile"] = prof.relabel(background_ratio=ratio) if ratio is not None else prof
        elif m.name == "ertacache" and "schedule" not in cfg:
            th = float(cfg.pop("threshold", 0.2))
            cfg["schedule"] = self.erta_schedule(th)
            cfg["scheduler"] = self.scheduler
        return cfg

    # --- one setting -------------------------------------------------------------------------------------
    def _enabled(self, m: Method, cfg: dict[str, Any]) -> tuple[Callable[[], None], str]:
        if m.is_peer:
            h = enable_peer(self.transformer, m.name, num_inference_steps=self.setup.steps, **cfg)
            return h.disable, h.cfg_mode
        enable_cache(self.transformer, m.name, **cfg)
        return (lambda: disable_cache(self.transformer)), "batch"

    def _one(self, m: Method | None, cfg: dict[str, Any]) -> tuple[torch.Tensor, float, float, Any]:
        if m is None:
            w, c = time.perf_counter(), time.process_time()
            out = self.run()
            return out, time.perf_counter() - w, time.process_time() - c, None
        off, cfg_mode = self._enabled(m, cfg)
        try:
            w, c = time.perf_counter(), time.process_time()
            out = self.run(cfg_mode=cfg_mode)
            wall, cpu = time.perf_counter() - w, time.process_time() - c
            stats = None if m.is_peer else cache_stats(self.transformer)[-1]
        finally:
            off()
        return out, wall, cpu, stats

    def work(self, m: Method | None, cfg: dict[str, Any]) -> int:
        counter = WorkCounter(self.transformer)
        try:
            self._one(m, cfg)
        finally:
            counter.remove()
        return counter.rows

    def evaluate(
        self, m: Method | None, ref: torch.Tensor | None, full_work: int
    ) -> tuple[dict[str, Any], torch.Tensor]:
        cfg = self.resolve(m) if m is not None else {}
        best = [math.inf] * 4  # wall ref, cpu ref, wall cached, cpu cached
        out, stats = None, None
        for _ in range(self.setup.repeats if self.setup.timing else 1):
            if m is not None and self.setup.timing:
                _, w, c, _ = self._one(None, {})
                best[0], best[1] = min(best[0], w), min(best[1], c)
            out, w, c, stats = self._one(m, cfg)
            best[2], best[3] = min(best[2], w), min(best[3], c)
        rows = self.work(m, cfg) if m is not None else full_work
        row: dict[str, Any] = {
            "setting": "no cache" if m is None else m.label,
            "method": "none" if m is None else m.name,
            "family": "reference" if m is None else ("peer" if m.is_peer else "ours"),
            "config": {} if m is None else _jsonable(m.config),
            "work": rows / full_work,
            "work_speedup": full_work / max(rows, 1),
            "seconds": best[2] if self.setup.timing else None,
            "cpu_seconds": best[3] if self.setup.timing else None,
            "ref_seconds": best[0] if (self.setup.timing and m is not None) else None,
            "speedup": (best[0] / best[2]) if (self.setup.timing and m is not None) else 1.0,
            "cpu_speedup": (best[1] / best[3]) if (self.setup.timing and m is not None) else 1.0,
            "psnr": None if ref is None else psnr(out, ref),
            "ssim": 1.0 if ref is None else ssim(out, ref),
            "mse": 0.0 if ref is None else mse(out, ref),
            "accuracy": digit_accuracy(out, self.labels),
            "steps_computed": self.setup.steps if m is None else (stats.steps_computed if stats else None),
            "skip_mask": [False] * self.setup.steps if m is None else (stats.skip_mask["cond"] if stats else None),
        }
        return row, out


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return repr(v)


def series(r: dict[str, Any]) -> str:
    """The curve a result belongs to: its method, or its own label when it sets options outside the method's
    default sweep (e.g. an ablation)."""
    keys = {k for c in SWEEPS.get(r["method"], []) for k in c}
    return r["method"] if set(r["config"]) <= keys else r["setting"]


def _interp(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear ``y(x)`` through ``points`` (sorted by x), ``None`` outside their range (no extrapolation)."""
    best: dict[float, float] = {}
    for x0, y0 in points:  # several settings at one x: the upper envelope
        best[x0] = max(y0, best.get(x0, -math.inf))
    pts = sorted(best.items())
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 - 1e-9 <= x <= x1 + 1e-9:
            return y0 if x1 - x0 < 1e-12 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if pts and abs(pts[0][0] - x) < 1e-9:
        return pts[0][1]
    return None


def dominance(rows: list[dict[str, Any]], key: str = "work", quality: str = "psnr") -> list[dict[str, Any]]:
    """For every peer row: (1) our settings that need at most its ``key`` (work) and reach at least its ``quality``;
    (2) the best of our methods *at equal work*: each of our methods' (work, quality) curve, linearly
    interpolated between its own settings (never extrapolated), read at the peer's work."""
    ours = [r for r in rows if r["family"] == "ours"]
    curves: dict[str, list[tuple[float, float]]] = {}
    for o in ours:
        curves.setdefault(series(o), []).append((o[key], min(o[quality] or 0.0, 100.0)))
    out = []
    for p in (r for r in rows if r["family"] == "peer"):
        beaters = [o["setting"] for o in ours if o[key] <= p[key] + 1e-9 and (o[quality] or 0) >= (p[quality] or 0)]
        at_equal = {m: _interp(c, p[key]) for m, c in curves.items()}
        at_equal = {m: v for m, v in at_equal.items() if v is not None}
        best = max(at_equal, key=at_equal.get) if at_equal else None
        out.append(
            {
                "peer": p["setting"],
                key: p[key],
                quality: p[quality],
                "beaten_by": beaters,
                "best_ours_at_equal_work": best,
                "best_ours_quality_at_equal_work": at_equal.get(best) if best else None,
            }
        )
    return out


def comparisons(rows: list[dict[str, Any]], timing: bool = True) -> dict[str, Any]:
    """Peers vs ours at equal transformer work (deterministic) and, with timing, at equal CPU-time cost
    (``1 / cpu_speedup``: noisy on a shared machine, but it includes each library's per-call overhead)."""
    out = {"peers_vs_ours": dominance(rows)}
    if timing:
        for r in rows:
            r["cpu_cost"] = 1.0 / r["cpu_speedup"] if r.get("cpu_speedup") else None
        out["peers_vs_ours_cpu"] = dominance([r for r in rows if r["cpu_cost"] is not None], key="cpu_cost")
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| setting | family | steps computed | mask | work | speed-up (work) | wall s | speed-up (wall) "
        "| speed-up (CPU) | PSNR dB | SSIM | MSE | digit acc |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        steps = "–" if r["steps_computed"] is None else f"{r['steps_computed']}/{len(r['skip_mask'] or []) or '?'}"
        mask = "–" if r["skip_mask"] is None else "`" + "".join("." if s else "C" for s in r["skip_mask"]) + "`"
        sec = "–" if r["seconds"] is None else f"{r['seconds']:.2f}"
        ps = "ref" if r["psnr"] is None else f"{r['psnr']:.2f}"
        lines.append(
            f"| {r['setting']} | {r['family']} | {steps} | {mask} | {r['work']:.2f} | {r['work_speedup']:.2f}x | {sec} "
            f"| {r['speedup']:.2f}x | {r['cpu_speedup']:.2f}x | {ps} | {r['ssim']:.4f} | {r['mse']:.1e} "
            f"| {r['accuracy']:.2f} |"
        )
    return "\n".join(lines)


def plot_quality_vs_speedup(rows: list[dict[str, Any]], path: Path, title: str = "", wall: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if wall else 1, figsize=(13, 5) if wall else (7, 5), squeeze=False)
    axes = axes[0]
    methods = sorted({series(r) for r in rows if r["family"] != "reference"})
    cmap = plt.get_cmap("tab20")
    panels = [(axes[0], "work_speedup", "speed-up in transformer work (1 / work fraction)")]
    if wall:
        panels.append((axes[1], "speedup", "speed-up in wall time (best of repeats, shared CPU)"))
    for ax, xkey, xlabel in panels:
        for i, meth in enumerate(methods):
            mine = [r for r in rows if r["family"] != "reference" and series(r) == meth]
            pts = sorted((r[xkey], min(r["psnr"], 60.0)) for r in mine)
            peer = meth.split(" ")[0] in PEERS
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="s" if peer else "o",
                linestyle="--" if peer else "-",
                color=cmap(i % 20),
                label=("peer: " if peer else "ours: ") + meth,
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("PSNR vs uncached (dB, capped at 60)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(
    samples: list[tuple[str, torch.Tensor]], path: Path, per_row: int = 10, scale: int = 3, diff_gain: float = 5.0
) -> None:
    """One row per setting: the first ``per_row`` samples (digits 0..9), then their absolute difference to the
    first row (the uncached samples) times ``diff_gain``; labelled, dark on white."""
    from PIL import Image, ImageDraw

    cell = 8 * scale + 2
    label_w, gap = 330, 16
    ref = samples[0][1]
    img = Image.new("L", (label_w + 2 * per_row * cell + gap + 4, cell * (len(samples) + 1) + 4), 255)
    draw = ImageDraw.Draw(img)
    draw.text((label_w, 4), "samples (classes 0-9)", fill=0)
    draw.text((label_w + per_row * cell + gap, 4), f"|sample - uncached| x {diff_gain:g}", fill=0)

    def tile(v: torch.Tensor) -> Image.Image:
        arr = (255 * (1 - v.float().clamp(0, 1))).to(torch.uint8).numpy()
        return Image.fromarray(arr).resize((8 * scale, 8 * scale), Image.NEAREST)

    for r, (name, x) in enumerate(samples):
        y0 = 2 + (r + 1) * cell
        draw.text((4, y0 + cell // 2 - 6), name[:52], fill=0)
        for c in range(min(per_row, x.shape[0])):
            img.paste(tile((x[c, 0] + 1) / 2), (label_w + c * cell + 1, y0 + 1))
            diff = (x[c, 0].float() - ref[c, 0].float()).abs() * diff_gain / 2
            img.paste(tile(diff), (label_w + per_row * cell + gap + c * cell + 1, y0 + 1))
    img.save(path)


def run_bench(
    setup: BenchSetup, methods: list[Method], out_dir: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run the benchmark; write ``bench.json``, ``bench.md``, ``quality_vs_speedup.png`` and ``samples.png`` to
    ``out_dir`` (if given). Returns the JSON document."""
    torch.set_num_threads(1)
    b = DigitsBench(setup, progress)
    bar = Progress(len(methods) + 1, progress)
    full_work = b.work(None, {})
    ref_row, ref = b.evaluate(None, None, full_work)
    rows, grids = [], [("no cache", ref)]
    bar.step("no cache")
    ref_best = ref_row["seconds"]
    for m in methods:
        row, out = b.evaluate(m, ref, full_work)
        if row["ref_seconds"] is not None:
            ref_best = min(ref_best, row["ref_seconds"])
        rows.append(row)
        grids.append((m.label, out))
        bar.step(m.label)
    if setup.timing:
        ref_row["seconds"] = ref_best
    rows.insert(0, ref_row)
    doc = {
        "date": dt.date.today().isoformat(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "diffusers": _version("diffusers"),
            "cache_dit": _version("cache_dit"),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "setup": {**asdict(setup), "cfg_mode": "batch"},
        "calibration": {**_jsonable(b.calibration), "seconds": b.calib_seconds},
        "results": rows,
        **comparisons(rows, setup.timing),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out / "bench.md").write_text(render_markdown(doc) + "\n")
        for key, obj in b._cache.items():  # calibrated artefacts, reusable with enable_cache(..., path)
            if hasattr(obj, "save"):
                obj.save(out / f"calibration_{key.replace('@', '_')}.json")
        if "teacache" in b._cache:
            from .calibration import save_calibration

            save_calibration(out / "calibration_teacache.json", "teacache", b._cache["teacache"], model=setup.model)
        if "magcache" in b._cache:
            from .calibration import save_calibration

            save_calibration(out / "calibration_magcache.json", "magcache", b._cache["magcache"], model=setup.model)
        plot_quality_vs_speedup(
            rows, out / "quality_vs_speedup.png", f"{setup.model}: quality vs speed-up", wall=setup.timing
        )
        sample_grid(grids, out / "samples.png")
    return doc


def render_markdown(doc: dict[str, Any]) -> str:
    s, m = doc["setup"], doc["machine"]
    lines = [
        f"# Diffusion caching benchmark: {s['model']}",
        "",
        f"{s['num_samples']} samples (labels i % 10), seed {s['seed']}, {s['steps']} Euler steps, CFG {s['guidance']} "
        f"(one batched call), {'best of ' + str(s['repeats']) if s['timing'] else 'timing off'}. Date {doc['date']}; "
        f"{m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} thread), diffusers "
        f"{m['diffusers']}, cache-dit {m['cache_dit']}.",
        "",
        markdown_table(doc["results"]),
        "",
        "## Peers vs ours",
        "",
        "Best of ours at equal work: each of our methods' PSNR-vs-work curve, interpolated linearly between its "
        "own settings (not extrapolated), read at the peer's work. Last column: our settings with at most the "
        "peer's work and at least its PSNR.",
        "",
        "| peer setting | work | PSNR dB | best of ours at equal work (PSNR dB) | our settings that match or beat it |",
        "|---|---|---|---|---|",
    ]
    lines += _comparison_lines(doc["peers_vs_ours"], "work")
    if "peers_vs_ours_cpu" in doc:
        lines += [
            "",
            "## Peers vs ours at equal CPU-time cost",
            "",
            "The same comparison with the measured CPU-time cost (1 / CPU-time speed-up, best of the repeats) instead "
            "of the work fraction. It includes each library's per-call overhead, but it is noisy on a shared box.",
            "",
            "| peer setting | CPU cost | PSNR dB | best of ours at equal CPU cost (PSNR dB) | our settings that match "
            "or beat it |",
            "|---|---|---|---|---|",
        ]
        lines += _comparison_lines(doc["peers_vs_ours_cpu"], "cpu_cost")
    return "\n".join(lines)


def _comparison_lines(entries: list[dict[str, Any]], key: str) -> list[str]:
    lines = []
    for d in entries:
        eq = (
            "–"
            if d["best_ours_at_equal_work"] is None
            else f"{d['best_ours_at_equal_work']} {d['best_ours_quality_at_equal_work']:.2f}"
        )
        lines.append(
            f"| {d['peer']} | {d[key]:.2f} | {d['psnr']:.2f} | {eq} | {', '.join(d['beaten_by']) or '**none**'} |"
        )
    return lines


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001 - optional packages
        return None
