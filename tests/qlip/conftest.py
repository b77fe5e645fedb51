"""Tiny-UNet QLIP tests run on one torch thread (many small ops; other jobs share the CPU)."""

import pytest

from ..conftest import single_torch_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(single_torch_thread)
