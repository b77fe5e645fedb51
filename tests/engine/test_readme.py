"""The README's Python snippet runs as written, on a tiny random pipeline standing in for the
Stable Diffusion folder it loads (``from_pretrained`` is the only thing replaced)."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_snippet_runs_as_written(tiny_pipe, tmp_path, monkeypatch, capsys):
    from diffusers import StableDiffusionPipeline

    import qlip

    blocks = _python_blocks()
    assert len(blocks) == 1
    loaded = []
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, path, **kw: loaded.append(path) or tiny_pipe))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert loaded == ["./stable-diffusion-v1-4"]
    fab, bitops, steps = capsys.readouterr().out.split()
    assert (float(fab), int(steps)) == (8.0, 25) and float(bitops) > 0
    assert (tmp_path / "runs" / "sd14-w4a8" / "quant_config.json").is_file()
    a8, a4 = (np.asarray(namespace[k]) for k in ("image", "image_a4"))
    assert not np.array_equal(a8, a4)  # pipe.qlip.use(4) reached the units
    assert not hasattr(tiny_pipe, "qlip") and not qlip.nn.quant_units(tiny_pipe.unet)
