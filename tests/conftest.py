"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture
def keep_threads():
    """Restore torch's CPU thread count after a test that changes it (benchmarks pick their own)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests on tiny nets (extra threads only add contention on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
