"""Retention gates: the small trained modules behind ``retention_gates``, and how their weights are saved.

One gate per full-attention layer reads the token's attention input (the hidden state after the layer's input
norm) and gives one ``log beta`` per KV head: ``log beta = logsigmoid(W2 act(W1 x + b1) + b)``. ``W1`` maps
``d_model -> 512`` with a bias, ``act`` is the model's own activation, ``W2`` maps ``512 -> Hkv`` without a bias
and ``b`` is a per-KV-head bias initialised to ``+10`` (``beta ~ 1``: an untrained gate keeps everything
equally, so eviction degenerates to recency). These are the TRIM-KV authors' defaults (ngocbh/trimkv, variant
``rg``).

"Make Each Token Count" adds a *shared final scoring projection* so that scores of all layers and heads share
one scale for the global top-k. Its exact form is not published; our reading (``shared_projection=True``, the
default) shares ``W2`` and ``b`` across layers while ``W1`` stays per layer.

Weights are saved as safetensors with the model's fingerprint and shapes in the header; by default next to the
converted model (``<model folder>/retention_gates.safetensors``) so they load with it, else under
``$INFERCACHE_HOME/gates/``. Gates we trained ourselves ship in ``infercache/models/gates/`` (named by the model's
fingerprint) and are used when no gates were saved with the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.activations import ACT2FN

from .._home import infercache_home
from ..cache.compressed_cache import full_attention_layers

GATES_FILE = "retention_gates.safetensors"
FORMAT = 1
BUNDLED = Path(__file__).resolve().parents[1] / "models" / "gates"  # gates we trained and ship, by model fingerprint


class GatesNotFoundError(FileNotFoundError):
    """No trained gates for this model; the message says how to train them."""


class RetentionGateSet(nn.Module):
    """Gates for the full-attention layers ``layers`` of one model: ``log_beta(layer, hidden) -> [B, Hkv, T]``."""

    def __init__(self, hidden_size: int, num_kv_heads: int, layers: list[int], *, inner: int = 512,
                 activation: str = "silu", shared_projection: bool = True, bias_init: float = 10.0):
        super().__init__()
        self.hidden_size, self.num_kv_heads, self.inner = hidden_size, num_kv_heads, inner
        self.layers = list(layers)
        self.activation, self.shared_projection, self.bias_init = activation, shared_projection, bias_init
        self.act = ACT2FN[activation]
        self.inputs = nn.ModuleDict({str(l): nn.Linear(hidden_size, inner) for l in self.layers})
        n_proj = 1 if shared_projection else len(self.layers)
        self.projections = nn.ModuleList(nn.Linear(inner, num_kv_heads, bias=False) for _ in range(n_proj))
        self.biases = nn.Parameter(torch.full((n_proj, num_kv_heads), float(bias_init)))

    @classmethod
    def for_model(cls, model, **kwargs) -> "RetentionGateSet":
        config = model.config.get_text_config(decoder=True)
        gates = cls(config.hidden_size, config.num_key_value_heads, full_attention_layers(model.config),
                    activation=getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", "silu"),
                    **kwargs)
        param = next(model.parameters())
        return gates.to(device=param.device)

    def _slot(self, layer_idx: int) -> int:
        return 0 if self.shared_projection else self.layers.index(layer_idx)

    def logits(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Gate pre-activations ``[B, Hkv, T]`` from the attention input ``hidden [B, T, d]``."""
        key = str(layer_idx)
        if key not in self.inputs:
            raise KeyError(f"retention gates have no gate for layer {layer_idx} (gated layers: {self.layers})")
        first = self.inputs[key]
        h = self.act(first(hidden.to(first.weight.dtype)))
        slot = self._slot(layer_idx)
        z = self.projections[slot](h) + self.biases[slot]
        return z.transpose(1, 2)

    def log_beta(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """``log beta`` per KV head and token, ``[B, Hkv, T]`` (float32, <= 0)."""
        return nn.functional.logsigmoid(self.logits(layer_idx, hidden).float())

    # ------------------------------------------------------------------ persistence
    def meta(self) -> dict:
        return {"format": FORMAT, "hidden_size": self.hidden_size, "num_kv_heads": self.num_kv_heads,
                "inner": self.inner, "layers": self.layers, "activation": self.activation,
                "shared_projection": self.shared_projection, "bias_init": self.bias_init}

    def save(self, path: str | Path, *, fingerprint: str, training: dict | None = None) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"meta": json.dumps(self.meta()), "fingerprint": fingerprint, "training": json.dumps(training or {})}
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(tensors, str(tmp), metadata=header)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, fingerprint: str | None = None) -> "RetentionGateSet":
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises several types for a bad file
            raise ValueError(f"{path}: not a readable retention-gates file ({err})") from None
        if "meta" not in header:
            raise ValueError(f"{path}: not a retention-gates file (no 'meta' in its header)")
        meta = json.loads(header["meta"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: gates format {meta.get('format')} is not supported (expected {FORMAT})")
        if fingerprint is not None and header.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{path}: these gates were trained for another model (fingerprint {header.get('fingerprint')}, "
                f"this model is {fingerprint}); train gates for this model with `infercache train-gates`"
            )
        gates = cls(meta["hidden_size"], meta["num_kv_heads"], meta["layers"], inner=meta["inner"],
                    activation=meta["activation"], shared_projection=meta["shared_projection"],
                    bias_init=meta["bias_init"])
        gates.load_state_dict(tensors)
        gates.training_summary = json.loads(header.get("training", "{}"))
        return gates.eval()


def default_gates_path(model) -> Path:
    """Next to the converted model when it has a folder, else ``$INFERCACHE_HOME/gates/<fingerprint>``."""
    from .razor_heads import model_fingerprint

    source = Path(getattr(model.config, "_name_or_path", "") or "")
    if source.is_dir() and (source / "config.json").exists():
        return source / GATES_FILE
    return infercache_home() / "gates" / bundled_name(model_fingerprint(model))


def bundled_name(fingerprint: str) -> str:
    return f"retention-gates-{fingerprint}.safetensors"


def load_gates_for(model, gates=None) -> RetentionGateSet:
    """Resolve the ``gates`` option: a :class:`RetentionGateSet`, a path, ``"untrained"``, or None (saved ones)."""
    from .razor_heads import model_fingerprint

    param = next(model.parameters())
    if isinstance(gates, RetentionGateSet):
        return gates.to(param.device)
    if gates == "untrained":  # bias only: one beta per head for every token, so eviction is by age alone
        untrained = RetentionGateSet.for_model(model).eval()
        with torch.no_grad():
            for proj in untrained.projections:
                proj.weight.zero_()
        return untrained
    fingerprint = model_fingerprint(model)
    path = Path(gates) if gates is not None else default_gates_path(model)
    if gates is None and not path.exists() and (BUNDLED / bundled_name(fingerprint)).exists():
        path = BUNDLED / bundled_name(fingerprint)
    if not path.exists():
        name = Path(getattr(model.config, "_name_or_path", "") or "").name or "MODEL"
        raise GatesNotFoundError(
            f"retention_gates: no trained gates at {path}. Train them once (CPU, minutes for stories260k) with\n"
            f"    infercache train-gates --model {name}\n"
            "or pass gates=PATH, or gates='untrained' for the untrained (recency-only) baseline."
        )
    loaded = RetentionGateSet.load(path, fingerprint=fingerprint)
    config = model.config.get_text_config(decoder=True)
    if loaded.hidden_size != config.hidden_size or loaded.num_kv_heads != config.num_key_value_heads or \
            loaded.layers != full_attention_layers(model.config):
        raise ValueError(f"{path}: gate shapes {loaded.meta()} do not fit this model")
    return loaded.to(param.device)
