"""T2Q's labels against closed forms and hand counts, and the prompts' quantization sensitivity on
the tiny pipeline (float noise when nothing is quantized, larger at fewer bits)."""

import copy

import numpy as np
import pytest
import scipy.stats
import torch

from qlip.methods.qlip.sensitivity import per_prompt_mean, row_sensitivity
from qlip.nn import QuantConfig, quant_units
from qlip.pipeline import CalibrationConfig, QuantizeJob, quantize_pipeline
from qlip.pipeline.qlip_data import capture_trajectories
from qlip.qlip_training.labels import LabelConfig, normalized_labels, raw_scores

RNG = np.random.default_rng(0)
REAL = RNG.normal(size=(400, 3)) * [1.0, 2.0, 0.5] + [1.0, -1.0, 0.0]
GENERATED = RNG.normal(size=(5, 3))


def test_gmm_giqa_with_one_component_is_the_gaussian_log_likelihood():
    config = LabelConfig(label="giqa", giqa_components=1, giqa_pca=None)
    got = raw_scores(config, {"features": torch.from_numpy(GENERATED)}, torch.from_numpy(REAL))
    mean, cov = REAL.mean(0), np.cov(REAL.T, bias=True)  # the mixture's ML estimates
    want = scipy.stats.multivariate_normal(mean, cov).logpdf(GENERATED)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_knn_giqa_and_realism_by_hand():
    real = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 5.0]])
    features = {"features": torch.tensor([[1.0, 1.0], [0.0, 4.0]])}
    knn = raw_scores(LabelConfig(label="giqa_knn", knn_k=2), features, real)
    # L1 distances: (1,1) -> 2, 2, 5 (the two nearest: 1/2 + 1/2); (0,4) -> 4, 6, 1 (1/1 + 1/4)
    np.testing.assert_allclose(knn, [1.0, 1.25])
    realism = raw_scores(LabelConfig(label="realism", realism_k=1, realism_keep=1.0), features,
                         real)
    # 1-NN radii 2, 2, 5; (0,4): max(2/4, 2/√20, 5/1) = 5; (1,1): max(2/√2, 2/√2, 5/√17) = √2
    np.testing.assert_allclose(realism, [np.sqrt(2), 5.0])


def test_image_text_and_sensitivity_pass_through_then_rank_normalise():
    data = {"features": torch.zeros(4, 2), "image_text": torch.tensor([0.3, 0.1, 0.2, 0.1])}
    raw = raw_scores(LabelConfig(label="image_text"), data)
    np.testing.assert_allclose(raw, [0.3, 0.1, 0.2, 0.1])
    # percentile among the four: fraction of scores <= each
    np.testing.assert_allclose(normalized_labels(raw), [1.0, 0.5, 0.75, 0.5])
    sens = raw_scores(LabelConfig(label="sensitivity"), data, sensitivity=torch.tensor([2.0, 1.0]))
    np.testing.assert_allclose(sens, [2.0, 1.0])
    with pytest.raises(ValueError, match="needs real"):
        raw_scores(LabelConfig(label="giqa"), data)
    with pytest.raises(ValueError, match="--clip"):
        raw_scores(LabelConfig(label="image_text"), {"features": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="label must be one of"):
        LabelConfig(label="bogus")


def test_per_prompt_mean_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0])
    got = per_prompt_mean(values, torch.tensor([0, 1, 0, 1, 2]), 3)
    torch.testing.assert_close(got, torch.tensor([2.0, 3.5, 7.0]))
    with pytest.raises(ValueError, match="needs rows"):
        per_prompt_mean(values, torch.tensor([0, 0, 0, 2, 2]), 3)


def test_sensitivity_is_zero_unquantized_and_grows_as_bits_fall(_tiny_pipeline_template):
    pipe = copy.deepcopy(_tiny_pipeline_template)
    job = QuantizeJob(quant=QuantConfig(wbits=32, abits=32, abits_options=(4, 8, 32)),
                      calibration=CalibrationConfig(num_prompts=2, num_inference_steps=3,
                                                    num_kept_steps=2, guidance=3.0))
    quantize_pipeline(pipe, ["a red circle", "a star"], job, progress=False)
    rows, index = capture_trajectories(pipe, ["a red circle", "two big squares"], steps=3,
                                       guidance=3.0, progress=False)
    units = quant_units(pipe.unet)
    errors = {b: row_sensitivity(pipe.unet, units, rows, b) for b in (32, 8, 4)}
    # W32A32: the FP computation up to float rounding (the FP path's attention kernel differs)
    assert errors[32].max() < 1e-4 * errors[4].mean()
    assert (errors[4] > errors[8]).float().mean() > 0.9 and (errors[8] > 0).all()
    assert all(u.active_bits() == 32 for u in units.values())  # the units' bits restored
    per_prompt = per_prompt_mean(errors[4], index, 2)
    assert per_prompt.shape == (2,) and (per_prompt > 0).all()
    with pytest.raises(ValueError, match="no quantizer for 6 bits"):
        row_sensitivity(pipe.unet, units, rows, 6)


def test_the_reference_source_renders_the_training_prompts_own_scenes():
    from qlip.qlip_training.sources import REAL_RENDER_SEED, reference_source
    from qlip.world.domain import heldout_free_prompts, render_batch
    from qlip.world.evaluator import load_evaluator

    prompts = heldout_free_prompts(6, seed=0)
    source = reference_source(prompts, 64, "cpu")
    generator = torch.Generator().manual_seed(REAL_RENDER_SEED * 1_000_003 + 2)
    renders = render_batch([p.scene for p in prompts[2:5]], 64, "cpu", generator)
    evaluator = load_evaluator("cpu")
    torch.testing.assert_close(source.real_chunk(2, 5), evaluator.global_features(renders).float())
    measured = source.measure(renders, [p.text for p in prompts[2:5]])
    torch.testing.assert_close(measured["image_text"], evaluator.image_text_similarity(
        renders, [p.text for p in prompts[2:5]]).float())
    assert measured["features"].shape == (3, 256) and len(source.real_keys) == 6


def test_image_complexity_of_an_edge_by_hand():
    from qlip.metrics import image_complexity

    edge = torch.zeros(2, 3, 4, 4)
    edge[0, :, :, 2:] = 1.0  # a white right half: one unit step on each row
    edge[1, 0, :, 2:] = 1.0  # the same edge in red only: the luminance steps by 0.299
    # the [3, 3] grid of forward differences holds the step in one of its three columns
    np.testing.assert_allclose(image_complexity(edge), [1 / 3, 0.299 / 3], rtol=1e-6)
    flat = torch.full((1, 3, 5, 5), 0.7)
    assert float(image_complexity(flat)) == 0.0
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        image_complexity(torch.zeros(3, 4, 4))


def test_complexity_and_length_labels_pass_through():
    data = {"features": torch.zeros(3, 2), "complexity": torch.tensor([0.2, 0.5, 0.1])}
    np.testing.assert_allclose(raw_scores(LabelConfig(label="complexity"), data), [0.2, 0.5, 0.1])
    lengths = torch.tensor([4, 9, 6])
    np.testing.assert_allclose(raw_scores(LabelConfig(label="length"), data, lengths=lengths),
                               [4.0, 9.0, 6.0])
    with pytest.raises(ValueError, match="--redo-stale"):
        raw_scores(LabelConfig(label="complexity"), {"features": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="token counts"):
        raw_scores(LabelConfig(label="length"), data)


def test_prompt_lengths_count_tokens_with_start_and_end(tiny_pipe):
    from qlip.pipeline.prompts import prompt_lengths

    prompts = ["a red circle", "a big red circle in the top left on a white background"]
    want = [len(tiny_pipe.tokenizer(p).input_ids) for p in prompts]
    assert prompt_lengths(tiny_pipe, prompts).tolist() == want and want[1] > want[0]


def test_the_criteria_labels_on_a_users_model_need_no_real_images(tmp_path):
    from qlip.qlip_training.job import TrainQLIPConfig, label_source

    pipe = type("Pipe", (), {"unet": type("U", (), {"config": type("C", (), {"sample_size": 8})()})(),
                             "vae_scale_factor": 8})()
    for label, want in (("length", None), ("complexity", "complexity")):
        config = TrainQLIPConfig(model=str(tmp_path), labels=LabelConfig(label=label),
                                 stop_after="t2q_data", work_dir=str(tmp_path / "work"))
        source = label_source(config, pipe, None)
        assert (source if want is None else source.name) == want
    images = torch.rand(2, 3, 8, 8)
    measured = label_source(config, pipe, None).measure(images, ["a", "b"])
    assert set(measured) == {"complexity"}  # no feature network, no scorer


def test_a_cached_t2q_is_named_by_its_labels_inputs_not_by_the_scores_last_bits(tmp_path):
    """GIQA's scores come from a PCA and a GMM fitted on multi-threaded BLAS, whose last bits
    may change between runs (the fifteenth session's ablations on the H100 refused a T2Q for
    that): the cache is named by the features the scores were computed from."""
    from qlip.pipeline.cache import tensor_digest
    from qlip.qlip_training.job import TrainQLIPConfig
    from qlip.qlip_training.labels import label_inputs
    from qlip.qlip_training.t2q_stage import fit_t2q

    config = TrainQLIPConfig(stop_after="t2q", work_dir=str(tmp_path), progress=False)
    config.t2q.iters, config.t2q.progress = 5, False
    real = torch.from_numpy(REAL).float()
    data = {"features": torch.randn(40, 3, generator=torch.Generator().manual_seed(1)),
            "image_text": torch.rand(40)}
    pooled = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    inputs = label_inputs(config.labels, data, real)
    assert sorted(inputs) == ["features", "real"]  # GIQA reads neither image_text nor lengths
    raw = torch.from_numpy(raw_scores(config.labels, data, real))
    lines = []
    fit_t2q(tmp_path / "t2q", pooled, raw, normalized_labels(raw.numpy()),
            tensor_digest(inputs), config, lines.append)
    nudged = raw * (1 + 1e-12)  # the same inputs, scores that differ in their last bits
    assert not torch.equal(nudged, raw)
    fit_t2q(tmp_path / "t2q", pooled, nudged, normalized_labels(nudged.numpy()),
            tensor_digest(inputs), config, lines.append)
    assert lines[-1] == f"T2Q: reusing {tmp_path / 't2q'}"
    # the records alone (fingerprint and metrics, as collect_records.sh brought them back
    # before the twenty-second session) are not a finished T2Q: it is trained again
    (tmp_path / "t2q" / "t2q.safetensors").unlink()
    fit_t2q(tmp_path / "t2q", pooled, raw, normalized_labels(raw.numpy()),
            tensor_digest(inputs), config, lines.append)
    assert "training prompts" in lines[-1] and (tmp_path / "t2q" / "t2q.safetensors").is_file()
    fit_t2q(tmp_path / "t2q", pooled, raw, normalized_labels(raw.numpy()),
            tensor_digest(inputs), config, lines.append)
    assert lines[-1] == f"T2Q: reusing {tmp_path / 't2q'}"
    other = label_inputs(config.labels, {**data, "features": data["features"] + 1}, real)
    with pytest.raises(ValueError, match="made from other inputs"):
        fit_t2q(tmp_path / "t2q", pooled, raw, normalized_labels(raw.numpy()),
                tensor_digest(other), config, lines.append)
