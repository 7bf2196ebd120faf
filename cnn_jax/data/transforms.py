"""Small, pure image ops on NumPy arrays (H, W, C), each tested on its own.

Krizhevsky et al. (2012), section 2: rescale so the shorter side is 256, take the central
256x256 patch, subtract the training set's mean image; train on random 224 (here 227)
crops and their mirrors, test on the centre crop.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def grey_to_rgb(image: np.ndarray) -> np.ndarray:
    """Replicate a single channel three times (the paper's treatment of grey images)."""
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def rgb_to_grey(image: np.ndarray) -> np.ndarray:
    """One channel: kept as is if already grey, else ITU-R 601 luma (PIL's 'L' conversion)."""
    if image.ndim == 2:
        return image[..., None]
    if image.shape[-1] == 1:
        return image
    luma = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(luma), 0, 255).astype(image.dtype)[..., None]


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize (PIL, antialiased when shrinking) so the shorter side is `size`."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) == (h, w):
        return image
    channels = [Image.fromarray(image[..., c]).resize((new_w, new_h), Image.BILINEAR)
                for c in range(image.shape[-1])]
    return np.stack([np.asarray(c) for c in channels], axis=-1)


def central_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central size x size patch (top-left rounding when the margin is odd)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the {size}x{size} crop")
    top, left = (h - size) // 2, (w - size) // 2
    return image[top:top + size, left:left + size]


def random_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator,
                     flip: bool = True) -> np.ndarray:
    """A uniformly placed size x size crop, mirrored left-right with probability 1/2."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the {size}x{size} crop")
    top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    out = image[top:top + size, left:left + size]
    return out[:, ::-1] if flip and rng.random() < 0.5 else out
