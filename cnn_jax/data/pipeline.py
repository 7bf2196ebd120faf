"""Batches from a prepared store, read ahead by worker threads.

Global batch `i` of the training stream is a slice of its epoch's permutation (seeded by
(seed, epoch)): the stream is a pure function of the step, so a resumed run, or one with
another number of processes, sees exactly the same examples, and a checkpoint needs no
iterator state. Each process reads only its own rows of every batch, training and evaluation.

Workers are threads: array_record reads run in C++ and JPEGs decode in libjpeg-turbo, both
outside the GIL, so threads scale without copying every batch between processes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools

import numpy as np
from tqdm.auto import tqdm

from cnn_jax.config import Set
from cnn_jax.data import transforms
from cnn_jax.data.sources import DatasetError
from cnn_jax.data.store import Store, StoreSpec, default_workers
from cnn_jax.files import replaced_atomically


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """The paper's preprocessing: images stored once as `resize_size` squares (shorter side
    resized, centre kept); on the device, the mean image is subtracted and a random (train)
    or central / ten (eval) `input_size` crop taken."""

    input_size: int = 227
    resize_size: int = 256
    flip: bool = True
    channels: int = 3  # 1: grey (LeNet); 3: RGB, grey images replicated as in the paper
    pca_noise: float = 0.0  # std of the PCA colour-noise coefficients (the paper: 0.1); 0 = off
    store_format: str = "raw"  # 'raw' uint8 pixels, or 'jpeg' re-encoded at resize_size

    @property
    def store(self) -> StoreSpec:
        return StoreSpec(self.resize_size, self.channels, self.store_format)


def statistics(store: Store, *, max_pca_images: int = 1000, write: bool = True) -> dict:
    """{'mean': the per-pixel mean image (float32, 0..255), 'channel_std': each channel's
    standard deviation over every pixel (0..1 units), 'eigenvalues', 'eigenvectors': the RGB
    covariance's PCA in 0..1 units} of a training store, computed once and written beside it
    (atomically, and only where `write`: process 0 of a multi-process run)."""
    path = store.directory / "statistics.npz"
    if path.exists():
        with np.load(path) as cached:
            if "channel_std" in cached:  # (written before channel_std existed: computed again)
                return dict(cached)
    n, chunk = len(store), 256
    total = np.zeros(store.shape, np.float64)
    squares = np.zeros(store.shape[-1], np.float64)
    for start in tqdm(range(0, n, chunk), desc=f"mean image of {store.directory.name}", leave=False):
        images = store.images(range(start, min(n, start + chunk)))
        total += images.sum(0, dtype=np.float64)
        squares += np.square(images, dtype=np.float64).sum((0, 1, 2))
    pixels_per_channel = n * store.shape[0] * store.shape[1]
    channel_mean = total.sum((0, 1)) / pixels_per_channel
    variance = np.maximum(squares / pixels_per_channel - np.square(channel_mean), 0.0)
    stats = {"mean": (total / n).astype(np.float32), "channel_std": (np.sqrt(variance) / 255.0).astype(np.float32)}
    if store.shape[-1] == 3:
        picks = np.linspace(0, n - 1, min(n, max_pca_images)).astype(int)
        pixels = store.images(picks)[:, ::4, ::4].reshape(-1, 3) / 255.0
        stats["eigenvalues"], stats["eigenvectors"] = transforms.pca_basis(pixels)
    else:
        stats["eigenvalues"], stats["eigenvectors"] = np.zeros(3), np.eye(3)
    if write:
        with replaced_atomically(path) as tmp:
            np.savez(tmp, **stats)
    return stats


def check_enough(images: int, batch_size: int):
    """A training split needs one whole batch (checked on the split's size before anything is
    prepared, and on the prepared store's, which has lost any undecodable images)."""
    if images < batch_size:
        raise DatasetError(f"the training split has {images} images, fewer than one batch of {batch_size}: "
                           "lower {0} or add images", Set("batch_size"))


class TrainStream:
    """Endless shuffled batches: `batch(i)` is this process's share of global batch i."""

    def __init__(self, store: Store, *, batch_size: int, seed: int, shard_index: int = 0,
                 shard_count: int = 1):
        check_enough(len(store), batch_size)
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.share = batch_size // shard_count
        self.offset = shard_index * self.share
        self.steps_per_epoch = len(store) // batch_size  # the remainder of each epoch is dropped

    @functools.lru_cache(maxsize=2)
    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.store))

    def indices(self, i: int) -> np.ndarray:
        epoch, k = divmod(i, self.steps_per_epoch)
        start = k * self.batch_size + self.offset
        return self.permutation(epoch)[start:start + self.share]

    def batch(self, i: int) -> dict:
        rows = self.indices(i)
        return {"image": self.store.images(rows), "label": self.store.labels[rows]}


def eval_batch(store: Store, i: int, *, batch_size: int, count: int, shard_index: int = 0,
               shard_count: int = 1) -> dict:
    """This process's share of eval batch i over the first `count` images, padded to the
    share with a 0/1 'mask', so every batch compiles alike and counts each image once."""
    share = batch_size // shard_count
    start = i * batch_size + shard_index * share
    rows = np.arange(start, min(start + share, count))
    pad = share - len(rows)
    images = store.images(rows)
    return {"image": np.concatenate([images, np.zeros((pad, *store.shape), np.uint8)]),
            "label": np.pad(store.labels[rows], (0, pad)),
            "mask": np.pad(np.ones(len(rows), np.float32), (0, pad))}


def eval_batches(store: Store, *, batch_size: int, limit: int = 0, shard_index: int = 0,
                 shard_count: int = 1, workers: int = 0):
    """One ordered pass over the first `limit` images (0: all), read ahead by workers."""
    count = min(len(store), limit or len(store))
    n = -(-count // batch_size)
    read = functools.partial(eval_batch, store, batch_size=batch_size, count=count,
                             shard_index=shard_index, shard_count=shard_count)
    with ReadAhead(read, 0, workers=workers, stop=n) as batches:
        yield from batches


class ReadAhead:
    """`fn(start), fn(start + 1), ...` in order, computed `ahead` at a time by worker threads."""

    def __init__(self, fn, start: int = 0, *, workers: int = 0, ahead: int = 0, stop: int | None = None):
        self.fn, self.next, self.stop = fn, start, stop
        self.workers = workers or default_workers()
        self.ahead = ahead or 2 * self.workers
        self.pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="read_ahead")
        self.pending: collections.deque = collections.deque()
        self.submitted = start
        self._fill()

    def _fill(self):
        while len(self.pending) < self.ahead and (self.stop is None or self.submitted < self.stop):
            self.pending.append(self.pool.submit(self.fn, self.submitted))
            self.submitted += 1

    def __iter__(self):
        return self

    def __next__(self):
        if not self.pending:
            raise StopIteration
        future = self.pending.popleft()
        self.next += 1
        self._fill()
        return future.result()

    def close(self):
        for future in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DeviceFeed:
    """Batches placed on the devices `depth` steps ahead of use, read by worker threads
    further ahead still, so the host prepares step n+2 while the device runs step n."""

    def __init__(self, read, start: int, place, *, workers: int, depth: int = 2):
        self.reader = ReadAhead(read, start, workers=workers)
        self.place, self.placed = place, collections.deque()
        for _ in range(depth):
            self.placed.append(self.place(next(self.reader)))

    def next(self):
        batch = self.placed.popleft()
        self.placed.append(self.place(next(self.reader)))
        return batch

    def close(self):
        self.placed.clear()
        self.reader.close()
