"""Datasets by name, through tensorflow-datasets' random-access `data_source` (array_record).

Reading needs no TensorFlow. The offline default, `digits`, is scikit-learn's 1,797 real
8x8 scans of handwritten digits, written once into the data dir as a tfds dataset, so the
same code path that serves ImageNet serves it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_DATA_DIR = os.environ.get("TFDS_DATA_DIR", str(pathlib.Path.home() / "tensorflow_datasets"))
DIGITS_VALIDATION = 300  # held-out examples; the remaining 1,497 train


class DatasetError(RuntimeError):
    """A dataset that cannot be opened; the message says what is missing and how to fix it."""


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits (UCI), 8x8 grey scaled to 0..255, 10 classes.

    Split deterministically: a fixed permutation (seed 0) puts 300 images in 'validation'
    and 1,497 in 'train'.
    """

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn load_digits(): 1,797 real 8x8 handwritten digit scans.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        order = np.random.default_rng(0).permutation(len(images))
        val, train = order[:DIGITS_VALIDATION], order[DIGITS_VALIDATION:]
        return {"train": self._generate_examples(images, digits.target, train),
                "validation": self._generate_examples(images, digits.target, val)}

    def _generate_examples(self, images, labels, indices):
        for i in sorted(indices):
            yield int(i), {"image": images[i], "label": int(labels[i])}


BUILDERS = {"digits": SklearnDigits}


@dataclasses.dataclass(frozen=True)
class Split:
    """An opened split: random access by index to {'image': uint8 HWC, 'label': int}."""

    name: str
    split: str
    source: object
    num_classes: int
    cache_dir: pathlib.Path  # where derived statistics (mean image) are cached

    def __len__(self):
        return len(self.source)


def _check_writable(data_dir: pathlib.Path):
    data_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(data_dir, os.W_OK):
        raise DatasetError(f"data dir {data_dir} is not writable: pass --config.data_dir=<a writable folder>")


def open_split(name: str, split: str, data_dir: str | None = None) -> Split:
    """Opens `split` of dataset `name`, preparing the offline default on first use."""
    data_dir = pathlib.Path(data_dir or DEFAULT_DATA_DIR).expanduser()
    if name in BUILDERS:
        builder = BUILDERS[name](data_dir=str(data_dir), file_format="array_record")
        if not builder.is_prepared():
            _check_writable(data_dir)
            print(f"preparing the offline dataset {name!r} in {data_dir} (once)")
            tfds.disable_progress_bar()
            builder.download_and_prepare()
    else:
        try:
            builder = tfds.builder(name, data_dir=str(data_dir))
        except tfds.core.registered.DatasetNotFoundError as err:
            raise DatasetError(f"unknown dataset {name!r}: use 'digits' or a tensorflow-datasets name") from err
        if not builder.is_prepared():
            raise DatasetError(f"dataset {name!r} is not prepared in {data_dir}: prepare it with "
                               f"tensorflow-datasets (`tfds build {name} --data_dir={data_dir} "
                               f"--file_format=array_record`) or pass --config.data_dir")
    if split not in builder.info.splits:
        raise DatasetError(f"dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    label = builder.info.features["label"]
    return Split(name, split, builder.as_data_source(split=split), label.num_classes,
                 pathlib.Path(builder.data_dir))
