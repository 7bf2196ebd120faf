"""Evaluation: top-1 / top-5 error with the centre crop or the paper's ten crops.

A run with `config.eval_only = True` evaluates the newest checkpoint of its workdir both ways. Ten-crop averages the softmax over
the four corner and centre patches and their mirrors (section 4.1 of the paper). The crops
are taken on the device (`data.augment`); the sums of each batch stay there until the end.
"""

from __future__ import annotations

import numpy as np

from cnn_jax.config import ConfigError, Set


def summarise(sums: dict | None, classes: int | None = None) -> dict:
    """Means per example from the summed eval outputs. Non-finite outputs are reported as a
    share ('nonfinite') and counted as errors, never averaged away. With 5 `classes` or fewer
    every label is in the top 5: top-5 error is left out, not reported as 0."""
    if not sums or not float(sums["count"]):
        raise ConfigError("the evaluation saw no examples: check {0} and {1}", Set("eval_split"), Set("eval_limit"))
    count = float(sums["count"])
    keys = ("loss", "top1_error", "nonfinite") if classes is not None and classes <= 5 else \
        ("loss", "top1_error", "top5_error", "nonfinite")
    return {key: float(np.asarray(sums[key])) / count for key in keys}


def top5_text(result: dict, prefix: str = "") -> str:
    """'top-5 error 3.0%', or 'top-5 error n/a' where the classes are 5 or fewer."""
    value = result.get(f"{prefix}top5_error")
    return "top-5 error n/a (5 classes or fewer)" if value is None else f"top-5 error {value:.1%}"
