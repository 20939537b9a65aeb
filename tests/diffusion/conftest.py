import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

torch.set_num_threads(1)

from infercache.diffusion import disable_cache, load_dit_digits  # noqa: E402
from infercache.diffusion.hooks import get_session  # noqa: E402


@pytest.fixture(scope="session")
def dit():
    """The trained dit-digits model and its scheduler (loaded once)."""
    return load_dit_digits()


@pytest.fixture
def model(dit):
    """dit-digits, with any cache a test enabled removed afterwards."""
    transformer, scheduler = dit
    yield transformer, scheduler
    if get_session(transformer) is not None:
        disable_cache(transformer)
