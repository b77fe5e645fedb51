"""QLIP's figures, as PNG (matplotlib), drawn from arrays of bits:

- :func:`plot_bit_share`: the share of each bit-width per layer (the paper's Fig. S3), layers in
  the UNet's order, transformer-block layers labelled in red and the others in black;
- :func:`plot_fab_by_richness`: FAB against caption richness on richness-controlled captions of
  one scene (Fig. S4): each scene's images and FAB per level, and FAB per level over many scenes;
- :func:`plot_bits_heatmap`: bits per sampling step × layer for a simple and a rich prompt;
- :func:`plot_fab_by_batch_size`: FAB against batch size in ``max`` mode, with ``per_image``
  beside it (Fig. S1);
- :func:`plot_q2b_direction`: Q2B's FAB against T2Q's predicted quality, with the predicted
  qualities of the held-out prompts and of each caption richness.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402

SHORT_NAMES = (("down_blocks.", "down"), ("up_blocks.", "up"), ("mid_block.", "mid."),
               ("attentions.", "att"), ("resnets.", "res"), ("transformer_blocks.", "tb"),
               ("downsamplers.0.", "dsamp."), ("upsamplers.0.", "usamp."),
               ("time_embedding.", "temb."), ("to_out.0", "to_out"), (".processor", ".matmuls"))
PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def short_name(name: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v`` → ``down0.att0.tb0.attn2.to_v``."""
    for long, short in SHORT_NAMES:
        name = name.replace(long, short)
    return name


_SECTIONS = ("down_blocks.", "mid_block.", "up_blocks.")


def unet_order(names: Sequence[str]) -> list[int]:
    """Indices that put unit names in the UNet's order of execution: input layers and the time
    embedding, the down blocks, the middle block, the up blocks, the output layers (diffusers
    registers ``up_blocks`` before ``mid_block``)."""
    def section(name: str) -> int:
        for k, prefix in enumerate(_SECTIONS):
            if name.startswith(prefix):
                return k + 1
        return 4 if name.startswith("conv_out") or name.startswith("conv_norm_out") else 0

    return sorted(range(len(names)), key=lambda i: (section(names[i]), i))


def is_transformer_layer(name: str) -> bool:
    """A layer of a transformer (cross-attention) block, proj_in/proj_out included."""
    return ".attentions." in name


def _colors(options: Sequence[int]) -> list[str]:
    return [PALETTE[i % len(PALETTE)] for i in range(len(options))]


def bit_shares(bits: np.ndarray, options: Sequence[int]) -> np.ndarray:
    """``[U, J]`` share of each option per unit, over every image and step of ``bits [N, S, U]``."""
    flat = bits.reshape(-1, bits.shape[-1])
    return np.stack([(flat == b).mean(0) for b in options], -1)


def _label_layers(ax, names: Sequence[str], size: float = 6.0) -> None:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([short_name(n) for n in names], rotation=90, fontsize=size)
    for label, name in zip(ax.get_xticklabels(), names):
        label.set_color("#c00000" if is_transformer_layer(name) else "black")
    ax.set_xlim(-0.6, len(names) - 0.4)


def plot_bit_share(bits: np.ndarray, names: Sequence[str], options: Sequence[int], path: Path,
                   title: str) -> Path:
    """Stacked bars: per layer, the share of images × steps at each bit option."""
    order = unet_order(names)
    shares, names = bit_shares(bits, options)[order], [names[i] for i in order]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.13 * len(names) + 2), 5.2), layout="constrained")
    bottom = np.zeros(len(names))
    for j, (b, color) in enumerate(zip(options, _colors(options))):
        ax.bar(range(len(names)), shares[:, j], bottom=bottom, width=0.85, color=color,
               label=f"{b} bits")
        bottom += shares[:, j]
    _label_layers(ax, names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of images × steps")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_xlabel("layers in the UNet's order; red: transformer-block (cross-attention) layers, "
                  "black: the others; '.matmuls': an attention unit's q, k, v inputs", fontsize=8)
    return _save(fig, path)


def plot_bits_heatmap(panels: Sequence[tuple[str, np.ndarray, float]], names: Sequence[str],
                      options: Sequence[int], path: Path) -> Path:
    """One heatmap per (caption, bits [S, U], FAB) panel: steps down, layers across."""
    cmap = ListedColormap(_colors(options))
    edges = [options[0] - 0.5] + [(a + b) / 2 for a, b in zip(options, options[1:])] + \
        [options[-1] + 0.5]
    norm = BoundaryNorm(edges, cmap.N)
    order = unet_order(names)
    names = [names[i] for i in order]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False, layout="constrained",
                             figsize=(max(8.0, 0.13 * len(names) + 2), 2.6 * len(panels) + 1.6))
    for ax, (caption, bits, fab) in zip(axes[:, 0], panels):
        image = ax.imshow(bits[:, order], aspect="auto", cmap=cmap, norm=norm,
                          interpolation="nearest")
        ax.set_title(textwrap.fill(f"{caption}  (FAB {fab:.2f})", 150), fontsize=9)
        ax.set_ylabel("sampling step")
    _label_layers(axes[-1, 0], names)
    axes[-1, 0].set_xlabel("layers in the UNet's order (red: transformer-block layers)", fontsize=8)
    bar = fig.colorbar(image, ax=axes[:, 0].tolist(), ticks=list(options), fraction=0.015,
                       pad=0.005)
    bar.set_label("activation bits")
    return _save(fig, path)


def plot_fab_by_richness(examples: Sequence[dict], curve: dict[int, list[float]],
                         path: Path, note: str = "") -> Path:
    """``examples``: one dict a scene, ``{"images": [H, W, 3] per level, "captions", "fab"}``;
    ``curve``: FAB values per richness level over many scenes (mean ± std drawn)."""
    levels = len(examples[0]["captions"])
    fig = plt.figure(figsize=(2.3 * levels + 4.2, 2.6 * len(examples) + 0.6), layout="constrained")
    grid = fig.add_gridspec(len(examples), levels + 2)
    for row, example in enumerate(examples):
        for level in range(levels):
            ax = fig.add_subplot(grid[row, level])
            ax.imshow(example["images"][level], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            caption = textwrap.fill(example["captions"][level], 34)
            ax.set_xlabel(f"{caption}\nFAB {example['fab'][level]:.2f}", fontsize=6.5)
            if row == 0:
                ax.set_title(f"richness {level}", fontsize=9)
    ax = fig.add_subplot(grid[:, levels:])
    xs = sorted(curve)
    means = np.array([np.mean(curve[x]) for x in xs])
    stds = np.array([np.std(curve[x]) for x in xs])
    ax.fill_between(xs, means - stds, means + stds, color="#999999", alpha=0.3,
                    label=f"± std over {len(curve[xs[0]])} scenes")
    ax.plot(xs, means, "k-o", label="mean over scenes")
    for i, example in enumerate(examples):
        ax.plot(range(levels), example["fab"], "--", marker=".", label=f"scene {i + 1}")
    ax.set_xticks(xs)
    ax.set_xlabel("caption richness (level)")
    ax.set_ylabel("FAB (mean activation bits)")
    ax.legend(fontsize=7)
    ax.set_title(note, fontsize=8)
    return _save(fig, path)


def plot_fab_by_batch_size(by_size: dict[int, float], per_image: float, path: Path,
                           note: str = "") -> Path:
    """``by_size``: mean FAB per image in ``max`` mode per batch size; ``per_image``: the FAB with
    each prompt at its own bits (the same at every batch size)."""
    sizes = sorted(by_size)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    ax.plot(sizes, [by_size[s] for s in sizes], "o-", color=PALETTE[0],
            label="max: each layer at the batch's largest request")
    ax.axhline(per_image, color=PALETTE[1], linestyle="--",
               label=f"per_image: each prompt at its own bits ({per_image:.2f})")
    for s in sizes:
        ax.annotate(f"{by_size[s]:.2f}", (s, by_size[s]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    _labels(ax, "batch size (prompts)", "FAB (mean activation bits)")
    ax.set_title(note, fontsize=9)
    return _save(fig, path)


def plot_q2b_direction(grid: np.ndarray, fab: np.ndarray, heldout: np.ndarray,
                       by_level: dict[int, np.ndarray], path: Path, note: str = "") -> Path:
    """Left: the FAB Q2B gives at each predicted quality of ``grid`` (its learned map), over the
    histogram of the held-out prompts' predicted qualities. Right: the predicted quality per
    caption richness level (mean ± std over scenes)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    left.plot(grid, fab, "-", color=PALETTE[0], label="Q2B: FAB at this predicted quality")
    left.set_xlabel("T2Q's predicted quality (Q2B's input)")
    left.set_ylabel("FAB (mean activation bits)")
    left.grid(alpha=0.3)
    hist = left.twinx()
    hist.hist(heldout, bins=40, color=PALETTE[1], alpha=0.35,
              label=f"held-out prompts ({len(heldout)})")
    hist.set_ylabel("prompts")
    lines = left.get_legend_handles_labels(), hist.get_legend_handles_labels()
    left.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8)
    levels = sorted(by_level)
    means = [float(np.mean(by_level[k])) for k in levels]
    stds = [float(np.std(by_level[k])) for k in levels]
    right.errorbar(levels, means, yerr=stds, fmt="k-o", capsize=3,
                   label=f"mean ± std over {len(by_level[levels[0]])} scenes")
    right.set_xticks(levels)
    _labels(right, "caption richness (level)", "T2Q's predicted quality")
    fig.suptitle(note, fontsize=9)
    return _save(fig, path)


def _labels(ax, xlabel: str, ylabel: str) -> None:
    """Axis labels, a light grid and the legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
