"""Streams as pure functions of the step, per-process shares, eval padding, statistics."""

import numpy as np
import pytest

from cnn_jax.data import pipeline, store
from cnn_jax.data.sources import open_split

SPEC = store.StoreSpec(size=32, channels=3)


@pytest.fixture(scope="module")
def stores(data_dir):
    return {split: store.prepare(open_split("digits", split, str(data_dir)), SPEC)
            for split in ("train", "validation")}


def test_the_stream_is_a_pure_function_of_the_step(stores):
    a = pipeline.TrainStream(stores["train"], batch_size=8, seed=3)
    b = pipeline.TrainStream(stores["train"], batch_size=8, seed=3)
    for i in (0, 5, 400):  # 400 is in a later epoch
        np.testing.assert_array_equal(a.batch(i)["image"], b.batch(i)["image"])
        np.testing.assert_array_equal(a.batch(i)["label"], b.batch(i)["label"])
    other = pipeline.TrainStream(stores["train"], batch_size=8, seed=4)
    assert not np.array_equal(a.indices(0), other.indices(0))


def test_each_epoch_is_a_new_permutation(stores):
    source = stores["validation"]  # 300 examples: 3 batches of 100 an epoch
    stream = pipeline.TrainStream(source, batch_size=100, seed=0)
    epochs = [np.concatenate([stream.indices(e * 3 + k) for k in range(3)]) for e in range(2)]
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(300))  # every example once
    assert not np.array_equal(epochs[0], epochs[1])


def test_process_shares_make_up_the_global_batch(stores):
    whole = pipeline.TrainStream(stores["train"], batch_size=12, seed=1)
    shares = [pipeline.TrainStream(stores["train"], batch_size=12, seed=1, shard_index=p, shard_count=3)
              for p in range(3)]
    for i in (0, 7, 200):
        np.testing.assert_array_equal(np.concatenate([s.indices(i) for s in shares]), whole.indices(i))


def test_eval_batches_pad_mask_and_split_between_processes(stores):
    source = stores["validation"]
    batches = list(pipeline.eval_batches(source, batch_size=64, limit=100, workers=2))
    assert [b["mask"].sum() for b in batches] == [64, 36]
    assert all(b["image"].shape == (64, 32, 32, 3) and b["image"].dtype == np.uint8 for b in batches)
    np.testing.assert_array_equal(batches[1]["label"][:36], source.labels[64:100])
    halves = [list(pipeline.eval_batches(source, batch_size=64, limit=100, shard_index=p, shard_count=2))
              for p in range(2)]
    assert [b["image"].shape[0] for b in halves[0]] == [32, 32]
    assert sum(b["mask"].sum() for h in halves for b in h) == 100
    np.testing.assert_array_equal(halves[1][1]["label"][:4], source.labels[96:100])  # rows 96..99


def test_statistics_are_the_mean_image_and_colour_pca_written_atomically(stores):
    source = stores["validation"]
    stats = pipeline.statistics(source)
    images = source.images(range(len(source))).astype(np.float64)
    np.testing.assert_allclose(stats["mean"], images.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["channel_std"], images.reshape(-1, 3).std(0) / 255.0, rtol=1e-5)
    pixels = source.images(np.linspace(0, len(source) - 1, len(source)).astype(int))[:, ::4, ::4].reshape(-1, 3)
    cov = np.cov(pixels / 255.0, rowvar=False)
    np.testing.assert_allclose(cov @ stats["eigenvectors"], stats["eigenvectors"] * stats["eigenvalues"], atol=1e-9)
    assert (source.directory / "statistics.npz").exists()
    assert not list(source.directory.glob(".*tmp*"))
    again = pipeline.statistics(source)  # read back, not recomputed
    np.testing.assert_array_equal(again["mean"], stats["mean"])
    (source.directory / "statistics.npz").unlink()
    np.savez(source.directory / "statistics.npz", mean=np.zeros(3))  # written before channel_std existed
    np.testing.assert_array_equal(pipeline.statistics(source)["channel_std"], stats["channel_std"])


def test_read_ahead_keeps_order_and_stops():
    with pipeline.ReadAhead(lambda i: i * i, 3, workers=2, stop=8) as values:
        assert list(values) == [9, 16, 25, 36, 49]
