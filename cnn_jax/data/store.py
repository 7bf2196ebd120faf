"""Prepared stores: each split decoded once, at the paper's fixed resolution, read as uint8.

Krizhevsky et al. (2012), section 2, down-sampled ImageNet to a fixed 256x256: the shorter
side resized to 256 and the central square kept. `prepare` does that once per split, size,
channel count and format, and writes array_record shards beside the dataset. Training and
evaluation then read uint8 arrays: no decoding at all ('raw'), or one small fixed-size JPEG
per image ('jpeg': several times smaller on disk, for datasets whose raw pixels would not fit).

Preparation runs over the machine's cores with a progress bar, resumes at the unfinished
shards when interrupted, and writes to a new directory when the split's contents (its
fingerprint) or the spec change. Files that cannot be decoded are skipped and counted once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import pathlib

import numpy as np
from tqdm.auto import tqdm

from cnn_jax.config import SettingError, Set, literal
from cnn_jax.data import transforms
from cnn_jax.files import replaced_atomically

FORMATS = ("raw", "jpeg")
SHARD_SIZE = 1024  # images per shard: the unit of parallel work and of resumption
VERSION = 1  # part of every store's key: bump it when preparation changes
_OPTIONS = "group_size:1,uncompressed"  # one record per read; pixels and JPEGs do not compress


class StoreError(SettingError):
    """A store that cannot be prepared (nothing decodable, an unwritable data dir)."""


@dataclasses.dataclass(frozen=True)
class StoreSpec:
    size: int = 256  # the side of the stored square (the paper: 256)
    channels: int = 3  # 3: RGB (grey replicated, as in the paper); 1: grey
    format: str = "raw"  # 'raw' uint8 pixels, or 'jpeg' re-encoded at `size`
    quality: int = 95  # JPEG quality of the 'jpeg' format

    def __post_init__(self):
        if self.format not in FORMATS:
            raise StoreError(f"unknown store format {self.format!r}: use one of {FORMATS}")


def store_dir(split, spec: StoreSpec) -> pathlib.Path:
    """Where `split` prepared with `spec` lives: a new name whenever either changes."""
    key = hashlib.sha1(f"{VERSION}|{split.name}|{split.fingerprint}|{spec}".encode()).hexdigest()[:10]
    return pathlib.Path(split.cache_dir) / f"{split.split}_{spec.size}x{spec.size}x{spec.channels}_{spec.format}_{key}"


def square(image: np.ndarray, spec: StoreSpec) -> np.ndarray:
    """The paper's fixed resolution: channels converted, shorter side resized, centre square."""
    image = transforms.rgb_to_grey(image) if spec.channels == 1 else transforms.grey_to_rgb(image)
    image = transforms.resize_shorter(image, spec.size)
    return np.ascontiguousarray(transforms.central_crop(image, spec.size))


def encode(image: np.ndarray, spec: StoreSpec) -> bytes:
    if spec.format == "raw":
        return image.tobytes()
    import simplejpeg

    return simplejpeg.encode_jpeg(image, quality=spec.quality, colorspace="GRAY" if spec.channels == 1 else "RGB")


def decode(record: bytes, spec: StoreSpec) -> np.ndarray:
    if spec.format == "raw":
        return np.frombuffer(record, np.uint8).reshape(spec.size, spec.size, spec.channels)
    import simplejpeg

    return simplejpeg.decode_jpeg(record, colorspace="GRAY" if spec.channels == 1 else "RGB")


def _shard_paths(directory: pathlib.Path, shard: int) -> tuple[pathlib.Path, pathlib.Path]:
    return directory / f"shard-{shard:05d}.array_record", directory / f"shard-{shard:05d}.json"


def _write_shard(split, spec: StoreSpec, shard: int, start: int, stop: int, directory: pathlib.Path) -> int:
    """Writes images [start, stop) as one shard; the records file appears last, by rename, so
    a shard that exists is complete. Returns how many images were written."""
    from array_record.python.array_record_module import ArrayRecordWriter

    records, sidecar = _shard_paths(directory, shard)
    with replaced_atomically(records) as tmp:
        writer = ArrayRecordWriter(str(tmp), _OPTIONS)
        labels, bad = [], []
        try:
            for index in range(start, stop):
                try:
                    example = split.load(index, min_side=spec.size)
                    image = square(example["image"], spec)
                except (ValueError, OSError) as err:
                    bad.append(str(err).splitlines()[0][:300])
                    continue
                writer.write(encode(image, spec))
                labels.append(int(example["label"]))
        finally:
            writer.close()
        _write_text(sidecar, json.dumps({"labels": labels, "bad": bad}))
    return stop - start


def _write_text(path: pathlib.Path, text: str):
    with replaced_atomically(path) as tmp:
        tmp.write_text(text)


def default_workers() -> int:
    """One per core this process may use, up to 16."""
    return max(1, min(16, len(os.sched_getaffinity(0))))


def _run_shards(split, spec, todo, directory, workers, bar):
    """Shards in parallel on threads: PIL and libjpeg-turbo decode and resize outside the
    GIL, and threads, unlike spawned processes, never re-import the user's main script."""
    with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(todo)))) as pool:
        futures = [pool.submit(_write_shard, split, spec, *job, directory) for job in todo]
        for future in concurrent.futures.as_completed(futures):
            bar.update(future.result())


def prepare(split, spec: StoreSpec, *, workers: int = 0) -> "Store":
    """The prepared store of `split`, made first if needed (resuming a partial one)."""
    directory = store_dir(split, spec)
    if (directory / "meta.json").exists():
        return Store(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"cannot write the prepared store at {literal(directory)} ({err.strerror}): "
                         "set {0}",
                         Set("data_dir", "<a writable folder>")) from None
    n = len(split)
    jobs = [(k, start, min(n, start + SHARD_SIZE)) for k, start in enumerate(range(0, n, SHARD_SIZE))]
    todo = [job for job in jobs if not all(p.exists() for p in _shard_paths(directory, job[0]))]
    done = sum(stop - start for _, start, stop in jobs if (_, start, stop) not in todo)
    with tqdm(total=n, initial=done, unit="img", dynamic_ncols=True, leave=False,
              desc=f"preparing {split.name}/{split.split} at {spec.size}x{spec.size} ({spec.format})") as bar:
        if done:
            bar.write(f"resuming the preparation of {directory}: {done} of {n} images done")
        _run_shards(split, spec, todo, directory, workers or default_workers(), bar)
    _finish(split, spec, directory, jobs)
    return Store(directory)


def _finish(split, spec, directory, jobs):
    """Gathers the shards' labels, checks every class kept an image, writes meta.json last."""
    labels, bad = [], []
    for shard, _, _ in jobs:
        sidecar = json.loads(_shard_paths(directory, shard)[1].read_text())
        labels += sidecar["labels"]
        bad += sidecar["bad"]
    if bad:
        logging.warning("skipped %d of %d images of %s/%s that could not be decoded, e.g. %s", len(bad),
                        len(split), split.name, split.split, "; ".join(bad[:3]))
    if not labels:
        raise StoreError(f"{literal(split.name)}/{literal(split.split)}: none of its {len(split)} images could "
                         "be decoded")
    missing = sorted(set(range(split.num_classes)) - set(labels))
    if missing and split.split == "train":
        names = getattr(split, "class_names", None) or []
        shown = ", ".join(names[c] if c < len(names) else str(c) for c in missing[:5])
        raise StoreError(f"{literal(split.name)}/{literal(split.split)}: class(es) {shown} have no decodable image "
                         f"({len(missing)} in all): fix or remove those files")
    np.save(directory / "labels.npy", np.asarray(labels, np.int32))
    meta = {"count": len(labels), "skipped": len(bad), "spec": dataclasses.asdict(spec),
            "dataset": split.name, "split": split.split, "fingerprint": split.fingerprint,
            "shards": len(jobs), "version": VERSION}
    _write_text(directory / "meta.json", json.dumps(meta, indent=1))


class Store:
    """A prepared split: `images(indices)` -> uint8 (n, size, size, channels); `labels`.

    Reads are thread-safe (array_record readers), so a pool of threads can fill batches.
    """

    def __init__(self, directory):
        import grain

        self.directory = pathlib.Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        self.spec = StoreSpec(**self.meta["spec"])
        self.labels = np.load(self.directory / "labels.npy")
        paths = [str(_shard_paths(self.directory, k)[0]) for k in range(self.meta["shards"])]
        self._records = grain.sources.ArrayRecordDataSource(paths)
        if len(self._records) != len(self.labels):
            raise StoreError(f"prepared store {literal(self.directory)} is inconsistent ({len(self._records)} "
                             f"records, {len(self.labels)} labels): delete the folder to prepare it again")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.spec.size, self.spec.size, self.spec.channels)

    def images(self, indices) -> np.ndarray:
        indices = [int(i) for i in indices]
        if not indices:
            return np.zeros((0, *self.shape), np.uint8)
        records = self._records.__getitems__(indices)
        if self.spec.format == "raw":
            return np.frombuffer(b"".join(records), np.uint8).reshape(len(indices), *self.shape)
        return np.stack([decode(r, self.spec) for r in records])

    def __repr__(self):
        return f"Store({str(self.directory)!r}, {len(self)} images)"


def subset(base: Store, classes: tuple = (), per_class: int = 0):
    """`base` itself, or its `Subset` of `classes` (() : all) with `per_class` images each."""
    if not classes and not per_class:
        return base
    return Subset(base, classes or range(int(base.labels.max()) + 1), per_class)


class Subset:
    """A view of a `Store` holding only `classes`, relabelled 0..k-1 in that order, with at
    most `per_class` images of each (0: all; the first in the store's order): the pieces of a
    transfer experiment (digits 0-4, then 5-9 from 20 images a class) from one prepared split."""

    def __init__(self, base: Store, classes, per_class: int = 0):
        classes = [int(c) for c in classes]
        picked = [np.flatnonzero(base.labels == c) for c in classes]
        self.rows = np.sort(np.concatenate([rows[:per_class] if per_class else rows for rows in picked]))
        new_label = np.full(max(int(base.labels.max()), *classes) + 1, -1, np.int64)
        new_label[classes] = np.arange(len(classes))
        self.base, self.spec, self.directory = base, base.spec, base.directory
        self.labels = new_label[base.labels[self.rows]].astype(base.labels.dtype)
        self.classes = tuple(classes)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.base.shape

    def images(self, indices) -> np.ndarray:
        return self.base.images(self.rows[np.asarray(list(indices), np.int64)])

    def __repr__(self):
        return f"Subset({self.base!r}, classes {list(self.classes)}, {len(self)} images)"
