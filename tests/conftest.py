import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """Tiny random-init models by architecture (cached for the session)."""
    from infercache.models import load

    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load(f"tiny-random-{arch}")
        return cache[arch]

    return get
