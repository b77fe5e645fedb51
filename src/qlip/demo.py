"""`qlip demo`: quantize a model (RTN W8A8 and W4A8), generate prompts of rising richness in FP and
quantized, print a table and write an image grid."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_PROMPTS = [
    "a circle",
    "a red circle",
    "a small red circle at the top left",
    "a small red circle at the top left and a large blue square at the bottom right",
    "a small red circle at the top left, a large blue square at the bottom right "
    "and a yellow triangle in the center, on a white background",
]
SETTINGS = [("FP", None, None), ("RTN W8A8", 8, 8), ("RTN W4A8", 4, 8)]


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded reference world")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=run_demo)


def _load_model(device: str):
    """The reference pipeline if this install has it, else a tiny random one built on the fly."""
    from .pipeline import ModelLoadError, load_pipeline

    try:
        return load_pipeline("reference", device), "reference"
    except ModelLoadError as err:
        print(f"note: {err}; using a tiny random pipeline built on the fly")
        from .testing import build_tiny_pipeline

        return build_tiny_pipeline(Path(tempfile.mkdtemp())).to(device), "tiny-random"


def save_grid(rows: list[list[Image.Image]], path: Path) -> None:
    h, w = rows[0][0].height, rows[0][0].width
    grid = np.zeros((h * len(rows), w * len(rows[0]), 3), dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = np.asarray(image.convert("RGB"))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def run_demo(args) -> int:
    import copy

    from .cli import _device
    from .nn import QuantConfig
    from .pipeline import CalibrationConfig, GenerationConfig, QuantizeJob, generate
    from .pipeline.quantize import quantize_pipeline

    device = _device(args.device)
    base, name = _load_model(device)
    prompts = DEMO_PROMPTS
    seeds = [args.seed] * len(prompts)
    gen = GenerationConfig(steps=args.steps, guidance=args.guidance, batch_size=len(prompts),
                           truncate=True)
    out = Path(args.out)
    rows, table = [], []
    for label, wbits, abits in SETTINGS:
        pipe = copy.deepcopy(base)
        if wbits is not None:
            job = QuantizeJob(
                quant=QuantConfig(wbits=wbits, abits=abits),
                calibration=CalibrationConfig(num_prompts=8, num_inference_steps=args.steps,
                                              num_kept_steps=5, guidance=args.guidance),
                base_model=name,
            )
            quantize_pipeline(pipe, prompts + prompts[::-1], job, out / f"w{wbits}a{abits}")
        result = generate(pipe, prompts, seeds, config=gen)
        rows.append(result.images)
        table.extend((label, r) for r in result.reports)
    save_grid(rows, out / "grid.png")
    print(f"\nmodel: {name}\n{'setting':<10} {'FAB':>6} {'BitOPs(T)':>10}  prompt")
    for label, r in table:
        print(f"{label:<10} {r.fab:6.2f} {r.bitops_t:10.4f}  {r.prompt[:70]}")
    print(f"\ngrid (rows: {', '.join(s[0] for s in SETTINGS)}; columns: prompts) -> {out / 'grid.png'}")
    return 0
