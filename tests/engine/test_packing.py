"""4-bit weight codes are saved two per byte (format 3); format-2 folders still load."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlip.nn import QuantConfig, QuantLayer
from qlip.pipeline import CalibrationConfig, QuantizeJob, load_quantized, quantize_pipeline
from qlip.pipeline.saving import CONFIG_FILE, PACKED, STATE_FILE
from qlip.quant import pack_nibbles, unpack_nibbles

SMALL = CalibrationConfig(num_prompts=2, num_inference_steps=3, num_kept_steps=2, guidance=3.0)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 3, 3, 3), (0,)])
def test_nibble_packing_round_trips_every_code(shape):
    codes = torch.randint(16, shape, generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (codes.numel() + 1) // 2
    assert torch.equal(unpack_nibbles(packed, shape), codes)


def test_packing_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="do not fit in 4 bits"):
        pack_nibbles(torch.tensor([3, 16], dtype=torch.uint8))
    with pytest.raises(ValueError, match="not the 4-bit packing of 6 codes"):
        unpack_nibbles(torch.zeros(2, dtype=torch.uint8), (2, 3))


def _saved(pipe, folder, wbits):
    job = QuantizeJob(quant=QuantConfig(wbits=wbits, abits=8), calibration=SMALL)
    quantize_pipeline(pipe, ["a red circle", "two squares"], job, folder, progress=False)
    return load_file(folder / STATE_FILE)


def _outputs(unet):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=c).sample


def test_w4_codes_are_saved_two_per_byte_and_load_bit_identical(
        tiny_pipe, tmp_path, _tiny_pipeline_template):
    state = _saved(tiny_pipe, tmp_path / "w4", 4)
    packed = {k: v for k, v in state.items() if k.endswith(PACKED)}
    layers = [m for m in tiny_pipe.unet.modules() if isinstance(m, QuantLayer)]
    assert packed and not any(".weight_codes_" in k and not k.endswith(PACKED) for k in state)
    codes = sum(c.numel() for m in layers for c in m.weight_codes())
    assert sum(v.numel() for v in packed.values()) <= codes // 2 + len(packed)
    fresh = copy.deepcopy(_tiny_pipeline_template)
    load_quantized(fresh.unet, tmp_path / "w4")
    assert torch.equal(_outputs(fresh.unet), _outputs(tiny_pipe.unet))

    # the same folder as format 2 wrote it (one code per byte) loads to the same model
    old = {k.removesuffix(PACKED) if k.endswith(PACKED) else k: v for k, v in state.items()}
    for key in old:
        if key + PACKED in state:
            owner, _, attr = key.rpartition(".")
            shape = tiny_pipe.unet.get_submodule(owner).weight_slices()[int(attr.rsplit("_", 1)[1])].shape
            old[key] = unpack_nibbles(state[key + PACKED], shape).contiguous()
    save_file(old, tmp_path / "w4" / STATE_FILE, metadata={"format": "qlip-quantized",
                                                          "version": "2"})
    meta = json.loads((tmp_path / "w4" / CONFIG_FILE).read_text())
    (tmp_path / "w4" / CONFIG_FILE).write_text(json.dumps(meta | {"version": 2}))
    legacy = copy.deepcopy(_tiny_pipeline_template)
    load_quantized(legacy.unet, tmp_path / "w4")
    assert torch.equal(_outputs(legacy.unet), _outputs(tiny_pipe.unet))


def test_w8_codes_stay_one_per_byte(tiny_pipe, tmp_path):
    state = _saved(tiny_pipe, tmp_path / "w8", 8)
    assert not any(k.endswith(PACKED) for k in state)
    assert any(".weight_codes_" in k for k in state)


def _w4_model(tiny_pipe, tmp_path, template):
    """(the quantized tiny UNet as calibrated, a fresh copy loaded from its folder and packed)."""
    from qlip.pipeline import load_for_sampling

    _saved(tiny_pipe, tmp_path / "w4", 4)
    packed = copy.deepcopy(template)
    load_for_sampling(packed, tmp_path / "w4", packed_weights=True)
    return tiny_pipe.unet, packed.unet


def test_packed_weights_give_the_same_outputs_in_a_quarter_of_the_bytes(
        tiny_pipe, tmp_path, _tiny_pipeline_template):
    from qlip.nn import tensor_bytes

    plain, packed = _w4_model(tiny_pipe, tmp_path, _tiny_pipeline_template)
    layers = [m for m in packed.modules() if isinstance(m, QuantLayer)]
    assert layers and all(m.packed for m in layers)
    assert torch.equal(_outputs(packed), _outputs(plain))  # the same dequantized weights
    for m in layers:
        weight = m.weight
        assert weight.untyped_storage().nbytes() == weight.element_size()  # one element
        nibbles = sum(b.numel() for n, b in m.named_buffers() if n.startswith("weight_nibbles_"))
        assert nibbles == sum((c.numel() + 1) // 2 for c in m.weight_codes())
        assert m.quantized_weight().shape == weight.shape and m._qweight is None
    # what the layers held as FP weights (and their dequantized cache) is gone
    fp_weights = sum(m.weight.numel() * 4 for m in plain.modules() if isinstance(m, QuantLayer))
    assert tensor_bytes(packed) < tensor_bytes(plain) - fp_weights

    # a dtype or device move keeps the placeholder at one element and the outputs equal
    wide_plain, wide_packed = copy.deepcopy(plain).double(), copy.deepcopy(packed).double()
    for m in wide_plain.modules():  # dequantized again in float64, as the packed layers do
        if isinstance(m, QuantLayer):
            m.refresh_weight()
    assert all(m.weight.dtype == torch.float64 and m.weight.untyped_storage().nbytes() == 8
               for m in wide_packed.modules() if isinstance(m, QuantLayer))
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g).double(), torch.randn(2, 16, 32, generator=g).double()
    with torch.no_grad():
        assert torch.equal(wide_packed(x, 10, encoder_hidden_states=c).sample,
                           wide_plain(x, 10, encoder_hidden_states=c).sample)
    assert packed.device == plain.device and packed.dtype == plain.dtype


def test_a_packed_model_compiles_into_one_graph(tiny_pipe, tmp_path, _tiny_pipeline_template):
    """A packed layer dequantizes its codes in every forward without reading the device (its
    quantizers were checked when it was packed): a host read there would break the graph, as it
    did for the SD 1.4 UNet's stride-2 convs on an H100."""
    plain, packed = _w4_model(tiny_pipe, tmp_path, _tiny_pipeline_template)
    compiled = torch.compile(packed, backend="eager", fullgraph=True)
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():  # fullgraph=True raises on a graph break
        assert torch.equal(compiled(x, 10, encoder_hidden_states=c).sample,
                           plain(x, 10, encoder_hidden_states=c).sample)


def test_packing_refuses_an_uncalibrated_quantizer(tiny_pipe, tmp_path, _tiny_pipeline_template):
    plain, _ = _w4_model(tiny_pipe, tmp_path, _tiny_pipeline_template)
    layer = next(m for m in plain.modules() if isinstance(m, QuantLayer) and m.wbits == 4)
    layer.weight_quantizers[0].calibrated.zero_()
    with pytest.raises(RuntimeError, match="never calibrated"):
        layer.pack_weights()
    assert not layer.packed


def test_a_packed_model_saves_the_same_folder_and_refuses_calibration(
        tiny_pipe, tmp_path, _tiny_pipeline_template):
    from qlip.pipeline.saving import QuantizedInfo, read_state, save_quantized

    plain, packed = _w4_model(tiny_pipe, tmp_path, _tiny_pipeline_template)
    config = QuantConfig.from_dict(json.loads((tmp_path / "w4" / CONFIG_FILE).read_text())
                                   ["quant_config"])
    save_quantized(packed, QuantizedInfo(config, "rtn", {}, "tiny"), tmp_path / "again")
    before, after = read_state(tmp_path / "w4"), read_state(tmp_path / "again")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    layer = next(m for m in packed.modules() if isinstance(m, QuantLayer))
    with pytest.raises(RuntimeError, match="packed"):
        layer.calibrate_weight()


def test_w8_layers_are_not_packed_and_packing_needs_codes(tiny_pipe, tmp_path):
    from qlip.nn import pack_weights

    _saved(tiny_pipe, tmp_path / "w8", 8)
    assert pack_weights(tiny_pipe.unet) == 0
    assert not any(m.packed for m in tiny_pipe.unet.modules() if isinstance(m, QuantLayer))
    layer = next(m for m in tiny_pipe.unet.modules() if isinstance(m, QuantLayer))
    layer.wbits = 4
    for i in range(len(layer.splits)):
        del layer._buffers[f"weight_codes_{i}"]
    with pytest.raises(ValueError, match="fixed to integer codes"):
        layer.pack_weights()


def test_real_kernels_make_a_loaded_model_channels_last_packed_and_real(
        tiny_pipe, tmp_path, _tiny_pipeline_template):
    """``--real-kernels`` (``prepare_real_kernels``): the layout first (a packed weight is a
    placeholder no layout change may copy), then the codes two per byte, then every layer that
    can switched to real execution, the packed 3×3 convs on their own tap-major bytes. On the
    CPU the forward stays the simulation (the kernels need a GPU or the interpreter), so the
    outputs equal the packed model's."""
    from qlip.pipeline.quantized_model import prepare_real_kernels

    plain, packed = _w4_model(tiny_pipe, tmp_path, _tiny_pipeline_template)
    real = copy.deepcopy(plain)
    switched = prepare_real_kernels(real, packed_weights=True)
    layers = [m for m in real.modules() if isinstance(m, QuantLayer)]
    assert switched == sum(m._real is not None for m in layers) > 0
    assert all(m.packed and m.weight.untyped_storage().nbytes() == m.weight.element_size()
               for m in layers)
    convs = [m for m in layers if m.kind == "conv2d" and tuple(m.kernel_size) == (3, 3)
             and m._real is not None]
    assert convs and all(m._real_tap_major for m in convs)
    for m in convs:  # the bytes real execution reads are the layer's own buffer
        assert (m._real[2].untyped_storage().data_ptr()
                == m._buffers["weight_nibbles_0"].untyped_storage().data_ptr())
    assert torch.equal(_outputs(real), _outputs(packed))
    # unpacked, real execution frees the simulation's dequantized weights (rebuilt on demand)
    unpacked = copy.deepcopy(plain)
    _outputs(unpacked)  # a simulated forward: every layer caches its dequantized weight
    assert prepare_real_kernels(unpacked) == switched
    assert all(m._qweight is None for m in unpacked.modules()
               if isinstance(m, QuantLayer) and m._real is not None)
    # (on the CPU the simulation runs again: the same outputs as the model made channels-last)
    assert torch.equal(_outputs(unpacked),
                       _outputs(copy.deepcopy(plain).to(memory_format=torch.channels_last)))
