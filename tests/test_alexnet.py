"""The paper's AlexNet: shapes and counts against its layer table, init, dropout, tracing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import get_model
from cnn_jax.layers import GeometryError
from cnn_jax.summary import layer_table

# Krizhevsky et al. 2012, section 3.5 and Figure 2, one tower's view at the 227x227 input the
# arithmetic needs (the figure says 224): (output H x W x C, parameters with biases).
PAPER_TABLE = {
    "conv1": ((55, 55, 96), 34_944),
    "pool1": ((27, 27, 96), 0),
    "conv2": ((27, 27, 256), 614_656),
    "pool2": ((13, 13, 256), 0),
    "conv3": ((13, 13, 384), 885_120),
    "conv4": ((13, 13, 384), 1_327_488),
    "conv5": ((13, 13, 256), 884_992),
    "pool5": ((6, 6, 256), 0),
    "fc6": ((4096,), 37_752_832),
    "fc7": ((4096,), 16_781_312),
    "fc8": ((1000,), 4_097_000),
}


@pytest.fixture(scope="module")
def paper_params():
    model = get_model("alexnet")
    return jax.jit(lambda k: model.init(k, jnp.zeros((1, 227, 227, 3)), train=False))(jax.random.key(0))["params"]


def test_layer_shapes_and_parameters_match_the_paper():
    rows = {r.path: r for r in layer_table(get_model("alexnet"))}
    for name, (shape, params) in PAPER_TABLE.items():
        assert rows[name].output_shape == shape, name
        assert rows[name].params == params, name


def test_forward_shapes_and_dtype():
    model = get_model("alexnet", num_classes=10)
    x = jnp.zeros((2, 227, 227, 3))
    logits, _ = model.init_with_output(jax.random.key(0), x, train=False)
    chex.assert_shape(logits, (2, 10))
    assert logits.dtype == jnp.float32


def test_mixed_precision_keeps_float32_params_and_logits():
    model = get_model("alexnet", num_classes=10, dtype=jnp.bfloat16)
    x = jnp.ones((1, 227, 227, 3))
    logits, variables = model.init_with_output(jax.random.key(0), x, train=False)
    assert logits.dtype == jnp.float32
    assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    _, inter = model.apply(variables, x, train=False, capture_intermediates=True, mutable="intermediates")
    assert inter["intermediates"]["conv3"]["__call__"][0].dtype == jnp.bfloat16


def test_paper_initialisation(paper_params):
    for name, layer in paper_params.items():
        kernel = np.asarray(layer["kernel"])
        # N(0, 0.01): the sample std of >= 34k draws is within 3% of 0.01.
        assert abs(kernel.std() - 0.01) < 3e-4, name
        assert abs(kernel.mean()) < 3e-4, name
        expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        np.testing.assert_array_equal(layer["bias"], expected_bias, err_msg=name)


@pytest.mark.parametrize("scheme, gain", [("lecun", 1.0), ("he", 2.0)])
def test_fan_in_initialisations(scheme, gain):
    """LeCun-normal: variance 1/fan_in; He-normal (He et al. 2015): 2/fan_in; zero biases."""
    model = get_model("alexnet", init_scheme=scheme)
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 227, 227, 3)), train=False))(jax.random.key(1))["params"]
    for name in ("conv1", "conv3", "fc7"):
        kernel = np.asarray(params[name]["kernel"])
        fan_in = np.prod(kernel.shape[:-1])
        assert abs(kernel.std() * np.sqrt(fan_in / gain) - 1.0) < 0.05, name
        np.testing.assert_array_equal(params[name]["bias"], 0.0)


def test_unknown_init_scheme_is_an_error():
    with pytest.raises(ValueError, match="unknown init scheme 'xavier'"):
        get_model("alexnet", init_scheme="xavier").init(jax.random.key(0), jnp.zeros((1, 227, 227, 3)), train=False)


def test_dropout_only_in_training(paper_params):
    model = get_model("alexnet")
    x = jax.random.normal(jax.random.key(2), (2, 227, 227, 3))
    variables = {"params": paper_params}

    def fc6_input(train, key):
        _, state = model.apply(variables, x, train=train, rngs={"dropout": key},
                               capture_intermediates=True, mutable="intermediates")
        return np.asarray(state["intermediates"]["drop6"]["__call__"][0])

    eval_a, eval_b = fc6_input(False, jax.random.key(3)), fc6_input(False, jax.random.key(4))
    np.testing.assert_array_equal(eval_a, eval_b)  # no randomness at test time
    train_a = fc6_input(True, jax.random.key(3))
    # Where the (deterministic) pool5 activation is positive, training keeps about half of
    # the units, scaled by 1 / (1 - 0.5), and zeroes the rest.
    live = eval_a > 0
    assert live.sum() > 1000
    kept = train_a[live] != 0
    assert 0.47 < kept.mean() < 0.53
    chex.assert_trees_all_close(train_a[live][kept], 2 * eval_a[live][kept], rtol=1e-5)
    np.testing.assert_array_equal(train_a, fc6_input(True, jax.random.key(3)))  # same key, same mask
    assert not np.array_equal(train_a, fc6_input(True, jax.random.key(5)))


def test_initialisation_is_deterministic_under_a_key():
    model = get_model("alexnet", num_classes=10)
    init = jax.jit(lambda k: model.init(k, jnp.zeros((1, 227, 227, 3)), train=False))
    eager = model.init(jax.random.key(7), jnp.zeros((1, 227, 227, 3)), train=False)
    chex.assert_trees_all_close(init(jax.random.key(7)), eager, rtol=1e-6)  # the key decides, not the compiler
    a, b = init(jax.random.key(7)), init(jax.random.key(8))
    assert not np.array_equal(a["params"]["conv1"]["kernel"], b["params"]["conv1"]["kernel"])


def test_jitted_forward_traces_once(paper_params):
    chex.clear_trace_counter()
    model = get_model("alexnet")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(params, x):
        return model.apply({"params": params}, x, train=False)

    outs = [forward(paper_params, jax.random.normal(jax.random.key(seed), (1, 227, 227, 3))) for seed in range(3)]
    chex.assert_shape(outs, [(1, 1000)] * 3)
    assert not np.allclose(outs[0], outs[1])
    with pytest.raises(AssertionError, match="trace"):  # the counter sees a new shape: a retrace
        forward(paper_params, jnp.zeros((2, 227, 227, 3)))


def test_geometry_error_names_layer_and_suggests_227():
    model = get_model("alexnet")
    with pytest.raises(GeometryError) as info:
        model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    msg = str(info.value)
    assert "conv1" in msg and "224" in msg and "54.25" in msg and "227" in msg
    assert "\n" not in msg


def test_floor_semantics_accepts_224():
    rows = {r.path: r for r in layer_table(get_model("alexnet", floor=True), (224, 224, 3))}
    # floor((224 - 11)/4) + 1 = 54; floor((54 - 3)/2) + 1 = 26; 26 -> 12 at pool2; 12 -> 5 at pool5.
    assert rows["conv1"].output_shape == (54, 54, 96)
    assert rows["pool1"].output_shape == (26, 26, 96)
    assert rows["pool5"].output_shape == (5, 5, 256)


def test_non_overlapping_pooling_variant_changes_geometry():
    rows = {r.path: r for r in layer_table(get_model("alexnet", pool_window=2, floor=True))}
    assert rows["pool1"].output_shape == (27, 27, 96)  # floor((55 - 2)/2) + 1
