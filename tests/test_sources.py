"""Datasets: folders of real photographs with bad files, offline tfds errors, one pipeline."""

import logging
import os
import time

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from cnn_jax.data import sources
from cnn_jax.data.sources import DatasetError, open_split


def save(img, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Two classes of real photos in every mode a user's folder may hold, plus bad files."""
    root = tmp_path_factory.mktemp("photos")
    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    for cls, photo in (("china", china), ("flower", flower)):
        for i in range(12):
            crop = photo.crop((i * 10, i * 5, i * 10 + 300, i * 5 + 200))
            save(crop, root / cls / f"{i:02d}.jpg")
        save(photo.convert("L"), root / cls / "grey.png")
        save(photo.convert("RGBA"), root / cls / "alpha.png")
        save(photo.convert("CMYK"), root / cls / "cmyk.jpg")
        save(photo.convert("P"), root / cls / "palette.png")
        save(Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257)), root / cls / "deep.png")
        save(photo.resize((40, 30)), root / cls / "tiny.jpg")  # smaller than any crop
    (root / "china" / "empty.jpg").write_bytes(b"")
    (root / "china" / "notes.txt").write_text("not an image")
    (root / "flower" / "broken.png").write_bytes(b"\x89PNG garbage")
    return root


def test_folder_split_skips_bad_files_with_a_warning(photo_folder, caplog):
    with caplog.at_level(logging.WARNING):
        files, classes = sources.scan_folder(photo_folder, "train")
    assert classes == ["china", "flower"]
    assert "skipped 3 file(s)" in caplog.text and "empty.jpg" in caplog.text
    val, _ = sources.scan_folder(photo_folder, "validation")
    names = {f for f, _ in files} | {f for f, _ in val}
    assert len(names) == 2 * 18 and not {f for f, _ in files} & {f for f, _ in val}
    assert 0 < len(val) < len(files)


def test_folder_reads_every_mode_as_rgb(photo_folder):
    split = open_split(f"folder:{photo_folder}", "train", str(photo_folder.parent / "tfds"))
    assert split.num_classes == 2
    for i in range(len(split)):
        record = split.source[i]
        assert record["image"].ndim == 3 and record["image"].shape[-1] == 3
        assert record["image"].dtype == np.uint8


def test_a_truncated_file_is_an_error_naming_it_never_a_substitute(tmp_path):
    photo = Image.fromarray(load_sample_images().images[0])
    for cls in ("a", "b"):
        for i in range(2):
            save(photo, tmp_path / cls / f"{i}.jpg")
    data = (tmp_path / "a" / "0.jpg").read_bytes()
    (tmp_path / "a" / "0.jpg").write_bytes(data[: len(data) // 2])  # header intact, body cut
    files, _ = sources.scan_classes(tmp_path, tmp_path)
    source = sources.FolderSource(files, str(tmp_path))
    readable = []
    for i in range(len(source)):
        try:
            readable.append(source[i])
        except ValueError as err:  # the prepared store counts these and skips them
            assert "0.jpg: cannot decode" in str(err)
    assert len(readable) == 3 and all(r["image"].shape == (427, 640, 3) for r in readable)


@pytest.mark.parametrize("layout,needle", [({"only": 2}, "1 class folder"),
                                           ({"a": 2, "b": 0}, "has no readable images"),
                                           (None, "does not exist")])
def test_folder_errors_are_one_line(tmp_path, layout, needle):
    photo = Image.fromarray(load_sample_images().images[1])
    for cls, n in (layout or {}).items():
        (tmp_path / cls).mkdir()
        for i in range(n):
            save(photo, tmp_path / cls / f"{i}.jpg")
    root = tmp_path if layout else tmp_path / "missing"
    with pytest.raises(DatasetError, match=needle) as info:
        open_split(f"folder:{root}", "train", str(tmp_path / "tfds"))
    assert "\n" not in str(info.value)


def test_val_classes_are_those_of_train_with_warnings_for_the_rest(tmp_path, caplog):
    photo = Image.fromarray(load_sample_images().images[1])
    for split, classes in (("train", "abc"), ("val", "acz")):  # val lacks b, adds z
        for cls in classes:
            save(photo, tmp_path / split / cls / "0.jpg")
    with caplog.at_level(logging.WARNING):
        files, classes = sources.scan_folder(tmp_path, "validation")
    assert classes == ["a", "b", "c"]
    assert sorted(label for _, label in files) == [0, 2]  # a and c keep train's labels; z is left out
    assert "z that train/ lacks" in caplog.text and "no images of class(es) b" in caplog.text
    (tmp_path / "train" / "b" / "0.jpg").unlink()
    with pytest.raises(DatasetError, match=r"train/b has no readable images"):
        sources.scan_folder(tmp_path, "train")


@pytest.mark.parametrize("name,needle", [("cifar10", "tfds build cifar10"), ("mnist", "not prepared"),
                                         ("oxford_flowers102", "not prepared"),
                                         ("imagenet2012", "ILSVRC2012_img_train.tar")])
def test_unprepared_tfds_datasets_fail_fast_without_network(tmp_path, name, needle):
    start = time.perf_counter()
    with pytest.raises(DatasetError, match=needle) as info:
        open_split(name, "train", str(tmp_path))
    assert time.perf_counter() - start < 10  # tfds alone retries downloads for ~205 s
    assert "\n" not in str(info.value)


def test_unknown_dataset_and_split(tmp_path, data_dir):
    with pytest.raises(DatasetError, match="unknown dataset 'nosuch'"):
        open_split("nosuch", "train", str(tmp_path))
    with pytest.raises(DatasetError, match="no split 'test'"):
        open_split("digits", "test", str(data_dir))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_data_dir(tmp_path):
    tmp_path.chmod(0o555)
    with pytest.raises(DatasetError, match="not writable"):
        open_split("digits", "train", str(tmp_path / "tfds"))


def test_a_folder_trains_through_the_same_pipeline(photo_folder, tmp_path):
    from ml_collections import config_dict

    from cnn_jax import train
    from helpers import tiny_config

    config = tiny_config(tmp_path / "tfds", dataset=f"folder:{photo_folder}", num_train_steps=2,
                         model_name="lenet5_modern", model=config_dict.ConfigDict({}),
                         input_size=32, resize_size=36, eval_limit=0)
    result = train.train_and_evaluate(config, tmp_path / "run")
    assert result["step"] == 2 and np.isfinite(result["loss"])


def test_the_offline_digits_are_prepared_without_talk_of_downloading(tmp_path, capfd):
    split = open_split("digits", "train", str(tmp_path))
    out = capfd.readouterr().out
    assert len(split) == 1497 and "preparing the offline dataset 'digits'" in out
    assert "Download" not in out  # nothing is downloaded; tfds's own wording would say so
