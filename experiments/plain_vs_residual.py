"""Plain against residual networks (He et al. 2015, Figure 6): `python -m experiments.plain_vs_residual`.

The paper, on CIFAR-10: the 56-layer plain network has a *higher* training error than the
20-layer one (the degradation problem), while ResNet-56 has a lower training error than
ResNet-20. Here: plain20_cifar, plain56_cifar, resnet20_cifar and resnet56_cifar (option A
shortcuts; the plain nets are the same layers without them) on the offline digits at 32x32
with random 32x32 crops of 36x36 images, the paper's learning rate 0.1, momentum 0.9 and weight decay 1e-4,
`experiment.seeds` seeds; training error as logged (the mean over each log window, on the
augmented batches), its last `experiment.tail` logged values averaged. Writes results.json,
results.md and plain_vs_residual.png to the workdir (default runs/plain_vs_residual).
Budget: 14 minutes on 2 CPU cores (8 runs of 200 steps; measured 13 min 33 s on 2026-12-02,
before later changes to the training code, on a machine not recorded, and 4 min 13 s on
2026-12-04 on an AMD EPYC of family 26, where the default runs take 0.40-0.44 of their
table's times, LeNet-5's 0.9). At that length the 56-layer nets are still early in training (lr 0.1 from the first step).
"""

from __future__ import annotations

import pathlib

import numpy as np
from ml_collections import config_dict

from cnn_jax.checks import ConfigError
from cnn_jax.config import defaults

from experiments import _analyse, _compare, _report, _run

CLAIM = _analyse.Claim(claim="Deeper plain nets train worse, deeper residual nets better (20 against 56 layers, CIFAR-10)",
                       paper="plain-56 above plain-20, ResNet-56 below ResNet-20 (training error)",
                       source="He et al. 2015, Figure 6")
NETS = ("plain20_cifar", "plain56_cifar", "resnet20_cifar", "resnet56_cifar")


def get_config() -> config_dict.ConfigDict:
    c = defaults()
    c.model_name = "resnet20_cifar"
    c.model = config_dict.ConfigDict(dict(shortcut="A", floor=True, dtype="float32"))
    c.input_size, c.resize_size, c.channels = 32, 36, 3
    c.pca_noise, c.learning_rate, c.weight_decay, c.decay_mask, c.schedule = 0.0, 0.1, 1e-4, "kernels", "constant"
    c.batch_size, c.num_train_steps, c.log_every_steps, c.eval_every_steps = 32, 200, 10, 100
    c.experiment = config_dict.ConfigDict(dict(seeds=2, tail=5))
    return c


def final_training_error(runs, tail: int) -> list[float]:
    """Per seed: the mean of the last `tail` logged training errors (NaN: diverged)."""
    return [float("nan") if r["diverged"] else float(np.mean(r["train_curve"][-tail:])) for r in runs]


def run_all(config, workdir) -> dict:
    root = pathlib.Path(workdir)
    tail = config.experiment.tail
    if tail < 1:
        raise ConfigError(f"--config.experiment.tail={tail}: must be at least 1 (logged training errors averaged)")
    results = _compare.run_variants(config, root, {name: {"model_name": name} for name in NETS})
    if not results:
        return _compare.NOTHING
    train = {net: final_training_error(results[net], tail) for net in NETS}
    for net in NETS:
        for r, value in zip(results[net], train[net]):
            r["final_training_error"] = value
    mean = {net: np.nanmean(v) * 100 if len(_analyse.finite(v)) else float("nan") for net, v in train.items()}
    plain_degrades = mean["plain56_cifar"] > mean["plain20_cifar"]
    residual_gains = mean["resnet56_cifar"] < mean["resnet20_cifar"]
    kind = ("reproduced" if plain_degrades and residual_gains else
            "same direction" if plain_degrades or residual_gains else "not reproduced")
    why = (f"training error, mean of the last {tail} logs: plain-20 {mean['plain20_cifar']:.1f}%, plain-56 "
           f"{mean['plain56_cifar']:.1f}% ({'higher' if plain_degrades else 'not higher'}); ResNet-20 "
           f"{mean['resnet20_cifar']:.1f}%, ResNet-56 {mean['resnet56_cifar']:.1f}% "
           f"({'lower' if residual_gains else 'not lower'})")
    verdict = _analyse.Verdict(
        ours=f"plain {mean['plain20_cifar']:.1f}% -> {mean['plain56_cifar']:.1f}%, residual "
             f"{mean['resnet20_cifar']:.1f}% -> {mean['resnet56_cifar']:.1f}% (20 -> 56 layers)",
        verdict=kind, why=why, scale=_compare.scale_of(config))
    table = _report.error_table(results, {f"training error (last {tail} logs)": "final_training_error"})
    panels = _report.panels({n: results[n] for n in NETS}, "train", "val")
    return _report.write_results(root, "plain_vs_residual", config, CLAIM, verdict, results, table, panels,
                                  title=f"Plain against residual networks of 20 and 56 layers, on {config.dataset}")


if __name__ == "__main__":
    _run.run(get_config, job=run_all, show=_report.show, name="plain_vs_residual")
