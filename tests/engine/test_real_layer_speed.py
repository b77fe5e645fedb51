"""benchmarks/real_layer_speed.py groups a UNet's real layers by kind and shapes (the timing itself
needs a GPU), and its totals weight each row by how many layers share it."""

import argparse

import pytest
import torch

from ..conftest import load_benchmark, unet_inputs


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("real_layer_speed")


def test_every_real_layer_falls_in_one_row(bench, tiny_pipe):
    from qlip.methods.calib_data import CalibrationSet
    from qlip.methods.rtn import quantize_rtn
    from qlip.nn import QuantConfig, use_real_execution
    from qlip.pipeline import prepare_unet
    from qlip.quant import real_gemm as rg

    unet = tiny_pipe.unet
    units = prepare_unet(unet, QuantConfig(wbits=4, abits=8))
    x, t, c = unet_inputs(unet, 2, seed=1)
    quantize_rtn(unet, units, CalibrationSet(x, t.float(), c, torch.zeros(2, dtype=torch.long)),
                 progress=False)
    switched = use_real_execution(unet)
    rows = bench.record_inputs(unet, lambda: unet(x, t, encoder_hidden_states=c))
    assert sum(r["count"] for r in rows.values()) == switched > 0
    # the downsamplers, 3×3 convs of stride 2, in rows of their own
    assert {r["kind"] for r in rows.values()} == {"linear", "conv1x1", "conv3x3", "conv3x3s2"}
    for r in rows.values():  # each row's layer and input have the row's shapes
        assert list(r["x"].shape) == r["input"] and list(r["layer"].weight.shape) == r["weight"]
        assert r["kind"] == bench.layer_kind(r["layer"])
        # int8 3×3 convs keep their codes tap-major; the weight-order call reads them as before
        assert r["layer"]._real_tap_major == r["kind"].startswith("conv3x3")
        # W4 codes come centered (no zero points); the row-sum call takes the full bracket
        # on the same codes, with zero points of 0
        real, summed = r["layer"]._real, bench.row_sum_operands(r["layer"])
        assert real[4] is None and rg.zero_mode(real[2], real[4]) == 0
        assert summed[2] is real[2] and rg.zero_mode(summed[2], summed[4]) == 2
        assert not summed[4].any()
    assert all(not m._forward_hooks for m in unet.modules())  # the hooks are gone


def test_totals_weight_rows_by_their_count(bench):
    rows = [{"kind": "linear", "count": 3, "real": 1.0, "bf16": 0.5, "simulated": 2.0},
            {"kind": "conv3x3", "count": 2, "real": 4.0, "bf16": 1.0, "simulated": 3.0,
             "real_weight_order": 5.0, "real_row_sums": 4.5}]
    got = bench.totals(rows)
    assert got["linear"] == {"real": 3.0, "bf16": 1.5, "simulated": 6.0}
    assert got["conv3x3"] == {"real": 8.0, "real_weight_order": 10.0, "real_row_sums": 9.0,
                              "bf16": 2.0, "simulated": 6.0}
    assert got["all"] == {"real": 11.0, "bf16": 3.5, "simulated": 12.0}


def test_extra_ways_are_chosen_by_name(bench):
    assert bench.extra_ways("all") == bench.EXTRA and bench.extra_ways("none") == ()
    assert bench.extra_ways("real_row_sums,real_weight_order") == ("real_row_sums",
                                                                  "real_weight_order")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown ways.*real_row_sum"):
        bench.extra_ways("real_row_sum")


def test_graph_timing_spreads_a_replay_over_its_calls(bench):
    """The default timing: GRAPH_REPEAT calls in one captured graph, each replay's time divided
    by them (the host's launches not counted)."""
    calls = []

    def fake_graph_replay(step, warmup, iters):  # what sd14_unet_step.graph_replay returns
        step()
        return {"median_ms": 5.0, "min_ms": 4.0, "iters": iters, "times": [5.0] * iters}

    got = bench.replayed(lambda: calls.append(1), 2, 7, fake_graph_replay)
    assert len(calls) == bench.GRAPH_REPEAT
    assert got == {"median_ms": 5.0 / bench.GRAPH_REPEAT, "min_ms": 4.0 / bench.GRAPH_REPEAT,
                   "iters": 7}
