"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture
def keep_threads():
    """Restore torch's CPU thread count after a test that changes it (benchmarks pick their own)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
