"""The method tests run many small ops on a tiny UNet: one torch thread is faster for them, and
stays fast when other jobs share the CPU (spinning OpenMP workers do not)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
