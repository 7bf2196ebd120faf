"""Two towers against one (Krizhevsky et al. 2012, section 3.2): `python -m experiments.two_towers`.

The paper: AlexNet split over two GPUs, each holding half of every layer's kernels and
communicating only at conv3 and the fully connected layers, has 1.7 and 1.2 points lower
top-1 and top-5 error than a net with half as many kernels in each convolutional layer on
one GPU. Here: the two-tower net (`alexnet_2tower`) on a (N/2, 2) mesh, one tower per device
of the 'model' axis, against the one-tower `alexnet` with half its kernels in every
convolution but conv5 (the paper's footnote: conv5 and the fully connected layers keep
their size, so that both nets have about as many parameters), both at 67x67
with half the paper's kernels per tower and 1,024-unit fc6/fc7 (`_compare.small_alexnet`), on
the offline digits, `experiment.seeds` seeds. On a CPU the command simulates 2 devices (an
already started JAX keeps its device count; the mesh needs an even one). Writes
results.json, results.md and two_towers.png to the workdir (default runs/two_towers).
Budget: 5 minutes on 2 CPU cores (6 runs of 600 steps; measured 4 min 31 s).
"""

from __future__ import annotations

import os

if __name__ == "__main__" and "device_count" not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"

import pathlib  # noqa: E402

import jax  # noqa: E402
from ml_collections import config_dict  # noqa: E402

from cnn_jax.checks import ConfigError  # noqa: E402
from cnn_jax.config import defaults  # noqa: E402

from experiments import _analyse, _compare, _report, _run  # noqa: E402

CLAIM = _analyse.Claim(claim="Two towers beat one tower with half the kernels in each convolutional layer (AlexNet)",
                       paper="-1.7 top-1 points", source="Krizhevsky et al. 2012, section 3.2")


def get_config() -> config_dict.ConfigDict:
    c = _compare.small_alexnet(defaults())
    c.experiment = config_dict.ConfigDict(dict(seeds=3))
    return c


def variants(config) -> dict:
    kernels, devices = config.model.kernels, jax.device_count()
    return {"two towers": {"model_name": "alexnet_2tower", "mesh": (devices // 2, 2)},
            "one tower, half the kernels": {"model_name": "alexnet", "model.kernels": kernels / 2,
                                            "model.conv5_kernels": kernels, "mesh": ()}}


def run_all(config, workdir) -> dict:
    root = pathlib.Path(workdir)
    if jax.device_count() < 2 or jax.device_count() % 2:
        raise ConfigError(f"two_towers needs an even number of devices, one tower on each of a pair; JAX has "
                          f"{jax.device_count()}: on CPU run it with JAX_PLATFORMS=cpu (2 devices are simulated)")
    results = _compare.run_variants(config, root, variants(config))
    if not results:
        return _compare.NOTHING
    # 1.7 points against the paper's one-network ILSVRC-2010 top-1 error, 37.5% (Table 1)
    verdict = _analyse.compare_errors(results, "two towers", "one tower, half the kernels", (39.2, 37.5),
                                      f"{_compare.scale_of(config)}, {jax.device_count()} devices")
    return _report.write_results(root, "two_towers", config, CLAIM, verdict, results, _report.error_table(results),
                                  _report.panels(results, "val"), title=f"Two towers against one with half the kernels, on {config.dataset}")


if __name__ == "__main__":
    _run.run(get_config, job=run_all, show=_report.show, name="two_towers")
