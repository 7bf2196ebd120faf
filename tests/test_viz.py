"""Pictures of a run: the learning curves from metrics.jsonl and the labelled Figure 3."""

import json

import numpy as np
import pytest
from PIL import Image

from cnn_jax import viz


def _log(path, rows):
    path.write_text("".join(json.dumps({"time": 0.0, **row}) + "\n" for row in rows))


def test_read_metrics_keeps_the_last_value_a_resumed_run_logged_for_a_step(tmp_path):
    _log(tmp_path / "metrics.jsonl", [{"step": 10, "train/loss": 2.0}, {"step": 20, "train/loss": 1.5},
                                      {"step": 20, "train/loss": 1.4}, {"step": 30, "train/loss": 1.0},
                                      {"step": 20, "eval/top1_error": 0.5}])
    metrics = viz.read_metrics(tmp_path / "metrics.jsonl")
    np.testing.assert_array_equal(metrics["train/loss"][0], [10, 20, 30])
    np.testing.assert_array_equal(metrics["train/loss"][1], [2.0, 1.4, 1.0])
    np.testing.assert_array_equal(metrics["eval/top1_error"][0], [20])


def test_rate_drops_are_the_falls_by_half_or_more():
    steps = np.array([10, 20, 30, 40, 50, 60])
    warmup_then_steps = np.array([0.01, 0.02, 0.02, 0.002, 0.0019, 0.0002])
    assert viz.rate_drops(steps, warmup_then_steps) == [40, 60]
    cosine = 0.1 * (1 + np.cos(np.pi * np.arange(6) / 12)) / 2  # slow decay: never a drop
    assert viz.rate_drops(steps, cosine) == []


def test_curves_png_is_written_from_a_log(tmp_path):
    rows = [{"step": s, "train/loss": 2.3 / s, "train/top1_error": 0.9 / s, "train/top5_error": 0.5 / s,
             "train/learning_rate": 0.1 if s < 50 else 0.01} for s in range(10, 101, 10)]
    rows += [{"step": 50, "eval/top1_error": 0.2, "eval/top5_error": 0.05},
             {"step": 100, "eval/top1_error": 0.1, "eval/top5_error": 0.01}]
    _log(tmp_path / "metrics.jsonl", rows)
    assert viz.main(["curves", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "curves.png").size == (1500, 420)


def test_curves_of_an_empty_log_is_one_line(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    assert viz.main(["curves", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no training loss logged" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("shape,labels", [((11, 11, 3, 96), 2), ((2, 11, 11, 3, 48), 2), ((3, 3, 3, 16), 1)],
                         ids=["alexnet", "two towers", "resnet20"])
def test_figure3_tiles_are_readable_for_any_first_layer(tmp_path, shape, labels):
    """Each kernel is enlarged to at least 40 pixels, 16 to a row, so no figure is a strip."""
    kernel = np.random.default_rng(0).normal(size=shape)
    width, height = Image.open(viz.save_conv1_figure({"conv1": {"kernel": kernel}}, tmp_path / "k.png", step=7)).size
    per_group = shape[-1] if len(shape) == 5 else shape[-1] // labels
    tile = 11 * 4 if shape[-3] == 11 else 3 * 15
    assert width >= min(16, per_group) * tile and height >= labels * -(-per_group // 16) * tile
    assert width / height < 8  # not a 2210x94 strip
    rows = viz.conv1_rows(kernel)
    assert rows.shape[:2] == (labels, per_group)
    assert viz.group_labels(kernel, *rows.shape[:2]) == (
        ["tower 1", "tower 2"] if len(shape) == 5 else
        ["kernels 1-48", "kernels 49-96"] if labels == 2 else ["kernels 1-16"])
