"""Local response normalisation (Krizhevsky et al. 2012, section 3.3): `python -m experiments.lrn`.

The paper: LRN (k=2, n=5, alpha=1e-4, beta=0.75, after the ReLUs of the first two layers)
takes a four-layer CNN's CIFAR-10 test error from 13% to 11%, and AlexNet's ImageNet top-1
and top-5 errors down by 1.4 and 1.2 points. Here: that four-layer network (`convnet4`) with
and without LRN on the offline digits at 32x32 grey, the paper's optimiser and weight decay,
`experiment.seeds` seeds each. The paper's constants were chosen for its input scale (pixels
0..255 less the mean); this pipeline feeds 0..1 less the mean, where alpha * sum(a^2) is
small beside k = 2 and LRN is close to a division by 2^0.75 (`--config.model`'s LRN has no
scale flag; the constants are `layers.LocalResponseNorm`'s fields). Writes results.json, results.md and lrn.png to the workdir
(default runs/lrn). Budget: 6 minutes on 2 CPU cores (6 runs of 400 steps; measured 6 min 2 s).
"""

from __future__ import annotations

import pathlib

from ml_collections import config_dict

from cnn_jax.config import defaults

from experiments import _analyse, _compare, _report, _run

CLAIM = _analyse.Claim(claim="LRN lowers test error (four-layer CNN, CIFAR-10)", paper="13% -> 11% (-2 points)",
                       source="Krizhevsky et al. 2012, section 3.3")
VARIANTS = {"with LRN": {"model.lrn": True}, "without LRN": {"model.lrn": False}}


def get_config() -> config_dict.ConfigDict:
    c = defaults()
    c.model_name = "convnet4"
    c.model = config_dict.ConfigDict(dict(lrn=True, dtype="float32"))
    c.input_size, c.resize_size, c.channels = 32, 32, 1
    c.pca_noise, c.schedule = 0.0, "constant"
    c.batch_size, c.num_train_steps, c.log_every_steps, c.eval_every_steps = 32, 400, 20, 100
    c.experiment = config_dict.ConfigDict(dict(seeds=3))
    return c


def run_all(config, workdir) -> dict:
    root = pathlib.Path(workdir)
    results = _compare.run_variants(config, root, VARIANTS)
    if not results:
        return _compare.NOTHING
    verdict = _analyse.compare_errors(results, "with LRN", "without LRN", (13.0, 11.0), _compare.scale_of(config))
    return _report.write_results(root, "lrn", config, CLAIM, verdict, results, _report.error_table(results),
                                  _report.panels(results, "val"),
                                  title=f"With and without LRN: {config.model_name} on {config.dataset}",
                                  ylabel="validation top-1 error (%)")


if __name__ == "__main__":
    _run.run(get_config, job=run_all, show=_report.show, name="lrn")
