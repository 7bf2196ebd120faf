"""Each optimiser against a NumPy transcription of its formula, step by step, across a drop."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import optim

LR, MOM, WD = 0.01, 0.9, 5e-4
STEPS, DROP_AT = 8, 4  # the learning rate is divided by 10 before step DROP_AT


def grads_sequence(shape=(3, 2), n=STEPS):
    rng = np.random.default_rng(0)
    return [rng.normal(size=shape).astype(np.float32) for _ in range(n)]


def lr_at(t):
    return LR * (0.1 if t >= DROP_AT else 1.0)


def numpy_paper(w, grads):
    """v <- 0.9 v - 0.0005 eps w - eps g;  w <- w + v   (Krizhevsky et al., section 5)."""
    v, out = np.zeros_like(w), []
    for t, g in enumerate(grads):
        v = MOM * v - WD * lr_at(t) * w - lr_at(t) * g
        w = w + v
        out.append(w)
    return out


def numpy_optax_sgd(w, grads):
    """t <- mu t + (g + wd w);  w <- w - eps t   (learning rate applied after the trace)."""
    trace, out = np.zeros_like(w), []
    for t, g in enumerate(grads):
        trace = MOM * trace + g + WD * w
        w = w - lr_at(t) * trace
        out.append(w)
    return out


def numpy_sgdw(w, grads):
    """m <- mu m + g;  w <- w - eps (m + wd w)   (decay outside the momentum)."""
    m, out = np.zeros_like(w), []
    for t, g in enumerate(grads):
        m = MOM * m + g
        w = w - lr_at(t) * (m + WD * w)
        out.append(w)
    return out


def run_optax(name, w, grads, drop_with="scale"):
    lr = LR if drop_with == "scale" else optim.make_schedule("step", LR, boundaries=(DROP_AT,))
    tx = optim.make_optimizer(name, lr, momentum=MOM, weight_decay=WD)
    params = {"kernel": jnp.asarray(w)}
    state, out = tx.init(params), []
    for t, g in enumerate(grads):
        if drop_with == "scale" and t == DROP_AT:
            state = optim.set_lr_scale(state, 0.1)
        updates, state = tx.update({"kernel": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        chex.assert_trees_all_close(float(optim.current_learning_rate(state)), lr_at(t), rtol=1e-6)
        out.append(np.asarray(params["kernel"]))
    return out


W0 = np.random.default_rng(1).normal(size=(3, 2)).astype(np.float32)


@pytest.mark.parametrize("drop_with", ["scale", "schedule"])
@pytest.mark.parametrize("name,reference", [("paper_sgd", numpy_paper), ("optax_sgd", numpy_optax_sgd),
                                            ("sgdw", numpy_sgdw)])
def test_matches_numpy_reference(name, reference, drop_with):
    ours, ref = run_optax(name, W0, grads_sequence(), drop_with), reference(W0.astype(np.float64), grads_sequence())
    for t, (a, b) in enumerate(zip(ours, ref)):
        chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-7, custom_message=f"step {t}")


@pytest.mark.parametrize("name,reference", [("paper_sgd", numpy_paper), ("optax_sgd", numpy_optax_sgd),
                                            ("sgdw", numpy_sgdw)])
def test_builders_take_a_schedule_as_optax_optimisers_do(name, reference):
    """`paper_sgd(learning_rate=schedule)` and the others, called directly (no injected hyper-parameters)."""
    tx = optim.OPTIMIZERS[name](optim.make_schedule("step", LR, boundaries=(DROP_AT,)), MOM, WD)
    params = {"kernel": jnp.asarray(W0)}
    state, ours = tx.init(params), []
    for g in grads_sequence():
        updates, state = tx.update({"kernel": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        ours.append(np.asarray(params["kernel"]))
    for t, (a, b) in enumerate(zip(ours, reference(W0.astype(np.float64), grads_sequence()))):
        chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-7, custom_message=f"step {t}")


def test_paper_and_optax_rules_agree_until_the_drop_then_differ():
    paper, coupled = numpy_paper(W0, grads_sequence()), numpy_optax_sgd(W0, grads_sequence())
    for t in range(DROP_AT):
        np.testing.assert_allclose(paper[t], coupled[t], rtol=1e-5)
    # After the drop, optax also shrinks the velocity built at the old rate: updates differ.
    step_paper = paper[DROP_AT] - paper[DROP_AT - 1]
    step_coupled = coupled[DROP_AT] - coupled[DROP_AT - 1]
    assert np.abs(step_paper - step_coupled).max() > 0.5 * np.abs(step_coupled).max()


def test_kernel_mask_leaves_biases_undecayed():
    params = {"conv": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for decay, bias_moves in (("kernels", False), ("all", True)):
        tx = optim.make_optimizer("paper_sgd", LR, weight_decay=0.1, decay=decay)
        updates, _ = tx.update(zeros, tx.init(params), params)
        np.testing.assert_allclose(updates["conv"]["kernel"], -LR * 0.1, rtol=1e-6)
        assert bool(jnp.any(updates["conv"]["bias"] != 0)) is bias_moves


def test_schedules_match_hand_values():
    step = optim.make_schedule("step", 1.0, boundaries=(10, 20), factor=0.1)
    assert [float(step(t)) for t in (0, 9, 10, 19, 20)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    cos = optim.make_schedule("cosine", 2.0, total_steps=110, warmup_steps=10)
    for t in (0, 5, 10, 35, 60, 110):
        expected = 2.0 * t / 10 if t < 10 else 2.0 * 0.5 * (1 + np.cos(np.pi * (t - 10) / 100))
        assert float(cos(t)) == pytest.approx(expected, abs=1e-6)
    assert optim.make_schedule("constant", 0.3) == 0.3
    # Warm-up before any schedule: linear from 0, then the schedule at its own (absolute) steps.
    warm_step = optim.make_schedule("step", 1.0, boundaries=(10, 20), factor=0.1, warmup_steps=4)
    assert [float(warm_step(t)) for t in (0, 2, 4, 9, 10, 20)] == pytest.approx([0, 0.5, 1, 1, 0.1, 0.01])
    for kind in ("constant", "plateau"):
        warm = optim.make_schedule(kind, 0.3, warmup_steps=3)
        assert [float(warm(t)) for t in (0, 1, 3, 100)] == pytest.approx([0, 0.1, 0.3, 0.3])
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.make_schedule("cosine", 1.0, total_steps=5, warmup_steps=5)


def test_plateau_divides_by_ten_at_most_three_times():
    state, scales = optim.PlateauState(), []
    for error in (0.5, 0.4, 0.4, 0.41, 0.3, 0.3, 0.3, 0.3, 0.2):
        state = optim.plateau_update(state, error)
        scales.append(state.scale)
    assert scales == pytest.approx([1, 1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.001, 0.001])
    assert state.drops == 3 and state.best == pytest.approx(0.2)


def test_plateau_patience():
    state = optim.PlateauState()
    for error in (0.5, 0.5, 0.5):
        state = optim.plateau_update(state, error, patience=2)
    assert state.scale == 0.1 and state.drops == 1


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.make_optimizer("adamw", 0.1)
    with pytest.raises(ValueError, match="unknown weight-decay mask"):
        optim.decay_mask("biases")
