"""The reproduction experiments: the networks they add, their verdict rules, every
experiment's smoke run, and the README table built from committed results."""

import importlib
import json
import pathlib
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import checks, get_model
from cnn_jax.models.resnet import BasicBlock
from experiments import _analyse, _compare, _report, _run, reproductions

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _count(model, shape):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False))
    return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


def test_convnet4_parameters_by_hand():
    # 5x5 convolutions of 32, 32, 64 kernels (padding 2), 3/2 pools flooring 32 -> 15 -> 7 -> 3, fc 3*3*64 -> 10
    by_hand = (5 * 5 * 3 * 32 + 32) + (5 * 5 * 32 * 32 + 32) + (5 * 5 * 32 * 64 + 64) + (3 * 3 * 64 * 10 + 10)
    assert _count(get_model("convnet4"), (32, 32, 3)) == by_hand == 85_098
    # 2/2 pools: 32 -> 16 -> 8 -> 4
    assert _count(get_model("convnet4", pool_window=2), (32, 32, 3)) == by_hand - 576 * 10 + 4 * 4 * 64 * 10
    hidden = get_model("convnet4", hidden=(100,), dropout_rate=0.5)
    assert _count(hidden, (32, 32, 3)) == by_hand - 5770 + (576 * 100 + 100) + (100 * 10 + 10)


def test_convnet4_activation_changes_the_function_and_unknown_ones_are_named():
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    relu, tanh = get_model("convnet4"), get_model("convnet4", activation="tanh")
    variables = relu.init(jax.random.key(0), x, train=False)
    out = relu.apply(variables, x, train=False)
    chex.assert_shape(out, (2, 10))
    assert not np.allclose(out, tanh.apply(variables, x, train=False))
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        get_model("convnet4", activation="gelu").init(jax.random.key(0), x, train=False)


def test_scaled_alexnet_parameters_by_hand():
    # kernels 0.5: 48-128-192-192-128; 67x67 input: conv1 15x15, pools 7, 3, 1; fc6 128 -> 1024
    convs = [(11, 3, 48), (5, 48, 128), (3, 128, 192), (3, 192, 192), (3, 192, 128)]
    by_hand = sum(k * k * i * o + o for k, i, o in convs) + (128 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 10 + 10)
    one = get_model("alexnet", num_classes=10, kernels=0.5, fc_units=1024, floor=True)
    assert _count(one, (67, 67, 3)) == by_hand
    # two towers of half those kernels each: conv2, conv4, conv5 read their own tower only
    towers = [(11, 3, 24), (5, 24, 64), (3, 128, 96), (3, 96, 96), (3, 96, 64)]  # conv3 reads both towers
    fc = (128 * 512 + 512) + (1024 * 512 + 512) + (1024 * 5 + 5)
    two = get_model("alexnet_2tower", num_classes=10, kernels=0.5, fc_units=1024)
    assert _count(two, (67, 67, 3)) == 2 * (sum(k * k * i * o + o for k, i, o in towers) + fc)


def test_plain_cifar_nets_have_resnet_parameter_counts():
    # He et al. Table 6: ResNet-20 0.27M, ResNet-56 0.85M; option A shortcuts add none, so the plain
    # nets have the same counts
    for depth, millions in ((20, 0.27), (56, 0.85)):
        plain, residual = (_count(get_model(f"{kind}{depth}_cifar", num_classes=10), (32, 32, 3))
                           for kind in ("plain", "resnet"))
        assert plain == residual and round(plain / 1e6, 2) == millions


def test_plain_block_has_no_shortcut():
    """With its second batch norm zeroed, a residual block passes relu(x) on; a plain one gives 0."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    for residual, expected in ((True, jax.nn.relu(x)), (False, jnp.zeros_like(x))):
        block = BasicBlock(16, residual=residual)
        variables = block.init(jax.random.key(1), x)
        params = jax.tree_util.tree_map_with_path(
            lambda path, v: jnp.zeros_like(v) if "bn2" in jax.tree_util.keystr(path) else v, variables["params"])
        chex.assert_trees_all_close(block.apply({**variables, "params": params}, x), expected)


def test_plain_net_is_the_resnet_without_shortcuts():
    """Same variables, different functions: ResNet passes `residual` down to every block."""
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    plain, residual = get_model("plain20_cifar", num_classes=10), get_model("resnet20_cifar", num_classes=10)
    variables = residual.init(jax.random.key(1), x, train=False)
    assert jax.tree.structure(plain.init(jax.random.key(1), x, train=False)) == jax.tree.structure(variables)
    assert not np.allclose(plain.apply(variables, x, train=False), residual.apply(variables, x, train=False))


def _results(errors: dict) -> dict:
    return {variant: [{"top1_error": e, "diverged": e != e} for e in values] for variant, values in errors.items()}


NAN = float("nan")


@pytest.mark.parametrize("better,worse,verdict,ours", [
    # the paper: 13% -> 11%, 15% lower; reproduced needs 7.7% lower, ranges apart, two seeds
    ((0.10, 0.11, 0.12), (0.13, 0.14, 0.15), "reproduced", "14.0% [13.0-15.0] -> 11.0% [10.0-12.0] (-3.0 points)"),
    ((0.10, 0.14, 0.12), (0.13, 0.12, 0.14), "same direction", "(-1.0 points)"),  # ranges overlap
    ((0.130, 0.131), (0.135, 0.136), "same direction", "(-0.5 points)"),  # apart, but 4% lower: too small
    ((0.10,), (0.14,), "same direction", "14.0% -> 10.0% (-4.0 points)"),  # one seed is not enough
    ((0.13, 0.14, 0.12), (0.10, 0.11, 0.12), "not reproduced", "(+2.0 points)"),  # higher
    ((0.10, 0.11, NAN), (0.13, 0.14, 0.15), "reproduced", "10.5% [10.0-11.0, 1 of 3 diverged]"),
    ((NAN, NAN), (0.13, 0.14), "not reproduced", "-> diverged (2 of 2)"),
])
def test_error_verdicts(better, worse, verdict, ours):
    result = _analyse.compare_errors(_results({"a": better, "b": worse}), "a", "b", (13.0, 11.0), "scale")
    assert result.verdict == verdict
    assert ours in result.ours


def test_helpers():
    assert _analyse.first_below([5, 10, 15], [0.5, 0.25, 0.1], 0.25) == 10
    assert _analyse.first_below([5, 10], [0.5, 0.3], 0.25) is None
    assert _analyse.pm([0.10, 0.11, 0.15]) == "12.0% [10.0-15.0]"
    assert _analyse.pm([0.02, -0.01], unit="") == "0.5 [-1.0-2.0]"
    with pytest.raises(ValueError, match="verdict 'yes'"):
        _analyse.Verdict(ours="", verdict="yes", why="", scale="")


def checked_run_with_made_up_errors(config, workdir):
    """In place of `train_and_evaluate`: the run's config is checked as it would be (model,
    fields, geometry, mesh), then the metrics and checkpoint folder of a 3-step run are written, with errors drawn
    from the run folder's name (so variants and seeds differ, and a rerun gives the same)."""
    checks.check_config(config, device_count=jax.device_count(), process_count=1)
    folder = pathlib.Path(workdir)
    (folder / "checkpoints" / "3" / "state").mkdir(parents=True, exist_ok=True)  # what evaluate_on starts from
    rng = np.random.default_rng(zlib.crc32(str(folder.relative_to(folder.parents[1])).encode()))
    errors = np.sort(rng.uniform(0.05, 0.9, 4))[::-1]
    with open(folder / "metrics.jsonl", "w") as log:
        for step, error in enumerate(errors[:3], 1):
            log.write(json.dumps({"step": step, "train/top1_error": error, "train/loss": 3 * error}) + "\n")
            log.write(json.dumps({"step": step, "eval/top1_error": error}) + "\n")
    return {"step": 3, "top1_error": float(errors[2]), "top5_error": float(errors[3]), "loss": float(3 * errors[2]),
            "ten_crop_top1_error": float(errors[3])}


# The real 3-step runs: one experiment for the shared runner (the others' runs are the same
# code with other settings), every experiment with its runs checked and made up.
REAL = ("lrn",)


@pytest.mark.parametrize("name", reproductions.EXPERIMENTS)
def test_experiment_smoke(name, data_dir, tmp_path, monkeypatch, capsys):
    """Every experiment's smoke mode: each of its runs for 3 steps (or checked and made up),
    then its table, plot and verdict."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    if name not in REAL:
        monkeypatch.setattr(_compare, "train_and_evaluate", checked_run_with_made_up_errors)
    module = importlib.import_module(f"experiments.{name}")
    argv = [name, "--config.smoke=True", f"--workdir={tmp_path}"]
    assert _run.main(module.get_config, argv, job=module.run_all, show=_report.show, name=name) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["smoke"] and data["experiment"] == name
    assert data["verdict"]["verdict"].capitalize() in out and data["claim"]["paper"] in out
    assert all(len(runs) == 1 for runs in data["runs"].values())  # one seed in smoke mode
    assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert data["claim"]["claim"] in (tmp_path / "results.md").read_text()


def test_readme_table_is_rendered_from_the_committed_results():
    text = (ROOT / "README.md").read_text()
    assert reproductions.rewrite(ROOT / "README.md", reproductions.render(ROOT / "docs" / "reproductions")) == text
    for name in reproductions.EXPERIMENTS:
        data = json.loads((ROOT / "docs" / "reproductions" / f"{name}.json").read_text())
        assert not data["smoke"] and data["verdict"]["verdict"] in text
        assert (ROOT / "docs" / "reproductions" / f"{name}.png").exists()


def test_collect_skips_smoke_runs(tmp_path):
    run = tmp_path / "runs" / "lrn"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"smoke": True}))
    assert reproductions.collect(tmp_path / "runs", tmp_path / "docs") == []
    (run / "results.json").write_text(json.dumps({"smoke": False, "claim": {}, "verdict": {}}))
    (run / "lrn.png").write_bytes(b"\x89PNG")
    assert reproductions.collect(tmp_path / "runs", tmp_path / "docs") == ["lrn"]
