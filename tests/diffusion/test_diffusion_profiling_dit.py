"""ProfilingDiT: the profiler recovers a planted foreground region and planted block preferences; the policy
computes foreground blocks on every step and reuses background spans in between."""

import pytest
import torch
from diffusers.models.attention_processor import Attention
from dit_helpers import NUM_STEPS, run

from infercache.diffusion import BlockProfile, cache_stats, enable_cache, profile_blocks
from infercache.diffusion.policies.profiling_dit import spans_of
from infercache.diffusion.profiling import foreground_tokens, label_blocks, token_saliency
from infercache.diffusion.quality import digit_accuracy, psnr


def planted_latent(shape=(2, 4, 16, 16), rows=(4, 10), cols=(6, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.05 * torch.randn(shape, generator=g)
    x[..., rows[0] : rows[1], cols[0] : cols[1]] += torch.linspace(1.0, 2.0, shape[1]).reshape(1, -1, 1, 1)
    return x


def test_foreground_tokens_recover_planted_region():
    x = planted_latent()
    mask = foreground_tokens(x, patch_size=2).reshape(2, 8, 8)
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[2:5, 3:6] = True  # pixel rows 4..9, cols 6..11 = token rows 2..4, cols 3..5
    assert torch.equal(mask, want.expand(2, 8, 8))
    # a video latent (B, C, F, H, W) with patch (1, 2, 2): the planted box in frames 1..2 only
    v = 0.05 * torch.randn(1, 2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    v[:, :, 1:3, 2:6, 4:8] += 1.5
    m = foreground_tokens(v, patch_size=(1, 2, 2)).reshape(4, 4, 4)
    want = torch.zeros(4, 4, 4, dtype=torch.bool)
    want[1:3, 1:3, 2:4] = True
    assert torch.equal(m, want)
    assert token_saliency(x, 2).shape == (2, 64)


class PlantedModel(torch.nn.Module):
    """Tokens = pixels with features [x, 1, 0, 0]; block b's attention logit on key n is ``s_b * x_n``, so blocks
    with ``s_b > 0`` look at the bright (planted) region and blocks with ``s_b < 0`` look away from it."""

    def __init__(self, strengths):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList()
        for s in strengths:
            block = torch.nn.Module()
            block.attn1 = Attention(query_dim=4, heads=1, dim_head=4, bias=True)
            with torch.no_grad():
                for p in block.attn1.parameters():
                    p.zero_()
                block.attn1.to_q.bias[0] = 1.0
                block.attn1.to_k.weight[0, 0] = float(s)
            self.transformer_blocks.append(block)

    def forward(self, hidden_states, timestep=None):
        b, c, h, w = hidden_states.shape
        x = hidden_states.reshape(b, h * w, 1)
        tokens = torch.cat([x, torch.ones_like(x), torch.zeros(b, h * w, 2)], dim=-1)
        for block in self.transformer_blocks:
            tokens = tokens + block.attn1(tokens)
        return tokens[..., :1].reshape(b, c, h, w)


def test_profile_recovers_planted_blocks():
    strengths = [8.0, -8.0, 6.0, -6.0, 0.0]
    model = PlantedModel(strengths)
    x = planted_latent(shape=(3, 1, 8, 8), rows=(2, 5), cols=(3, 7))

    def run_planted():
        for t in (900.0, 500.0, 100.0):
            model(x, timestep=torch.tensor([t]))

    prof = profile_blocks(model, run_planted, threshold=1.0)
    pref = prof.preference
    assert pref[0] > 2 and pref[2] > 2 and pref[1] < 0.5 and pref[3] < 0.5
    assert pref[4] == pytest.approx(1.0, abs=1e-3)  # uniform attention: no preference
    assert prof.foreground_blocks == [0, 2, 4] and prof.background_blocks == [1, 3]
    assert prof.meta["trajectories"] == 1 and len(prof.per_step) == 3
    # a given foreground mask: the complement region flips every preference
    inverse = ~foreground_tokens(x, 1)
    flipped = profile_blocks(model, run_planted, foreground=inverse, threshold=1.0)
    assert flipped.background_blocks == [0, 2] and flipped.foreground_blocks == [1, 3, 4]


def test_label_rules():
    pref = [1.4, 1.3, 1.3, 1.1]
    assert label_blocks(pref) == ([0, 1, 2], [3])  # default: below the mean preference (1.275)
    assert label_blocks(pref, threshold=1.0) == ([0, 1, 2, 3], [])
    assert label_blocks(pref, background_ratio=0.5) == ([0, 2], [1, 3])  # ties broken by block index
    assert label_blocks([1.0] * 3) == ([0, 1, 2], [])  # no preference: nothing cached
    assert label_blocks([1.5, 0.9, 1.2, 0.8]) == ([0, 2], [1, 3])  # relative to the mean (1.1)
    assert spans_of([0, 1, 3, 5, 6, 7]) == [(0, 1), (3, 3), (5, 7)]
    assert spans_of([3, 0, 1], merge=False) == [(0, 0), (1, 1), (3, 3)]


def test_profile_dit_digits_roundtrip_and_partial_steps(model, tmp_path):
    transformer, scheduler = model
    prof = profile_blocks(transformer, lambda: run(transformer, scheduler, seed=5), background_ratio=0.5)
    assert len(prof.preference) == 4 and len(prof.background_blocks) == 2
    path = tmp_path / "profile.json"
    prof.save(path)
    assert BlockProfile.load(path) == prof

    counts = [0] * 4
    handles = [
        b.attn1.register_forward_hook(lambda *a, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, b in enumerate(transformer.transformer_blocks)
    ]
    try:
        enable_cache(transformer, "profiling_dit", profile=str(path), step_interval=3, warmup_steps=2)
        run(transformer, scheduler)
    finally:
        for h in handles:
            h.remove()
    stats = cache_stats(transformer)[-1]
    full = stats.steps_computed
    assert stats.skip_mask["cond"] == [False, False] + [s % 3 != 0 for s in range(NUM_STEPS - 2)]
    for b in range(4):  # foreground blocks run on every step, background blocks on full steps only
        assert counts[b] == (full if b in prof.background_blocks else NUM_STEPS), (b, counts)


def test_profiling_dit_quality_on_dit_digits(model):
    transformer, scheduler = model
    labels = torch.arange(20) % 10
    ref = run(transformer, scheduler, seed=3, steps=20, labels=labels)
    enable_cache(transformer, "profiling_dit", foreground_blocks=[0], step_interval=3, warmup_steps=3)
    out = run(transformer, scheduler, seed=3, steps=20, labels=labels)
    assert cache_stats(transformer)[-1].steps_skipped >= 10
    assert psnr(out, ref) > 25 and digit_accuracy(out, labels) > 0.6
