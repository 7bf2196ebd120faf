"""Freezing, slower backbones, new heads and starting a run from another run's weights."""

from __future__ import annotations

import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import optim, train, transfer
from cnn_jax.models import get_model
from experiments import _report, _run
from experiments import transfer as transfer_experiment
from helpers import tiny_config


def _params():
    model = get_model("lenet5_modern", num_classes=5)
    return model, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False)["params"]


def _train(tx, params, steps=4):
    """`steps` updates with fixed random gradients; the final parameters."""
    state = tx.init(params)
    for t in range(steps):
        grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(t), p.shape), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_frozen_parameters_get_no_update_no_decay_and_no_state(name):
    model, params = _params()
    frozen = transfer.all_but_head(model)
    free, _ = _train(optim.make_optimizer(name, 0.1, weight_decay=0.01), params)
    ours, state = _train(optim.make_optimizer(name, 0.1, weight_decay=0.01, frozen=frozen), params)
    for layer in ("C1", "C3", "C5", "F6"):
        chex.assert_trees_all_equal(ours[layer], params[layer])  # untouched, decay included
    chex.assert_trees_all_close(ours["output"], free["output"], rtol=1e-6)  # the head trains as before
    momentum = [x for x in jax.tree.leaves(state.inner_state) if np.ndim(x) > 0]  # one buffer per trained array
    assert sorted(x.shape for x in momentum) == sorted(x.shape for x in jax.tree.leaves(params["output"]))


def test_a_slower_backbone_moves_as_if_trained_at_the_lower_rate():
    model, params = _params()
    ours, _ = _train(optim.make_optimizer("paper_sgd", 0.1, slow=transfer.all_but_head(model), slow_lr_scale=0.1),
                     params)
    fast, _ = _train(optim.make_optimizer("paper_sgd", 0.1), params)
    slow, _ = _train(optim.make_optimizer("paper_sgd", 0.01), params)
    chex.assert_trees_all_close(ours["output"], fast["output"], rtol=1e-6)
    chex.assert_trees_all_close(ours["C1"], slow["C1"], rtol=1e-5)  # 0.1 x 0.1 and 0.01 round differently


def test_the_head_pattern_matches_exactly_the_layers_outside_the_head():
    pattern = transfer.all_but_head(get_model("googlenet"))
    for path, outside in (("conv1/kernel", True), ("aux1/fc1/kernel", True), ("fc/kernel", False),
                          ("aux1/fc2/bias", False), ("fc_extra/kernel", True)):
        assert bool(re.search(pattern, path)) == outside, path


def test_a_new_head_is_fresh_and_the_backbone_is_loaded():
    _, source = _params()
    model = get_model("lenet5_modern", num_classes=3)
    fresh = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 1)), train=False)
    start = transfer.merge(fresh, {"params": source}, transfer.head_of(model), "run A")
    chex.assert_trees_all_equal(start.variables["params"]["C3"], source["C3"])
    chex.assert_trees_all_equal(start.variables["params"]["output"], fresh["params"]["output"])
    assert (start.loaded, start.replaced) == (["C1", "C3", "C5", "F6"], ["output"])
    other = get_model("lenet5_modern", num_classes=5).init(jax.random.key(7), jnp.zeros((1, 32, 32, 1)), train=False)
    same = transfer.merge(other, {"params": source}, ("output",), "run A", new_head=True)
    assert same.replaced == ["output"]  # same class count, other classes: still a fresh head
    chex.assert_trees_all_equal(same.variables["params"]["output"], other["params"]["output"])
    chex.assert_trees_all_equal(same.variables["params"]["F6"], source["F6"])
    assert not np.array_equal(other["params"]["output"]["kernel"], source["output"]["kernel"])


def test_a_backbone_that_does_not_fit_is_an_error_naming_the_parameter():
    _, source = _params()
    model = get_model("lenet5_modern", num_classes=5)
    fresh = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 1)), train=False)
    source = {**source, "C3": {**source["C3"], "kernel": np.zeros((3, 3, 6, 16), np.float32)}}
    with pytest.raises(transfer.TransferError, match=r"params C3/kernel has shape \(3, 3, 6, 16\) in run A but "
                                                     r"the model needs \(5, 5, 6, 16\)"):
        transfer.merge(fresh, {"params": source}, transfer.head_of(model), "run A")


def test_a_freeze_pattern_that_matches_nothing_is_refused():
    _, params = _params()
    with pytest.raises(transfer.TransferError, match="matches no parameter; paths look like C1/bias"):
        transfer.describe_training(params, "^conv")


def _restored(workdir, step):
    from cnn_jax.checkpoint import restore_as_numpy

    return restore_as_numpy((workdir / "checkpoints" / str(step) / "state").absolute())["params"]


def test_head_only_run_from_another_run_keeps_its_backbone_bit_for_bit(data_dir, tmp_path, capsys):
    """Run A learns digits 0-4; run B starts from A's workdir on 5-9 with a new head, head only."""
    source = tmp_path / "a"
    config = tiny_config(data_dir, classes=(0, 1, 2, 3, 4), num_train_steps=2, checkpoint_every_steps=2)
    from cnn_jax.train import train_and_evaluate

    train_and_evaluate(config, source)
    target = tmp_path / "b"
    config = tiny_config(data_dir, classes=(5, 6, 7, 8, 9), train_per_class=4, num_train_steps=2,
                         checkpoint_every_steps=2, init_from=str(source), head_only=True, new_head=True)
    result = train_and_evaluate(config, target)
    out = capsys.readouterr().out
    assert "frozen: 14 of 16 parameter arrays" in out and "fc8" not in out.split("frozen:")[1].splitlines()[0]
    assert f"initialised from {source}/checkpoints/2: 7 layer(s) loaded; replaced (new, as initialised): fc8" in out
    before, after = _restored(source, 2), _restored(target, 2)
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"):
        chex.assert_trees_all_equal(after[layer], before[layer])
    fresh = train.create_train_state(jax.random.fold_in(jax.random.key(config.seed), 0),
                                     get_model("alexnet", num_classes=5, **config.model.to_dict()),
                                     optax.identity(), (67, 67, 3)).params["fc8"]
    for name in ("kernel", "bias"):  # the new head started from the run's own initialisation and moved
        assert not np.array_equal(after["fc8"][name], fresh[name]) and not np.array_equal(after["fc8"][name],
                                                                                            before["fc8"][name])
    assert 0.0 <= result["top1_error"] <= 1.0


def test_class_subsets_relabel_and_cap_the_training_images(data_dir):
    from cnn_jax.data import store
    from cnn_jax.data.sources import open_split
    from cnn_jax.data.pipeline import ImageSpec
    from cnn_jax.builders import _prepared

    split = open_split("digits", "train", str(data_dir))
    full = _prepared(split, ImageSpec(32, 32, False, 1, 0.0, "raw"), 1, 0)
    part = store.subset(full, (7, 3), per_class=5)
    assert len(part) == 10 and sorted(part.labels.tolist()) == [0] * 5 + [1] * 5
    originals = full.labels[part.rows]
    assert set(originals[part.labels == 0]) == {7} and set(originals[part.labels == 1]) == {3}
    np.testing.assert_array_equal(part.images([0, 9]), full.images(part.rows[[0, 9]]))
    assert store.subset(full) is full


@pytest.mark.parametrize("flag,needle", [
    ("--config.classes=(1,1)", "two or more distinct class numbers"),
    ("--config.freeze=[", "not a regular expression"),
    ("--config.init_from=/no/such/file.pth", "no such file or folder"),
    ("--config.backbone_lr_scale=0", "must be a finite number > 0"),
])
def test_transfer_flags_are_checked_up_front(flag, needle, capsys):
    from experiments.alexnet import get_config

    assert _run.main(get_config, ["alexnet", flag]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_transfer_experiment_smoke_writes_its_table_and_plot(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    argv = ["transfer", "--config.smoke=True", f"--workdir={tmp_path}"]
    assert _run.main(transfer_experiment.get_config, argv, job=transfer_experiment.run_all,
                     show=_report.show) == 0
    out = capsys.readouterr().out
    assert "| small | digits 0-4 net | head only |" in out and "| full | random | from scratch |" in out
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(results) == {"pretrain", *transfer_experiment.VARIANTS}
    assert (tmp_path / "transfer.png").read_bytes()[:4] == b"\x89PNG"
    assert "replaced (new, as initialised): output" in out
