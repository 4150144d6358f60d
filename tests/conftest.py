"""Shared test settings: one torch thread for the whole session, and the `--runslow` option.

One thread: the models under test are tiny; intra-op threads only add hand-offs, and on a loaded
2-core machine OpenMP contention made each small conv about 50x slower. Tests marked `slow` are
skipped unless `--runslow` is given."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (long benchmarks)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
