"""The grain pipeline: exact resume of the stream, per-epoch reshuffling, eval padding."""

import numpy as np

from cnn_jax.data import pipeline
from cnn_jax.data.sources import open_split

SPEC = pipeline.ImageSpec(input_size=28, resize_size=32, flip=True, channels=3, pca_noise=0.1)


def test_stream_resumes_exactly(data_dir):
    split = open_split("digits", "train", str(data_dir))
    mean = pipeline.mean_image(split, SPEC)
    first = iter(pipeline.train_loader(split, SPEC, mean, batch_size=8, seed=3))
    for _ in range(3):
        next(first)
    state = first.get_state()
    expected = [next(first) for _ in range(2)]
    second = iter(pipeline.train_loader(split, SPEC, mean, batch_size=8, seed=3))
    second.set_state(state)
    for want, got in zip(expected, (next(second) for _ in range(2))):
        np.testing.assert_array_equal(want["label"], got["label"])
        np.testing.assert_array_equal(want["image"], got["image"])  # same crops, flips and colour noise


def test_each_epoch_is_a_new_permutation(data_dir):
    split = open_split("digits", "validation", str(data_dir))  # 300 examples
    mean = pipeline.mean_image(split, SPEC)
    stream = iter(pipeline.train_loader(split, SPEC, mean, batch_size=100, seed=0))
    epochs = [np.concatenate([next(stream)["label"] for _ in range(3)]) for _ in range(2)]
    labels = np.array([split.source[i]["label"] for i in range(len(split))])
    for epoch in epochs:  # every example once per epoch
        np.testing.assert_array_equal(np.bincount(epoch, minlength=10), np.bincount(labels, minlength=10))
    assert not np.array_equal(epochs[0], epochs[1])


def test_eval_batches_pad_and_mask(data_dir):
    split = open_split("digits", "validation", str(data_dir))
    mean = pipeline.mean_image(split, SPEC)
    batches = list(pipeline.eval_batches(split, SPEC, mean, batch_size=64, limit=100))
    assert [b["mask"].sum() for b in batches] == [64, 36]
    assert all(b["image"].shape == (64, 28, 28, 3) for b in batches)
    ten = next(pipeline.eval_batches(split, SPEC, mean, batch_size=4, crops="ten"))
    assert ten["image"].shape == (4, 10, 28, 28, 3)


def test_mean_image_is_the_per_pixel_mean_and_cached(data_dir):
    split = open_split("digits", "validation", str(data_dir))
    mean = pipeline.mean_image(split, SPEC)
    expected = np.mean([pipeline.decode(split.source[i], SPEC).astype(np.float64) for i in range(len(split))], 0)
    np.testing.assert_allclose(mean, expected, rtol=1e-5)
    assert list(split.cache_dir.glob("mean_image_validation_32_3.npz"))
