"""Command line for training the reference world's model (VAE first, then UNet + text encoder).

    python -m qlip.world.train vae --out runs/world/vae_run --seconds 150
    python -m qlip.world.train unet --out runs/world/unet_run --vae runs/world/vae_run/vae \
        --seconds 480 --resume
    python -m qlip.world.train export --vae runs/world/vae_run/vae \
        --weights runs/world/unet_run/compact/ema_fp16.safetensors \
        --out src/qlip/world/assets/reference-sd

Every command stops by itself at ``--seconds`` and saves a checkpoint (also every two minutes);
run it again with ``--resume`` to continue.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from qlip.world.train_common import pick_device


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qlip.world.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("vae", "unet"):
        command = sub.add_parser(name)
        command.add_argument("--out", type=Path, required=True)
        command.add_argument("--seconds", type=float, default=480.0)
        command.add_argument("--max-steps", type=int, default=1_000_000)
        command.add_argument("--batch", type=int)
        command.add_argument("--lr", type=float)
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--device")
        command.add_argument("--no-compile", action="store_true")
        command.add_argument("--resume", action="store_true",
                             help="continue from --out (without it --out must hold no state)")
    unet = sub.choices["unet"]
    unet.add_argument("--vae", type=Path, required=True, help="trained VAE folder (diffusers)")
    unet.add_argument("--eval-prompts", type=int, default=400)
    unet.add_argument("--pool-size", type=int, default=200_000)
    unet.add_argument("--offset-noise", type=float, default=0.0,
                      help="std of a per-channel constant added to the noise (0: off)")
    unet.add_argument("--richness-weights", type=_weights,
                      help="comma-separated probabilities of richness levels 0-4 "
                           "(default: uniform)")
    unet.add_argument("--final-eval", action="store_true",
                      help="also sample and check all 3,000 held-out prompts at the end")
    export = sub.add_parser("export")
    export.add_argument("--vae", type=Path, required=True)
    export.add_argument("--weights", type=Path, required=True)
    export.add_argument("--out", type=Path, required=True)
    return parser


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,1,2,3,3: {error}") from None


def _check_resume(args) -> None:
    has_state = (args.out / "state.pt").exists() or (args.out / "compact").exists()
    if has_state and not args.resume:
        raise SystemExit(f"{args.out} already holds a checkpoint: pass --resume to continue "
                         "from it, or choose another --out")


def _overrides(args) -> dict:
    chosen = {"out": args.out, "seconds": args.seconds, "max_steps": args.max_steps,
              "seed": args.seed, "compile": not args.no_compile}
    chosen.update({k: v for k, v in (("batch", args.batch), ("lr", args.lr)) if v is not None})
    return chosen


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _parser().parse_args(argv)
    if args.command == "export":
        from qlip.world.train_unet import export_reference_model

        export_reference_model(args.vae, args.weights, args.out)
        return
    _check_resume(args)
    device = pick_device(args.device)
    if args.command == "vae":
        from qlip.world.train_vae import VaeTrainConfig, train_vae

        train_vae(VaeTrainConfig(**_overrides(args)), device)
    else:
        from qlip.world.train_unet import UnetTrainConfig, train_unet

        config = UnetTrainConfig(vae_dir=args.vae, eval_prompts=args.eval_prompts,
                                 pool_size=args.pool_size, offset_noise=args.offset_noise,
                                 richness_weights=args.richness_weights, **_overrides(args))
        train_unet(config, device, final_eval=args.final_eval)


if __name__ == "__main__":
    main()
