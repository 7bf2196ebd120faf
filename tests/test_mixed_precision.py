"""`dtype=bfloat16` is mixed precision for every model of the zoo.

Read off each model's traced train step (abstractly: no FLOPs are spent): parameters and
their gradients stay float32 (so the optimiser's state does too), the convolutions and
matrix products run in bfloat16, and the numerically delicate parts run in float32: the
logits, softmax and the loss, batch-norm statistics, and window sums (LRN's squares, which underflow in bfloat16,
and average pooling). A short run shows it trains.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import metrics, optim, train
from cnn_jax.models import get_model, list_models


def _eqns(jaxpr):
    """Every equation, sub-jaxprs (vmap, custom derivatives, pjit) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _loss(model, params, extra, x, y):
    variables = {"params": params, **extra}
    out = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)},
                      mutable=list(extra) or False)
    out = out[0] if extra else out
    logits = out["logits"] if isinstance(out, dict) else out
    return metrics.cross_entropy(logits, y).mean(), logits


@pytest.mark.parametrize("name", list_models())
def test_bfloat16_is_mixed_precision(name):
    model = get_model(name, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, *model.input_shape), jnp.float32)
    y = jax.ShapeDtypeStruct((2,), jnp.int32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    params = variables["params"]
    extra = {k: v for k, v in variables.items() if k != "params"}
    grad_fn = jax.grad(lambda p, extra, x, y: _loss(model, p, extra, x, y), has_aux=True)
    grads, logits = jax.eval_shape(grad_fn, params, extra, x, y)

    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert logits.dtype == jnp.float32
    eqns = list(_eqns(jax.make_jaxpr(grad_fn)(params, extra, x, y).jaxpr))
    products = [e for e in eqns if e.primitive.name in ("conv_general_dilated", "dot_general")]
    statistics = [e for e in products if e.invars[0].aval.ndim == 1]  # batch norm's sums: ones @ x
    heavy = [e for e in products if e not in statistics]
    assert heavy and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in heavy), \
        sorted({(e.primitive.name, str(e.invars[0].aval.dtype)) for e in heavy})
    assert all(e.invars[1].aval.dtype == jnp.float32 for e in statistics)
    sums = [e for e in eqns if e.primitive.name == "reduce_window_sum"]  # LRN's squares, average pooling
    assert all(e.invars[0].aval.dtype == jnp.float32 for e in sums)
    softmax = [e for e in eqns if e.primitive.name in ("logistic", "exp", "log")]  # loss and softmax
    assert all(e.invars[0].aval.dtype == jnp.float32 for e in softmax if e.invars[0].aval.ndim == 2)


def _losses(name, shape, dtype, steps=30):
    """Full-batch training losses on separable data, and the final state (lr 0.005: stable)."""
    model = get_model(name, num_classes=4, dtype=dtype)
    state = train.create_train_state(jax.random.key(0), model, optim.make_optimizer("paper_sgd", 0.005), shape)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 64)
    images = rng.normal(0, 0.3, (64, *shape)).astype(np.float32) + labels[:, None, None, None] * 0.5

    @jax.jit
    def step(state):
        (loss, (_, updates)), grads = jax.value_and_grad(train.loss_and_metrics, argnums=1, has_aux=True)(
            state, state.params, {"image": images, "label": labels}, jax.random.key(1), 0.0)
        new, opt_state = state.tx.update(grads, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, new), opt_state=opt_state,
                             batch_stats=updates.get("batch_stats", state.batch_stats)), loss

    losses = []
    for _ in range(steps):
        state, loss = step(state)
        losses.append(float(loss))
    return np.array(losses), state


@pytest.mark.parametrize("name,shape", [("lenet5_modern", (32, 32, 1)),
                                        pytest.param("resnet_tiny", (32, 32, 3), marks=pytest.mark.slow)])
def test_bfloat16_trains_as_float32_does(name, shape):
    losses, state = _losses(name, shape, jnp.bfloat16)
    reference, _ = _losses(name, shape, jnp.float32)
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses
    # bf16 rounding, not a different descent: the curves agree while the loss falls steadily; past
    # that, rounding differences grow along the trajectory (by 30 steps they differ by up to 0.07)
    np.testing.assert_allclose(losses[:20], reference[:20], atol=0.05)
    velocity = state.opt_state.inner_state[1].velocity
    assert {leaf.dtype for leaf in jax.tree.leaves(velocity)} == {jnp.dtype(jnp.float32)}
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
