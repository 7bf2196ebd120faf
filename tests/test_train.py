"""Train step, NaN stop, checkpoint resume equality, on AlexNet at 67x67 over real digits."""

import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ml_collections import config_dict

from cnn_jax import get_model, optim, train
from cnn_jax.checkpoint import CheckpointError
from cnn_jax.data import augment
from cnn_jax.train_log import TrainLog
from helpers import tiny_config


def restored_params(workdir, step):
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")["params"]


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    model = get_model("alexnet", num_classes=4, init_scheme="lecun", dropout_rate=0.0)
    tx = optim.make_optimizer("paper_sgd", 0.05)
    state = train.create_train_state(jax.random.key(0), model, tx, (67, 67, 3))
    images = jax.random.randint(jax.random.key(1), (8, 67, 67, 3), 0, 256).astype(jnp.uint8)
    batch = {"image": images, "label": jnp.arange(8) % 4}
    prep = augment.make_preprocessor(np.full((67, 67, 3), 128.0), np.zeros(3), np.eye(3), input_size=67,
                                     flip=False, pca_noise=0.0)  # a fixed batch: nothing random
    step = jax.jit(chex.assert_max_traces(train.train_step, n=1), donate_argnums=(0,))
    losses = []
    for _ in range(12):
        state, stats = step(state, batch, jax.random.key(2), prep)
        losses.append(float(stats["loss"]))
    assert int(state.step) == 12
    assert losses[-1] < 0.75 * losses[0]  # 1.38 (ln 4) -> 0.99 after 12 steps, measured
    assert float(stats["learning_rate"]) == pytest.approx(0.05)


def test_eval_step_counts_only_masked_examples():
    model = get_model("alexnet", num_classes=3, init_scheme="lecun")
    state = train.create_train_state(jax.random.key(0), model, optim.make_optimizer("sgdw", 0.1), (67, 67, 3))
    images = jax.random.normal(jax.random.key(1), (4, 67, 67, 3))
    full = train.eval_step(state, {"image": images[:2], "label": jnp.array([0, 1])})
    padded = train.eval_step(state, {"image": images, "label": jnp.array([0, 1, 2, 2]),
                                     "mask": jnp.array([1.0, 1.0, 0.0, 0.0])})
    chex.assert_trees_all_close(full, padded, rtol=1e-5)
    assert float(padded["count"]) == 2


def test_non_finite_values_stop_the_run_and_never_reach_a_checkpoint(data_dir, tmp_path):
    config = tiny_config(data_dir, learning_rate=1e12, num_train_steps=6, schedule="constant")
    with pytest.raises(train.NonFiniteLossError, match=r"(at|by) step [1-6].*newest.*checkpoint"):
        train.train_and_evaluate(config, tmp_path)
    for step_dir in (tmp_path / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            params = restored_params(tmp_path, int(step_dir.name))
            assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), step_dir


class _Recorder:
    def __init__(self):
        self.lines = []

    def write(self, step, scalars):
        self.lines.append((step, scalars))

    def set_postfix(self, **_):
        pass


def test_the_log_reads_a_window_only_once_its_last_step_has_finished():
    from cnn_jax.timing import StepClock

    writer, clock = _Recorder(), StepClock()
    log = TrainLog(writer, clock, _Recorder(), batch_size=4, newest=lambda: "ckpt/2")
    for step in range(1, 7):
        log.add({"loss": jnp.float32(step)})
        if step % 2 == 0:
            log.close(step)
        log.read(step - 2)  # what the loop does once step - 2 has finished
        assert [s for s, _ in writer.lines] == [s for s in (2, 4) if s <= step - 2]
    log.drain(6)
    assert [(s, v["train/loss"]) for s, v in writer.lines] == [(2, 1.5), (4, 3.5), (6, 5.5)]
    log.add({"loss": jnp.float32(1.0)})
    log.add({"loss": jnp.float32(np.nan)})
    log.close(8)
    log.read(7)
    assert len(writer.lines) == 3  # step 8 not yet finished: not read, so no NaN seen yet
    with pytest.raises(train.NonFiniteLossError, match="loss is nan at step 8; the newest checkpoint is ckpt/2"):
        log.read(8)
    clock.close()


def test_a_checkpoint_of_another_model_is_refused_untouched(data_dir, tmp_path):
    train.train_and_evaluate(tiny_config(data_dir, num_train_steps=2), tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # 99x99 input: fc6 sees 2x2x256 features instead of 1x1x256
    other = tiny_config(data_dir, num_train_steps=2, allow_config_change=True, input_size=99, resize_size=104)
    with pytest.raises(CheckpointError, match="another model"):
        train.train_and_evaluate(other, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # nothing set aside


def test_a_start_that_fails_on_its_data_leaves_no_record_to_block_the_fixed_command(data_dir, tmp_path):
    """A misspelt dataset fails before anything is trained, and writes no config.json: the
    corrected command starts afresh rather than being refused as 'trained with other settings'."""
    from cnn_jax.data.sources import DatasetError

    with pytest.raises(DatasetError, match="is not a dataset name"):
        train.train_and_evaluate(tiny_config(data_dir, dataset="mnist:x.y"), tmp_path)
    assert not (tmp_path / "config.json").exists()
    assert train.train_and_evaluate(tiny_config(data_dir, num_train_steps=1), tmp_path)["step"] == 1


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(data_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # eval every 2 steps with the plateau schedule: the learning-rate state must resume too.
    result = train.train_and_evaluate(tiny_config(data_dir, num_train_steps=6, keep_checkpoints=5, schedule="plateau"), straight)
    kept = sorted(int(p.name) for p in (straight / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [2, 4, 6]  # the cadence of 2, and no extra save at step 1
    train.train_and_evaluate(tiny_config(data_dir, num_train_steps=3, schedule="plateau"), resumed)
    assert sorted(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())[-1] == 3
    result_resumed = train.train_and_evaluate(tiny_config(data_dir, num_train_steps=6, schedule="plateau"),
                                              resumed)
    assert result["step"] == result_resumed["step"] == 6
    chex.assert_trees_all_close(restored_params(straight, 6), restored_params(resumed, 6), rtol=1e-6, atol=1e-7)
    assert result["top1_error"] == pytest.approx(result_resumed["top1_error"])
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 6  # the log was appended to, not overwritten


def test_damaged_latest_checkpoint_falls_back_to_the_previous(data_dir, tmp_path):
    train.train_and_evaluate(tiny_config(data_dir, num_train_steps=4), tmp_path)
    for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "manifest" in f.name:
            f.unlink()
    result = train.train_and_evaluate(tiny_config(data_dir, num_train_steps=4), tmp_path)
    assert result["step"] == 4
    assert (tmp_path / "checkpoints" / "unreadable-4").is_dir()  # set aside, not deleted
    assert (tmp_path / "checkpoints" / "4").is_dir()  # and step 4 written again


FAMILIES = {  # model: (fields, input size, channels): the smallest input each geometry allows, or near it
    "lenet5": ({}, 32, 1), "lenet5_modern": ({}, 32, 1), "vgg11_bn": ({}, 32, 3),
    "googlenet": ({"aux_heads": True}, 128, 3), "resnet_tiny": ({}, 32, 3), "alexnet_bn": ({}, 167, 3),
}


BATCH_NORM = ("vgg11_bn", "resnet_tiny", "alexnet_bn")


def test_a_batch_norm_network_goes_through_the_whole_pipeline(data_dir, tmp_path):
    """Runner, evaluation and checkpoint with batch statistics (the experiments' smoke runs
    train a network without batch norm)."""
    config = tiny_config(data_dir, model_name="resnet_tiny", model=config_dict.ConfigDict({}), input_size=32,
                         resize_size=32, num_train_steps=2, eval_every_steps=2)
    result = train.train_and_evaluate(config, tmp_path)
    assert result["step"] == 2 and np.isfinite(result["loss"])
    saved = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "2" / "state")
    means = [v for path, v in jax.tree_util.tree_leaves_with_path(saved["batch_stats"]) if path[-1].key == "mean"]
    assert means and any(np.abs(m).max() > 0 for m in means)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "googlenet" else n
                                  for n in sorted(FAMILIES)])  # googlenet: minutes of compiling
def test_one_training_step_per_family(name):
    """The jitted train step on each family's own kind of state: a finite loss, batch-norm
    statistics that moved, GoogLeNet's auxiliary losses reaching their heads (the whole
    pipeline around the step is the smoke runs' job)."""
    fields, size, channels = FAMILIES[name]
    model = get_model(name, num_classes=10, **fields)
    state = train.create_train_state(jax.random.key(0), model, optim.make_optimizer("paper_sgd", 0.01),
                                     (size, size, channels))
    batch = {"image": jax.random.normal(jax.random.key(1), (4, size, size, channels)), "label": jnp.arange(4)}
    state, stats = jax.jit(train.train_step)(state, batch, jax.random.key(2), None)
    assert int(state.step) == 1 and np.isfinite(float(stats["loss"]))
    if name in BATCH_NORM:  # statistics were trained
        means = [v for path, v in jax.tree_util.tree_leaves_with_path(state.batch_stats) if path[-1].key == "mean"]
        assert means and any(np.abs(m).max() > 0 for m in means)
    if name == "googlenet":  # the auxiliary losses reached the heads: their (zero-initialised,
        # so not weight-decayed) biases have a velocity
        optimiser = {jax.tree_util.keystr(path): v for path, v in jax.tree_util.tree_leaves_with_path(state.opt_state)}
        for head in ("aux1", "aux2"):
            biases = [v for path, v in optimiser.items() if f"'{head}']['fc2']['bias']" in path]
            assert biases and all(np.abs(v).max() > 0 for v in biases), head


def test_ten_crop_eval_averages_the_softmax():
    model = get_model("lenet5_modern", num_classes=4)
    state = train.create_train_state(jax.random.key(0), model, optim.make_optimizer("sgdw", 0.1), (32, 32, 1))
    views = jax.random.normal(jax.random.key(1), (3, 10, 32, 32, 1))
    labels = jnp.array([0, 1, 3])
    out = train.eval_step(state, {"image": views, "label": labels})
    logits = model.apply({"params": state.params}, views.reshape(30, 32, 32, 1), train=False)
    probs = np.asarray(jax.nn.softmax(logits)).reshape(3, 10, 4).mean(1)
    expected_loss = -np.log(probs[np.arange(3), np.asarray(labels)]).sum()
    np.testing.assert_allclose(float(out["loss"]), expected_loss, rtol=1e-5)
    expected_top1 = (probs.argmax(1) != np.asarray(labels)).sum()
    assert float(out["top1_error"]) == expected_top1 and float(out["count"]) == 3


@pytest.mark.parametrize("paused", [False, True])
def test_the_step_clock_counts_an_idle_gap_as_data_wait_unless_the_loop_paused(paused):
    from cnn_jax.timing import StepClock

    clock = StepClock()
    clock.dispatched(1, jnp.ones(3), time.perf_counter())
    clock.wait(1)
    time.sleep(0.2)  # the device has nothing to run: the host is busy (or saving, if paused)
    if paused:
        clock.pause()
    clock.dispatched(2, jnp.ones(3), time.perf_counter())
    clock.wait(2)
    wait = clock.take()
    clock.close()
    assert wait == 0.0 if paused else wait > 0.5  # 0.2 s idle against microseconds of work


def test_a_step_that_returns_only_when_done_counts_as_work_not_data_wait():
    from cnn_jax.timing import StepClock

    clock = StepClock()
    clock.dispatched(1, jnp.ones(3), time.perf_counter())
    clock.wait(1)
    sent = time.perf_counter()
    time.sleep(0.2)  # a synchronous step (pmap's): the call itself is the device's work
    clock.dispatched(2, jnp.ones(3), sent)
    clock.wait(2)
    wait = clock.take()
    clock.close()
    assert wait < 0.1, wait


def test_train_step_without_a_preprocessor_refuses_integer_images():
    model = get_model("lenet5_modern")
    state = train.create_train_state(jax.random.key(0), model, optim.paper_sgd(0.01), (32, 32, 1))
    batch = {"image": np.zeros((2, 32, 32, 1), np.uint8), "label": np.zeros(2, np.int32)}
    with pytest.raises(TypeError, match=r"prep=None.*uint8.*make_preprocessor"):
        train.train_step(state, batch, jax.random.key(1), None)
