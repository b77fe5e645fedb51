"""Every kind of file qlip reads, truncated, replaced by random bytes or foreign: the error names
the file and says how to make it again (never a bare SafetensorError, JSONDecodeError or
TypeError)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from qlip.files import CorruptFileError

DAMAGES = ("truncated", "random", "foreign")


def _damage(path, damage: str) -> None:
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(max(len(data), 64)))
    elif path.suffix == ".json":  # foreign: valid JSON, not ours
        path.write_text(json.dumps({"format": "someone-else", "version": 1}))
    else:  # foreign: a valid safetensors file of someone else's
        from safetensors.torch import save_file

        save_file({"weight": torch.zeros(3)}, str(path), metadata={"format": "someone-else"})


def _expect(path, fn, *remedy: str) -> None:
    """``fn()`` refuses with a message naming ``path`` and saying what to do."""
    with pytest.raises((CorruptFileError, ValueError)) as info:
        fn()
    message = str(info.value)
    assert str(path) in message, message
    for needle in remedy:
        assert needle in message, message


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["quant_config.json", "quant_state.safetensors"])
def test_quantized_model_files(quantized, tmp_path, name, damage):
    from qlip.pipeline.saving import check_quantized_folder

    folder = tmp_path / "q"
    shutil.copytree(quantized, folder)
    _damage(folder / name, damage)
    _expect(folder / name, lambda: check_quantized_folder(folder), "quantize the model again")


@pytest.mark.parametrize("damage", DAMAGES)
def test_calibration_cache_is_named_and_captured_anew(quantized, tmp_path, damage, capsys):
    from qlip.methods.calib_data import CalibrationSet
    from qlip.pipeline.quantize import _reusable

    cache = tmp_path / "calibration.safetensors"
    shutil.copy(quantized / "calibration.safetensors", cache)
    _damage(cache, damage)
    if damage != "foreign":
        _expect(cache, lambda: CalibrationSet.load(cache), "captured anew")
    assert not _reusable(cache, {"model": "x"})  # quantize then captures it again
    assert str(cache) in capsys.readouterr().err


def _qlip_folder(tmp_path):
    from qlip.methods.qlip import Q2B, T2Q, Q2BConfig, QLIPModules, save_qlip

    torch.manual_seed(0)
    modules = QLIPModules(T2Q(8, 4), Q2B(3, 2, Q2BConfig(bits=(4, 8, 16))), ["a", "b", "c"])
    return save_qlip(modules, tmp_path / "qlip")


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["qlip.json", "qlip.safetensors"])
def test_qlip_modules(tmp_path, name, damage):
    from qlip.methods.qlip import load_qlip

    folder = _qlip_folder(tmp_path)
    _damage(folder / name, damage)
    _expect(folder / name if damage != "foreign" or name == "qlip.json" else folder / "qlip.json",
            lambda: load_qlip(folder), "train-qlip")


def _eval_folder(tmp_path):
    from PIL import Image

    from qlip.evaluation.store import ImageStore

    store = ImageStore(tmp_path / "eval")
    store.add_batch([0, 1], [Image.new("RGB", (8, 8))] * 2, [{"prompt": "a", "seed": 0}] * 2)
    store.check_settings({"steps": 2})
    return store


@pytest.mark.parametrize("damage", DAMAGES)
def test_eval_records_damaged_lines_are_said_and_regenerated(tmp_path, damage, capsys):
    from qlip.evaluation.store import ImageStore

    store = _eval_folder(tmp_path)
    _damage(store.index_file, damage)
    again = ImageStore(store.root)
    if damage == "truncated":  # cut after its first line: the second image has no record
        assert again.missing(2) == [1]
    else:
        assert again.missing(2) == [0, 1]
        err = capsys.readouterr().err
        assert str(store.root) in err and "is not a record" in err and "generated again" in err


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_eval_settings(tmp_path, damage):
    store = _eval_folder(tmp_path)
    path = store.root / "settings.json"
    _damage(path, damage)
    _expect(path, lambda: store.check_settings({"steps": 2}), "delete it")


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind", ["GMMGIQA", "KNNGIQA"])
def test_giqa_models(tmp_path, kind, damage):
    from qlip.metrics import giqa

    cls = getattr(giqa, kind)
    model = (cls(n_components=2) if kind == "GMMGIQA" else cls(k=2)).fit(
        torch.randn(40, 6, generator=torch.Generator().manual_seed(0)))
    path = tmp_path / "giqa.safetensors"
    model.save(path)
    _damage(path, damage)
    _expect(path, lambda: cls.load(path), "fit the GIQA model again")


@pytest.mark.parametrize("damage", DAMAGES)
def test_run_features_and_bits(tmp_path, damage):
    from qlip.evaluation.run_features import RunFeatures, load_run_features
    from qlip.pipeline.generate import read_bits, save_bits

    run = RunFeatures({"generated": {"global": np.ones((2, 3))}}, {"fab": np.ones(2)},
                      {"richness": np.zeros(2, int)}, {"num_images": "2"})
    path = run.save(tmp_path)
    _damage(path, damage)
    if damage != "foreign":
        _expect(path, lambda: load_run_features(tmp_path), "run `qlip eval` again")
    bits = tmp_path / "bits.safetensors"
    save_bits(bits, np.full((1, 2, 3), 8), np.full((1, 2, 3), 8), ["a", "b", "c"])
    _damage(bits, damage)
    _expect(bits, lambda: read_bits(bits), "generate the images again")


@pytest.mark.parametrize("damage", DAMAGES)
def test_cache_fingerprints_and_chunks(tmp_path, damage):
    from qlip.pipeline.cache import FINGERPRINT_FILE, ChunkStore, claim

    def compute(a, b):
        return {"x": torch.arange(a, b)}

    store = ChunkStore(tmp_path / "c", {"steps": 2}, chunk=2)
    store.run(["p", "q", "r"], compute, progress=False)
    chunk = store.path(0)
    _damage(chunk, damage)
    if damage != "foreign":
        _expect(chunk, lambda: store.run(["p", "q", "r"], compute, progress=False), "delete it")
    fingerprint = tmp_path / "c" / FINGERPRINT_FILE
    _damage(fingerprint, damage)
    if damage != "foreign":
        _expect(fingerprint, lambda: claim(tmp_path / "c", {"steps": 2}), "delete")
    else:  # valid JSON of other inputs: the stale-cache refusal names what differs
        _expect(tmp_path / "c", lambda: claim(tmp_path / "c", {"steps": 2}), "--redo-stale")


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_q2b_checkpoint(tmp_path, damage):
    from qlip.methods.qlip import Q2B, Q2BConfig
    from qlip.methods.qlip.train import CHECKPOINT_FILE, _Checkpoint

    q2b = Q2B(3, 2, Q2BConfig(bits=(4, 8, 16)))
    optimizer = torch.optim.Adam(q2b.parameters())
    sum(p.sum() for p in q2b.parameters()).backward()
    optimizer.step()  # Adam has moments to keep
    checkpoint = _Checkpoint(tmp_path)
    checkpoint.save(q2b, optimizer, [{"loss": 1.0}])
    assert checkpoint.load(q2b, optimizer) == [{"loss": 1.0}]
    _damage(tmp_path / CHECKPOINT_FILE, damage)
    _expect(tmp_path / CHECKPOINT_FILE, lambda: checkpoint.load(q2b, optimizer),
            "train Q2B from its start")


def test_reconstruction_checkpoint_corrupt_is_named(tmp_path):
    from qlip.methods.brecq import _checkpoint_matches

    path = tmp_path / "000-conv_in.safetensors"
    path.write_bytes(os.urandom(100))
    _expect(path, lambda: _checkpoint_matches(path, "{}"), "reconstructed again")
