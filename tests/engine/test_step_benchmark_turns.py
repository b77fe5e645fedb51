"""benchmarks/sd14_unet_step.py's variants take turns measuring (one GPU, one variant at a time);
a variant still compiling must not hold the others (on an H100 the real variants' first calls
ran past the step's time limit and nothing was measured)."""

import time
from argparse import Namespace

import pytest

from ..conftest import load_benchmark


@pytest.fixture(scope="module")
def step_module():
    return load_benchmark("sd14_unet_step")


def _args(folder, index, barrier_s=30.0):
    return Namespace(sync_dir=str(folder), processes=3, index=index, barrier_s=barrier_s,
                     variants="bf16,w4a8_layers_real,w4a8_layers")


def test_a_variant_still_compiling_is_skipped_and_measures_late(step_module, tmp_path):
    Turn = step_module._Turn
    (tmp_path / "ready-bf16").touch()
    (tmp_path / "ready-w4a8_layers").touch()  # w4a8_layers_real (index 1) is still compiling
    start = time.time()
    order = []
    # places: round 0 is index 0, 1, 2; round 1 is rotated by one: index 2, 0, 1
    for r, index in ((0, 0), (0, 2), (1, 2), (1, 0)):  # the ready ones, each in its order
        with Turn(_args(tmp_path, index), r) as turn:
            order.append((r, index, turn.late))
    assert time.time() - start < 5  # no wait of barrier_s (30 s) for the missing variant
    assert not any(late for *_, late in order)
    assert Turn(_args(tmp_path, 0), 0)._read() == 5  # index 0's round-1 turn (place 4) passed on
    # the slow variant, ready now, takes its round-0 turn out of turn, at once
    (tmp_path / "ready-w4a8_layers_real").touch()
    start = time.time()
    with Turn(_args(tmp_path, 1), 0) as turn:
        assert turn.late
    assert time.time() - start < 5


def test_a_ready_variant_is_waited_for(step_module, tmp_path):
    """A turn whose variant is ready (compiled, measuring) is not skipped: the next waits."""
    Turn = step_module._Turn
    for name in ("bf16", "w4a8_layers_real", "w4a8_layers"):
        (tmp_path / f"ready-{name}").touch()
    start = time.time()
    with Turn(_args(tmp_path, 1, barrier_s=0.5), 0) as turn:  # place 1: index 0 has not gone
        assert not turn.late
    assert time.time() - start >= 0.5  # it waited its whole deadline
    assert Turn(_args(tmp_path, 0), 0)._read() == 2  # and passed the counter on after its turn
