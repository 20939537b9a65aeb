"""Training retention gates by distillation from the frozen model ("Make Each Token Count", TRIM-KV).

Only the gates learn; the language model is frozen. A training forward runs the model with
*retention-gated attention*: the logit of query ``t`` for key ``i`` is multiplied by ``beta_i^(t - i)``, so a
token whose gate decays fades towards logit 0 (not towards -inf), as in the authors' eager code. The loss is

* ``kl``: forward KL from the frozen full-attention model's next-token distribution to the gated one,
* ``lm``: next-token cross-entropy of the gated model on the training text,
* ``capacity``: the expected number of retained entries above the memory ``M``. At every query step ``t`` the
  entries retained by all gated layers and KV heads sum to ``sum alpha_(t,i)`` (``alpha = beta^(t - i)``); the loss
  is the mean over steps of ``relu(sum alpha - M x layers x Hkv) / (M x layers x Hkv)``. The global form lets
  layers and heads trade memory, matching the global top-k at inference. The paper does not publish the exact
  form (our choice); its weight is 1.0 (authors' ``retention_weight``).

Training text: ``data="self"`` samples sequences from the model itself (temperature 1, from BOS), which needs no
dataset and matches the model's own distribution; ``data="haystack"`` cuts the shipped public-domain passages
used by ``infercache bench``. Defaults are sized for a CPU run in minutes on stories260k.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..cache.capture import attention_modules
from ..policies.retention_gate_modules import RetentionGateSet

GATED_ATTN = "infercache_gated_training"
_LOCAL = threading.local()


@dataclass
class GateTrainingConfig:
    memory: int = 128  # M: entries per layer and KV head the capacity loss aims at
    steps: int = 600
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 1e-3
    kl_weight: float = 1.0
    lm_weight: float = 1.0
    capacity_weight: float = 1.0
    data: str = "self"  # "self" (the model's own samples) or "haystack"
    num_sequences: int = 256
    seed: int = 0
    shared_projection: bool = True

    def validate(self) -> None:
        if self.memory < 1 or self.steps < 1 or self.seq_len < 2 or self.batch_size < 1 or self.num_sequences < 1:
            raise ValueError(f"memory, steps, batch_size, num_sequences must be >= 1 and seq_len >= 2: {self}")
        if self.memory >= self.seq_len:
            raise ValueError(f"memory ({self.memory}) must be below seq_len ({self.seq_len}) for the capacity loss to act")
        if self.data not in ("self", "haystack"):
            raise ValueError(f"data must be 'self' or 'haystack', got {self.data!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


# ---------------------------------------------------------------------------------------------- gated attention


def retention_decay(log_beta: torch.Tensor, q_len: int) -> torch.Tensor:
    """``log alpha[b, h, t, i] = (t - i) log beta[b, h, i]`` for the last ``q_len`` queries (``-inf`` above the
    diagonal): ``[B, Hkv, q_len, L]``."""
    length = log_beta.shape[-1]
    rows = torch.arange(length - q_len, length, device=log_beta.device)[:, None]
    age = (rows - torch.arange(length, device=log_beta.device)[None, :]).float()
    log_alpha = age[None, None] * log_beta[:, :, None, :]
    return log_alpha.masked_fill(age[None, None] < 0, float("-inf"))


def gated_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Eager attention with each logit scaled by ``beta_i^(t - i)``; plain sdpa for layers without a gate."""
    log_beta = getattr(_LOCAL, "log_beta", {}).get(module.layer_idx)
    if log_beta is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    b, h, q, _ = query.shape
    g = h // key.shape[1]
    log_alpha = retention_decay(log_beta, q)  # [B, Hkv, q, L]
    _LOCAL.log_alpha[module.layer_idx] = log_alpha
    decay = log_alpha.exp().repeat_interleave(g, dim=1)  # 0 above the diagonal
    k, v = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    logits = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scaling * decay
    causal = torch.isfinite(log_alpha).repeat_interleave(g, dim=1)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        causal = causal & attention_mask[..., -k.shape[2]:]
    logits = logits.masked_fill(~causal, float("-inf"))
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        logits = logits + attention_mask[..., -k.shape[2]:].float()
    probs = torch.softmax(logits, dim=-1).to(value.dtype)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).contiguous(), None


def _gate_hook(gates: RetentionGateSet):
    def hook(module, args, kwargs):
        if getattr(_LOCAL, "active", False) and str(module.layer_idx) in gates.inputs:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            _LOCAL.log_beta[module.layer_idx] = gates.log_beta(module.layer_idx, hidden)

    return hook


class GatedForward:
    """Context manager: inside it, ``model(ids)`` runs retention-gated attention with ``gates`` (with grad)."""

    def __init__(self, model, gates: RetentionGateSet):
        self.model, self.gates = model, gates

    def __enter__(self):
        AttentionInterface.register(GATED_ATTN, gated_attention)
        AttentionMaskInterface.register(GATED_ATTN, sdpa_mask)
        self.previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(GATED_ATTN)
        self.handles = [m.register_forward_pre_hook(_gate_hook(self.gates), with_kwargs=True)
                        for m in attention_modules(self.model)]
        _LOCAL.active, _LOCAL.log_beta, _LOCAL.log_alpha = True, {}, {}
        return self

    def log_alphas(self) -> dict:
        return _LOCAL.log_alpha

    def reset(self) -> None:
        _LOCAL.log_beta, _LOCAL.log_alpha = {}, {}

    def __exit__(self, *exc):
        _LOCAL.active, _LOCAL.log_beta, _LOCAL.log_alpha = False, {}, {}
        for handle in self.handles:
            handle.remove()
        self.model.set_attn_implementation(self.previous)
        return False


# ---------------------------------------------------------------------------------------------- losses


def capacity_loss(log_alphas: list[torch.Tensor], memory: int) -> torch.Tensor:
    """Mean over query steps of the retained entries (all layers and KV heads) above ``memory`` per head."""
    retained = sum(la.exp().sum(dim=(1, 3)) for la in log_alphas)  # [B, q]
    limit = memory * sum(la.shape[1] for la in log_alphas)
    return F.relu(retained - limit).mean() / limit


def _losses(model, gated: GatedForward, ids: torch.Tensor, teacher_logp: torch.Tensor, config) -> dict:
    gated.reset()
    logits = model(ids, use_cache=False).logits.float()
    logp = F.log_softmax(logits, -1)
    kl = (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()
    lm = F.nll_loss(logp[:, :-1].reshape(-1, logp.shape[-1]), ids[:, 1:].reshape(-1))
    cap = capacity_loss(list(gated.log_alphas().values()), config.memory)
    total = config.kl_weight * kl + config.lm_weight * lm + config.capacity_weight * cap
    return {"loss": total, "kl": kl, "lm": lm, "capacity": cap}


# ---------------------------------------------------------------------------------------------- data


def training_sequences(model, tokenizer, *, data: str, n: int, length: int, seed: int,
                       progress: bool = True) -> torch.Tensor:
    """``[n, length]`` token ids: the model's own samples (``data="self"``) or shipped passages (``"haystack"``)."""
    device = next(model.parameters()).device
    if data == "haystack":
        from ..bench.metrics import fidelity_text

        rows = []
        for i in range(n):
            text = fidelity_text(tokenizer=tokenizer, n_tokens=length + 8, seed=seed * 100_003 + i)
            ids = tokenizer(text, return_tensors="pt").input_ids[0, :length]
            if ids.numel() == length:
                rows.append(ids)
        return torch.stack(rows).to(device)
    return sample_sequences(model, tokenizer, n, length, seed=seed, progress=progress)


def sample_sequences(model, tokenizer, n: int, length: int, *, seed: int = 0, batch: int = 32,
                     progress: bool = True) -> torch.Tensor:
    """``n`` sequences of ``length`` tokens sampled from ``model`` at temperature 1, each starting at BOS."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id
    if bos is None:
        raise ValueError("sampling training text needs a BOS token; use data='haystack'")
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, n, batch), desc="sampling text from the model", disable=not progress, unit="batch"):
            rows = min(batch, n - start)
            ids = torch.full((rows, 1), bos, dtype=torch.long, device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=length - 1,
                                 min_new_tokens=length - 1, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 pad_token_id=bos)
            out.append(gen[:, :length])
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- training


def train_gates(model, tokenizer, config: GateTrainingConfig | None = None, *, data: torch.Tensor | None = None,
                progress: bool = True, gates: RetentionGateSet | None = None) -> tuple[RetentionGateSet, dict]:
    """Train retention gates for ``model`` (frozen); returns the gates and a summary (losses, time, config)."""
    from tqdm.auto import tqdm

    config = config or GateTrainingConfig()
    config.validate()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(config.seed)
    gates = gates or RetentionGateSet.for_model(model, shared_projection=config.shared_projection)
    gates.train()
    if data is None:
        data = training_sequences(model, tokenizer, data=config.data, n=config.num_sequences, length=config.seq_len,
                                  seed=config.seed, progress=progress)
    if data.shape[1] < config.seq_len:
        raise ValueError(f"training sequences have {data.shape[1]} tokens, seq_len is {config.seq_len}")
    optimizer = torch.optim.AdamW(gates.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / config.steps)))
    gen = torch.Generator().manual_seed(config.seed)
    history = []
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    with GatedForward(model, gates) as gated, tqdm(total=config.steps, desc="training gates", disable=not progress) as bar:
        for step in range(config.steps):
            rows = torch.randint(0, data.shape[0], (config.batch_size,), generator=gen)
            ids = data[rows.to(data.device), : config.seq_len]
            gated.reset()
            _LOCAL.active = False  # the teacher: the same frozen model with plain attention
            with torch.no_grad():
                teacher_logp = F.log_softmax(model(ids, use_cache=False).logits.float(), -1)
            _LOCAL.active = True
            losses = _losses(model, gated, ids, teacher_logp, config)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            schedule.step()
            row = {k: round(float(v.detach()), 5) for k, v in losses.items()}
            history.append(row)
            bar.set_postfix(kl=row["kl"], lm=row["lm"], cap=row["capacity"])
            bar.update()
    model.train(was_training)
    gates.eval()
    first, last = _mean(history[: max(1, len(history) // 10)]), _mean(history[-max(1, len(history) // 10):])
    summary = {"config": asdict(config), "seconds": round(time.perf_counter() - start, 1), "sequences": int(data.shape[0]),
               "first_losses": first, "last_losses": last, "history_every_10": history[::10]}
    return gates, summary


def _mean(rows: list[dict]) -> dict:
    return {k: round(sum(r[k] for r in rows) / len(rows), 5) for k in rows[0]}
