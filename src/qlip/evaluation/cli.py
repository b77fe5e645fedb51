"""`qlip eval`: thin; each flag maps onto EvalConfig or onto what measures the images."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from ..metrics.bootstrap import BootstrapConfig
from ..quant import check_bits
from .harness import EvalConfig, EvalPrompt, run_evaluation
from .measures import check_real_set, folder_measures, reference_measures
from .shard import Shard

HELDOUT = "heldout"


def add_eval_parser(sub) -> None:
    from ..cli_args import add_execution_args as _add_execution_args
    from ..cli_args import add_model_args as _add_model_args
    from ..cli_args import bits_arg as _bits
    from ..cli_args import finite_float, int_at_least, torch_device_name

    p = sub.add_parser("eval", help="generate N images and measure FID, sFID, CLIP score, GIQA...")
    _add_model_args(p)
    p.add_argument("--quantized", help="folder written by `qlip quantize`")
    p.add_argument("--abits", type=_bits("--abits"), help="activation bits (default: the model's)")
    _add_execution_args(p)
    p.add_argument("--prompts", default=HELDOUT,
                   help="'heldout' (the reference world's evaluation set) or a file, one per line")
    p.add_argument("--num-images", type=int_at_least("--num-images", 1), default=1000)
    p.add_argument("--batch-size", type=int_at_least("--batch-size", 1), default=16)
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=0,
                   help="image i uses seed + i")
    p.add_argument("--steps", type=int_at_least("--steps", 1), default=25)
    p.add_argument("--guidance", type=finite_float("--guidance", 0), default=4.0)
    p.add_argument("--truncate", action="store_true",
                   help="cut prompts longer than the tokenizer's limit (a line says how many) "
                        "instead of refusing them")
    p.add_argument("--real", help="folder of real images (needed unless --model reference)")
    p.add_argument("--inception-weights", help="torch-fidelity Inception weights file (user models)")
    p.add_argument("--clip", help="local CLIP model folder for the CLIP score (user models)")
    p.add_argument("--reference-run", help="another eval folder with the same prompts and seeds "
                   "(e.g. FP): report the mean squared difference of same-seed images")
    p.add_argument("--lpips-weights", help="torchvision AlexNet weights file: LPIPS to the "
                   "--reference-run (user models; nothing is downloaded)")
    p.add_argument("--batch-mode", choices=("max", "per_image"), default="max",
                   help="max: each layer runs the batch at its maximum bits; per_image: each prompt "
                        "at its own bits")
    from ..cli_args import add_policy_args

    add_policy_args(p)
    p.add_argument("--bootstrap-resamples", type=int_at_least("--bootstrap-resamples", 1),
                   default=BootstrapConfig.resamples,
                   help="bootstrap resamples of every interval")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--bootstrap-device", type=torch_device_name, default=None,
                   help="where the intervals' linear algebra runs (default: --device); 'cpu' "
                        "keeps it off a GPU that several concurrent evals share")
    from ..cli_args import add_resolution_args

    add_resolution_args(p)
    p.add_argument("--label", default="", help="name of this run in the reports")
    p.add_argument("--out", required=True)
    p.set_defaults(handler=cmd_eval)


def _heldout_order(count: int) -> tuple[list, np.ndarray]:
    from ..world.domain import heldout_prompts

    pool = heldout_prompts()
    if count > len(pool):
        raise ValueError(f"the held-out set has {len(pool)} prompts; --num-images {count} is more")
    return pool, np.random.default_rng(0).permutation(len(pool))


def select_prompts(source: str, count: int, world: bool) -> list[EvalPrompt]:
    """``count`` prompts: a fixed, level-mixing subset of the held-out set, or a file's prompts
    (cycled if the file has fewer)."""
    if count < 1:
        raise ValueError("--num-images must be at least 1")
    if source == HELDOUT:
        if not world:
            raise ValueError("--prompts heldout is the reference world's set; for another model "
                             "pass --prompts FILE")
        pool, order = _heldout_order(count)
        return [EvalPrompt(pool[i].text, pool[i].richness, pool[i]) for i in order[:count]]
    from ..cli_args import read_prompt_file

    texts = read_prompt_file(source)
    return [EvalPrompt(texts[i % len(texts)]) for i in range(count)]


def floor_prompts(count: int) -> list[EvalPrompt]:
    """Other held-out prompts than ``select_prompts`` picks (disjoint while 2·count fits in the
    set): their renders are an independent real set, for the FID floor."""
    pool, order = _heldout_order(count)
    rest = np.concatenate([order[count:], order[:count]])[:count]
    return [EvalPrompt(pool[i].text, pool[i].richness, pool[i]) for i in rest]


def check_reference_run(folder: str) -> None:
    """Refuse, before any work, a --reference-run that is not an eval folder."""
    from pathlib import Path

    if not (Path(folder) / "generated.jsonl").is_file():
        raise FileNotFoundError(f"--reference-run {folder} is not an eval folder (no "
                                "generated.jsonl): evaluate the reference (e.g. FP) run first")


def _renders(args, world: bool) -> bool:
    """Whether the real images are the reference world's renders of the held-out prompts (else
    the ``--real`` folder)."""
    return world and args.prompts == HELDOUT and not args.real


def _evaluate(args, prompts, world: bool, device: str, shard: Shard, policy_config
              ) -> dict | None:
    from ..cli_args import execution_label
    from ..pipeline import load_for_sampling, load_pipeline

    measures = (reference_measures(prompts, floor_prompts(len(prompts)), device)
                if _renders(args, world)
                else folder_measures(args.real, args.inception_weights, args.clip, device,
                                     args.lpips_weights))
    pipe = load_pipeline(args.model, device)
    policy = load_for_sampling(pipe, args.quantized, args.abits, policy_config,
                               packed_weights=args.packed_weights, real_kernels=args.real_kernels,
                               real_fp8=args.fp8, attention=args.attention)
    config = EvalConfig(num_images=args.num_images, batch_size=args.batch_size,
                        seed=args.seed, steps=args.steps, guidance=args.guidance,
                        batch_mode=args.batch_mode, truncate=args.truncate,
                        height=args.height, width=args.width,
                        execution=execution_label(args, pipe.unet), compile=args.compile)
    bootstrap = BootstrapConfig(resamples=args.bootstrap_resamples, seed=args.bootstrap_seed,
                                device=args.bootstrap_device or device)
    return run_evaluation(pipe, prompts, policy, config, args.out, measures,
                          args.reference_run, args.label or args.quantized or "FP",
                          bootstrap, shard)


def cmd_eval(args) -> int:
    from ..cli_args import DEFAULT_MODEL, output_folder
    from ..cli_args import device_name as _device
    from ..files import FolderLock
    from ..pipeline.quantized_model import check_sampling_flags
    from ..pipeline.saving import check_quantized_folder

    if args.reference_run:
        check_reference_run(args.reference_run)
    if args.abits is not None:
        check_bits(args.abits, "--abits")
    check_sampling_flags(args.quantized, args.abits, args.packed_weights, args.real_kernels,
                         _device(args.device), args.fp8, args.batch_mode)
    if args.quantized:
        check_quantized_folder(args.quantized)
    from ..cli_args import policy_config_from_args
    from ..pipeline.quantized_model import check_policy_inputs

    policy_config = policy_config_from_args(args)
    check_policy_inputs(policy_config, args.quantized, args.abits)
    shard = Shard.from_env()  # torchrun / accelerate launch: this process's share
    device = shard.device(_device(args.device))
    world = args.model == DEFAULT_MODEL
    prompts = select_prompts(args.prompts, args.num_images, world)
    renders = _renders(args, world)
    if renders or args.real:  # (no --real for a user's model: folder_measures says so)
        check_real_set(None if renders else args.real, args.num_images)
    folder = output_folder(args.out)
    shard.start(device)
    try:  # rank 0 alone holds the folder's lock: the ranks write their own files in it
        with FolderLock(folder, "qlip eval") if shard.is_main else nullcontext():
            metrics = _evaluate(args, prompts, world, device, shard, policy_config)
    finally:
        shard.stop()
    if metrics is None:  # another rank than 0: its share is written, rank 0 reports
        return 0
    shown = {k: metrics.get(k) for k in ("fid", "sfid", "clip_score", "alignment", "giqa", "fab",
                                         "bitops_t", "num_images")}
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    print(f"wrote metrics.json, metrics.md and grid.png to {args.out}")
    return 0
