"""The `qlip` command line: thin; each flag maps onto a config field, the work is done elsewhere."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_args import (
    DEFAULT_MODEL,
    SOFTMAX_FOLLOWS,
    add_execution_args,
    add_model_args,
    add_policy_args,
    add_prompt_args,
    add_resolution_args,
    bits_arg,
    bits_list_arg,
    device_name,
    execution_label,
    finite_float,
    int_at_least,
    output_folder,
    policy_config_from_args,
    read_prompt_file,
    softmax_bits_arg,
)
from .files import FolderLock, note
from .nn import PRESETS, QuantConfig
from .quant import RANGE_METHODS


def _add_quantize(sub) -> None:
    from .methods.brecq import ReconstructionConfig
    from .methods.dgq import DGQConfig
    from .methods.ptqd import PTQDConfig
    from .methods.qdiffusion import QDiffusionConfig
    from .nn.attention import PROB_QUANTIZERS

    p = sub.add_parser("quantize", help="quantize a pipeline's UNet and save it")
    add_model_args(p)
    p.add_argument("--method", default="rtn", choices=["rtn", "qdiffusion", "ptqd", "dgq"],
                   help="rtn (round-to-nearest), qdiffusion (BRECQ/AdaRound + EMA activations), "
                        "ptqd (qdiffusion with per-tensor weights + noise correction), dgq "
                        "(qdiffusion weights + per-step grouped activations, log2 attention)")
    p.add_argument("--wbits", type=bits_arg("--wbits"), default=4)
    p.add_argument("--abits", type=bits_arg("--abits"), default=8)
    p.add_argument("--abits-options", type=bits_list_arg, default=(),
                   help="activation bit-widths calibrated for run-time switching, e.g. 8,16,32")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="layer policy: qdiffusion (all), ptqd (8-bit first/last), dgq (FP first/last); "
                        "default: the method's (ptqd, dgq), else qdiffusion")
    p.add_argument("--softmax-bits", type=softmax_bits_arg, default=None,
                   help="bits of the attention probabilities, or 'abits' for the unit's activation "
                        "bits (default: abits for --method dgq, else 16)")
    p.add_argument("--softmax-quantizer", choices=PROB_QUANTIZERS, default=None,
                   help="uniform or log2 (dynamic scale) probabilities (default: log2 for dgq)")
    p.add_argument("--keep-start-token", action=argparse.BooleanOptionalAction, default=None,
                   help="cross-attention's first key and start-token column stay FP and out of "
                        "the log2 max (default: on for dgq)")
    p.add_argument("--groups", type=int, default=1,
                   help="dgq: activation groups g per layer input (1 = per tensor; DGQ: 8 or 16)")
    p.add_argument("--kmeans-init", type=int_at_least("--kmeans-init", 1), default=DGQConfig.kmeans_n_init,
                   help="dgq: K-means restarts per input and step (scikit-learn n_init)")
    p.add_argument("--no-attention", action="store_true", help="leave attention matmuls in FP")
    p.add_argument("--weight-range", default="minmax", choices=RANGE_METHODS, help="rtn only")
    p.add_argument("--act-range", default="minmax", choices=RANGE_METHODS, help="rtn only")
    p.add_argument("--recon-iters", type=int_at_least("--recon-iters", 0), default=ReconstructionConfig.iters,
                   help="qdiffusion/ptqd/dgq: AdaRound iterations per block (paper: 20000)")
    p.add_argument("--recon-samples", type=int_at_least("--recon-samples", 1), default=ReconstructionConfig.num_samples,
                   help="qdiffusion/ptqd/dgq: calibration rows used by the reconstruction")
    p.add_argument("--act-tune-iters", type=int_at_least("--act-tune-iters", 0), default=QDiffusionConfig.act_tune_iters,
                   help="qdiffusion/ptqd: LSQ tuning of activation step sizes per unit (0 = off)")
    p.add_argument("--ptqd-prompts", type=int_at_least("--ptqd-prompts", 1), default=PTQDConfig.num_prompts,
                   help="ptqd: DDIM trajectories for the correction statistics (paper: 1024)")
    p.add_argument("--ptqd-steps", type=int_at_least("--ptqd-steps", 1), default=PTQDConfig.num_steps,
                   help="ptqd: DDIM steps of those trajectories (paper: 20)")
    p.add_argument("--weights-from", help="qdiffusion/ptqd/dgq: reuse the quantized weights of "
                   "this earlier `qlip quantize` folder (same --wbits and preset); only the "
                   "activations are calibrated again")
    p.add_argument("--calib-prompts", help="file with one prompt per line (reference model: optional)")
    p.add_argument("--calib-num", type=int_at_least("--calib-num", 1), default=32,
                   help="prompts used for calibration")
    p.add_argument("--calib-steps", type=int_at_least("--calib-steps", 1), default=25,
                   help="sampling steps of calibration runs")
    p.add_argument("--calib-kept-steps", type=int_at_least("--calib-kept-steps", 1), default=25,
                   help="steps kept, spread uniformly")
    p.add_argument("--calib-cache", help="calibration capture file shared by several quantize "
                   "runs of one model and calibration setting (default: OUT/calibration."
                   "safetensors); reused only when captured from the same model, prompts and "
                   "settings, else captured anew")
    p.add_argument("--guidance", type=finite_float("--guidance", 0), default=7.5)
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=0)
    p.add_argument("--truncate", action="store_true",
                   help="cut calibration prompts longer than the tokenizer's limit (a line says "
                        "how many) instead of refusing them")
    add_resolution_args(p)
    p.add_argument("--out", required=True, help="folder for the quantized model")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images (FP or quantized) with a cost report")
    p.add_argument("prompts", nargs="*", help="one or more prompts")
    add_model_args(p)
    p.add_argument("--prompt-file", help="file with one prompt per line (added to PROMPTS)")
    p.add_argument("--quantized", help="folder written by `qlip quantize`")
    p.add_argument("--abits", type=bits_arg("--abits"), help="activation bits (default: the model's)")
    add_execution_args(p)
    p.add_argument("--steps", type=int_at_least("--steps", 1), default=25)
    p.add_argument("--guidance", type=finite_float("--guidance", 0), default=7.5)
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=0,
                   help="image i uses seed + i")
    p.add_argument("--batch-size", type=int_at_least("--batch-size", 1), default=4)
    add_prompt_args(p)
    p.add_argument("--batch-mode", choices=("max", "per_image"), default="max",
                   help="max: each layer runs the batch at its maximum bits (the paper's practice); "
                        "per_image: each prompt at its own bits")
    add_policy_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing an earlier run's images, "
                        "report and bits (other files are left alone)")
    add_resolution_args(p)
    p.add_argument("--out", required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_generate(sub)
    from .demo import add_demo_parser
    from .evaluation.cli import add_eval_parser
    from .evaluation.compare import add_compare_parser
    from .qlip_training.cli import (
        add_per_layer_parser,
        add_plot_qlip_parser,
        add_train_qlip_parser,
    )

    add_eval_parser(sub)
    add_compare_parser(sub)
    add_train_qlip_parser(sub)
    add_plot_qlip_parser(sub)
    add_per_layer_parser(sub)
    add_demo_parser(sub)
    return parser


def _calibration_prompts(args) -> list[str]:
    if args.calib_prompts:
        return read_prompt_file(args.calib_prompts)
    if args.model == DEFAULT_MODEL:
        from .world.domain import training_prompts

        return [p.text for p in training_prompts(args.calib_num, args.seed)]
    raise ValueError("--calib-prompts FILE is needed for a model other than the reference model")


def _quant_config(args) -> QuantConfig:
    """The flags' QuantConfig; flags left unset take the method's defaults."""
    from .pipeline.quantize import METHOD_QUANT_DEFAULTS

    given = {"preset": args.preset, "softmax_quantizer": args.softmax_quantizer,
             "keep_start_token": args.keep_start_token}
    if args.softmax_bits == SOFTMAX_FOLLOWS:
        given["softmax_follows_abits"] = True
    elif args.softmax_bits is not None:
        given |= {"softmax_bits": args.softmax_bits, "softmax_follows_abits": False}
    fields = METHOD_QUANT_DEFAULTS[args.method] | {k: v for k, v in given.items() if v is not None}
    return QuantConfig(wbits=args.wbits, abits=args.abits, abits_options=args.abits_options,
                       quantize_attention=not args.no_attention, act_groups=args.groups, **fields)


def cmd_quantize(args) -> int:
    from .methods.brecq import ReconstructionConfig
    from .methods.dgq import DGQConfig
    from .methods.ptqd import PTQDConfig
    from .methods.qdiffusion import QDiffusionConfig
    from .methods.rtn import RTNConfig
    from .pipeline import CalibrationConfig, QuantizeJob, load_pipeline, quantize_pipeline

    reconstruction = ReconstructionConfig(iters=args.recon_iters, num_samples=args.recon_samples,
                                          seed=args.seed)
    qdiffusion = QDiffusionConfig(reconstruction=reconstruction,
                                  act_tune_iters=args.act_tune_iters, seed=args.seed)
    job = QuantizeJob(
        method=args.method,
        quant=_quant_config(args),
        calibration=CalibrationConfig(
            num_prompts=args.calib_num, num_inference_steps=args.calib_steps,
            num_kept_steps=args.calib_kept_steps, guidance=args.guidance, seed=args.seed,
            truncate=args.truncate, height=args.height, width=args.width,
        ),
        rtn=RTNConfig(weight_range=args.weight_range, act_range=args.act_range),
        qdiffusion=qdiffusion,
        ptqd=PTQDConfig(qdiffusion=qdiffusion, num_prompts=args.ptqd_prompts,
                        num_steps=args.ptqd_steps, guidance=args.guidance, seed=args.seed,
                        height=args.height, width=args.width),
        dgq=DGQConfig(reconstruction=reconstruction, kmeans_n_init=args.kmeans_init,
                      seed=args.seed),
        base_model=args.model,
        weights_from=args.weights_from,
    )
    from .pipeline.saving import check_quantized_folder

    prompts = _calibration_prompts(args)
    if args.weights_from:
        check_quantized_folder(args.weights_from)
    if args.calib_cache:
        output_folder(str(Path(args.calib_cache).parent), "--calib-cache (its folder)")
        if Path(args.calib_cache).is_dir():
            raise ValueError(f"--calib-cache {args.calib_cache} is a folder; give a file path")
    with FolderLock(output_folder(args.out), "qlip quantize"):
        pipe = load_pipeline(args.model, device_name(args.device))
        units = quantize_pipeline(pipe, prompts, job, args.out, calibration_cache=args.calib_cache)
    groups = f" g={args.groups}" if args.method == "dgq" else ""
    print(f"quantized {len(units)} units of {args.model} with {args.method} "
          f"W{args.wbits}A{args.abits}{groups}; saved to {args.out}")
    return 0


def cmd_generate(args) -> int:
    from .pipeline import GenerationConfig, generate, load_for_sampling, load_pipeline
    from .pipeline.generate import check_generation_folder, save_generation
    from .pipeline.prompts import check_prompt_text, check_prompts, truncation_note
    from .pipeline.quantized_model import check_sampling_flags
    from .pipeline.saving import check_quantized_folder

    for i, prompt in enumerate(args.prompts):
        check_prompt_text(prompt, f"prompt argument {i + 1}", args.allow_empty_prompt)
    prompts = list(args.prompts) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    if not prompts:
        raise ValueError("no prompts given; pass PROMPT arguments or --prompt-file")
    check_sampling_flags(args.quantized, args.abits, args.packed_weights, args.real_kernels,
                         device_name(args.device), args.fp8, args.batch_mode)
    if args.quantized:
        check_quantized_folder(args.quantized)
    from .pipeline.quantized_model import check_policy_inputs

    policy_config = policy_config_from_args(args)
    check_policy_inputs(policy_config, args.quantized, args.abits)
    out = check_generation_folder(output_folder(args.out), args.overwrite)
    with FolderLock(out, "qlip generate"):
        pipe = load_pipeline(args.model, device_name(args.device))
        over = check_prompts(pipe, prompts, args.truncate, args.allow_empty_prompt)
        if over:
            note(truncation_note(over, len(prompts), pipe.tokenizer.model_max_length))
        policy = load_for_sampling(pipe, args.quantized, args.abits, policy_config,
                                   packed_weights=args.packed_weights,
                                   real_kernels=args.real_kernels, real_fp8=args.fp8,
                                   attention=args.attention)
        config = GenerationConfig(steps=args.steps, guidance=args.guidance,
                                  batch_size=args.batch_size, truncate=args.truncate,
                                  batch_mode=args.batch_mode, allow_empty=args.allow_empty_prompt,
                                  height=args.height, width=args.width, compile=args.compile)
        seeds = [args.seed + i for i in range(len(prompts))]
        result = generate(pipe, prompts, seeds, policy, config)
        path = save_generation(result, out, {"model": args.model, "quantized": args.quantized,
                                             "policy": policy.describe() if policy else "FP",
                                             "execution": execution_label(args, pipe.unet)})
    extra = " and bits.safetensors" if result.bits is not None else ""
    print(f"wrote {len(result.images)} images, report.json{extra} to {path.parent}")
    return 0


COMMANDS = {"quantize": cmd_quantize, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = COMMANDS.get(args.command) or args.handler
    try:
        return handler(args)
    except (ValueError, OSError, ImportError) as err:  # OSError: FileNotFoundError, disk full...
        print(f"qlip {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qlip {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
