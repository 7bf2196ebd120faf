"""Figure 3 of Krizhevsky et al.: the 96 conv1 kernels, 48 per tower, one row per tower.

    python -m cnn_jax.viz runs/alexnet_digits              # newest checkpoint of a workdir
    python -m cnn_jax.viz runs/alexnet_digits/checkpoints/92 --out conv1.png

Each 11x11x3 kernel is shown as an RGB tile, scaled to its own min..max, enlarged 4x. For
the two-tower model the rows are its towers; for the one-tower model they are kernels 1-48
and 49-96 (how the paper's GPUs split them).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
from PIL import Image

from cnn_jax.checkpoint import newest_step, restore_as_numpy


def kernel_tiles(kernels: np.ndarray) -> np.ndarray:
    """(kh, kw, 3, n) -> (n, kh, kw, 3) uint8, each kernel scaled to its own range."""
    k = np.moveaxis(np.asarray(kernels, np.float32), -1, 0)
    lo = k.min(axis=(1, 2, 3), keepdims=True)
    hi = k.max(axis=(1, 2, 3), keepdims=True)
    return np.round(255 * (k - lo) / np.maximum(hi - lo, 1e-12)).astype(np.uint8)


def conv1_rows(conv1_kernel: np.ndarray) -> np.ndarray:
    """(rows, n per row, kh, kw, 3) tiles: the towers' kernels, or the one-tower 96 split in two."""
    kernel = np.asarray(conv1_kernel)
    if kernel.ndim == 5:  # tower-stacked (towers, kh, kw, 3, n)
        return np.stack([kernel_tiles(t) for t in kernel])
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise ValueError(f"conv1 kernel of shape {kernel.shape} is not an RGB convolution")
    tiles = kernel_tiles(kernel)
    return tiles.reshape(2, -1, *tiles.shape[1:]) if len(tiles) % 2 == 0 else tiles[None]


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


def save_conv1_figure(params, path) -> pathlib.Path:
    """Writes the Figure-3 grid of `params['conv1']['kernel']` to `path` (PNG)."""
    path = pathlib.Path(path)
    if "conv1" not in params:
        raise ValueError(f"these parameters have no conv1 (their first layers: {', '.join(list(params)[:3])}): the "
                         "figure shows an RGB first convolution such as AlexNet's")
    grid_image(conv1_rows(np.asarray(params["conv1"]["kernel"]))).save(path)
    return path


def plot_curves(panels: dict, path, *, title: str, xlabel: str = "training steps",
                ylabel: str = "validation top-1 error (%)") -> pathlib.Path:
    """One panel per entry of `panels` ({panel title: {line label: (steps, mean, low, high)}}):
    each line the mean over seeds, shaded from the lowest to the highest seed. PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False, sharey=True)
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        for label, (steps, mean, low, high) in lines.items():
            (line,) = ax.plot(steps, mean, label=label, marker=".")
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
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
    parser = argparse.ArgumentParser(prog="python -m cnn_jax.viz", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=pathlib.Path, help="a workdir, its checkpoints/ or checkpoints/<step>")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="PNG path (default: beside the checkpoint)")
    args = parser.parse_args(argv)
    try:
        params, step_dir = _checkpoint_params(args.checkpoint)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - orbax and tensorstore raise many kinds on damage
        print(f"error: cannot read the checkpoint under {args.checkpoint} ({type(err).__name__}: "
              f"{str(err).splitlines()[0][:160] if str(err) else ''}): it may be damaged; pass another step's "
              "folder, checkpoints/<step>", file=sys.stderr)
        return 2
    try:
        out = save_conv1_figure(params, args.out or step_dir.parent.parent / f"conv1_kernels_{step_dir.name}.png")
    except (ValueError, KeyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
