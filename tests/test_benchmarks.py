"""The train-step benchmark runs end to end and its table reads its own numbers (speed itself is
measured in `benchmarks/`, never asserted here)."""

import json

import pytest

from benchmarks import train_step


def test_train_step_benchmark_writes_what_it_prints(tmp_path, capfd):
    out = tmp_path / "step.json"
    assert train_step.main(["--models", "lenet5", "--repeats", "2", "--seconds", "0.05", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    result = report["models"]["lenet5"]
    rates = result["cnn_jax"]["all"]
    assert len(rates) == 2 and all(r > 0 for r in rates)
    assert result["cnn_jax"]["min"] <= result["cnn_jax"]["median"] <= result["cnn_jax"]["max"]
    # LeNet-5's forward multiply-adds by hand, biases included (the paper's connection counts
    # for C1, C3, C5, F6; S2 and S4 count their bias additions, their sums being no products)
    by_hand = 28 * 28 * 6 * 26 + 14 * 14 * 6 + 10 * 10 * 1516 + 5 * 5 * 16 + 120 * 401 + 84 * 121
    assert result["forward_macs_per_image"] == by_hand
    assert result["peak_bytes"] > 0 and result["first_step_s"] > 0
    if "pytorch" in result:  # the [bench] extra
        assert result["ratio"] == pytest.approx(result["cnn_jax"]["median"] / result["pytorch"]["median"])
    printed = capfd.readouterr()  # fd level: the case may run in a child process
    assert f"{result['cnn_jax']['median']:,.1f}" in printed.out and "lenet5" in printed.out
    assert "lenet5: compiling" in printed.err and "lenet5: timing round 2 of 2" in printed.err  # progress


def test_train_step_benchmark_refuses_unknown_models():
    with pytest.raises(SystemExit):
        train_step.main(["--models", "alexnet,lenet7"])
