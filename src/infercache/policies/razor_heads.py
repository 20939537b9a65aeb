"""Head profiling for RazorAttention: which KV heads are retrieval heads (echo and induction scores).

Following the authors' tools (Huawei msmodelslim ``ra_compression`` / mindspore_gs): feed a random token
sequence repeated several times, and for every query position in a later copy measure its attention to the
previous copies of the *same* token (**echo**) and to the token that *followed* them (**induction**). A KV
head's score is the max over its query heads. Ranked over all (layer, KV head) pairs, the retrieval heads are
the top ``induction_ratio=0.14`` by induction plus the top ``echo_ratio=0.01`` by echo (about 15%).

The authors use 2,500 random ids from [10000, 12500) repeated 4 times (10K tokens). That costs hours on a
CPU for a 30-layer model, so our default segment is ``min(2500, (context - 1) // repeats, 512)``; pass
``segment=2500`` to match the authors. Only full-attention layers are profiled (sliding-window layers are
never compressed). Profiles are saved as JSON (next to a converted model, else under
``$INFERCACHE_HOME/profiles``) and reused.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .._home import infercache_home
from ..cache.compressed_cache import full_attention_layers

PROFILE_ATTN = "infercache_profile"
PROFILE_FILE = "razor_heads.json"


class _Recorder:
    def __init__(self, segment: int, offset: int, chunk: int = 256):
        self.segment, self.offset, self.chunk = segment, offset, chunk
        self.scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.full_layers: set[int] = set()
        self.bar = None

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer = module.layer_idx
        if layer in self.full_layers:
            self.scores[layer] = self.measure(query, key, scaling or query.shape[-1] ** -0.5)
            if self.bar is not None:
                self.bar.update(1)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    def measure(self, query, key, scaling) -> tuple[torch.Tensor, torch.Tensor]:
        """Echo and induction scores per query head ``[H]`` from one layer's queries and keys."""
        _, h, total, _ = query.shape
        g = h // key.shape[1]
        k = key[0].float().repeat_interleave(g, dim=0)  # [H, T, D]
        seg, off = self.segment, self.offset
        echo = torch.zeros(h)
        induction = torch.zeros(h)
        pairs = 0
        cols = torch.arange(total)
        for start in range(off + seg, total, self.chunk):
            rows = torch.arange(start, min(total, start + self.chunk))
            q = query[0, :, rows].float()
            logits = (q @ k.transpose(-1, -2)) * scaling
            logits = logits.masked_fill(cols[None, None, :] > rows[None, :, None], float("-inf"))
            probs = torch.softmax(logits, dim=-1)  # [H, r, T]
            copies = (rows - off) // seg  # how many earlier copies each row has
            for r in range(1, int(copies.max()) + 1):
                has = copies >= r
                if not bool(has.any()):
                    continue
                same = rows[has] - r * seg
                echo += probs[:, has.nonzero().flatten(), :].gather(-1, same[None, :, None].expand(h, -1, 1)).sum((1, 2))
                nxt = (same + 1).clamp_max(total - 1)
                induction += probs[:, has.nonzero().flatten(), :].gather(-1, nxt[None, :, None].expand(h, -1, 1)).sum((1, 2))
                pairs += int(has.sum())
        return echo / max(pairs, 1), induction / max(pairs, 1)


def model_fingerprint(model) -> str:
    """A stable id for a model's weights and shapes (config + a few parameter tensors)."""
    config = json.loads(model.config.to_json_string(use_diff=False))
    for key in ("_name_or_path", "transformers_version"):  # where and with what it was loaded: not the model
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for _, p in list(model.named_parameters())[:4]:
        digest.update(p.detach().float().cpu().numpy().tobytes()[:65536])
    return digest.hexdigest()[:16]


def default_profile_path(model) -> Path:
    source = Path(getattr(model.config, "_name_or_path", "") or "")
    if source.is_dir() and (source / "config.json").exists():
        return source / PROFILE_FILE
    return infercache_home() / "profiles" / f"razor-{model_fingerprint(model)}.json"


def profile_heads(model, *, segment: int | None = None, repeats: int = 4, induction_ratio: float = 0.14,
                  echo_ratio: float = 0.01, seed: int = 0, progress: bool = True) -> dict:
    """Measure echo/induction scores on a repeated random sequence and pick the retrieval heads."""
    config = model.config.get_text_config(decoder=True)
    context = getattr(config, "max_position_embeddings", 4096)
    vocab = config.vocab_size
    if segment is None:
        segment = min(2500, (context - 1) // repeats, 512)
    if segment < 8:
        raise ValueError(f"segment must be >= 8 tokens, got {segment}")
    lo, hi = (10000, 12500) if vocab > 12500 else (vocab // 4, vocab - 1)
    gen = torch.Generator().manual_seed(seed)
    block = torch.randint(lo, hi, (segment,), generator=gen)
    bos = getattr(config, "bos_token_id", None)
    prefix = [bos] if isinstance(bos, int) else []
    ids = torch.tensor(prefix + block.repeat(repeats).tolist())[None].to(next(model.parameters()).device)
    recorder = _Recorder(segment, len(prefix))
    recorder.full_layers = set(full_attention_layers(model.config))
    AttentionInterface.register(PROFILE_ATTN, recorder)
    AttentionMaskInterface.register(PROFILE_ATTN, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROFILE_ATTN)
    try:
        with torch.no_grad(), tqdm(total=len(recorder.full_layers), desc="profiling heads", disable=not progress) as bar:
            recorder.bar = bar
            model(ids)
    finally:
        model.set_attn_implementation(previous)
    hkv = config.num_key_value_heads
    layers = sorted(recorder.scores)
    echo = torch.stack([recorder.scores[l][0].view(hkv, -1).amax(-1) for l in layers])  # [layers, Hkv]
    induction = torch.stack([recorder.scores[l][1].view(hkv, -1).amax(-1) for l in layers])
    n = echo.numel()
    top_ind = set(torch.topk(induction.flatten(), math.ceil(induction_ratio * n)).indices.tolist())
    top_echo = set(torch.topk(echo.flatten(), math.ceil(echo_ratio * n)).indices.tolist())
    retrieval = sorted(top_ind | top_echo)
    return {
        "format": 1,
        "fingerprint": model_fingerprint(model),
        "segment": segment,
        "repeats": repeats,
        "induction_ratio": induction_ratio,
        "echo_ratio": echo_ratio,
        "layers": layers,
        "num_kv_heads": hkv,
        "echo": echo.tolist(),
        "induction": induction.tolist(),
        "retrieval_heads": [[layers[i // hkv], i % hkv] for i in retrieval],
    }


def load_or_profile(model, path: str | Path | None = None, **kwargs) -> dict:
    """The saved profile for this model, or a new one (computed and saved)."""
    target = Path(path) if path else default_profile_path(model)
    if target.exists():
        profile = json.loads(target.read_text())
        if profile.get("fingerprint") == model_fingerprint(model):
            return profile
    profile = profile_heads(model, **kwargs)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(profile, indent=1))
    except OSError:
        pass  # a read-only model folder: the profile still serves this process
    return profile


def plot_profile(profile: dict, out: str | Path) -> Path:
    """Heat map of induction scores per (layer, KV head), retrieval heads outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ind = torch.tensor(profile["induction"])
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * ind.shape[1] + 3), max(3, 0.25 * ind.shape[0] + 1.5)))
    im = ax.imshow(ind.numpy(), aspect="auto", cmap="viridis")
    layers = profile["layers"]
    for layer, head in profile["retrieval_heads"]:
        ax.add_patch(plt.Rectangle((head - 0.5, layers.index(layer) - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_xticks(range(ind.shape[1]))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title("Retrieval heads (red) by induction score", fontsize=10)
    fig.colorbar(im, ax=ax, label="induction score")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
