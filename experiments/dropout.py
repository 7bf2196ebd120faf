"""Dropout (Krizhevsky et al. 2012, section 4.2): `python -m experiments.dropout`.

The paper: without dropout on the inputs of fc6 and fc7 AlexNet overfits substantially;
dropout roughly doubles the number of iterations needed to converge. Here: AlexNet's layers
at 67x67 with half the kernels (`_compare.small_alexnet`) on the offline digits, dropout 0.5
against none, `experiment.seeds` seeds; overfitting as the gap between the training-split
error (evaluated without dropout) and the validation error, convergence as the first logged
step whose training error (as trained, with dropout) is at most `experiment.converged`.
Writes results.json, results.md and dropout.png to the workdir (default runs/dropout).
Budget: 7 minutes on 2 CPU cores (6 runs of 800 steps; measured 6 min 55 s).
"""

from __future__ import annotations

import pathlib

import numpy as np
from ml_collections import config_dict

from cnn_jax.config import defaults

from experiments import _analyse, _compare, _report, _run

CLAIM = _analyse.Claim(claim="Dropout on fc6/fc7 removes substantial overfitting and about doubles the steps to converge (AlexNet)",
                       paper="about 2x the steps", source="Krizhevsky et al. 2012, section 4.2")
VARIANTS = {"dropout 0.5": {"model.dropout_rate": 0.5}, "no dropout": {"model.dropout_rate": 0.0}}


def get_config() -> config_dict.ConfigDict:
    c = _compare.small_alexnet(defaults())
    c.num_train_steps = 800
    c.experiment = config_dict.ConfigDict(dict(seeds=3, converged=0.05))
    return c


def run_all(config, workdir) -> dict:
    root = pathlib.Path(workdir)
    budget, level = _compare.budget(config), config.experiment.converged
    results = _compare.run_variants(config, root, VARIANTS, evaluate=("train",))
    if not results:
        return _compare.NOTHING
    gaps = _analyse.add_gap(results)
    for runs in results.values():
        for r in runs:
            r["steps_to_converge"] = (None if r["diverged"] else
                                      _analyse.first_below(r["train_steps"], r["train_curve"], level))
    steps = {v: [r["steps_to_converge"] for r in runs if r["steps_to_converge"]] for v, runs in results.items()}
    everyone = all(r["steps_to_converge"] for runs in results.values() for r in runs)
    ratio = np.mean(steps["dropout 0.5"]) / np.mean(steps["no dropout"]) if everyone else float("nan")
    less_overfit = gaps["dropout 0.5"] < gaps["no dropout"]
    # the paper: "roughly doubles"; reproduced within a factor 1.5..3 and with less overfitting
    kind = ("reproduced" if less_overfit and 1.5 <= ratio <= 3 else
            "same direction" if less_overfit and ratio > 1 else "not reproduced")
    why = (f"train/validation gap {gaps['no dropout']:.1f} points without dropout, {gaps['dropout 0.5']:.1f} with; "
           + (f"steps to {level:.0%} training error (as trained) {np.mean(steps['no dropout']):.0f} without, "
              f"{np.mean(steps['dropout 0.5']):.0f} with ({ratio:.1f}x)" if everyone else
              f"not every run reached {level:.0%} training error (as trained) within {budget} steps, or it "
              "diverged: no step ratio"))
    steps_text = f"{ratio:.1f}x the steps" if everyone else "steps: n/a"
    verdict = _analyse.Verdict(ours=f"{steps_text}; gap {gaps['no dropout']:.1f} -> {gaps['dropout 0.5']:.1f} points",
                               verdict=kind, why=why, scale=_compare.scale_of(config))
    table = [*_report.error_table(results, _report.GAP_COLUMNS), "",
             f"| variant | steps to {level:.0%} training error (per seed) |", "|---|---|"]
    table += [f"| {v} | {', '.join(str(r['steps_to_converge'] or f'>{budget}') for r in runs)} |" for v, runs in results.items()]
    panels = _report.panels(results, "train", "val")
    return _report.write_results(root, "dropout", config, CLAIM, verdict, results, table, panels,
                                  title=f"With and without dropout: {config.model_name} on {config.dataset}")


if __name__ == "__main__":
    _run.run(get_config, job=run_all, show=_report.show, name="dropout")
