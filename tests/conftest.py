"""Shared test settings: one torch thread for the whole session. The models under test are tiny:
intra-op threads only add hand-offs, and on a loaded 2-core machine OpenMP contention made each
small conv about 50x slower."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
