"""`qlip train-qlip`, `qlip plot-qlip` and `qlip per-layer`: thin; each flag maps onto one config
field."""

from __future__ import annotations

import argparse

from ..methods.qlip import Q2BConfig, Q2BTrainConfig, T2QConfig
from ..methods.qlip.q2b import FORCE_MODES, OPTION_COUNTS
from ..methods.qlip.train import OPTIMIZERS, PENALTY_NORMS
from ..pipeline.qlip_data import FPRunConfig
from ..quant import parse_bits_list
from .job import STOP_POINTS
from .labels import LABELS, LabelConfig


def _bits(text: str) -> tuple[int, ...]:
    try:
        return parse_bits_list(text, "--bits")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def add_train_qlip_parser(sub) -> None:
    from ..cli_args import add_model_args, finite_float, int_at_least

    p = sub.add_parser("train-qlip", help="train QLIP's T2Q and Q2B on a quantized model")
    add_model_args(p)
    p.add_argument("--quantized", help="folder written by `qlip quantize` (needed unless "
                   "--stop-after)")
    p.add_argument("--bits", type=_bits, default=Q2BConfig.bits,
                   help="Q2B's bit options, low to high, all in the model's activation bank")
    p.add_argument("--out", help="folder for qlip.json (default: the --quantized folder; another "
                   "folder gets a copy of the quantized model too)")
    p.add_argument("--work-dir", help="the stages' caches (default: QUANTIZED/qlip_work)")
    p.add_argument("--prompts", help="training prompts, one a line (default on the reference "
                   "model: its training captions, every held-out text excluded)")
    p.add_argument("--num-prompts", type=int_at_least("--num-prompts", 2), default=10_000, help="N, T2Q's FP generations")
    p.add_argument("--prompt-seed", type=int_at_least("--prompt-seed", 0), default=0)
    p.add_argument("--keep-heldout-texts", action="store_true",
                   help="reference model, demos only: draw every training caption, held-out texts "
                   "included (an evaluation on held-out prompts would score texts QLIP was "
                   "trained on)")
    p.add_argument("--q2b-prompts", type=int_at_least("--q2b-prompts", 1), default=128,
                   help="the first prompts, whose FP trajectories train Q2B")
    p.add_argument("--steps", type=int_at_least("--steps", 1), default=FPRunConfig.steps,
                   help="sampling steps (Q2B is trained for exactly these)")
    p.add_argument("--guidance", type=finite_float("--guidance", 0), default=FPRunConfig.guidance)
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=FPRunConfig.seed, help="prompt i uses seed + i")
    p.add_argument("--chunk", type=int_at_least("--chunk", 1), default=FPRunConfig.chunk,
                   help="prompts per saved chunk of the FP runs (the unit of resumption)")
    p.add_argument("--batch-size", type=int_at_least("--batch-size", 1), default=FPRunConfig.batch_size)
    p.add_argument("--label", choices=LABELS, default=LabelConfig.label,
                   help="T2Q's label: giqa (GMM), giqa_knn, realism, image_text, sensitivity; "
                   "or the selection criteria complexity (T2C) and length")
    p.add_argument("--giqa-components", type=int_at_least("--giqa-components", 1), default=LabelConfig.giqa_components)
    p.add_argument("--knn-k", type=int_at_least("--knn-k", 1), default=LabelConfig.knn_k)
    p.add_argument("--realism-k", type=int_at_least("--realism-k", 1), default=LabelConfig.realism_k)
    p.add_argument("--real", help="user models: a folder of real images (giqa, realism)")
    p.add_argument("--inception-weights", help="user models: torch-fidelity Inception weights")
    p.add_argument("--clip", help="user models: a local CLIP model folder (image_text)")
    p.add_argument("--t2q-iters", type=int_at_least("--t2q-iters", 1), default=T2QConfig.iters)
    p.add_argument("--t2q-batch-size", type=int_at_least("--t2q-batch-size", 1), default=T2QConfig.batch_size)
    p.add_argument("--t2q-lr", type=finite_float("--t2q-lr"), default=T2QConfig.lr)
    p.add_argument("--t2q-holdout", type=finite_float("--t2q-holdout"), default=0.1,
                   help="share of the prompts held out to measure T2Q's SROCC/PLCC")
    p.add_argument("--variant", choices=sorted(OPTION_COUNTS), default=Q2BConfig.variant)
    p.add_argument("--group-steps", type=int_at_least("--group-steps", 1), default=Q2BConfig.group_steps,
                   help="M: steps sharing one (p_m, p_h) (default %(default)s; chosen by "
                   "measurement, docs/methods.md)")
    p.add_argument("--high-steps", type=int_at_least("--high-steps", 0), default=Q2BConfig.high_steps,
                   help="m: first steps forced high (default %(default)s; chosen by measurement)")
    p.add_argument("--force", choices=FORCE_MODES, default=Q2BConfig.force)
    p.add_argument("--ignore-prompt", action="store_true",
                   help="the timestep-only control: Q2B's q is a constant for every prompt, so "
                   "the bits depend on the layer and the step only (no T2Q is trained or needed)")
    p.add_argument("--q2b-iters", type=int_at_least("--q2b-iters", 1), default=Q2BTrainConfig.iters,
                   help="Q2B's optimiser steps (default %(default)s; chosen by measurement)")
    p.add_argument("--q2b-batch-size", type=int_at_least("--q2b-batch-size", 1), default=Q2BTrainConfig.batch_size)
    p.add_argument("--q2b-lr", type=finite_float("--q2b-lr"), default=Q2BTrainConfig.lr,
                   help="Q2B's learning rate (default %(default)s; chosen by measurement)")
    p.add_argument("--lam", type=finite_float("--lam", 0), default=Q2BTrainConfig.lam,
                   help="λ, the bit-penalty weight (default %(default)s; chosen by measurement)")
    p.add_argument("--penalty-norm", choices=PENALTY_NORMS, default=Q2BTrainConfig.penalty_norm)
    p.add_argument("--q2b-optimizer", choices=OPTIMIZERS, default=Q2BTrainConfig.optimizer,
                   help="Q2B's optimiser: adam (default; chosen by measurement), or sgd "
                   "(momentum 0.9)")
    p.add_argument("--checkpoint-every", type=int_at_least("--checkpoint-every", 1), default=Q2BTrainConfig.checkpoint_every)
    p.add_argument("--q2b-seed", type=int_at_least("--q2b-seed", 0), default=Q2BTrainConfig.seed,
                   help="the order Q2B's training draws its rows in: retrain with other seeds to "
                   "see how far training alone moves a policy (two trainings of the same "
                   "settings differed by 0.7 dB of PSNR on the reference world)")
    p.add_argument("--truncate", action="store_true",
                   help="cut training prompts longer than the tokenizer's limit (a line says how "
                        "many) instead of refusing them")
    p.add_argument("--redo-stale", action="store_true",
                   help="recompute a stage whose cache was made from other inputs")
    p.add_argument("--stop-after", choices=STOP_POINTS,
                   help="run the FP stages up to this one and stop (no --quantized needed; "
                   "e.g. while the quantizer calibrates, into a --work-dir a later job reuses)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_train_qlip)


def train_config_from_args(args):
    """The TrainQLIPConfig the flags say (one field per flag)."""
    from ..cli_args import device_name
    from .job import TrainQLIPConfig

    return TrainQLIPConfig(
        quantized=args.quantized or "", stop_after=args.stop_after, model=args.model, out=args.out, work_dir=args.work_dir,
        device=device_name(args.device), prompts=args.prompts, num_prompts=args.num_prompts,
        prompt_seed=args.prompt_seed, exclude_heldout=not args.keep_heldout_texts,
        q2b_prompts=args.q2b_prompts,
        sampling=FPRunConfig(steps=args.steps, guidance=args.guidance, seed=args.seed,
                             chunk=args.chunk, batch_size=args.batch_size),
        labels=LabelConfig(label=args.label, giqa_components=args.giqa_components,
                           knn_k=args.knn_k, realism_k=args.realism_k),
        real=args.real, inception_weights=args.inception_weights, clip=args.clip,
        t2q=T2QConfig(iters=args.t2q_iters, batch_size=args.t2q_batch_size, lr=args.t2q_lr),
        t2q_holdout=args.t2q_holdout,
        q2b=Q2BConfig(bits=args.bits, variant=args.variant, group_steps=args.group_steps,
                      high_steps=args.high_steps, force=args.force,
                      ignore_prompt=args.ignore_prompt),
        q2b_train=Q2BTrainConfig(iters=args.q2b_iters, batch_size=args.q2b_batch_size,
                                 lr=args.q2b_lr, lam=args.lam, penalty_norm=args.penalty_norm,
                                 optimizer=args.q2b_optimizer, checkpoint_every=args.checkpoint_every,
                                 seed=args.q2b_seed),
        redo_stale=args.redo_stale, truncate=args.truncate, progress=not args.no_progress,
    )


def cmd_train_qlip(args) -> int:
    from .job import train_qlip

    train_qlip(train_config_from_args(args))
    return 0


def add_plot_qlip_parser(sub) -> None:
    from ..cli_args import add_model_args, finite_float, int_at_least
    from .figures import QLIPFiguresConfig as F

    p = sub.add_parser("plot-qlip", help="QLIP's figures (bit share per layer, FAB by richness, "
                       "bits per step) for a trained model folder")
    add_model_args(p)
    p.add_argument("--quantized", required=True, help="folder with qlip.json (`qlip train-qlip`)")
    p.add_argument("--out", required=True, help="folder for the PNGs and figures.json")
    p.add_argument("--prompts", default=F.prompts,
                   help="bit-share prompts: 'heldout' (reference world) or a file, one per line")
    p.add_argument("--num-prompts", type=int_at_least("--num-prompts", 2), default=F.num_prompts)
    p.add_argument("--richness-captions", help="user models: groups of captions of rising "
                   "richness, one a line, groups separated by a blank line")
    p.add_argument("--example-scenes", type=int, default=F.example_scenes)
    p.add_argument("--curve-scenes", type=int, default=F.curve_scenes)
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=F.seed)
    p.add_argument("--guidance", type=finite_float("--guidance", 0), default=F.guidance)
    p.add_argument("--batch-size", type=int_at_least("--batch-size", 1), default=F.batch_size)
    p.set_defaults(handler=cmd_plot_qlip)


def figures_config_from_args(args):
    """The QLIPFiguresConfig the flags say (one field per flag)."""
    from ..cli_args import device_name
    from .figures import QLIPFiguresConfig

    return QLIPFiguresConfig(
        quantized=args.quantized, out=args.out, model=args.model, device=device_name(args.device),
        prompts=args.prompts, num_prompts=args.num_prompts,
        richness_captions=args.richness_captions, example_scenes=args.example_scenes,
        curve_scenes=args.curve_scenes, seed=args.seed, guidance=args.guidance,
        batch_size=args.batch_size)


def cmd_plot_qlip(args) -> int:
    from .figures import make_figures

    numbers = make_figures(figures_config_from_args(args))
    levels = numbers["s4"]["fab_by_level_mean"]
    print("FAB by richness level: " + ", ".join(f"{k}: {v:.2f}" for k, v in levels.items()))
    direction = numbers["direction"]
    low, high = direction["fab_at_heldout_min_and_max_quality"]
    print(f"Q2B gives more bits to {direction['more_bits_for']}: FAB {low:.3f} at the held-out "
          f"prompts' lowest predicted quality, {high:.3f} at their highest")
    print("wrote bit_share_per_layer.png, fab_by_batch_size.png, fab_by_richness.png, "
          f"bits_per_step.png, q2b_direction.png and figures.json to {args.out}")
    return 0


def add_per_layer_parser(sub) -> None:
    from ..cli_args import add_model_args, bits_arg, finite_float, int_at_least
    from .per_layer import WEIGHTINGS
    from .per_layer import PerLayerConfig as C

    p = sub.add_parser("per-layer", help="the best fixed bits per layer at a target FAB (a "
                       "control for QLIP): a greedy on each layer's measured damage")
    add_model_args(p)
    p.add_argument("--quantized", required=True, help="folder written by `qlip quantize`")
    p.add_argument("--target-fab", type=finite_float("--target-fab", 0),
                   help="the FAB (or, with --weighting weighted, MAC-weighted bits) to reach "
                   "(needed unless --damage-only)")
    p.add_argument("--out", help="the assignment file (JSON), for "
                   "`qlip eval/generate --policy per-layer --assignment FILE` (needed unless "
                   "--damage-only)")
    p.add_argument("--damage-only", action="store_true",
                   help="measure each layer's damage and cache it in the work folder, nothing "
                   "else: a later run with --target-fab (any target) reuses it")
    p.add_argument("--bits", type=_bits, default=(),
                   help="the options, low to high (default: the model's activation bank)")
    p.add_argument("--weighting", choices=WEIGHTINGS, default=C.weighting,
                   help="fab: the ledger's FAB (each Linear/Conv layer 1); weighted: its "
                   "MAC-weighted bits")
    p.add_argument("--attention-bits", type=bits_arg("--attention-bits"), default=None,
                   help="bits of the dynamic attention units, which FAB does not count "
                   "(default: the highest option)")
    p.add_argument("--prompts", help="training prompts, one a line (default on the reference "
                   "model: train-qlip's, every held-out text excluded)")
    p.add_argument("--num-prompts", type=int_at_least("--num-prompts", 1), default=C.num_prompts,
                   help="prompts whose FP trajectories are the rows (train-qlip's --q2b-prompts)")
    p.add_argument("--prompt-seed", type=int_at_least("--prompt-seed", 0), default=C.prompt_seed)
    p.add_argument("--max-rows", type=int_at_least("--max-rows", 1), default=C.max_rows,
                   help="rows measured, spread evenly over the trajectories")
    p.add_argument("--work-dir", help="the trajectories' cache (default: QUANTIZED/qlip_work; "
                   "train-qlip's work folder reuses its Q2B rows)")
    p.add_argument("--steps", type=int_at_least("--steps", 1), default=FPRunConfig.steps)
    p.add_argument("--guidance", type=finite_float("--guidance", 0), default=FPRunConfig.guidance)
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=FPRunConfig.seed,
                   help="prompt i uses seed + i")
    p.add_argument("--chunk", type=int_at_least("--chunk", 1), default=FPRunConfig.chunk)
    p.add_argument("--batch-size", type=int_at_least("--batch-size", 1),
                   default=FPRunConfig.batch_size)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_per_layer)


def per_layer_config_from_args(args):
    """The PerLayerConfig the flags say (one field per flag)."""
    from ..cli_args import device_name
    from .per_layer import PerLayerConfig

    return PerLayerConfig(
        quantized=args.quantized, out=args.out or "", target_fab=args.target_fab or 0.0,
        damage_only=args.damage_only, bits=args.bits,
        weighting=args.weighting, attention_bits=args.attention_bits, model=args.model,
        device=device_name(args.device), prompts=args.prompts, num_prompts=args.num_prompts,
        prompt_seed=args.prompt_seed, max_rows=args.max_rows, work_dir=args.work_dir,
        sampling=FPRunConfig(steps=args.steps, guidance=args.guidance, seed=args.seed,
                             chunk=args.chunk, batch_size=args.batch_size),
        progress=not args.no_progress)


def cmd_per_layer(args) -> int:
    from .per_layer import run_per_layer

    run_per_layer(per_layer_config_from_args(args))
    return 0
