"""ReLU against tanh (Krizhevsky et al. 2012, Figure 1): `python -m experiments.relu_vs_tanh`.

The paper: a four-layer convolutional network with ReLUs reaches 25% training error on
CIFAR-10 six times faster than the same network with tanh units; each network at the
learning rate that trains it fastest, no regularisation. Here: the same network
(`convnet4`, without LRN) on the offline digits at 32x32 grey, each activation at the
fastest of `experiment.learning_rates`, `experiment.seeds` seeds, steps to 25% training
error read off the logged training error (the mean over each `log_every_steps` window).
Writes results.json, results.md and relu_vs_tanh.png to the workdir (default
runs/relu_vs_tanh). Budget: 6 minutes on 2 CPU cores (18 runs of 120 steps; measured 5 min 47 s).
"""

from __future__ import annotations

import pathlib

import numpy as np
from ml_collections import config_dict

from cnn_jax.checks import ConfigError
from cnn_jax.config import defaults

from experiments import _analyse, _compare, _report, _run

CLAIM = _analyse.Claim(claim="ReLU reaches 25% training error faster than tanh (four-layer CNN, CIFAR-10)",
                       paper="tanh needs 6x the steps", source="Krizhevsky et al. 2012, Figure 1")
ACTIVATIONS = ("relu", "tanh")


def get_config() -> config_dict.ConfigDict:
    c = defaults()
    c.model_name = "convnet4"
    c.model = config_dict.ConfigDict(dict(activation="relu", lrn=False, dtype="float32"))
    c.input_size, c.resize_size, c.channels = 32, 32, 1
    c.pca_noise, c.weight_decay, c.schedule = 0.0, 0.0, "constant"  # no regularisation (Figure 1)
    c.batch_size, c.num_train_steps, c.log_every_steps, c.eval_every_steps = 32, 120, 2, 40
    c.experiment = config_dict.ConfigDict(dict(threshold=0.25, learning_rates=(0.01, 0.03, 0.1), seeds=3))
    return c


def variants(config) -> dict:
    rates = config.experiment.learning_rates[:1] if config.smoke else config.experiment.learning_rates
    return {f"{act}, lr {lr:g}": {"model.activation": act, "learning_rate": lr} for act in ACTIVATIONS for lr in rates}


def steps_to(runs, threshold) -> list:
    """Per seed: the first logged step at or below `threshold` training error (None: never, or diverged)."""
    return [None if r["diverged"] else _analyse.first_below(r["train_steps"], r["train_curve"], threshold)
            for r in runs]


def fastest(results: dict, act: str, threshold: float, budget: int) -> str:
    """The variant of `act` with the fewest mean steps to the threshold (never: the budget)."""
    mean = lambda v: np.mean([s or budget for s in steps_to(results[v], threshold)])  # noqa: E731
    return min((v for v in results if v.startswith(act)), key=mean)


def run_all(config, workdir) -> dict:
    root = pathlib.Path(workdir)
    e, budget = config.experiment, _compare.budget(config)
    if not e.learning_rates:
        raise ConfigError("--config.experiment.learning_rates is empty: give one or more, e.g. '(0.01, 0.03)'")
    results = _compare.run_variants(config, root, variants(config))
    if not results:
        return _compare.NOTHING
    best = {act: fastest(results, act, e.threshold, budget) for act in ACTIVATIONS}
    steps = {act: steps_to(results[v], e.threshold) for act, v in best.items()}
    table = ["| activation, learning rate | steps to 25% training error (per seed) | final training error | "
             "final validation error |", "|---|---|---:|---:|"]
    for variant, runs in results.items():
        mark = " (fastest)" if variant in best.values() else ""
        finals = [_analyse.pm([float("nan") if r["diverged"] else r["train_curve"][-1] for r in runs]),
                  _analyse.pm([r["top1_error"] for r in runs])]
        per_seed = ["diverged" if r["diverged"] else str(s) if s else f">{budget}"
                    for r, s in zip(runs, steps_to(runs, e.threshold))]
        table.append(f"| {variant}{mark} | {', '.join(per_seed)}"
                     f" | {finals[0]} | {finals[1]} |")
    reached = all(s is not None for act in ACTIVATIONS for s in steps[act])
    ratio = np.mean([s or budget for s in steps["tanh"]]) / np.mean([s or budget for s in steps["relu"]])
    if not reached:
        kind, why = "not reproduced", f"not every run reached {e.threshold:.0%} within {budget} steps"
    else:
        kind = "reproduced" if ratio >= 3 else "same direction" if ratio > 1.2 else "not reproduced"
        why = (f"tanh needs {ratio:.1f}x the steps of ReLU to reach {e.threshold:.0%} training error "
               f"(means {np.mean(steps['tanh']):.0f} and {np.mean(steps['relu']):.0f} steps, resolution "
               f"{config.log_every_steps} steps)")
    verdict = _analyse.Verdict(
        ours=f"tanh needs {ratio:.1f}x the steps" if reached else "n/a", verdict=kind, why=why,
        scale=f"{_compare.scale_of(config)}, learning rate per activation from {list(e.learning_rates)}")
    panels = _report.panels({best[a]: results[best[a]] for a in ACTIVATIONS}, "train")
    return _report.write_results(root, "relu_vs_tanh", config, CLAIM, verdict, results, table, panels,
                                  title=f"ReLU against tanh: {config.model_name} on {config.dataset}",
                                  ylabel="training top-1 error (%)")


if __name__ == "__main__":
    _run.run(get_config, job=run_all, show=_report.show, name="relu_vs_tanh")
