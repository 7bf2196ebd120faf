"""Input pipeline on grain: shuffling, augmentation, batching. The only module that knows grain.

The training stream is a grain `DataLoader` over the split's random-access source: an
`IndexSampler` shuffles with a per-epoch permutation derived from the seed, random crops
draw from a per-record generator, so the stream is a pure function of (seed, position) and
its iterator state, saved in checkpoints, resumes it exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import grain
import numpy as np
from tqdm.auto import tqdm

from cnn_jax.data import transforms
from cnn_jax.data.sources import Split


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """The paper's preprocessing: resize the shorter side to `resize_size`, centre square,
    subtract the mean image, then a random (train) or central (eval) `input_size` crop."""

    input_size: int = 227
    resize_size: int = 256
    flip: bool = True
    channels: int = 3  # 1: grey (LeNet); 3: RGB, grey images replicated as in the paper
    pca_noise: float = 0.0  # std of the PCA colour-noise coefficients (the paper: 0.1); 0 = off


def decode(record: dict, spec: ImageSpec) -> np.ndarray:
    """uint8 RGB (or grey), shorter side resized and centre-cropped to resize_size^2."""
    image = np.asarray(record["image"])
    image = transforms.rgb_to_grey(image) if spec.channels == 1 else transforms.grey_to_rgb(image)
    image = transforms.resize_shorter(image, spec.resize_size)
    return transforms.central_crop(image, spec.resize_size)


def _cached(path: pathlib.Path, compute) -> dict:
    """The arrays `compute()` returns (a dict), cached at `path` (.npz) beside the dataset.

    A read-only data dir only costs the cache: a warning, and the arrays are still returned.
    """
    if path.exists():
        with np.load(path) as cached:
            return dict(cached)
    arrays = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
    except OSError as err:
        logging.warning("could not cache %s (%s)", path, err)
    return arrays


def mean_image(split: Split, spec: ImageSpec) -> np.ndarray:
    """Per-pixel mean of the decoded training images, float32; cached beside the dataset."""

    def compute():
        total = np.zeros((spec.resize_size, spec.resize_size, spec.channels), np.float64)
        for i in tqdm(range(len(split)), desc=f"mean image of {split.name}/{split.split}", leave=False):
            total += decode(split.source[i], spec)
        return {"mean": (total / max(len(split), 1)).astype(np.float32)}

    name = f"mean_image_{split.split}_{spec.resize_size}_{spec.channels}.npz"
    return _cached(pathlib.Path(split.cache_dir) / name, compute)["mean"]


def colour_basis(split: Split, spec: ImageSpec, max_images: int = 1000):
    """(eigenvalues, eigenvectors) of the RGB covariance of the training images, in the
    pipeline's 0..1 units, from up to `max_images` evenly spaced images; cached."""

    def compute():
        step = max(1, len(split) // max_images)
        pixels = np.concatenate([decode(split.source[i], spec)[::4, ::4].reshape(-1, 3)
                                 for i in range(0, len(split), step)]) / 255.0
        values, vectors = transforms.pca_basis(pixels)
        return {"values": values, "vectors": vectors}

    cached = _cached(pathlib.Path(split.cache_dir) / f"colour_pca_{split.split}_{spec.resize_size}.npz", compute)
    return cached["values"], cached["vectors"]


class _Preprocess(grain.transforms.RandomMap):
    """decode -> minus mean image -> crop: random (+ flip) for 'train', 'centre' or 'ten'."""

    def __init__(self, spec: ImageSpec, mean: np.ndarray, mode: str, basis=None):
        self.spec, self.mean, self.mode, self.basis = spec, mean, mode, basis

    def __repr__(self):  # stable across processes, as grain's workers require
        return f"_Preprocess({self.spec}, mode={self.mode})"

    def random_map(self, record, rng: np.random.Generator):
        image = decode(record, self.spec).astype(np.float32) / 255.0 - self.mean / 255.0
        if self.mode == "train":
            image = transforms.random_crop_flip(image, self.spec.input_size, rng, self.spec.flip)
            if self.basis is not None and self.spec.pca_noise > 0:
                image = transforms.pca_colour_noise(image, *self.basis, rng, self.spec.pca_noise)
        elif self.mode == "ten":
            image = transforms.ten_crop(image, self.spec.input_size)
        else:
            image = transforms.central_crop(image, self.spec.input_size)
        return {"image": np.ascontiguousarray(image), "label": np.int32(record["label"])}


def train_loader(split: Split, spec: ImageSpec, mean: np.ndarray, *, batch_size: int, seed: int,
                 worker_count: int = 0, shard_index: int = 0, shard_count: int = 1) -> grain.DataLoader:
    """An endless, shuffled, augmented stream of full batches (this host's shard)."""
    basis = colour_basis(split, spec) if spec.pca_noise > 0 and spec.channels == 3 else None
    if len(split) < batch_size * shard_count:
        raise ValueError(f"{split.name}/{split.split} has {len(split)} examples, fewer than one "
                         f"global batch of {batch_size * shard_count}: lower --config.batch_size")
    shard = grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(len(split), shard_options=shard, shuffle=True,
                                          num_epochs=None, seed=seed)
    ops = [_Preprocess(spec, mean, "train", basis), grain.transforms.Batch(batch_size, drop_remainder=True)]
    return grain.DataLoader(data_source=split.source, sampler=sampler, operations=ops,
                            worker_count=worker_count)


def eval_batches(split: Split, spec: ImageSpec, mean: np.ndarray, *, batch_size: int,
                 limit: int | None = None, crops: str = "centre"):
    """One pass over the split in order, every batch padded to `batch_size` with a 0/1 'mask'
    (so evaluation compiles once and counts every example exactly once). `crops='ten'`
    gives images of shape (B, 10, S, S, C): corners, centre and their mirrors."""
    n = min(len(split), limit or len(split))
    sampler = grain.samplers.IndexSampler(n, shuffle=False, num_epochs=1, seed=0)
    loader = grain.DataLoader(data_source=split.source, sampler=sampler,
                              operations=[_Preprocess(spec, mean, crops),
                                          grain.transforms.Batch(batch_size, drop_remainder=False)])
    for batch in loader:
        size = len(batch["label"])
        pad = batch_size - size
        yield {"image": np.pad(batch["image"], ((0, pad),) + ((0, 0),) * (batch["image"].ndim - 1)),
               "label": np.pad(batch["label"], (0, pad)),
               "mask": np.pad(np.ones(size, np.float32), (0, pad))}


class Lookahead:
    """A stream one batch ahead, so the next batch is prepared while the device trains.

    `pending` is the next batch to train on; `advance()` loads the one after it. The saved
    position (`get_state`) is that of `pending`, so a checkpoint taken between steps resumes
    with exactly the batch that would have come next.
    """

    def __init__(self, iterator):
        self.iterator = iterator
        self._load()

    def _load(self):
        self.position = self.iterator.get_state()
        self.pending = next(self.iterator)

    def advance(self):
        self._load()

    def get_state(self):
        return self.position

    def set_state(self, state):
        self.iterator.set_state(state)
        self._load()

    def __getattr__(self, name):  # anything else grain's checkpoint handler asks of the stream
        return getattr(self.iterator, name)


def iterator_save_args(iterator):
    """orbax checkpoint args that save the stream's position."""
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator):
    """orbax checkpoint args that restore the stream's position into `iterator`."""
    return grain.checkpoint.CheckpointRestore(iterator)
