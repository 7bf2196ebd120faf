"""Datasets by name, through tensorflow-datasets' random-access `data_source` (array_record).

Reading needs no TensorFlow. The offline default, `digits`, is scikit-learn's 1,797 real
8x8 scans of handwritten digits, written once into the data dir as a tfds dataset, so the
same code path that serves ImageNet serves it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from cnn_jax.config import SettingError, Set, literal
from cnn_jax.data import transforms

WRITABLE = Set("data_dir", "<a writable folder>")
DEFAULT_DATA_DIR = os.environ.get("TFDS_DATA_DIR", str(pathlib.Path.home() / "tensorflow_datasets"))
DIGITS_VALIDATION = 300  # held-out examples; the remaining 1,497 train


class DatasetError(SettingError):
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
    cache_dir: pathlib.Path  # where prepared stores and their statistics are written
    fingerprint: str = ""  # changes when the split's contents may have changed
    class_names: tuple = ()

    def __len__(self):
        return len(self.source)

    def load(self, index: int, min_side: int = 0) -> dict:
        """Example `index` decoded: {'image': uint8 HWC, 'label': int}. `min_side` lets a
        source decode large JPEGs at reduced size (never below it), bounding memory."""
        if hasattr(self.source, "load"):
            return self.source.load(index, min_side)
        record = self.source[index]
        return {"image": np.asarray(record["image"]), "label": int(record["label"])}


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FOLDER_VALIDATION = 0.1  # fraction held out (by a hash of the file name) when there is no val/ folder

PREPARE_HINT = ("prepare it on a machine with network access: `pip install -e '.[prepare]'` then "
                "`tfds build {name} --data_dir={data_dir} --file_format=array_record`, and copy the "
                "folder here (or set {{0}} to where it is)")
HINTS = {
    "imagenet2012": ("imagenet2012 needs the ILSVRC-2012 tar files (ILSVRC2012_img_train.tar, "
                     "ILSVRC2012_img_val.tar) in {data_dir}/downloads/manual, then `pip install -e "
                     "'.[prepare]'` and `tfds build imagenet2012 --data_dir={data_dir} "
                     "--file_format=array_record`"),
}


class FolderSource:
    """Random access to root/<class>/<image>, decoded (and converted to RGB) when read.

    A file that cannot be decoded raises ValueError naming it: the prepared store skips and
    counts such files once, so no image ever stands in for another.
    """

    def __init__(self, files: list[tuple[str, int]], root: str):
        self.files, self.root = files, root

    def __len__(self):
        return len(self.files)

    def __repr__(self):
        return f"FolderSource({self.root!r}, {len(self.files)} files)"

    def load(self, index: int, min_side: int = 0) -> dict:
        path, label = self.files[index]
        try:
            data = pathlib.Path(path).read_bytes()
        except OSError as err:
            raise ValueError(f"{path}: cannot read ({err})") from None
        return {"image": transforms.decode(data, name=path, min_side=min_side), "label": label}

    def __getitem__(self, index):
        return self.load(index)

    def fingerprint(self) -> str:
        """Paths, sizes and modification times: a changed, added or removed file changes it."""
        digest = hashlib.sha1()
        for path, label in self.files:
            stat = os.stat(path)
            digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def _readable(path: pathlib.Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()  # header and structure, without decoding every pixel
        return True
    except Exception:  # noqa: BLE001
        return False


def _in_validation(relative: str) -> bool:
    digest = hashlib.sha1(relative.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < FOLDER_VALIDATION


def scan_folder(root: pathlib.Path, split: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(files with labels, class names) of a folder of class folders.

    With root/train and root/val (or root/validation), those are the splits; otherwise 10%
    of every class is held out for 'validation' by a hash of the file's path. Non-image and
    unreadable files are skipped with one warning that counts them.
    """
    if not root.is_dir():
        raise DatasetError(f"image folder {literal(root)} does not exist")
    if (root / "train").is_dir():
        names = ["train"] if split == "train" else ["val", "validation", split]
        folder = next((root / n for n in names if (root / n).is_dir()), None)
        if folder is None:
            raise DatasetError(f"image folder {literal(root)} has train/ but no {literal(repr(split))} folder "
                               f"(tried {literal(names)})")
        if split != "train":
            extra = sorted({d.name for d in folder.iterdir() if d.is_dir()}
                           - {d.name for d in (root / "train").iterdir() if d.is_dir()})
            if extra:
                logging.warning("%s has class folder(s) %s that train/ lacks: not evaluated (the model has no "
                                "such class)", folder, _some(extra))
        return scan_classes(folder, class_root=root / "train", require_all=split == "train")
    files, classes = scan_classes(root, class_root=root)
    want_val = split != "train"
    return [(f, c) for f, c in files if _in_validation(os.path.relpath(f, root)) == want_val], classes


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def scan_classes(root: pathlib.Path, class_root: pathlib.Path, require_all: bool = True):
    """Images of root/<class>/ for the classes named by the sub-folders of `class_root`.

    Every class needs an image to train on (`require_all`); an evaluation split may lack
    some classes (a warning names them)."""
    classes = sorted(d.name for d in class_root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise DatasetError(f"image folder {literal(class_root)} has {len(classes)} class folder(s): a classifier "
                           "needs at least two sub-folders of images, one per class")
    files, skipped, absent = [], [], []
    for label, name in enumerate(classes):
        folder = root / name
        entries = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped += [p for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES]
        good = [p for p in images if p.stat().st_size > 0 and _readable(p)]
        skipped += [p for p in images if p not in good]
        if not good and require_all:
            raise DatasetError(f"class folder {literal(folder)} has no readable images: add some or remove the "
                               "folder")
        absent += [] if good else [name]
        files += [(str(p), label) for p in good]
    if skipped:
        logging.warning("skipped %d file(s) that are not readable images under %s, e.g. %s",
                        len(skipped), root, ", ".join(str(p) for p in skipped[:3]))
    if absent:
        logging.warning("%s has no images of class(es) %s: they are not evaluated", root,
                        _some(absent))
    return files, classes


def _check_writable(data_dir: pathlib.Path):
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetError(f"data dir {literal(data_dir)} cannot be made ({err.strerror}): set {{0}}", WRITABLE) from None
    if not os.access(data_dir, os.W_OK):
        raise DatasetError(f"data dir {literal(data_dir)} is not writable: set {{0}}", WRITABLE)


def open_split(name: str, split: str, data_dir: str | None = None) -> Split:
    """Opens `split` of dataset `name`, preparing the offline default on first use.

    `name`: 'digits' (offline), any prepared tensorflow-datasets name (imagenet2012, cifar10,
    mnist, oxford_flowers102, ...), or 'folder:/path' for a folder of class folders.
    Missing data fails at once with a one-line `DatasetError` saying how to get it; nothing
    is downloaded.
    """
    data_dir = pathlib.Path(data_dir or DEFAULT_DATA_DIR).expanduser()
    if name.startswith("folder:"):
        root = pathlib.Path(name.removeprefix("folder:")).expanduser().absolute()
        files, classes = scan_folder(root, split)
        if not files:
            hint = ("add images, or hold out your own in root/train and root/val" if split != "train"
                    and not (root / "train").is_dir() else "add images")
            raise DatasetError(f"image folder {literal(root)} has no images for split {literal(repr(split))}: "
                               f"{hint}")
        key = hashlib.sha1(str(root).encode()).hexdigest()[:12]
        source = FolderSource(files, str(root))
        return Split(name, split, source, len(classes), data_dir / "folders" / key, source.fingerprint(),
                     tuple(classes))
    if name in BUILDERS:
        builder = BUILDERS[name](data_dir=str(data_dir), file_format="array_record")
        if not builder.is_prepared():
            _check_writable(data_dir)
            print(f"preparing the offline dataset {name!r} in {data_dir} (once)")
            tfds.disable_progress_bar()
            with contextlib.redirect_stdout(io.StringIO()):  # tfds says "Downloading ...": nothing is
                builder.download_and_prepare()
    else:
        try:
            builder = tfds.builder(name, data_dir=str(data_dir))
        except tfds.core.registered.DatasetNotFoundError as err:
            raise DatasetError(f"unknown dataset {literal(repr(name))}: use 'digits' or a tensorflow-datasets "
                               "name") from err
        except ValueError as err:  # tfds cannot parse the name (name[/config][:x.y.z])
            raise DatasetError(f"{literal(repr(name))} is not a dataset name: write name, name/config or "
                               "name:1.2.3 (e.g. 'cifar10', 'imagenet2012:5.1.0')") from err
        if not builder.is_prepared():
            hint = HINTS.get(name, PREPARE_HINT).format(name=name, data_dir=literal(data_dir))
            raise DatasetError(f"dataset {literal(repr(name))} is not prepared in {literal(data_dir)} (no "
                               f"download is attempted): {hint}", Set("data_dir"))
    if split not in builder.info.splits:
        raise DatasetError(f"dataset {literal(repr(name))} has no split {literal(repr(split))}; it has "
                           f"{sorted(builder.info.splits)}")
    label = builder.info.features["label"]
    try:
        source = builder.as_data_source(split=split)
    except Exception as err:  # noqa: BLE001 - e.g. prepared as tfrecord, which has no random access
        raise DatasetError(f"dataset {literal(repr(name))} in {literal(data_dir)} cannot be read by index "
                           f"({type(err).__name__}); "
                           f"rebuild it with --file_format=array_record") from None
    fingerprint = f"{builder.name}:{builder.version}:{split}:{builder.info.splits[split].num_examples}"
    cache_dir = data_dir / "prepared" / f"{builder.name}-{builder.version}"  # beside, not inside, tfds's folder
    return Split(name, split, source, label.num_classes, cache_dir, fingerprint)
