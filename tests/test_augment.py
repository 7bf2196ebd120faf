"""Augmentation on the device equals the NumPy reference for the same draws; no host transfers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import get_model, optim, train
from cnn_jax.data import augment, transforms

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
MEAN = RNG.uniform(0, 255, (40, 40, 3)).astype(np.float32)
VALUES, VECTORS = transforms.pca_basis(RNG.uniform(0, 1, (500, 3)) @ np.diag([1.0, 0.6, 0.3]))


def prep(**kw):
    fields = dict(input_size=32, flip=True, pca_noise=0.1) | kw
    return augment.make_preprocessor(MEAN, VALUES, VECTORS, **fields)


def host_reference(draws, size=32):
    out = []
    for i, image in enumerate(IMAGES):
        x = image.astype(np.float32) / 255.0 - MEAN / 255.0
        x = transforms.crop(x, int(draws.top[i]), int(draws.left[i]), size, bool(draws.mirror[i]))
        out.append(x + VECTORS @ (np.asarray(draws.alpha[i]) * VALUES))  # the paper's sum_i p_i alpha_i lambda_i
    return np.stack(out)


def test_train_augmentation_equals_the_numpy_reference():
    p = prep()
    draws = p.draw(jax.random.key(3), len(IMAGES))
    assert np.asarray(draws.mirror).any() and not np.asarray(draws.mirror).all()
    device = jax.jit(p.apply_draws)(jnp.asarray(IMAGES), draws)
    np.testing.assert_allclose(device, host_reference(draws), atol=2e-6)
    chex.assert_trees_all_close(p.train(jnp.asarray(IMAGES), jax.random.key(3)), device, atol=1e-6)


@pytest.mark.parametrize("normalize", ["channel", "imagenet"])
def test_per_channel_normalisation_and_its_colour_noise_in_pixel_units(normalize):
    """(x/255 - centre) / spread per channel; the PCA shift, drawn in 0..1 pixel units, is divided
    by the same spread, so it moves the pixels as it does under the paper's normalisation."""
    std = np.array([0.2, 0.25, 0.3])
    p = prep(normalize=normalize, channel_std=std)
    centre, spread = ((MEAN.mean((0, 1)) / 255.0, std) if normalize == "channel" else
                      (np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)))
    draws = p.draw(jax.random.key(3), len(IMAGES))
    expected = []
    for i, image in enumerate(IMAGES):
        x = transforms.crop(image.astype(np.float64) / 255.0, int(draws.top[i]), int(draws.left[i]), 32,
                            bool(draws.mirror[i]))
        expected.append((x + VECTORS @ (np.asarray(draws.alpha[i]) * VALUES) - centre) / spread)
    np.testing.assert_allclose(p.apply_draws(jnp.asarray(IMAGES), draws), np.stack(expected), atol=1e-5)


def test_normalisation_errors_name_the_setting():
    from cnn_jax.config import ConfigError

    with pytest.raises(ConfigError, match=r"config.normalize=channels: unknown input normalisation; did you mean "
                                          r"channel\?"):
        prep(normalize="channels")
    with pytest.raises(ConfigError, match=r"config.normalize=imagenet: ImageNet's statistics are for RGB images, "
                                          r"not config.channels=1"):
        augment.make_preprocessor(MEAN[..., :1], VALUES, VECTORS, input_size=32, flip=False, pca_noise=0.0,
                                  normalize="imagenet")


def test_draws_cover_every_origin_and_follow_the_key():
    p = prep(pca_noise=0.0, flip=False)
    draws = p.draw(jax.random.key(0), 4000)
    assert set(np.unique(draws.top)) == set(range(9)) == set(np.unique(draws.left))  # 40 - 32 + 1 origins
    assert not np.asarray(draws.mirror).any() and not np.asarray(draws.alpha).any()
    other = p.draw(jax.random.key(1), 4000)
    assert not np.array_equal(draws.top, other.top)
    alphas = prep().draw(jax.random.key(0), 4000).alpha
    assert np.std(alphas) == pytest.approx(0.1, rel=0.05)


def test_centre_and_ten_crops_equal_the_numpy_reference():
    p = prep()
    normalised = IMAGES.astype(np.float32) / 255.0 - MEAN / 255.0
    centre = np.stack([transforms.central_crop(x, 32) for x in normalised])
    ten = np.stack([transforms.ten_crop(x, 32) for x in normalised])
    np.testing.assert_allclose(p.evaluate(jnp.asarray(IMAGES), "centre"), centre, atol=1e-6)
    np.testing.assert_allclose(p.evaluate(jnp.asarray(IMAGES), "ten"), ten, atol=1e-6)
    with pytest.raises(ValueError, match="unknown crops"):
        p.evaluate(jnp.asarray(IMAGES), "five")


def test_the_train_and_eval_steps_make_no_host_transfers():
    model = get_model("lenet5_modern", num_classes=10)
    state = train.create_train_state(jax.random.key(0), model, optim.make_optimizer("paper_sgd", 0.01), (32, 32, 1))
    p = augment.make_preprocessor(MEAN[..., :1], np.zeros(3), np.eye(3), input_size=32, flip=True, pca_noise=0.0)
    batch = {"image": jnp.asarray(IMAGES[..., :1]), "label": jnp.arange(6) % 10}
    step = jax.jit(chex.assert_max_traces(train.train_step, n=1), donate_argnums=(0,))
    evaluate = jax.jit(train.eval_step, static_argnames="crops")
    key = jax.random.key(1)
    state, _ = step(state, batch, key, p)  # compile outside the guard
    evaluate(state, batch, p, crops="ten")
    with jax.transfer_guard("disallow"):
        for _ in range(3):
            state, stats = step(state, batch, key, p)
        sums = evaluate(state, batch, p, crops="ten")
    assert int(state.step) == 4 and float(sums["count"]) == 6
