"""The paper's augmentation and test crops in JAX, inside the jitted steps.

Batches cross to the device as uint8 squares at the stored resolution (4x less traffic than
float32); here they become the network's input. Krizhevsky et al. (2012): subtract the
training set's mean image, train on random crops and their mirrors (section 4.1) with PCA
colour noise (alpha_i ~ N(0, 0.1) per image, added to every pixel), and test on the centre
crop or on ten crops (four corners, centre, and their mirrors). Randomness comes from
`fold_in(key, step)`, so a resumed run draws exactly what an uninterrupted one would.
The NumPy versions in `transforms` are the reference these are tested against.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cnn_jax.config import ConfigError, Set, one_of
from cnn_jax.layers import InputError

CROPS = ("centre", "ten")  # the evaluations a Preprocessor offers: one centre crop, the paper's ten
# How 0..1 pixels become the network's input: minus the training set's mean image (the paper),
# minus its per-channel mean and over its per-channel standard deviation, or ImageNet's channel
# statistics as torchvision's weights expect (its `transforms.Normalize` constants).
NORMALIZATIONS = ("mean_image", "channel", "imagenet")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Draws(struct.PyTreeNode):
    """One batch's random choices: crop origins, mirrors and PCA coefficients."""

    top: jax.Array  # (B,) int32
    left: jax.Array  # (B,) int32
    mirror: jax.Array  # (B,) bool
    alpha: jax.Array  # (B, 3) float32


class Preprocessor(struct.PyTreeNode):
    """Image spec and dataset statistics; `train`/`evaluate` map uint8 batches to inputs.

    A pytree: the arrays travel into the compiled step as arguments (replicated), the spec
    is static. Adding an augmentation means adding it here, in `draw` and `train`.
    """

    mean: jax.Array  # (R, R, C) float32 in 0..255: the training set's mean image
    eigenvalues: jax.Array  # (3,) RGB covariance eigenvalues, in 0..1 units
    eigenvectors: jax.Array  # (3, 3), columns
    centre: jax.Array  # (C,) in 0..1 units: subtracted per channel (not with 'mean_image')
    spread: jax.Array  # (C,): divided by per channel (not with 'mean_image')
    normalize: str = struct.field(pytree_node=False, default="mean_image")
    input_size: int = struct.field(pytree_node=False, default=227)
    flip: bool = struct.field(pytree_node=False, default=True)
    pca_noise: float = struct.field(pytree_node=False, default=0.0)  # std of alpha; 0 = off

    def normalise(self, images: jax.Array) -> jax.Array:
        """uint8 (B, R, R, C) -> float32 in 0..1 units, minus the mean image (or per channel:
        minus `centre`, over `spread`)."""
        want = (*self.mean.shape[:2], self.mean.shape[-1])
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise InputError(f"the preprocessor takes stored uint8 images of shape (batch, {', '.join(map(str, want))}), "
                             f"got {tuple(images.shape)}: pass batches from the prepared store, whose size is "
                             "the config's resize_size")
        if images.dtype != jnp.uint8:
            raise InputError(f"the preprocessor takes uint8 pixels (0..255), got {images.dtype}: pass the stored "
                             "images as they are; it subtracts the mean itself")
        if self.normalize == "mean_image":
            return images.astype(jnp.float32) / 255.0 - self.mean / 255.0
        return (images.astype(jnp.float32) / 255.0 - self.centre) / self.spread

    def draw(self, key: jax.Array, batch: int) -> Draws:
        size, side = self.input_size, self.mean.shape[0]
        k_top, k_left, k_mirror, k_alpha = jax.random.split(key, 4)
        top = jax.random.randint(k_top, (batch,), 0, side - size + 1)
        left = jax.random.randint(k_left, (batch,), 0, side - size + 1)
        mirror = jax.random.bernoulli(k_mirror, 0.5, (batch,)) & self.flip
        alpha = jax.random.normal(k_alpha, (batch, 3)) * self.pca_noise
        return Draws(top, left, mirror, alpha)

    def apply_draws(self, images: jax.Array, draws: Draws) -> jax.Array:
        """Normalise, crop at the drawn origins, mirror, add the colour shift."""
        x = self.normalise(images)
        size, channels = self.input_size, x.shape[-1]

        def crop(image, top, left):
            return jax.lax.dynamic_slice(image, (top, left, 0), (size, size, channels))

        x = jax.vmap(crop)(x, draws.top, draws.left)
        x = jnp.where(draws.mirror[:, None, None, None], x[:, :, ::-1], x)
        if self.pca_noise > 0 and channels == 3:
            shift = (draws.alpha * self.eigenvalues) @ self.eigenvectors.T  # (B, 3), in 0..1 pixel units
            x = x + (shift if self.normalize == "mean_image" else shift / self.spread)[:, None, None, :]
        return x

    def train(self, images: jax.Array, key: jax.Array) -> jax.Array:
        return self.apply_draws(images, self.draw(key, images.shape[0]))

    def evaluate(self, images: jax.Array, crops: str = "centre") -> jax.Array:
        """The centre crop (B, S, S, C), or ten crops (B, 10, S, S, C) in `transforms.ten_crop`'s order."""
        x = self.normalise(images)
        size, side = self.input_size, x.shape[1]
        centre = (side - size) // 2
        if crops == "centre":
            return x[:, centre:centre + size, centre:centre + size]
        if crops != "ten":
            raise ValueError(f"unknown crops {crops!r}: use one of {', '.join(CROPS)}")
        origins = [(0, 0), (0, side - size), (side - size, 0), (side - size, side - size), (centre, centre)]
        views = [x[:, t:t + size, l:l + size] for t, l in origins]
        views += [v[:, :, ::-1] for v in views]
        return jnp.stack(views, axis=1)


def make_preprocessor(mean, eigenvalues, eigenvectors, *, input_size: int, flip: bool, pca_noise: float,
                      normalize: str = "mean_image", channel_std=None) -> Preprocessor:
    """The preprocessor for stored images with the training set's statistics (`mean`: the mean
    image in 0..255; `channel_std`: per channel in 0..1 units, needed by 'channel')."""
    if mean.shape[0] < input_size:
        raise ConfigError(f"stored images of {mean.shape[0]}x{mean.shape[1]} are smaller than the "
                          f"{input_size}x{input_size} input: raise {{0}}", Set("resize_size"))
    centre, spread = _channel_statistics(normalize, mean, channel_std)
    as_array: Any = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return Preprocessor(as_array(mean), as_array(eigenvalues), as_array(eigenvectors), as_array(centre),
                        as_array(spread), normalize=normalize, input_size=input_size, flip=flip,
                        pca_noise=float(pca_noise))


def check_normalize(normalize: str, channels: int):
    """A normalisation this preprocessor knows, for images of `channels` channels."""
    one_of("normalize", normalize, NORMALIZATIONS, "input normalisation")
    if normalize == "imagenet" and channels != 3:
        raise ConfigError("ImageNet's statistics are for RGB images, not {0}", Set("channels", channels),
                          key="normalize", value=normalize)


def _channel_statistics(normalize: str, mean, channel_std) -> tuple:
    """(centre, spread) per channel in 0..1 units for `normalize`."""
    channels = mean.shape[-1]
    check_normalize(normalize, channels)
    if normalize == "mean_image":
        return np.zeros(channels), np.ones(channels)
    if normalize == "channel":
        if channel_std is None:
            raise ValueError("normalize='channel' needs the training set's per-channel standard deviation")
        return np.asarray(mean, np.float64).mean((0, 1)) / 255.0, np.maximum(np.asarray(channel_std), 1e-6)
    return np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
