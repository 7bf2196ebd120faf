"""Evaluation: top-1 / top-5 error with the centre crop or the paper's ten crops.

    python -m experiments.alexnet --config.eval_only=True --workdir=runs/alexnet_digits

evaluates the newest checkpoint of a workdir both ways. Ten-crop averages the softmax over
the four corner and centre patches and their mirrors (section 4.1 of the paper). The crops
are taken on the device (`data.augment`); the sums of each batch stay there until the end.
"""

from __future__ import annotations

import numpy as np

CROPS = ("centre", "ten")


def summarise(sums: dict | None) -> dict:
    """Means per example from the summed eval outputs. Non-finite outputs are reported as a
    share ('nonfinite') and counted as errors, never averaged away."""
    if not sums or not float(sums["count"]):
        raise ValueError("the evaluation saw no examples: check --config.eval_split and --config.eval_limit")
    count = float(sums["count"])
    return {key: float(np.asarray(sums[key])) / count for key in ("loss", "top1_error", "top5_error", "nonfinite")}
