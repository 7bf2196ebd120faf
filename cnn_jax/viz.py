"""Pictures of a run: Figure 3 of Krizhevsky et al. (the first layer's kernels) and the
learning curves, each from what a run leaves in its workdir.

    python -m cnn_jax.viz kernels runs/alexnet_digits           # newest checkpoint of a workdir
    python -m cnn_jax.viz kernels runs/alexnet_digits/checkpoints/92 --out conv1.png
    python -m cnn_jax.viz curves runs/alexnet_digits            # metrics.jsonl -> curves.png

Figure 3: each RGB kernel is a tile scaled to its own min..max and enlarged to about 44 pixels,
16 to a row. The two-tower model's groups are its towers; the one-tower model's are kernels
1-48 and 49-96 (how the paper's GPUs split them). Training writes both pictures at its end.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np
from PIL import Image

from cnn_jax.checkpoint import newest_step, restore_as_numpy

TILE_PIXELS = 44  # an 11x11 kernel enlarged 4x, as in the paper's figure
PER_ROW = 16
PAPER_KERNELS = 96  # AlexNet's conv1, split 48 + 48 between the paper's two GPUs


def kernel_tiles(kernels: np.ndarray) -> np.ndarray:
    """(kh, kw, 3, n) -> (n, kh, kw, 3) uint8, each kernel scaled to its own range."""
    k = np.moveaxis(np.asarray(kernels, np.float32), -1, 0)
    lo = k.min(axis=(1, 2, 3), keepdims=True)
    hi = k.max(axis=(1, 2, 3), keepdims=True)
    return np.round(255 * (k - lo) / np.maximum(hi - lo, 1e-12)).astype(np.uint8)


def conv1_rows(conv1_kernel: np.ndarray) -> np.ndarray:
    """(groups, n per group, kh, kw, 3) tiles: the towers' kernels, the one-tower AlexNet's 96
    split in two as the paper's GPUs held them, or every kernel in one group."""
    kernel = np.asarray(conv1_kernel)
    if kernel.ndim == 5:  # tower-stacked (towers, kh, kw, 3, n)
        return np.stack([kernel_tiles(t) for t in kernel])
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise ValueError(f"conv1 kernel of shape {kernel.shape} is not an RGB convolution")
    tiles = kernel_tiles(kernel)
    return tiles.reshape(2, -1, *tiles.shape[1:]) if len(tiles) == PAPER_KERNELS else tiles[None]


def grid_image(rows: np.ndarray, scale: int = 4, gap: int = 2) -> Image.Image:
    """Tiles laid out in rows on a white background, each enlarged `scale` times."""
    n_rows, n_cols, h, w, _ = rows.shape
    h, w = h * scale, w * scale
    canvas = np.full((n_rows * (h + gap) + gap, n_cols * (w + gap) + gap, 3), 255, np.uint8)
    for r in range(n_rows):
        for c in range(n_cols):
            tile = rows[r, c].repeat(scale, 0).repeat(scale, 1)
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            canvas[y:y + h, x:x + w] = tile
    return Image.fromarray(canvas)


def group_labels(conv1_kernel: np.ndarray, groups: int, per_group: int) -> list[str]:
    """'tower 1', ... for a tower-stacked kernel; 'kernels 1-48', ... otherwise."""
    if np.ndim(conv1_kernel) == 5:
        return [f"tower {g + 1}" for g in range(groups)]
    return [f"kernels {g * per_group + 1}-{(g + 1) * per_group}" for g in range(groups)]


def _wrapped(tiles: np.ndarray, per_row: int) -> np.ndarray:
    """(n, kh, kw, 3) -> (rows, per_row, kh, kw, 3), the last row padded with white tiles."""
    rows = -(-len(tiles) // per_row)
    blank = np.full((rows * per_row - len(tiles), *tiles.shape[1:]), 255, np.uint8)
    return np.concatenate([tiles, blank]).reshape(rows, per_row, *tiles.shape[1:])


def save_conv1_figure(params, path, *, step: int | None = None, layer: str = "conv1") -> pathlib.Path:
    """Writes Figure 3 of `params[layer]['kernel']` to `path` (PNG): a labelled block of tiles
    per tower (or per half of a one-tower model's kernels), titled with the layer and step."""
    path = pathlib.Path(path)
    if layer not in params:
        raise ValueError(f"these parameters have no {layer} (their first layers: {', '.join(list(params)[:3])}): "
                         "the figure shows an RGB first convolution such as AlexNet's")
    kernel = np.asarray(params[layer]["kernel"])
    rows = conv1_rows(kernel)
    groups, per_group, kh, kw, _ = rows.shape
    scale = max(1, math.ceil(TILE_PIXELS / max(kh, kw)))
    blocks = [np.asarray(grid_image(_wrapped(group, min(PER_ROW, per_group)), scale=scale)) for group in rows]
    plt = _pyplot()
    heights = [b.shape[0] for b in blocks]
    width_px, height_px = blocks[0].shape[1], sum(heights)
    fig, axes = plt.subplots(groups, 1, squeeze=False, gridspec_kw={"height_ratios": heights},
                             figsize=(width_px / 100 + 1.6, height_px / 100 + 0.3 * groups + 0.6))
    for ax, block, label in zip(axes[:, 0], blocks, group_labels(kernel, groups, per_group)):
        ax.imshow(block, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(label)
    at = f" at step {step}" if step is not None else ""
    fig.suptitle(f"{layer}: {groups * per_group} kernels of {kh}x{kw}x3{at}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{key: (steps, values)} from a metrics.jsonl. A resumed run logs the steps after its
    checkpoint again: the last value logged for a step is the one that stands."""
    by_key: dict[str, dict[int, float]] = {}
    for line in pathlib.Path(path).read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                by_key.setdefault(key, {})[int(row["step"])] = float(value)
    return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for k, v in by_key.items()}


def rate_drops(steps: np.ndarray, rates: np.ndarray, factor: float = 2.0) -> list[int]:
    """The logged steps where the learning rate fell by `factor` or more since the previous
    log (a step or plateau schedule's drop; a warm-up or a cosine's slow decay is not one)."""
    return [int(s) for s, before, after in zip(steps[1:], rates[:-1], rates[1:]) if after * factor <= before]


def save_curves(metrics_path, path) -> pathlib.Path:
    """curves.png: training loss; training and validation top-1 and top-5 error; the learning
    rate, all against step, with the rate's drops marked (dashed) on every panel."""
    metrics = read_metrics(metrics_path)
    if "train/loss" not in metrics:
        raise ValueError(f"{metrics_path} has no training loss logged yet: train for at least "
                         "log_every_steps steps first")
    plt = _pyplot()
    fig, (loss, error, rate) = plt.subplots(1, 3, figsize=(15, 4.2))
    loss.plot(*metrics["train/loss"], label="training loss")
    loss.set(title="loss", ylabel="cross-entropy")
    for key, style in (("train/top1_error", "-"), ("train/top5_error", ":"),
                       ("eval/top1_error", "o-"), ("eval/top5_error", "o:")):
        if key in metrics:
            split, k = key.split("/")
            steps, values = metrics[key]
            error.plot(steps, 100 * values, style, label=f"{'training' if split == 'train' else 'validation'} "
                                                        f"top-{k[3]}", markersize=4)
    error.set(title="error", ylabel="error (%)")
    drops = []
    if "train/learning_rate" in metrics:
        steps, rates = metrics["train/learning_rate"]
        rate.plot(steps, rates, label="learning rate")
        if rates.min() > 0 and rates.max() / rates.min() > 5:
            rate.set_yscale("log")
        else:  # a constant rate: from zero, without float32's last-digit wobble as an offset axis
            rate.set_ylim(0, 1.1 * rates.max() or 1)
            rate.ticklabel_format(axis="y", useOffset=False)
        drops = rate_drops(steps, rates)
    rate.set(title="learning rate", ylabel="rate")
    for ax in (loss, error, rate):
        for i, step in enumerate(drops):
            ax.axvline(step, color="grey", linestyle="--", linewidth=1, label="rate drop" if i == 0 else None)
        ax.set(xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(str(pathlib.Path(metrics_path).parent))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return pathlib.Path(path)


def plot_curves(panels: dict, path, *, title: str, xlabel: str = "training steps",
                ylabel: str = "validation top-1 error (%)") -> pathlib.Path:
    """One panel per entry of `panels` ({panel title: {line label: (steps, mean, low, high)}}):
    each line the mean over seeds, shaded from the lowest to the highest seed (the legend
    says so). PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False, sharey=True)
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        for label, (steps, mean, low, high) in lines.items():
            (line,) = ax.plot(steps, mean, label=f"{label} (mean over seeds)", marker=".")
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0,
                            label=f"{label}: range over seeds")
        ax.set(title=panel, xlabel=xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return pathlib.Path(path)


def _checkpoint_params(location: pathlib.Path):
    step = newest_step(location)
    return restore_as_numpy((step / "state").absolute())["params"], step


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("kernels", "curves", "-h", "--help"):
        argv.insert(0, "kernels")  # the older form: python -m cnn_jax.viz WORKDIR
    parser = argparse.ArgumentParser(prog="python -m cnn_jax.viz", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    kernels = commands.add_parser("kernels", help="Figure 3: the first layer's kernels of a checkpoint")
    kernels.add_argument("checkpoint", type=pathlib.Path, help="a workdir, its checkpoints/ or checkpoints/<step>")
    kernels.add_argument("--out", type=pathlib.Path, default=None, help="PNG path (default: in the workdir)")
    curves = commands.add_parser("curves", help="learning curves of a workdir's metrics.jsonl")
    curves.add_argument("workdir", type=pathlib.Path)
    curves.add_argument("--out", type=pathlib.Path, default=None, help="PNG path (default: WORKDIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        out = _kernels(args.checkpoint, args.out) if args.command == "kernels" else \
            save_curves(args.workdir / "metrics.jsonl", args.out or args.workdir / "curves.png")
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _kernels(location: pathlib.Path, out) -> pathlib.Path:
    try:
        params, step_dir = _checkpoint_params(location)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - orbax and tensorstore raise many kinds on damage
        raise ValueError(f"cannot read the checkpoint under {location} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160] if str(err) else ''}): it may be damaged; pass another "
                         "step's folder, checkpoints/<step>") from None
    step = int(step_dir.name) if step_dir.name.isdigit() else None
    return save_conv1_figure(params, out or step_dir.parent.parent / f"conv1_kernels_{step_dir.name}.png", step=step)


if __name__ == "__main__":
    sys.exit(main())
