"""NVIDIA kvpress 0.5.5 as a benchmark peer, run on the very same token ids as infercache.

>>> from infercache.bench.peers.kvpress import make_request, run_kvpress
>>> requests = [make_request("niah-0", "snapkv", 0.25, prompt.context_ids, prompt.question_ids)]
>>> rows = run_kvpress("~/.cache/infercache/models/smollm2-135m", requests, "kvpress.jsonl")
>>> rows[0]["prediction_ids"], rows[0]["cache_bytes"], rows[0]["error"]

kvpress pins an older transformers than ours, so it runs in its own virtualenv
(:func:`.kvpress_env.ensure_env`, built on first use) and is driven through a subprocess running
the standalone :mod:`.kvpress_runner` script. Requests go in as JSONL, results come back as JSONL,
one row per request; a request that fails in kvpress comes back with ``"error"`` set and the other
requests still run. See ``docs/peers.md`` for the protocol and the semantic differences.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from .kvpress_env import KVPRESS_VERSION, ensure_env

RUNNER = Path(__file__).with_name("kvpress_runner.py")

ProgressFn = Callable[[str], None]


class PeerMethod(NamedTuple):
    """How one infercache method name is run in kvpress."""

    press: str | None  # kvpress press expression (classes of kvpress 0.5.5); None: no press
    notes: str  # semantic differences from infercache's policy of the same name


KVPRESS_METHODS: dict[str, PeerMethod] = {
    "full": PeerMethod(None, "No press: the uncompressed reference, same prefill/decode loop."),
    "snapkv": PeerMethod(
        "SnapKVPress",
        "Question-agnostic by default: the 64-query observation window is the END OF THE CONTEXT, "
        "not the question (unless the question is inside the context). Window always kept; "
        "avg-pool kernel 5; scores averaged over the GQA group; same length for every head and layer.",
    ),
    "streaming_llm": PeerMethod("StreamingLLMPress", "4 sink tokens + the most recent ones; prefill only."),
    "h2o": PeerMethod(
        "ObservedAttentionPress",
        "Mean attention each key received during the prefill (eager attention only, so the runner "
        "loads an eager copy of the model). One-shot at prefill: no heavy-hitter updates while decoding.",
    ),
    "tova": PeerMethod(
        "TOVAPress",
        "Attention of the last context token averaged over heads; one-shot at prefill (TOVA proper "
        "evicts one token per decoding step).",
    ),
    "pyramidkv": PeerMethod(
        "PyramidKVPress",
        "SnapKV scores with a linearly decreasing per-layer budget (beta=20). Unequal layer lengths "
        "break the HF causal mask on the multi-token question step in kvpress 0.5.5: recorded as an "
        "error (works only when question_ids is empty).",
    ),
    "adakv": PeerMethod(
        "AdaKVPress(SnapKVPress)",
        "kvpress's 'adakv_snapkv': head-wise top-k across heads with alpha_safeguard=0.2. MASKING ONLY: "
        "evicted keys stay in the cache and are overwritten by a fake key at attention time, so "
        "cache_bytes equals full; effective_tokens_per_layer shows the masked budget. Needs sdpa.",
    ),
    "knorm": PeerMethod("KnormPress", "Keeps the keys with the smallest L2 norm (computed in fp32)."),
    "expected_attention": PeerMethod(
        "ExpectedAttentionPress",
        "Plain press with its defaults (512 future positions, 4 sinks, covariance, value norm, "
        "epsilon=0), real eviction. kvpress's leaderboard 'expected_attention' is the AdaKV variant: "
        "see adakv_expected_attention.",
    ),
    "adakv_expected_attention": PeerMethod(
        "AdaKVPress(ExpectedAttentionPress(epsilon=1e-2))",
        "kvpress's registry/leaderboard 'expected_attention'; masking only, like adakv.",
    ),
    "random": PeerMethod("RandomPress", "Uniform random scores; the global torch seed is set per request."),
}

REQUEST_FIELDS = ("id", "method", "budget", "context_ids", "question_ids", "max_new_tokens")
RESULT_FIELDS = (
    "id",
    "method",
    "budget",
    "prediction_ids",
    "cache_tokens_per_layer",
    "cache_bytes",
    "prefill_s",
    "decode_s",
    "error",
)


class PeerRunError(RuntimeError):
    """The peer runner could not be started or produced no readable output at all."""


def compression_ratio(budget: float) -> float:
    """kvpress's nominal ``compression_ratio`` (fraction REMOVED) for infercache's float budget (fraction KEPT)."""
    if isinstance(budget, bool) or not isinstance(budget, float) or not 0.0 < budget <= 1.0:
        raise ValueError(f"a ratio budget is a float in (0, 1] (fraction kept), got {budget!r}")
    return round(1.0 - budget, 12)


def make_request(
    request_id: str,
    method: str,
    budget: float | int,
    context_ids: Sequence[int],
    question_ids: Sequence[int] = (),
    max_new_tokens: int = 16,
    **extra,
) -> dict:
    """A validated runner request (a plain JSON-able dict)."""
    request = {
        "id": str(request_id),
        "method": method,
        "budget": budget,
        "context_ids": [int(i) for i in context_ids],
        "question_ids": [int(i) for i in question_ids],
        "max_new_tokens": int(max_new_tokens),
        **extra,
    }
    validate_request(request)
    return request


def validate_request(request: dict) -> None:
    """Raise ``ValueError`` for a request the runner would reject."""
    missing = [name for name in ("id", "method", "budget", "context_ids") if name not in request]
    if missing:
        raise ValueError(f"request is missing {', '.join(missing)}")
    if request["method"] not in KVPRESS_METHODS:
        raise ValueError(
            f"method {request['method']!r} has no kvpress peer; choose one of {', '.join(KVPRESS_METHODS)}"
        )
    budget = request["budget"]
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a float ratio in (0, 1] or an int number of tokens, got {budget!r}")
    if isinstance(budget, int) and budget < 1 or isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"budget out of range: {budget!r} (float: fraction kept in (0, 1]; int: tokens >= 1)")
    if not request["context_ids"]:
        raise ValueError("context_ids is empty")
    if int(request.get("max_new_tokens", 16)) < 1:
        raise ValueError("max_new_tokens must be >= 1")


def error_result(request: dict, error: str) -> dict:
    """The row of a request that produced no result (e.g. the runner died before reaching it)."""
    return {
        "id": request.get("id"),
        "method": request.get("method"),
        "budget": request.get("budget"),
        "prediction_ids": [],
        "cache_tokens_per_layer": [],
        "cache_bytes": None,
        "prefill_s": None,
        "decode_s": None,
        "error": error,
    }


def write_requests(requests: Iterable[dict], path: str | os.PathLike) -> Path:
    path = Path(path)
    with open(path, "w") as handle:
        for request in requests:
            handle.write(json.dumps(request) + "\n")
    return path


def read_results(path: str | os.PathLike) -> list[dict]:
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            continue
    return rows


def _default_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_kvpress(
    model_dir: str | os.PathLike,
    requests: Sequence[dict],
    out_path: str | os.PathLike,
    *,
    python: str | os.PathLike | None = None,
    runner: str | os.PathLike | None = None,
    runner_args: Sequence[str] = (),
    threads: int = 1,
    timeout: float | None = None,
    progress: ProgressFn | None = _default_progress,
) -> list[dict]:
    """Run ``requests`` through kvpress on the HF model folder ``model_dir``; one row per request, in order.

    ``out_path`` receives the runner's JSONL (the requests go next to it, ``<out>.requests.jsonl``).
    ``python`` defaults to the peer venv's interpreter (built on first use by :func:`ensure_env`);
    ``runner`` to :data:`RUNNER`. The runner's stderr (its progress lines) is streamed to
    ``progress``. Requests that got no row (the runner crashed or timed out before them) come back
    with ``"error"`` set, so the result always lines up with ``requests``.
    """
    requests = list(requests)
    if not requests:
        return []
    for request in requests:
        validate_request(request)
    ids = [request["id"] for request in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids must be unique")
    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    requests_path = write_requests(requests, out_path.with_name(out_path.name + ".requests.jsonl"))
    if out_path.exists():
        out_path.unlink()

    python = Path(python) if python is not None else ensure_env(progress=progress)
    cmd = [
        str(python),
        str(runner or RUNNER),
        "--model-dir",
        str(model_dir),
        "--requests",
        str(requests_path),
        "--out",
        str(out_path),
        "--threads",
        str(threads),
        *runner_args,
    ]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the peer must not import our source tree
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = str(threads)
    say = progress or (lambda _line: None)
    tail: list[str] = []
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
        )
    except OSError as exc:
        raise PeerRunError(f"could not start the kvpress peer ({cmd[0]}): {exc}") from exc
    timed_out = threading.Event()

    def _kill_on_timeout() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, _kill_on_timeout) if timeout else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail = (tail + [line])[-40:]
            say(line)
        code: int | str = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if timer is not None:
            timer.cancel()
    if timed_out.is_set():
        code = f"a kill after the {timeout:g} s timeout"

    rows = {row.get("id"): row for row in read_results(out_path)}
    if not rows and code != 0:
        raise PeerRunError(
            f"the kvpress peer exited with {code} before writing any result:\n" + "\n".join(tail[-20:])
        )
    why = f"the kvpress {KVPRESS_VERSION} runner exited with {code} before this request"
    if tail:
        why += f"; last output: {tail[-1][:500]}"
    results = [rows.get(request["id"]) or error_result(request, why) for request in requests]
    return results

