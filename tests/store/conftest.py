"""Shared fixtures for the KV store tests: a namespace, KV factories and a real redis-server when available."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from infercache.store import Namespace

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


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def closed_redis_url() -> str:
    """A redis:// URL on a loopback port where nothing listens (Redis is down)."""
    return f"redis://127.0.0.1:{free_port()}/0"


class RedisServer:
    """A throwaway ``redis-server`` on loopback, without persistence, working in ``folder``."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"redis-server did not answer on port {self.port} within 15 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server when the binary is on PATH (CI installs it), else the test is skipped."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
