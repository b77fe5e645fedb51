"""benchmarks/collect_records.sh: what a device call brings back. FEATURES carries each named
eval's features, metrics, settings and, where the eval has them, its bits (what a random-matched
control draws from); records leave the generated images out."""

import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "collect_records.sh"


def _touch(path: Path, size: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def test_features_carry_the_bits_and_records_leave_images_out(tmp_path):
    run = tmp_path / "run"
    for name in ("features.safetensors", "metrics.json", "settings.json", "bits.safetensors",
                 "images/00000.png", "grid.png"):
        _touch(run / "eval_qlip" / name)
    for name in ("features.safetensors", "metrics.json", "settings.json"):  # FP: no bits
        _touch(run / "eval_fp" / name)
    _touch(run / "eval_other" / "features.safetensors")
    for name in ("q2b_ckpt.safetensors", "trajectories/chunk_0000000.safetensors"):
        _touch(run / "qlip_work" / "q2b_x" / name)
    dest = tmp_path / "out"
    subprocess.run(["bash", str(SCRIPT), str(run), str(dest)], check=True, capture_output=True,
                   env={"FEATURES": "eval_qlip eval_fp", "PATH": "/usr/bin:/bin"})
    with tarfile.open(dest / "features.tgz") as tar:
        got = {Path(n).relative_to(run.relative_to("/")).as_posix() for n in tar.getnames()}
    assert got == {"eval_qlip/features.safetensors", "eval_qlip/metrics.json",
                   "eval_qlip/settings.json", "eval_qlip/bits.safetensors",
                   "eval_fp/features.safetensors", "eval_fp/metrics.json", "eval_fp/settings.json"}
    with tarfile.open(dest / "records.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert "grid.png" in names and "metrics.json" in names
    assert "00000.png" not in names and "bits.safetensors" not in names
    # a cut Q2B training's checkpoint travels (it resumes from it), the FP trajectories do not
    assert "q2b_ckpt.safetensors" in names and "chunk_0000000.safetensors" not in names


def test_models_only_packs_the_named_folders(tmp_path):
    run = tmp_path / "run"
    for folder in ("q_bank", "q_qlip", "eval_fp"):
        _touch(run / folder / ("features.safetensors" if folder.startswith("eval") else
                               "quant_config.json"))
    dest = tmp_path / "out"
    subprocess.run(["bash", str(SCRIPT), str(run), str(dest)], check=True, capture_output=True,
                   env={"MODELS": "1", "ONLY": "q_qlip eval_fp", "PATH": "/usr/bin:/bin"})
    assert sorted(p.name for p in dest.glob("state_*")) == ["state_eval_fp.tgz",
                                                             "state_q_qlip.tgz"]
    subprocess.run(["bash", str(SCRIPT), str(run), str(tmp_path / "all")], check=True,
                   capture_output=True, env={"MODELS": "1", "PATH": "/usr/bin:/bin"})
    assert len(list((tmp_path / "all").glob("state_*"))) == 3  # without ONLY: every folder
