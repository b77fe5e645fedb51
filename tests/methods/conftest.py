"""The method tests run many small ops on a tiny UNet: one torch thread (see the root conftest)."""

import pytest

from ..conftest import single_torch_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(single_torch_thread)
