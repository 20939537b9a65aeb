"""The kvpress benchmark peer (``infercache.bench.peers``).

The fast tests never touch the peer virtualenv: they check the request/result schema, the method
mapping, the budget conversion, the subprocess driver against fake runners, and the runner's own
prefill/decode loop against a fake ``kvpress`` module on a tiny random model in this venv.

The one ``slow`` test runs the real kvpress 0.5.5 and is SKIPPED unless its venv already exists
(``infercache_home()/peers/kvpress-0.5.5``, built by ``ensure_env()`` or the first
``infercache bench`` run with a kvpress peer). CI does not build it: kvpress is a benchmark
dependency (about 1.5 GB, its own transformers), not a dependency of infercache.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest

from infercache.bench.peers import kvpress as peer
from infercache.bench.peers import kvpress_env

RUNNER_PATH = Path(peer.__file__).with_name("kvpress_runner.py")


@pytest.fixture(scope="module")
def runner():
    """The standalone runner script, imported as a module (its top level needs only the stdlib)."""
    spec = importlib.util.spec_from_file_location("kvpress_runner_under_test", RUNNER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ mapping and budgets


def test_runner_imports_only_stdlib_torch_transformers_kvpress():
    tree = ast.parse(RUNNER_PATH.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the runner must not use relative imports"
            roots.add(node.module.split(".")[0])
    third_party = {root for root in roots if root not in sys.stdlib_module_names}
    assert third_party <= {"torch", "transformers", "kvpress"}, third_party
    assert "infercache" not in roots


def test_method_mapping_matches_the_runner(runner):
    assert set(peer.KVPRESS_METHODS) == set(runner.PRESS_SPECS)
    for method, (class_name, kwargs, wrapper) in runner.PRESS_SPECS.items():
        press = peer.KVPRESS_METHODS[method].press
        if class_name is None:
            assert press is None
            continue
        assert class_name in press and (wrapper is None or press.startswith(wrapper + "("))
        assert peer.KVPRESS_METHODS[method].notes
    # the methods the benchmark asks for, under infercache's policy names
    for method in ("snapkv", "streaming_llm", "h2o", "tova", "pyramidkv", "adakv", "knorm",
                   "expected_attention", "random", "full"):
        assert method in peer.KVPRESS_METHODS
    assert peer.KVPRESS_METHODS["h2o"].press == "ObservedAttentionPress"
    assert runner.EAGER_METHODS == {"h2o"}


def test_peer_method_names_are_infercache_policies():
    from infercache.policies import POLICIES

    extra = set(peer.KVPRESS_METHODS) - set(POLICIES)
    assert extra <= {"adakv_expected_attention"}, extra


@pytest.mark.parametrize("budget, ratio", [(0.25, 0.75), (0.5, 0.5), (1.0, 0.0), (0.1, 0.9), (0.875, 0.125)])
def test_compression_ratio_is_one_minus_budget(runner, budget, ratio):
    assert peer.compression_ratio(budget) == pytest.approx(ratio, abs=1e-12)
    assert runner.compression_ratio(budget) == pytest.approx(ratio, abs=1e-12)


@pytest.mark.parametrize("budget", [0.0, 1.5, -0.1, True, "0.5", 3])
def test_compression_ratio_rejects_non_ratios(runner, budget):
    with pytest.raises(ValueError):
        peer.compression_ratio(budget)
    with pytest.raises(ValueError):
        runner.compression_ratio(budget)


def _kvpress_n_kept(k_len: int, ratio: float) -> int:  # kvpress.utils.compute_n_kept (0.5.5)
    return 0 if ratio >= 1.0 else max(1, int(k_len * (1 - ratio)))


def _pyramidkv_fallback_n_kept(k_len: int, ratio: float) -> int:  # PyramidKVPress's SnapKV fallback
    return max(1, round(k_len * (1 - ratio)))


@pytest.mark.parametrize("length", [1, 7, 64, 100, 999, 1000, 1050, 4096])
@pytest.mark.parametrize("budget", [0.01, 0.1, 0.125, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0, 1, 16, 256, 5000])
def test_press_ratio_makes_kvpress_keep_infercaches_count(runner, length, budget):
    from infercache.cache.budget import Budget
    import torch

    ours = int(Budget.parse(budget).resolve(torch.tensor([length]))[0])
    assert runner.kept_tokens(budget, length) == ours
    ratio = runner.press_ratio(budget, length)
    assert 0.0 <= ratio < 1.0
    assert _kvpress_n_kept(length, ratio) == ours
    assert _pyramidkv_fallback_n_kept(length, ratio) == ours
    if isinstance(budget, float) and math.floor(budget * length) >= 1:  # not clamped to one token
        assert abs(ratio - (1 - budget)) < 1.0 / length + 1e-12


def test_nominal_ratio_can_lose_a_token_which_press_ratio_avoids(runner):
    assert _kvpress_n_kept(1000, 1 - 0.1) == 99  # the reason for press_ratio
    assert _kvpress_n_kept(1000, runner.press_ratio(0.1, 1000)) == 100


# ---------------------------------------------------------------------------------- request schema


def test_make_request_schema():
    request = peer.make_request("a", "snapkv", 0.25, [1, 2, 3], [4, 5], max_new_tokens=8)
    assert set(request) == set(peer.REQUEST_FIELDS)
    assert request == {"id": "a", "method": "snapkv", "budget": 0.25, "context_ids": [1, 2, 3],
                       "question_ids": [4, 5], "max_new_tokens": 8}
    assert json.loads(json.dumps(request)) == request
    assert peer.make_request("b", "full", 1.0, [1])["question_ids"] == []  # question-aware: no question


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="nope"), "no kvpress peer"),
        (dict(budget=0.0), "out of range"),
        (dict(budget=1.5), "out of range"),
        (dict(budget=0), "out of range"),
        (dict(budget=True), "budget must be"),
        (dict(context_ids=[]), "empty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_make_request_rejects(runner, kwargs, match):
    args = dict(request_id="x", method="snapkv", budget=0.25, context_ids=[1, 2], question_ids=[3])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        peer.make_request(**args)
    raw = {"id": "x", **{k: v for k, v in args.items() if k != "request_id"}}
    with pytest.raises(ValueError):
        runner.validate_request(raw)


def test_run_kvpress_rejects_before_starting(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    good = peer.make_request("a", "snapkv", 0.25, [1, 2])
    with pytest.raises(FileNotFoundError):
        peer.run_kvpress(model_dir, [good], tmp_path / "out.jsonl", python=sys.executable)
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="unique"):
        peer.run_kvpress(model_dir, [good, good], tmp_path / "out.jsonl", python=sys.executable)
    assert peer.run_kvpress(model_dir, [], tmp_path / "out.jsonl", python="/nonexistent") == []


# ------------------------------------------------------------------------ the driver on fake runners

FAKE_RUNNER = """
import argparse, json, sys
p = argparse.ArgumentParser()
p.add_argument("--model-dir"); p.add_argument("--requests"); p.add_argument("--out")
p.add_argument("--threads"); p.add_argument("--mode", default="ok")
a = p.parse_args()
reqs = [json.loads(l) for l in open(a.requests)]
if a.mode == "crash-at-start":
    print("Traceback: boom at import", file=sys.stderr); sys.exit(3)
if a.mode == "hang":
    import time; print("[fake] hanging", file=sys.stderr, flush=True); time.sleep(60)
with open(a.out, "w") as out:
    for i, r in enumerate(reqs):
        if a.mode == "die-at-last" and i == len(reqs) - 1:
            print("[fake] segfault-ish", file=sys.stderr, flush=True); sys.exit(139)
        err = "RuntimeError: The size of tensor a (661) must match" if r["method"] == "pyramidkv" else None
        row = {"id": r["id"], "method": r["method"], "budget": r["budget"],
               "prediction_ids": [] if err else [7, 8], "cache_tokens_per_layer": [len(r["context_ids"])],
               "cache_bytes": 64, "prefill_s": 0.1, "decode_s": None if err else 0.2, "error": err}
        out.write(json.dumps(row) + "\\n"); out.flush()
        print(f"[fake] {i + 1}/{len(reqs)} {r['id']}", file=sys.stderr, flush=True)
"""


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_runner.py"
    script.write_text(textwrap.dedent(FAKE_RUNNER))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    requests = [
        peer.make_request("r0", "snapkv", 0.25, [1, 2, 3], [4]),
        peer.make_request("r1", "pyramidkv", 0.25, [1, 2, 3], [4]),
        peer.make_request("r2", "full", 1.0, [1, 2, 3], []),
    ]

    def run(mode="ok", **kwargs):
        lines = []
        rows = peer.run_kvpress(model_dir, requests, tmp_path / "out" / "res.jsonl", python=sys.executable,
                                runner=script, runner_args=["--mode", mode], progress=lines.append, **kwargs)
        return rows, lines

    return run


def test_driver_reads_rows_in_request_order_and_streams_progress(fake, tmp_path):
    rows, lines = fake()
    assert [row["id"] for row in rows] == ["r0", "r1", "r2"]
    for row in rows:
        assert set(peer.RESULT_FIELDS) <= set(row)
    assert rows[0]["error"] is None and rows[0]["prediction_ids"] == [7, 8]
    assert rows[1]["error"].startswith("RuntimeError") and rows[1]["prediction_ids"] == []
    assert rows[2]["error"] is None
    assert lines == ["[fake] 1/3 r0", "[fake] 2/3 r1", "[fake] 3/3 r2"]
    written = [json.loads(line) for line in (tmp_path / "out" / "res.jsonl.requests.jsonl").read_text().splitlines()]
    assert [r["id"] for r in written] == ["r0", "r1", "r2"]


def test_driver_fills_error_rows_when_the_runner_dies(fake):
    rows, lines = fake("die-at-last")
    assert [row["error"] is None for row in rows] == [True, False, False]
    assert rows[1]["error"].startswith("RuntimeError")  # recorded by the runner itself
    assert "exited with 139" in rows[2]["error"] and "segfault-ish" in rows[2]["error"]
    assert set(peer.RESULT_FIELDS) <= set(rows[2])


def test_driver_raises_when_the_runner_writes_nothing(fake):
    with pytest.raises(peer.PeerRunError, match="boom at import"):
        fake("crash-at-start")


def test_driver_timeout_kills_the_runner(fake):
    with pytest.raises(peer.PeerRunError, match="timeout"):
        fake("hang", timeout=3)


# --------------------------------------------------------------------------------------- environment


def test_env_paths_follow_infercache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERCACHE_HOME", str(tmp_path / "home"))
    root = kvpress_env.default_env_path()
    assert root == tmp_path / "home" / "peers" / "kvpress-0.5.5"
    assert kvpress_env.env_python(root) == root / "bin" / "python"
    assert not kvpress_env.is_ready(root)
    commands = kvpress_env.install_commands(root)
    assert [cmd[-1] for cmd in commands[1:]] == ["torch==2.13.0", "kvpress==0.5.5"]  # torch FIRST


def test_ensure_env_reuses_a_finished_env_without_installing(tmp_path, monkeypatch):
    root = tmp_path / "env"
    python = kvpress_env.env_python(root)
    python.parent.mkdir(parents=True)
    python.write_text("")
    (root / kvpress_env.MARKER_NAME).write_text(json.dumps({"kvpress": "0.5.5"}))

    def no_subprocess(*args, **kwargs):
        raise AssertionError("ensure_env must not install again")

    monkeypatch.setattr(kvpress_env.subprocess, "run", no_subprocess)
    assert kvpress_env.ensure_env(root, progress=None) == python
    assert kvpress_env.read_marker(root) == {"kvpress": "0.5.5"}


def test_ensure_env_failure_names_the_commands_to_run(tmp_path, monkeypatch):
    failing = [[sys.executable, "-c", "import sys; print('no matching distribution for kvpress'); sys.exit(1)"]]
    monkeypatch.setattr(kvpress_env, "install_commands", lambda *a, **k: failing)
    messages = []
    with pytest.raises(kvpress_env.PeerEnvError) as info:
        kvpress_env.ensure_env(tmp_path / "env", progress=messages.append)
    text = str(info.value)
    assert "no matching distribution" in text and "To install it by hand" in text
    assert "exit 1" in text
    assert messages and "installing the kvpress 0.5.5 peer" in messages[0]
    assert not kvpress_env.is_ready(tmp_path / "env")


# ------------------------------------------- the runner's own loop, with a fake kvpress, in this venv

FAKE_KVPRESS = '''
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class _Evict:
    """Keeps the last n_kept context entries of every layer after prefill (a stand-in press)."""
    compression_ratio: float = 0.0

    def hook(self, module, args, kwargs, output):
        cache = kwargs.get("past_key_values") or kwargs.get("cache")  # renamed after transformers 5.2
        layer = cache.layers[module.layer_idx]
        length = layer.keys.shape[-2]
        if kwargs["hidden_states"].shape[1] != length:
            return output
        n_kept = max(1, int(length * (1 - self.compression_ratio)))
        layer.keys, layer.values = layer.keys[:, :, -n_kept:], layer.values[:, :, -n_kept:]
        return output

    @contextmanager
    def __call__(self, model):
        hooks = [layer.self_attn.register_forward_hook(self.hook, with_kwargs=True) for layer in model.model.layers]
        try:
            yield
        finally:
            for handle in hooks:
                handle.remove()


SnapKVPress = StreamingLLMPress = KnormPress = TOVAPress = RandomPress = ExpectedAttentionPress = _Evict
ObservedAttentionPress = _Evict


@dataclass
class PyramidKVPress(_Evict):
    def __call__(self, model):
        raise RuntimeError("The size of tensor a (661) must match the size of tensor b (952)")


@dataclass
class AdaKVPress:
    press: object
    alpha_safeguard: float = 0.2

    @contextmanager
    def __call__(self, model):
        yield  # masking only: nothing evicted


class KeyRerotationPress:
    pass
'''


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def test_runner_loop_with_fake_kvpress(tiny_model_dir, tmp_path):
    (tmp_path / "fakes").mkdir()
    (tmp_path / "fakes" / "kvpress.py").write_text(FAKE_KVPRESS)
    context = list(range(3, 43))  # 40 tokens
    requests = [
        peer.make_request("snap", "snapkv", 0.25, context, [50, 51, 52], max_new_tokens=5),
        peer.make_request("pyr", "pyramidkv", 0.25, context, [50, 51, 52], max_new_tokens=5),
        peer.make_request("full", "full", 1.0, context, [50, 51, 52], max_new_tokens=5),
        peer.make_request("ada", "adakv", 0.25, context, [50, 51, 52], max_new_tokens=5),
        peer.make_request("qa", "snapkv", 8, context, [], max_new_tokens=4),  # question inside the context
        peer.make_request("h2o", "h2o", 0.5, context, [50], max_new_tokens=3),
        peer.make_request("snap-again", "snapkv", 0.25, context, [50, 51, 52], max_new_tokens=5),
    ]
    env_runner = tmp_path / "runner.py"  # the fake kvpress must come first on sys.path
    env_runner.write_text(
        f"import sys, runpy; sys.path.insert(0, {str(tmp_path / 'fakes')!r}); "
        f"sys.argv[0] = {str(RUNNER_PATH)!r}; runpy.run_path({str(RUNNER_PATH)!r}, run_name='__main__')\n"
    )
    lines = []
    rows = peer.run_kvpress(tiny_model_dir, requests, tmp_path / "out.jsonl", python=sys.executable,
                            runner=env_runner, progress=lines.append)
    by_id = {row["id"]: row for row in rows}
    assert [row["id"] for row in rows] == [r["id"] for r in requests]
    snap, pyr, full, ada, qa, h2o = (by_id[k] for k in ("snap", "pyr", "full", "ada", "qa", "h2o"))

    assert snap["error"] is None and 1 <= len(snap["prediction_ids"]) <= 5
    assert snap["cache_tokens_per_layer"] == [10, 10]  # floor(0.25 * 40), every layer
    assert snap["kept_tokens"] == 10 and math.isclose(snap["compression_ratio"], 1 - 10.25 / 40)
    # bytes = layers * (K + V) * kv_heads * tokens * head_dim * 4 (fp32)
    assert snap["cache_bytes"] == 2 * 2 * 2 * 10 * 8 * 4
    assert full["error"] is None and full["cache_tokens_per_layer"] == [40, 40]
    assert full["cache_bytes"] == 4 * snap["cache_bytes"] and full["compression_ratio"] is None
    assert ada["error"] is None and ada["cache_bytes"] == full["cache_bytes"]  # masking keeps full size
    assert pyr["error"].startswith("RuntimeError: The size of tensor a") and pyr["prediction_ids"] == []
    assert qa["error"] is None and qa["cache_tokens_per_layer"] == [8, 8] and 1 <= len(qa["prediction_ids"]) <= 4
    assert h2o["error"] is None and h2o["attn_implementation"] == "eager"
    assert snap["attn_implementation"] == "sdpa"
    for row in rows:
        assert set(peer.RESULT_FIELDS) <= set(row)
        assert row["peer_versions"]["transformers"]
    assert any("ERROR RuntimeError" in line for line in lines)
    assert any("done: 7 requests, 1 errors" in line for line in lines)

    # greedy and deterministic: the same request twice gives the same tokens
    assert by_id["snap-again"]["prediction_ids"] == snap["prediction_ids"]

    # with no press, prefill + explicit-position decode equals plain transformers greedy generation
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([context + [50, 51, 52]])
    out = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=2, pad_token_id=0)
    expected = out[0, ids.shape[1]:].tolist()
    assert full["prediction_ids"] == expected[: len(full["prediction_ids"])]


# --------------------------------------------------------------------------- the real peer (slow)

SMOLLM = Path("~/.cache/infercache/models/smollm2-135m").expanduser()


@pytest.mark.slow
@pytest.mark.skipif(not kvpress_env.is_ready(), reason="kvpress peer venv not built (benchmark dependency; "
                    "build it with infercache.bench.peers.kvpress_env.ensure_env())")
@pytest.mark.skipif(not (SMOLLM / "config.json").is_file(), reason="smollm2-135m not prepared")
def test_real_kvpress_on_smollm2(tmp_path):
    context = list(range(1000, 1300))
    question = [504, 314, 260, 1345, 30]
    requests = [
        peer.make_request("snap", "snapkv", 0.25, context, question, max_new_tokens=4),
        peer.make_request("ada", "adakv", 0.25, context, question, max_new_tokens=4),
        peer.make_request("full", "full", 1.0, context, question, max_new_tokens=4),
    ]
    rows = {row["id"]: row for row in peer.run_kvpress(SMOLLM, requests, tmp_path / "kv.jsonl", progress=None)}
    assert all(row["error"] is None for row in rows.values()), rows
    assert set(rows["snap"]["cache_tokens_per_layer"]) == {75}
    assert rows["snap"]["cache_bytes"] * 4 == rows["full"]["cache_bytes"]
    assert rows["ada"]["cache_bytes"] == rows["full"]["cache_bytes"]  # AdaKV only masks
    assert max(rows["ada"]["effective_tokens_per_layer"]) == pytest.approx(75)
    assert rows["snap"]["peer_versions"]["kvpress"] == "0.5.5"
