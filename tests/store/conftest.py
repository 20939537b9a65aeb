"""Shared fixtures for the KV store tests: a namespace, KV factories and a real redis-server when available."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from infercache.store import Namespace
from infercache.store.local_redis import LocalRedis, free_port

torch.set_num_threads(1)

LAYERS, HEADS, HEAD_DIM = 3, 2, 8


@pytest.fixture
def namespace() -> Namespace:
    return Namespace(model_id="tiny-llama", weights_hash="w" * 64, dtype="float32", num_layers=LAYERS,
                     num_kv_heads=HEADS, head_dim=HEAD_DIM, rope={"rope_type": "default", "rope_theta": 10000.0},
                     tokenizer_hash="t" * 64)


KVFactory = Callable[..., list[tuple[torch.Tensor, torch.Tensor]]]


@pytest.fixture
def make_kv() -> KVFactory:
    """``make_kv(tokens, dtype=float32, layers=3, heads=2, dim=8, seed=0)`` -> per-layer (K, V) ``[H, T, D]``."""

    def build(tokens: int, dtype: torch.dtype = torch.float32, layers: int = LAYERS, heads: int = HEADS,
              dim: int = HEAD_DIM, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        return [(torch.randn(heads, tokens, dim, generator=generator).to(dtype),
                 torch.randn(heads, tokens, dim, generator=generator).to(dtype)) for _ in range(layers)]

    return build


@pytest.fixture
def closed_redis_url() -> str:
    """A redis:// URL on a loopback port where nothing listens (Redis is down)."""
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    """A real redis-server when the binary is on PATH (CI installs it), else the test is skipped."""
    if not LocalRedis.available():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = LocalRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
