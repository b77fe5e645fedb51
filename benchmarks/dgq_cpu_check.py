"""A CPU check of DGQ on the reference model: mean squared difference to the FP image of the same
prompt and seed (values in [-1, 1]) at A4, A5, A6, A8 with W8 weights, for Q-Diffusion's
activations and DGQ with g = 1, 8, 16 (and g = 8 with a uniform 16-bit softmax, no start token:
the grouping without DGQ's attention), plus each calibration's wall time. Weights: the mse grid
without AdaRound (``--recon-iters 0``: at W8 the reconstruction changes little and costs most of
the CPU time). Writes JSON lines to OUT/results.jsonl (a rerun skips finished rows).

    python benchmarks/dgq_cpu_check.py OUT [--num-images 32] [--only dgq_g8_uniform16]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from qlip.methods.brecq import ReconstructionConfig
from qlip.methods.dgq import DGQConfig
from qlip.methods.qdiffusion import QDiffusionConfig
from qlip.nn import QuantConfig
from qlip.pipeline import (
    CalibrationConfig,
    GenerationConfig,
    QuantizeJob,
    generate,
    load_pipeline,
    quantize_pipeline,
)
from qlip.policies import FixedBits
from qlip.world.domain import heldout_prompts, training_prompts

BANK = (4, 5, 6, 8)
DGQ = dict(preset="dgq", softmax_quantizer="log2", softmax_follows_abits=True,
           keep_start_token=True)
RUNS = {
    "qdiffusion": ("qdiffusion", {}),
    "dgq_g1": ("dgq", DGQ | {"act_groups": 1}),
    "dgq_g8": ("dgq", DGQ | {"act_groups": 8}),
    "dgq_g16": ("dgq", DGQ | {"act_groups": 16}),
    "dgq_g8_uniform16": ("dgq", {"preset": "dgq", "act_groups": 8}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), default=list(RUNS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {json.loads(line)["run"] for line in results.read_text().splitlines()} \
        if results.is_file() else set()
    base = load_pipeline("reference", "cpu")
    pool = heldout_prompts()
    order = np.random.default_rng(0).permutation(len(pool))  # `qlip eval`'s held-out order
    prompts = [pool[i].text for i in order[: args.num_images]]
    seeds = list(range(len(prompts)))
    gen = GenerationConfig(steps=25, guidance=4.0, batch_size=32)

    def images(pipe, policy):
        result = generate(pipe, prompts, seeds, policy, gen, progress=False)
        return np.stack([np.asarray(i, dtype=np.float32) / 127.5 - 1 for i in result.images])

    fp = images(base, None)
    calibration = CalibrationConfig(num_prompts=32, num_inference_steps=25, num_kept_steps=25,
                                    guidance=4.0)
    recon = ReconstructionConfig(iters=0)
    calib_prompts = [p.text for p in training_prompts(32, 0)]
    for name in args.only:
        if name in done:
            continue
        method, fields = RUNS[name]
        pipe = copy.deepcopy(base)
        job = QuantizeJob(method=method, calibration=calibration,
                          quant=QuantConfig(wbits=8, abits=8, abits_options=BANK, **fields),
                          qdiffusion=QDiffusionConfig(reconstruction=recon),
                          dgq=DGQConfig(reconstruction=recon))
        start = time.time()
        quantize_pipeline(pipe, calib_prompts, job, None, progress=False,
                          calibration_cache=out / "calibration.safetensors")
        row = {"run": name, "calibration_s": round(time.time() - start, 1),
               "num_images": len(prompts), "mse_vs_fp": {}}
        for abits in BANK:
            row["mse_vs_fp"][abits] = round(float(((images(pipe, FixedBits(abits)) - fp) ** 2)
                                                  .mean()), 5)
        print(json.dumps(row), flush=True)
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
