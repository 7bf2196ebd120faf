import jax
import numpy as np
import jax.numpy as jnp
import pytest

from cnn_jax import metrics


def numpy_topk_error(logits, labels, k):
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return np.array([label not in row for row, label in zip(top, labels)], np.float32)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_topk_error_matches_argsort(k):
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(200, 10)).astype(np.float32), rng.integers(0, 10, 200)
    np.testing.assert_array_equal(metrics.topk_error(jnp.asarray(logits), jnp.asarray(labels), k),
                                  numpy_topk_error(logits, labels, k))


def test_topk_error_hand_example():
    logits = jnp.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    labels = jnp.array([2, 2])
    np.testing.assert_array_equal(metrics.topk_error(logits, labels, 1), [1, 1])
    np.testing.assert_array_equal(metrics.topk_error(logits, labels, 2), [0, 1])
    np.testing.assert_array_equal(metrics.topk_error(logits, labels, 3), [0, 0])


def test_cross_entropy_hand_value():
    logits = jnp.log(jnp.array([[0.25, 0.75]]))
    np.testing.assert_allclose(metrics.cross_entropy(logits, jnp.array([1])), [-np.log(0.75)], rtol=1e-6)


def test_running_mean_is_weighted():
    mean = metrics.Mean()
    assert np.isnan(mean.value)
    mean.add(3.0, 4)  # 4 examples summing to 3
    mean.add(1.0, 1)
    assert mean.value == pytest.approx(4.0 / 5)


@pytest.mark.parametrize("k", [1, 2])
def test_topk_error_counts_ties_against_the_model(k):
    logits, labels = jnp.zeros((4, 10)), jnp.array([0, 3, 7, 9])  # a collapsed net
    np.testing.assert_array_equal(metrics.topk_error(logits, labels, k), [1, 1, 1, 1])


def test_topk_error_tie_below_the_kth_place_is_still_top_k():
    logits, labels = jnp.array([[3.0, 1.0, 1.0, 0.0]]), jnp.array([1])  # one class above, one tied
    np.testing.assert_array_equal(metrics.topk_error(logits, labels, 2), [1])
    np.testing.assert_array_equal(metrics.topk_error(logits, labels, 3), [0])


@pytest.mark.parametrize("bad, where", [(np.nan, 2), (np.nan, 0), (np.inf, 0), (-np.inf, 2)])
def test_topk_error_non_finite_rows_are_errors(bad, where):
    logits = np.array([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0]], np.float32)
    logits[0, where] = bad  # label 0 is clearly first in the clean row
    labels = jnp.array([0, 0])
    for k in (1, 2, 3):
        np.testing.assert_array_equal(metrics.topk_error(jnp.asarray(logits), labels, k), [1, 0])


def test_topk_error_is_jittable_float32():
    err = jax.jit(metrics.topk_error, static_argnums=2)(jnp.zeros((3, 5)), jnp.array([0, 1, 2]), 1)
    assert err.shape == (3,) and err.dtype == jnp.float32


def test_count_nonfinite_flags_rows_with_nan_or_inf():
    logits = jnp.array([[0.0, 1.0], [np.nan, 1.0], [np.inf, 0.0], [0.0, -np.inf], [1e30, -1e30]])
    counts = metrics.count_nonfinite(logits)
    np.testing.assert_array_equal(counts, [0, 1, 1, 1, 0])
    assert counts.dtype == jnp.float32


@pytest.mark.parametrize("label", [-1, 3, 1000])
def test_a_label_outside_the_classes_is_an_error_and_a_nan_loss(label):
    # take_along_axis fills an out-of-range gather with NaN, which compares false: without the
    # range check such an example would count as correct and train on a NaN.
    logits = jnp.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    labels = jnp.array([label, 2])
    np.testing.assert_array_equal(metrics.topk_error(logits, labels, 1), [1.0, 0.0])
    np.testing.assert_array_equal(metrics.topk_error(logits, labels, 5), [1.0, 0.0])
    loss = metrics.cross_entropy(logits, labels)
    assert np.isnan(loss[0]) and np.isclose(loss[1], np.log(np.exp([1, 2, 3]).sum()) - 3)
