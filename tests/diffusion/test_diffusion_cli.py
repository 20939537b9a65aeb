"""The ``infercache diffusion`` command (bench and calibrate), the calibration file round trip and SSIM."""

import argparse
import json

import pytest
import torch
from dit_helpers import NUM_STEPS, run

from infercache.diffusion import cache_stats, disable_cache, enable_cache
from infercache.diffusion.bench import Method, dominance, parse_methods
from infercache.diffusion.calibration import load_calibration, save_calibration
from infercache.diffusion.cli import add_parser
from infercache.diffusion.quality import ssim


def cli(*argv):
    parser = argparse.ArgumentParser(prog="infercache")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["diffusion", *argv])
    return args.func(args)


def test_parser_registers_actions():
    parser = argparse.ArgumentParser(prog="infercache")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["diffusion", "calibrate", "--policy", "teacache", "--out", "x.json"])
    assert args.runs == 2 and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["diffusion", "calibrate", "--policy", "nope", "--out", "x.json"])
    with pytest.raises(SystemExit):
        parser.parse_args(["diffusion", "bench"])  # --out is required


def test_bench_tiny_run_writes_json_markdown_png(tmp_path):
    out = tmp_path / "bench"
    rc = cli(
        "bench", "--policies", "easycache:threshold=0.2,diffusers_first_block_cache:threshold=0.3",
        "--num-samples", "10", "--steps", "8", "--no-timing", "--quiet", "--out", str(out),
    )
    assert rc == 0
    doc = json.loads((out / "bench.json").read_text())
    rows = {r["setting"]: r for r in doc["results"]}
    assert set(rows) == {"no cache", "easycache threshold=0.2", "diffusers_first_block_cache threshold=0.3"}
    assert rows["no cache"]["psnr"] is None and rows["no cache"]["work"] == 1.0
    for name in ("easycache threshold=0.2", "diffusers_first_block_cache threshold=0.3"):
        r = rows[name]
        assert 0.0 < r["work"] < 1.0, r  # something was skipped, and the work counter saw it
        assert 10.0 < r["psnr"] < 100.0 and 0.5 < r["ssim"] < 1.0
    assert rows["easycache threshold=0.2"]["steps_computed"] < 8
    assert [d["peer"] for d in doc["peers_vs_ours"]] == ["diffusers_first_block_cache threshold=0.3"]
    md = (out / "bench.md").read_text()
    assert "| easycache threshold=0.2 | ours |" in md and "Peers vs ours" in md
    for png in ("quality_vs_speedup.png", "samples.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_methods():
    ms = parse_methods("teacache:threshold=0.3:probe=input,diffusers_pab")
    assert ms[0] == Method("teacache", {"threshold": 0.3, "probe": "input"})
    assert all(m.name == "diffusers_pab" and m.is_peer for m in ms[1:]) and len(ms) > 2
    assert {m.name for m in parse_methods("peers")}.isdisjoint({"easycache", "teacache"})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        parse_methods("nope")
    with pytest.raises(ValueError, match="key=value"):
        parse_methods("easycache:0.1")
    with pytest.raises(ValueError, match="no methods"):
        parse_methods(" , ")


def test_dominance_interpolates_without_extrapolating():
    rows = [
        {"family": "ours", "method": "a", "setting": "a1", "work": 0.4, "psnr": 30.0},
        {"family": "ours", "method": "a", "setting": "a2", "work": 0.8, "psnr": 40.0},
        {"family": "ours", "method": "a", "setting": "a3", "work": 0.8, "psnr": 42.0},  # upper envelope at 0.8
        {"family": "peer", "method": "p", "setting": "p1", "work": 0.6, "psnr": 36.0},
        {"family": "peer", "method": "p", "setting": "p2", "work": 0.3, "psnr": 20.0},
    ]
    for r in rows:
        r["config"] = {}
    d = {x["peer"]: x for x in dominance(rows)}
    assert d["p1"]["best_ours_quality_at_equal_work"] == pytest.approx(36.0)
    assert d["p1"]["beaten_by"] == []  # a1 has less work but less PSNR; a2 and a3 have more work
    assert d["p2"]["best_ours_at_equal_work"] is None and d["p2"]["beaten_by"] == []


@pytest.mark.parametrize("policy", ["teacache", "magcache"])
def test_calibrate_command_round_trip(tmp_path, model, policy):
    transformer, scheduler = model
    path = tmp_path / f"{policy}.json"
    rc = cli(
        "calibrate", "--policy", policy, "--runs", "1", "--num-samples", "4", "--steps", str(NUM_STEPS),
        "--degree", "2", "--out", str(path),
    )
    assert rc == 0
    doc = json.loads(path.read_text())
    assert doc["policy"] == policy and doc["num_inference_steps"] == NUM_STEPS
    values = load_calibration(path, policy)
    key = "coefficients" if policy == "teacache" else "mag_ratios"
    if policy == "teacache":
        assert len(values) == 3 and 0.0 <= doc["r2"] <= 1.0
    else:
        assert set(values) == {"cond", "uncond"} and all(len(v) == NUM_STEPS for v in values.values())
        assert values["cond"][0] == 1.0
    ref = run(transformer, scheduler)
    # the file, passed by path, gives exactly what the values passed directly give
    outs = []
    for v in (str(path), path, values):
        enable_cache(transformer, policy, **{key: v}, threshold=0.3)
        try:
            outs.append(run(transformer, scheduler))
            skipped = cache_stats(transformer)[-1].steps_skipped
        finally:
            disable_cache(transformer)
        assert skipped > 0
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert not torch.equal(outs[0], ref)
    # threshold 0 with the file: bit-identical to the uncached model
    enable_cache(transformer, policy, **{key: str(path)}, threshold=0.0)
    try:
        assert torch.equal(run(transformer, scheduler), ref)
    finally:
        disable_cache(transformer)


def test_calibration_file_errors(tmp_path):
    path = tmp_path / "t.json"
    save_calibration(path, "teacache", [1.0, 0.0])
    with pytest.raises(ValueError, match="'teacache' calibration, not a 'magcache'"):
        load_calibration(path, "magcache")
    with pytest.raises(FileNotFoundError, match="infercache diffusion calibrate"):
        load_calibration(tmp_path / "missing.json", "teacache")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not an infercache calibration file"):
        load_calibration(tmp_path / "other.json", "teacache")
    with pytest.raises(ValueError, match="no calibration file format"):
        save_calibration(path, "easycache", [])


def _ssim_naive(a, b, data_range=2.0, w=7):
    """Direct per-window SSIM (loops), to check the pooled implementation."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for x, y in zip(a.double().flatten(0, 1), b.double().flatten(0, 1)):
        for i in range(x.shape[0] - w + 1):
            for j in range(x.shape[1] - w + 1):
                p, q = x[i : i + w, j : j + w].flatten(), y[i : i + w, j : j + w].flatten()
                mp, mq = p.mean(), q.mean()
                vp, vq = p.var(unbiased=True), q.var(unbiased=True)
                cov = ((p - mp) * (q - mq)).sum() / (p.numel() - 1)
                vals.append(((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
    return float(torch.stack(vals).mean())


def test_ssim():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(3, 1, 8, 8, generator=g)).clamp(-1, 1)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) == pytest.approx(_ssim_naive(a, b), rel=1e-9)
    assert ssim(a, b) == pytest.approx(ssim(b, a))
    assert ssim(a, b) < ssim(a, (a + 0.05 * (b - a))) < 1.0
    with pytest.raises(ValueError, match="one shape"):
        ssim(a, b[:2])
