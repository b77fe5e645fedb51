"""Tiny-UNet QLIP tests: one torch thread (many small ops; other jobs share the CPU)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
