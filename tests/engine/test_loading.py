"""Named models (the registry behind ``load_pipeline``) and ``load_for_sampling`` (what the CLIs
map --quantized / --abits onto)."""

import copy

import pytest
import torch

from qlip.nn import QuantConfig, quant_units
from qlip.pipeline import (
    CalibrationConfig,
    ModelLoadError,
    PTQDScheduler,
    QuantizeJob,
    load_for_sampling,
    load_pipeline,
    loading,
    quantize_pipeline,
    register_model,
    registered_models,
)


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(loading, "_MODELS", dict(loading._MODELS))  # registrations stay local


def test_a_registered_model_loads_by_name(registry, tiny_pipe):
    asked = []

    def load_tiny(device, dtype):
        asked.append((device, dtype))
        return tiny_pipe

    register_model("tiny", load_tiny)
    assert "tiny" in registered_models() and "reference" in registered_models()
    assert load_pipeline("tiny", "cpu", torch.float64) is tiny_pipe
    assert asked == [("cpu", torch.float64)]


def test_a_loader_by_name_is_imported_on_first_use(registry, tmp_path):
    register_model("tiny-by-name", "qlip.testing:build_tiny_pipeline")
    with pytest.raises(TypeError):  # imported and called: this builder takes no device
        load_pipeline("tiny-by-name")
    register_model("missing", "qlip.testing:no_such_loader")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline("missing")
    register_model("gone", "qlip.no_such_module:load")
    with pytest.raises(ModelLoadError, match="'gone' is not available"):
        load_pipeline("gone")


def test_reference_still_loads_by_name():
    pipe = load_pipeline("reference")
    assert pipe.unet.config.sample_size > 0 and pipe.tokenizer is not None


def test_unknown_names_and_bad_registrations_get_a_message(registry, tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder.*reference"):
        load_pipeline("no-such-model")
    with pytest.raises(ValueError, match="must not look like a path"):
        register_model("org/model", "a:b")
    with pytest.raises(ValueError, match="package.module:function"):
        register_model("tiny", "qlip.testing")


def test_load_for_sampling_loads_wraps_and_chooses(tiny_pipe, _tiny_pipeline_template, tmp_path):
    assert load_for_sampling(tiny_pipe) is None and not quant_units(tiny_pipe.unet)
    with pytest.raises(ValueError, match="--abits needs --quantized"):
        load_for_sampling(tiny_pipe, None, 8)
    job = QuantizeJob(quant=QuantConfig(wbits=8, abits=8, abits_options=(8, 16)),
                      calibration=CalibrationConfig(num_prompts=1, num_inference_steps=2,
                                                    num_kept_steps=1, guidance=3.0))
    quantize_pipeline(copy.deepcopy(_tiny_pipeline_template), ["a red circle"], job,
                      tmp_path / "q", progress=False)
    policy = load_for_sampling(tiny_pipe, tmp_path / "q", 16)
    assert policy.abits == 16 and len(quant_units(tiny_pipe.unet)) > 0
    assert not isinstance(tiny_pipe.scheduler, PTQDScheduler)  # RTN: no statistics to apply
    other = copy.deepcopy(_tiny_pipeline_template)
    assert load_for_sampling(other, str(tmp_path / "q")).abits == 8  # the model's own abits
