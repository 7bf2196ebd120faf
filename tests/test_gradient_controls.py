"""Negative controls for `test_gradients.py`: its rule catches a wrong derivative.

On CPU the project's steps differentiate LRN's power and batch norm with derivatives written
out by hand (`cnn_jax.fast_cpu`), and average gradients across pmap devices with a `pmean`.
The float64 reference is JAX's own derivative of XLA's standard operations, so it does not
share that code. Each control plants one slip of the kind such code has, in the project's
step only, and asserts that the first update then fails the rule in layers the slip reaches
(named for each); `test_gradients.py` passes the same families and batches without the slip.
"""

from __future__ import annotations

import jax
import pytest

from cnn_jax import fast_cpu
from test_gradients import (FLOOR, TORCH_LAYOUTS, deviations, float64_update, one_family_at_a_time,  # noqa: E402
                            outside, project_update, reference_shards, torch_tolerance)


_power_without_beta = jax.custom_jvp(fast_cpu._negative_power.fun, nondiff_argnums=(1,))


@_power_without_beta.defjvp
def _power_without_beta_jvp(beta, primals, tangents):
    (s,), (ds,) = primals, tangents
    value = _power_without_beta(s, beta)
    return value, -value / s * ds  # the slip: d/ds s^-beta is -beta s^-beta / s


def _batch_norm_bwd_without_variance(epsilon, res, cotangents):
    x, mean, inv, scale = res
    n = x.size // x.shape[-1]
    dy = cotangents[0]
    dbias, dscale = fast_cpu.channel_sums(dy), fast_cpu.channel_sums(dy * (x - mean) * inv)
    return (scale * inv) * (dy - dbias / n), dscale, dbias  # the slip: the variance's path, - xhat * dscale / n


_batch_norm_without_variance = jax.custom_vjp(fast_cpu._batch_normalise.fun, nondiff_argnums=(3,))
_batch_norm_without_variance.defvjp(fast_cpu._batch_normalise_fwd, _batch_norm_bwd_without_variance)


def _no_mean(tree, axis_name, **_):
    return tree  # the slip: each pmap device keeps its own half's gradients


# slip: (what it replaces, its stand-in, family, path, layers it reaches that must fail the rule)
SLIPS = {
    "lrn-power-without-beta": ((fast_cpu, "_negative_power"), _power_without_beta, "alexnet", "jit_runner",
                               {"conv1/kernel", "conv2/kernel"}),  # LRN follows conv1 and conv2
    "batch-norm-without-variance-path": ((fast_cpu, "_batch_normalise"), _batch_norm_without_variance,
                                         "resnet20_cifar", "jit_runner", {"conv1/kernel"}),
    "pmap-without-gradient-mean": ((jax.lax, "pmean"), _no_mean, "lenet5", "pmap_runner",
                                   {"C1/kernel", "F6/kernel"}),
}


@pytest.mark.parametrize("slip", sorted(SLIPS))
def test_the_rule_catches_a_slip(slip, monkeypatch):
    (owner, attribute), stand_in, name, path, reached = SLIPS[slip]
    one_family_at_a_time(name)
    shards = reference_shards(name, path)
    reference = float64_update(name, shards)  # computed before the slip, and unaffected by it
    tolerance = torch_tolerance(name, shards) if name in TORCH_LAYOUTS else FLOOR
    monkeypatch.setattr(owner, attribute, stand_in)
    with fast_cpu.forced(True):  # the written-out derivatives, on any backend
        found = deviations(project_update(name, path), reference)
    missed = {k: f"{found[k]:.1e}" for k in reached if k not in outside(found, tolerance)}
    assert not missed, f"{slip} leaves these layers within the rule: {missed}"
