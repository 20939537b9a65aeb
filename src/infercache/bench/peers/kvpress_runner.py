#!/usr/bin/env python
"""Run NVIDIA kvpress on pre-tokenized requests (the benchmark peer's side of the subprocess).

This file is a STANDALONE script: it runs inside the kvpress peer virtualenv (kvpress 0.5.5,
transformers 5.2) and imports only the standard library, torch, transformers and kvpress, never
infercache. infercache drives it through :func:`infercache.bench.peers.kvpress.run_kvpress`::

    PEER_PYTHON kvpress_runner.py --model-dir DIR --requests IN.jsonl --out OUT.jsonl

Each input line is one request::

    {"id": "niah-0", "method": "snapkv", "budget": 0.25,
     "context_ids": [...], "question_ids": [...], "max_new_tokens": 16}

``budget`` follows infercache's convention: a float in (0, 1] is the fraction of the context's KV
pairs KEPT (``floor(b * L)``, at least 1), an int the number of tokens kept. kvpress's
``compression_ratio`` is the fraction REMOVED, nominally ``1 - budget``; the press gets the ratio
that makes kvpress keep exactly the same count (:func:`press_ratio`, within ``1 / L`` of ``1 - b``).

For each request the script replicates ``KVPressTextGenerationPipeline._forward`` of kvpress 0.5.5:

1. the context ids are prefilled through ``model.model`` (no lm_head) inside ``with press(model)``,
   so the press's forward hooks compress each layer's cache right after that layer's attention;
2. the question ids are fed in one forward pass with explicit ``position_ids`` that continue from
   the *original* context length (kvpress does not re-index positions after eviction);
3. the answer is decoded greedily, one token at a time, again with explicit positions, until an
   EOS id of the model's generation config or ``max_new_tokens``.

When ``question_ids`` is empty (question-aware protocol: the question is inside the context), the
first answer token comes from the last context position's hidden state through the lm_head
(kvpress's pipeline always has a non-empty question suffix, so it has no such case).

One output line per request, written and flushed as soon as it is done::

    {"id", "method", "budget", "compression_ratio", "kept_tokens", "press", "prediction_ids",
     "cache_tokens_per_layer", "effective_tokens_per_layer", "cache_bytes", "context_tokens",
     "prefill_s", "decode_s", "attn_implementation", "error", "peer_versions"}

``prediction_ids`` are the greedy tokens, ending with the EOS id when decoding stopped on one (as
in kvpress's pipeline, which then decodes with ``skip_special_tokens=True``).

``cache_bytes`` sums the bytes of every key and value tensor held by the cache right after the
prefill (what is really in memory). ``effective_tokens_per_layer`` subtracts the per-head average of
the keys that head-wise presses (AdaKV) only *mask*: kvpress keeps them in the cache and overwrites
them with a "fake key" at attention time, so their bytes stay. A failing request gets
``"error": "<Type>: <message>"`` and the run goes on. Progress goes to stderr, one line per request.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

# Run as a script, this file's folder is sys.path[0], and that folder holds infercache's own
# ``kvpress.py`` wrapper, which would shadow the real kvpress package: drop it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]

# our method name -> (kvpress press class, constructor kwargs besides compression_ratio, wrapper)
# wrapper "AdaKVPress" means AdaKVPress(<press>(...)), as kvpress's evaluate_registry does.
PRESS_SPECS: dict[str, tuple[str | None, dict, str | None]] = {
    "full": (None, {}, None),
    "snapkv": ("SnapKVPress", {}, None),
    "streaming_llm": ("StreamingLLMPress", {}, None),
    "h2o": ("ObservedAttentionPress", {}, None),
    "tova": ("TOVAPress", {}, None),
    "pyramidkv": ("PyramidKVPress", {}, None),
    "adakv": ("SnapKVPress", {}, "AdaKVPress"),
    "knorm": ("KnormPress", {}, None),
    "expected_attention": ("ExpectedAttentionPress", {}, None),
    "adakv_expected_attention": ("ExpectedAttentionPress", {"epsilon": 1e-2}, "AdaKVPress"),
    "random": ("RandomPress", {}, None),
}

# presses that read the attention weights of the prefill: they need the eager attention kernel
EAGER_METHODS = frozenset({"h2o"})

REQUIRED_FIELDS = ("id", "method", "budget", "context_ids")


def _check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a float ratio in (0, 1] or an int number of tokens, got {budget!r}")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"an int budget is a number of tokens kept and must be >= 1, got {budget}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"a float budget is the fraction of the KV cache kept and must be in (0, 1], got {budget}")


def compression_ratio(budget: float) -> float:
    """kvpress's nominal ``compression_ratio`` (fraction removed) for a float ``budget`` (fraction kept)."""
    _check_budget(budget)
    if isinstance(budget, int):
        raise ValueError("an int budget (tokens kept) has no fixed compression ratio; see press_ratio()")
    return round(1.0 - budget, 12)


def kept_tokens(budget: float | int, context_len: int) -> int:
    """Tokens kept per head and layer under infercache's convention (``Budget.resolve``)."""
    _check_budget(budget)
    if isinstance(budget, int):
        return min(budget, context_len)
    return min(context_len, max(1, math.floor(context_len * budget)))


def press_ratio(budget: float | int, context_len: int) -> float:
    """The ``compression_ratio`` handed to the press so that kvpress keeps exactly
    :func:`kept_tokens` of ``context_len`` tokens.

    kvpress keeps ``int(L * (1 - ratio))`` (PyramidKV's SnapKV fallback ``round(...)``); with the
    nominal ``1 - budget`` float rounding can lose a token (``b = 0.1, L = 1000`` keeps 99). Aiming at
    ``n + 0.25`` makes both ``int`` and ``round`` give ``n``; the ratio differs from ``1 - budget`` by
    less than ``1 / L``.
    """
    n = kept_tokens(budget, context_len)
    if n >= context_len:
        return 0.0
    return 1.0 - (n + 0.25) / context_len


def validate_request(request: dict) -> None:
    """Raise ``ValueError`` if ``request`` is not a well-formed runner request."""
    missing = [name for name in REQUIRED_FIELDS if name not in request]
    if missing:
        raise ValueError(f"request is missing {', '.join(missing)}")
    if request["method"] not in PRESS_SPECS:
        raise ValueError(f"unknown method {request['method']!r}; choose one of {', '.join(PRESS_SPECS)}")
    _check_budget(request["budget"])
    if not request["context_ids"]:
        raise ValueError("context_ids is empty")
    for name in ("context_ids", "question_ids"):
        ids = request.get(name) or []
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"{name} must be a list of non-negative token ids")
    if int(request.get("max_new_tokens", 16)) < 1:
        raise ValueError("max_new_tokens must be >= 1")


def build_press(kvpress, method: str, budget: float | int, context_len: int):
    """The kvpress press for ``method`` keeping ``budget`` of ``context_len`` tokens (``None`` for ``full``)."""
    class_name, kwargs, wrapper = PRESS_SPECS[method]
    if class_name is None:
        return None
    ratio = press_ratio(budget, context_len)
    press = getattr(kvpress, class_name)(compression_ratio=ratio, **kwargs)
    if wrapper is not None:
        press = getattr(kvpress, wrapper)(press)
    return press


def describe_press(press) -> str | None:
    return None if press is None else repr(press)


def empty_result(request: dict) -> dict:
    return {
        "id": request.get("id"),
        "method": request.get("method"),
        "budget": request.get("budget"),
        "compression_ratio": None,
        "kept_tokens": None,
        "press": None,
        "prediction_ids": [],
        "cache_tokens_per_layer": [],
        "effective_tokens_per_layer": [],
        "cache_bytes": None,
        "context_tokens": len(request.get("context_ids") or []),
        "prefill_s": None,
        "decode_s": None,
        "attn_implementation": None,
        "error": None,
    }


# ------------------------------------------------------------------------------------------- runtime


class _Runtime:
    """Loads the model once per attention implementation and runs requests the kvpress way."""

    def __init__(self, model_dir: str, dtype: str, attn_implementation: str):
        import torch

        self.torch = torch
        self.model_dir = model_dir
        self.dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
        self.default_attn = attn_implementation
        self.models: dict[str, object] = {}

    def model(self, attn_implementation: str):
        if attn_implementation not in self.models:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=self.dtype, attn_implementation=attn_implementation
            )
            model.eval()
            self.models[attn_implementation] = model
        return self.models[attn_implementation]

    def run(self, kvpress, request: dict) -> dict:
        """The result row for ``request``; on failure the exception carries ``.partial`` (what was
        measured before it failed, e.g. the cache after a prefill whose decode then crashed)."""
        result = empty_result(request)
        try:
            return self._run(kvpress, request, result)
        except Exception as exc:
            exc.partial = result
            raise

    def _run(self, kvpress, request: dict, result: dict) -> dict:
        torch = self.torch
        from transformers import DynamicCache

        validate_request(request)
        method, budget = request["method"], request["budget"]
        context_len = len(request["context_ids"])
        if method != "full":
            result["compression_ratio"] = press_ratio(budget, context_len)
            result["kept_tokens"] = kept_tokens(budget, context_len)
        attn = "eager" if method in EAGER_METHODS else self.default_attn
        result["attn_implementation"] = attn
        model = self.model(attn)
        press = build_press(kvpress, method, budget, context_len)
        result["press"] = describe_press(press)
        torch.manual_seed(int(request.get("seed", 0)))  # RandomPress(seed=None) draws from the global RNG

        layers = _attention_layers(model)
        for attention in layers:  # a failed earlier request must not leak AdaKV masks into this one
            if getattr(attention, "masked_key_indices", None) is not None:
                attention.masked_key_indices = None

        device = next(model.parameters()).device
        context_ids = torch.tensor([request["context_ids"]], dtype=torch.long, device=device)
        question = list(request.get("question_ids") or [])
        max_new_tokens = int(request.get("max_new_tokens", 16))
        context_length = context_ids.shape[1]
        cache = DynamicCache()

        with torch.inference_mode():
            # 1. prefill the context inside the press (kvpress pipeline: model.model, no lm_head)
            start = time.perf_counter()
            if press is not None:
                with press(model):
                    out = model.model(input_ids=context_ids, past_key_values=cache)
            else:
                out = model.model(input_ids=context_ids, past_key_values=cache)
            result["prefill_s"] = round(time.perf_counter() - start, 6)
            tokens, nbytes = _cache_footprint(cache)
            result["cache_tokens_per_layer"] = tokens
            result["cache_bytes"] = nbytes
            result["effective_tokens_per_layer"] = _effective_tokens(layers, tokens, model.config)

            if isinstance(press, getattr(kvpress, "KeyRerotationPress", ())):
                context_length = cache.get_seq_length()

            # 2. question with explicit positions after the ORIGINAL context length, 3. greedy decode
            start = time.perf_counter()
            if question:
                position_ids = torch.arange(
                    context_length, context_length + len(question), device=device
                ).unsqueeze(0)
                outputs = model(
                    input_ids=torch.tensor([question], dtype=torch.long, device=device),
                    past_key_values=cache,
                    position_ids=position_ids,
                    logits_to_keep=1,
                )
                logits = outputs.logits[0, -1]
            else:
                position_ids = torch.tensor([[context_length - 1]], device=device)
                logits = model.get_output_embeddings()(out.last_hidden_state[:, -1:])[0, -1]
            position_ids = position_ids[:, -1:] + 1
            generated = [int(logits.argmax())]
            stop = model.generation_config.eos_token_id
            stop_ids = set(stop if isinstance(stop, (list, tuple)) else [stop] if stop is not None else [])
            for i in range(max_new_tokens - 1):
                if generated[-1] in stop_ids:
                    break
                outputs = model(
                    input_ids=torch.tensor([[generated[-1]]], dtype=torch.long, device=device),
                    past_key_values=cache,
                    position_ids=position_ids + i,
                )
                generated.append(int(outputs.logits[0, -1].argmax()))
            result["decode_s"] = round(time.perf_counter() - start, 6)
        result["prediction_ids"] = generated
        return result


def _attention_layers(model) -> list:
    inner = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn for layer in inner.layers]


def _cache_footprint(cache) -> tuple[list[int], int]:
    """Tokens held per layer and the bytes of every key/value tensor the cache holds."""
    tokens, nbytes = [], 0
    for layer in getattr(cache, "layers", []):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        held = 0
        for tensor in (keys, values):
            if tensor is not None and hasattr(tensor, "element_size"):
                nbytes += tensor.numel() * tensor.element_size()
        if keys is not None and hasattr(keys, "shape") and keys.dim() == 4:
            held = int(keys.shape[-2])
        for name in ("_quantized_keys", "_quantized_values"):  # QuantizedCache layers
            tensor = getattr(layer, name, None)
            if tensor is not None and hasattr(tensor, "element_size"):
                nbytes += tensor.numel() * tensor.element_size()
        tokens.append(held)
    return tokens, int(nbytes)


def _effective_tokens(layers: list, tokens: list[int], config) -> list[float]:
    """Tokens per layer that attention can still see (masked keys of head-wise presses removed)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    effective = []
    for attention, held in zip(layers, tokens):
        masked = getattr(attention, "masked_key_indices", None)
        n_masked = int(masked[0].numel()) if masked is not None else 0
        effective.append(round(held - n_masked / n_kv_heads, 3))
    return effective


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="HF model folder (config + safetensors)")
    parser.add_argument("--requests", required=True, help="input JSONL, one request per line")
    parser.add_argument("--out", required=True, help="output JSONL, one result per request")
    parser.add_argument("--attn-implementation", default="sdpa", help="default: sdpa (h2o always eager)")
    parser.add_argument("--dtype", default="float32", help="torch dtype name or 'auto' (default float32)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--traceback", action="store_true", help="print the traceback of failed requests")
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(f"[kvpress-peer] {message}", file=sys.stderr, flush=True)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    torch.set_num_threads(max(1, args.threads))
    import transformers

    transformers.utils.logging.disable_progress_bar()

    import kvpress

    versions = {
        "kvpress": getattr(kvpress, "__version__", None) or _dist_version("kvpress"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    say("versions " + json.dumps(versions))

    with open(args.requests) as handle:
        lines = [line for line in handle if line.strip()]
    runtime = _Runtime(args.model_dir, args.dtype, args.attn_implementation)
    n_errors = 0
    with open(args.out, "w") as out:
        for index, line in enumerate(lines, 1):
            try:
                request = json.loads(line)
            except ValueError as exc:
                request = {"id": f"line-{index}"}
                result, error = empty_result(request), exc
            else:
                result, error = None, None
                try:
                    result = runtime.run(kvpress, request)
                except Exception as exc:  # one request failing never aborts the run
                    error = exc
                    if args.traceback:
                        traceback.print_exc()
            if error is not None:
                result = getattr(error, "partial", None) or empty_result(request)
                result["error"] = _error_text(error)
                n_errors += 1
            result["peer_versions"] = versions
            out.write(json.dumps(result) + "\n")
            out.flush()
            tag = f"{index}/{len(lines)} {result['id']} {result['method']}@{result['budget']}"
            if result["error"]:
                say(f"{tag}: ERROR {result['error'][:300]}")
            else:
                say(
                    f"{tag}: {len(result['prediction_ids'])} tokens, cache {result['cache_bytes'] / 2**20:.2f} MiB, "
                    f"prefill {result['prefill_s']:.2f}s decode {result['decode_s']:.2f}s"
                )
    say(f"done: {len(lines)} requests, {n_errors} errors")
    return 0


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
