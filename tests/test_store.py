"""Prepared stores: the paper's fixed-size squares, resumable, invalidated, bad files counted."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from cnn_jax.data import store, transforms
from cnn_jax.data.sources import open_split


def test_raw_store_holds_the_resized_centre_squares(data_dir):
    split = open_split("digits", "validation", str(data_dir))
    prepared = store.prepare(split, store.StoreSpec(size=40, channels=3))
    assert len(prepared) == len(split) and prepared.images([0]).shape == (1, 40, 40, 3)
    for i in (0, 17, 299):
        expected = transforms.central_crop(transforms.resize_shorter(
            transforms.grey_to_rgb(np.asarray(split.source[i]["image"])), 40), 40)
        np.testing.assert_array_equal(prepared.images([i])[0], expected)
        assert prepared.labels[i] == split.source[i]["label"]


def test_jpeg_store_decodes_close_to_the_raw_one(data_dir):
    split = open_split("digits", "validation", str(data_dir))
    raw = store.prepare(split, store.StoreSpec(size=40))
    jpeg = store.prepare(split, store.StoreSpec(size=40, format="jpeg"))
    assert jpeg.directory != raw.directory
    difference = np.abs(raw.images(range(20)).astype(int) - jpeg.images(range(20))).mean()
    assert 0 < difference < 3  # lossy, but the same pictures


def make_folder(root, classes=("cat", "dog"), per_class=6, size=(60, 90)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (*size, 3), np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)
    return root


def test_interrupted_preparation_resumes_and_changed_inputs_invalidate(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "SHARD_SIZE", 4)
    root = make_folder(tmp_path / "images")
    split = open_split(f"folder:{root}", "train", str(tmp_path / "data"))
    first = store.prepare(split, store.StoreSpec(size=32))
    shards = sorted(first.directory.glob("shard-*.array_record"))
    assert len(shards) == -(-len(split) // 4) >= 2
    # An interruption: the last shard and meta.json never written.
    (first.directory / "meta.json").unlink()
    shards[-1].unlink()
    kept = {p: p.stat().st_mtime_ns for p in shards[:-1]}
    again = store.prepare(split, store.StoreSpec(size=32))
    assert {p: p.stat().st_mtime_ns for p in shards[:-1]} == kept  # done shards not redone
    np.testing.assert_array_equal(again.images(range(len(again))), first.images(range(len(first))))
    # A changed file or another size: a new store
    os.utime(root / "cat" / "0.jpg", ns=(1, 1))
    changed = open_split(f"folder:{root}", "train", str(tmp_path / "data"))
    assert store.store_dir(changed, store.StoreSpec(size=32)) != first.directory
    assert store.store_dir(split, store.StoreSpec(size=48)) != first.directory


def test_undecodable_files_are_skipped_and_counted_once(tmp_path, caplog):
    root = make_folder(tmp_path / "images")
    for i in range(3):  # pass the scan (valid header), fail the decode
        data = (root / "dog" / f"{i}.jpg").read_bytes()
        (root / "dog" / f"{i}.jpg").write_bytes(data[: len(data) // 3])
    split = open_split(f"folder:{root}", "train", str(tmp_path / "data"))
    with caplog.at_level(logging.WARNING):
        prepared = store.prepare(split, store.StoreSpec(size=32))
    skipped = [r for r in caplog.records if "could not be decoded" in r.getMessage()]
    assert len(skipped) == 1 and "3 of" in skipped[0].getMessage()
    assert prepared.meta["skipped"] == 3 and len(prepared) == len(split) - 3


def test_a_class_without_decodable_images_is_an_error(tmp_path):
    root = make_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=3)
    for path in (root / "b").iterdir():
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])  # passes the scan, fails the decode
    split = open_split(f"folder:{root}", "train", str(tmp_path / "data"))
    with pytest.raises(store.StoreError, match="class.* b have no decodable image"):
        store.prepare(split, store.StoreSpec(size=32))


def test_large_jpegs_decode_at_reduced_size():
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((2400, 3200, 3), 128, np.uint8)).save(buffer, format="JPEG")
    image = transforms.decode(buffer.getvalue(), min_side=256)
    assert 256 <= min(image.shape[:2]) < 600  # DCT-domain scaling: 1/8 of 2400 is 300
    assert transforms.decode(buffer.getvalue()).shape == (2400, 3200, 3)
