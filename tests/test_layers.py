"""LRN against independent NumPy transcriptions of each framework's formula; geometry checks."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import fast_cpu, layers
from cnn_jax.layers import GeometryError, LocalResponseNorm


def paper_lrn_numpy(a, n=5, k=2.0, alpha=1e-4, beta=0.75):
    """Krizhevsky et al. (2012) eq. in section 3.3, written as loops over channels (NHWC)."""
    N = a.shape[-1]
    b = np.empty_like(a, dtype=np.float64)
    for i in range(N):
        lo, hi = max(0, i - n // 2), min(N - 1, i + n // 2)
        s = (a[..., lo:hi + 1].astype(np.float64) ** 2).sum(-1)
        b[..., i] = a[..., i] / (k + alpha * s) ** beta
    return b


def tf_lrn_numpy(a, depth_radius, bias, alpha, beta):
    """tf.nn.local_response_normalization as documented: sqr_sum over d-r..d+r, no division."""
    N = a.shape[-1]
    out = np.empty_like(a, dtype=np.float64)
    for d in range(N):
        s = (a[..., max(0, d - depth_radius):d + depth_radius + 1].astype(np.float64) ** 2).sum(-1)
        out[..., d] = a[..., d] / (bias + alpha * s) ** beta
    return out


def caffe_within_numpy(a, n, alpha, beta, k):
    """Caffe WITHIN_CHANNEL: average pooling of a^2 with pad (n-1)/2 divides by n*n everywhere."""
    h = n // 2
    sq = np.pad(a.astype(np.float64) ** 2, ((0, 0), (h, h), (h, h), (0, 0)))
    H, W = a.shape[1:3]
    s = np.zeros_like(a, dtype=np.float64)
    for dy in range(n):
        for dx in range(n):
            s += sq[:, dy:dy + H, dx:dx + W, :]
    return a / (k + alpha * s / (n * n)) ** beta


@pytest.fixture
def activations():
    # Large values so that the normaliser is far from k and the test is sensitive to alpha.
    return np.random.default_rng(0).normal(0, 30.0, size=(2, 5, 6, 11)).astype(np.float32)


def apply_lrn(x, **kw):
    return np.asarray(LocalResponseNorm(**kw).apply({}, jnp.asarray(x)))


def test_lrn_matches_paper_formula(activations):
    chex.assert_trees_all_close(apply_lrn(activations), paper_lrn_numpy(activations), rtol=1e-5)


def test_lrn_actually_normalises(activations):
    # Guard against a test that cannot fail: the output differs from the input by much more
    # than the tolerance above.
    assert np.abs(apply_lrn(activations) - activations).max() > 1.0


@pytest.mark.parametrize("n", [1, 3, 5, 7])
def test_lrn_window_sizes(activations, n):
    chex.assert_trees_all_close(apply_lrn(activations, size=n, alpha=1e-3),
                                paper_lrn_numpy(activations, n=n, alpha=1e-3), rtol=1e-5)


def test_lrn_tensorflow_mapping(activations):
    kw = layers.lrn_from_tensorflow(depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75)
    assert kw["size"] == 5  # the paper's n = 5 is TF's radius 2
    chex.assert_trees_all_close(apply_lrn(activations, **kw),
                                tf_lrn_numpy(activations, 2, 2.0, 1e-4, 0.75), rtol=1e-5)


def test_lrn_caffe_mapping_across(activations):
    # Caffe divides alpha by n: the paper's alpha = 1e-4 is Caffe's alpha = 5e-4 with n = 5.
    kw = layers.lrn_from_caffe(local_size=5, alpha=5e-4, beta=0.75, k=2.0)
    chex.assert_trees_all_close(apply_lrn(activations, **kw), paper_lrn_numpy(activations), rtol=1e-5)


def test_lrn_caffe_mapping_within(activations):
    kw = layers.lrn_from_caffe(local_size=3, alpha=1e-2, beta=0.75, k=1.0, norm_region="WITHIN_CHANNEL")
    chex.assert_trees_all_close(apply_lrn(activations, **kw),
                                caffe_within_numpy(activations, 3, 1e-2, 0.75, 1.0), rtol=1e-5)


def test_lrn_keeps_dtype_and_is_float32_inside():
    x = jnp.full((1, 2, 2, 5), 100.0, jnp.bfloat16)
    y = LocalResponseNorm().apply({}, x)
    assert y.dtype == jnp.bfloat16
    ref = paper_lrn_numpy(np.full((1, 2, 2, 5), 100.0, np.float32))
    chex.assert_trees_all_close(np.asarray(y, np.float32), ref, rtol=1e-2)


def test_lrn_pytorch_mapping(activations):
    torch = pytest.importorskip("torch")
    kw = layers.lrn_from_pytorch(size=5, alpha=5e-4, beta=0.75, k=2.0)
    ref = torch.nn.functional.local_response_norm(
        torch.from_numpy(activations).permute(0, 3, 1, 2), size=5, alpha=5e-4, beta=0.75, k=2.0)
    chex.assert_trees_all_close(apply_lrn(activations, **kw),
                                ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)


def test_lrn_pytorch_even_size_is_refused():
    with pytest.raises(ValueError, match="even"):
        layers.lrn_from_pytorch(size=4)


@pytest.mark.parametrize("w,f,p,s,out", [(227, 11, 0, 4, 55), (55, 3, 0, 2, 27), (27, 5, 2, 1, 27),
                                          (13, 3, 1, 1, 13), (13, 3, 0, 2, 6), (32, 5, 0, 1, 28)])
def test_window_output_size(w, f, p, s, out):
    assert layers.window_output_size(w, f, s, p) == out == (w - f + 2 * p) / s + 1


def test_window_output_size_rejects_fraction():
    # The CS231n notes' example of invalid hyper-parameters: W=10, F=3, P=0, S=2 gives 4.5.
    with pytest.raises(GeometryError, match=r"4\.5") as info:
        layers.window_output_size(10, 3, 2, 0, layer="convX")
    assert "convX" in str(info.value)
    assert layers.window_output_size(10, 3, 2, 0, floor=True) == 4


def test_conv_and_pool_layers_check_geometry():
    x = jnp.zeros((1, 10, 10, 1))
    with pytest.raises(GeometryError, match="pool"):
        layers.MaxPool(3, 2, name="pool").init(jax.random.key(0), x)
    conv = layers.Conv(2, (3, 3), strides=2, padding=0, name="c")
    with pytest.raises(GeometryError, match="c: input 10"):
        conv.init(jax.random.key(0), x)
    floor = layers.Conv(2, (3, 3), strides=2, padding=0, floor=True)
    out, _ = floor.init_with_output(jax.random.key(0), x)
    chex.assert_shape(out, (1, 4, 4, 2))


def test_avg_pool_does_not_count_padding():
    x = jnp.ones((1, 3, 3, 1))
    y = layers.AvgPool(3, 1, padding=1).apply({}, x)
    chex.assert_trees_all_close(y, jnp.ones_like(y))


# ---- the derivatives written for speed equal the ones JAX derives itself -----------------------

def _tied(shape, seed=0):
    """Post-ReLU-like values from a handful of levels: many windows hold several equal maxima."""
    levels = jax.random.randint(jax.random.key(seed), shape, -2, 4).astype(jnp.float32)
    return jnp.maximum(levels, 0.0)


@pytest.mark.parametrize("window,stride,padding,side", [
    ((3, 3), (2, 2), "VALID", 11), ((2, 2), (2, 2), "VALID", 12), ((3, 3), (1, 1), "SAME", 11),
    ((3, 3), (2, 2), "SAME", 12), ((3, 3), (2, 2), ((1, 1), (1, 1)), 11), ((3, 2), (2, 1), ((0, 2), (1, 0)), 11)])
def test_max_pool_value_and_gradient_equal_flax(window, stride, padding, side):
    # side 12 with SAME pads (0, 1): GoogLeNet's 112 -> 56 pools pad only after
    x = _tied((2, side, side, 4))
    args = (window, stride, padding)
    ours = lambda x: layers.max_pool(x, *args)  # noqa: E731
    reference = lambda x: nn.max_pool(x, *args)  # noqa: E731 - JAX's select_and_scatter derivative
    y, pullback = jax.vjp(ours, x)
    y_ref, pullback_ref = jax.vjp(reference, x)
    chex.assert_trees_all_equal(y, y_ref)
    cotangent = jax.random.normal(jax.random.key(1), y.shape)
    grad, grad_ref = pullback(cotangent)[0], pullback_ref(cotangent)[0]
    assert float(jnp.abs(grad_ref).sum()) > 0  # ties included: the reference routes to one maximum
    chex.assert_trees_all_close(grad, grad_ref, rtol=1e-6, atol=1e-6)
    # Forward mode is the transpose of the same routing: <J t, c> = <t, J^T c>.
    tangent = jax.random.normal(jax.random.key(2), x.shape)
    forward = jax.jvp(ours, (x,), (tangent,))[1]
    chex.assert_trees_all_close(jnp.vdot(forward, cotangent), jnp.vdot(tangent, grad), rtol=1e-5)


def test_max_pool_gradient_goes_to_one_maximum_per_window():
    # A window of equal values: the whole cotangent goes to its first element (row-major).
    x = jnp.ones((1, 3, 3, 1))
    grad = jax.grad(lambda x: layers.max_pool(x, (3, 3), (1, 1)).sum())(x)
    expected = np.zeros((1, 3, 3, 1), np.float32)
    expected[0, 0, 0, 0] = 1.0
    chex.assert_trees_all_equal(grad, jnp.asarray(expected))


def _textbook_lrn(x, size, k, alpha, beta):
    """b = a / (k + alpha * sum a^2)^beta with JAX's own derivative of the power."""
    h = size // 2
    total = jax.lax.reduce_window(jnp.square(x), 0.0, jax.lax.add, (1, 1, 1, size), (1, 1, 1, 1),
                                  ((0, 0), (0, 0), (0, 0), (h, h)))
    return x / (k + alpha * total) ** beta


@pytest.mark.parametrize("beta", [0.75, 0.5, 0.6])
def test_lrn_gradient_equals_autodiff_of_the_formula(activations, beta):
    kw = dict(size=5, k=2.0, alpha=1e-3, beta=beta)
    x = jnp.asarray(activations)
    cotangent = jax.random.normal(jax.random.key(0), x.shape)
    y, pullback = jax.vjp(lambda x: LocalResponseNorm(**kw).apply({}, x), x)
    y_ref, pullback_ref = jax.vjp(lambda x: _textbook_lrn(x, **kw), x)
    chex.assert_trees_all_close(y, y_ref, rtol=1e-5)
    chex.assert_trees_all_close(pullback(cotangent)[0], pullback_ref(cotangent)[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_equals_flax(train):
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 6)) * 3.0 + 1.0
    kw = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    ours, reference = layers.BatchNorm(**kw), nn.BatchNorm(**kw)
    variables = {"params": {"scale": jnp.linspace(0.5, 2.0, 6), "bias": jnp.linspace(-1.0, 1.0, 6)},
                 "batch_stats": {"mean": jnp.linspace(0.0, 1.0, 6), "var": jnp.linspace(1.0, 3.0, 6)}}
    chex.assert_trees_all_equal_shapes_and_dtypes(ours.init(jax.random.key(1), x), variables)
    cotangent = jax.random.normal(jax.random.key(2), x.shape)

    def pullback(module):
        def f(params, x):
            y, new = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(y * cotangent), (y, new)
        return jax.grad(f, argnums=(0, 1), has_aux=True)(variables["params"], x)

    (grads, (y, stats)), (grads_ref, (y_ref, stats_ref)) = pullback(ours), pullback(reference)
    assert y.dtype == y_ref.dtype
    chex.assert_trees_all_close(y, y_ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(stats, stats_ref, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads, grads_ref, rtol=1e-4, atol=1e-5)


def _textbook_batch_norm(x, scale, bias, cotangent, epsilon=1e-5):
    """y and the gradients of <y, cotangent> (x, scale, bias) in float64 NumPy, two passes."""
    x, g, axes = x.astype(np.float64), cotangent.astype(np.float64), (0, 1, 2)
    mean, inv = x.mean(axis=axes), 1 / np.sqrt(x.var(axis=axes) + epsilon)
    xhat, n = (x - mean) * inv, x.size // x.shape[-1]
    dbias, dscale = g.sum(axis=axes), (g * xhat).sum(axis=axes)
    return xhat * scale + bias, (scale * inv * (g - (dbias + xhat * dscale) / n), dscale, dbias)


@pytest.mark.parametrize("fast", [True, False])
def test_batch_norm_holds_when_the_mean_dwarfs_the_spread(fast):
    """A channel whose values sit far from zero (8 values at 50 +- 0.01), as few values a
    channel at a small batch's last stages can: float32's one-pass E[x^2] - E[x]^2 (flax's
    default) cancels there, and the output and every gradient below it go wrong."""
    rng = np.random.default_rng(0)
    x = (50.0 + 0.01 * rng.normal(size=(2, 2, 2, 3))).astype(np.float32)
    cotangent = rng.normal(size=x.shape).astype(np.float32)
    scale, bias = np.array([0.5, 1.0, 2.0], np.float32), np.array([0.1, 0.0, -0.1], np.float32)
    y_ref, grads_ref = _textbook_batch_norm(x, scale, bias, cotangent)

    def value_and_grads(module):
        def f(params, x):
            return module.apply({"params": params, "batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}, x,
                                mutable=["batch_stats"])[0]
        y, pullback = jax.vjp(f, {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}, jnp.asarray(x))
        grads, dx = pullback(jnp.asarray(cotangent))
        return y, (dx, grads["scale"], grads["bias"])

    flax_y, _ = value_and_grads(nn.BatchNorm(use_running_average=False))
    assert np.abs(np.asarray(flax_y) - y_ref).max() > 0.1  # the data does defeat one pass
    with fast_cpu.forced(fast):
        y, grads = value_and_grads(layers.BatchNorm())
    chex.assert_trees_all_close(y, y_ref.astype(np.float32), atol=1e-3)
    for found, want in zip(grads, grads_ref):
        chex.assert_trees_all_close(found, want.astype(np.float32), atol=1e-3 * np.abs(want).max())


def test_channel_sums_equal_a_reduction():
    x = jax.random.normal(jax.random.key(0), (3, 4, 5, 7))
    chex.assert_trees_all_close(layers.channel_sums(x), x.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (1, 2, 0), (1, 2, "SAME"), (3, 1, 1)])
def test_one_by_one_as_product_equals_the_convolution(kernel, stride, padding):
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 5))
    kw = dict(features=4, kernel_size=(kernel, kernel), strides=stride, padding=padding, floor=True)
    ours, reference = layers.Conv(**kw, conv_general_dilated=layers.one_by_one_as_product), layers.Conv(**kw)
    variables = reference.init(jax.random.key(1), x)
    cotangent = jax.random.normal(jax.random.key(2), reference.apply(variables, x).shape)

    def value_and_grads(module):
        y, pullback = jax.vjp(lambda v, x: module.apply(v, x), variables, x)
        return y, pullback(cotangent)

    chex.assert_trees_all_close(value_and_grads(ours), value_and_grads(reference), rtol=1e-5, atol=1e-5)
    ops = {e.primitive.name for e in jax.make_jaxpr(lambda v, x: ours.apply(v, x))(variables, x).jaxpr.eqns}
    assert ("conv_general_dilated" not in ops and "dot_general" in ops) == (kernel == 1), ops


@pytest.mark.parametrize("name,shape", [("alexnet", (67, 67, 3)), ("resnet_tiny", (32, 32, 3))])
def test_the_fast_cpu_formulations_equal_xlas_standard_ones(name, shape):
    """Max pooling's and batch norm's derivatives, LRN's power, 1x1 convolutions as products:
    the CPU forms (used on CPU) and XLA's standard ones (used elsewhere) give the same loss and
    gradients, so the backend's choice cannot change the numbers."""
    from cnn_jax import get_model

    model = get_model(name, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (4, *shape))
    labels = jnp.arange(4) % 10
    variables = model.init(jax.random.key(1), x, train=False)

    def loss(params):
        out = model.apply({**variables, "params": params}, x, train=True, rngs={"dropout": jax.random.key(2)},
                          mutable=["batch_stats"])[0]
        return -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(4), labels])

    results = {}
    for fast in (True, False):
        with fast_cpu.forced(fast):
            results[fast] = jax.jit(jax.value_and_grad(loss))(variables["params"])  # traced inside
    (fast_loss, fast_grads), (plain_loss, plain_grads) = results[True], results[False]
    np.testing.assert_allclose(fast_loss, plain_loss, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(fast_grads), jax.tree.leaves(plain_grads)):
        scale = max(float(jnp.abs(b).max()), 1e-12)
        np.testing.assert_allclose(a / scale, b / scale, atol=1e-5, err_msg=jax.tree_util.keystr(path))
