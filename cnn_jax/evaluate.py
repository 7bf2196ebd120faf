"""Evaluation: top-1 / top-5 error with the centre crop or the paper's ten crops.

    python -m experiments.alexnet --config.eval_only=True --workdir=runs/alexnet_digits

evaluates the newest checkpoint of a workdir both ways. Ten-crop averages the softmax over
the four corner and centre patches and their mirrors (section 4.1 of the paper).
"""

from __future__ import annotations

import jax

from cnn_jax import metrics
from cnn_jax.data import pipeline

CROPS = ("centre", "ten")


def evaluate(state, batches, eval_fn) -> dict:
    """Mean loss and top-1/top-5 error over `batches` (dicts with 'mask')."""
    sums = {"loss": metrics.Mean(), "top1_error": metrics.Mean(), "top5_error": metrics.Mean()}
    for batch in batches:
        out = jax.device_get(eval_fn(state, batch))
        for key, mean in sums.items():
            mean.add(out[key], out["count"])
    return {key: mean.value for key, mean in sums.items()}


def evaluate_split(state, split, spec, mean, *, eval_fn, place, batch_size: int, limit: int = 0,
                   crops: str = "centre") -> dict:
    """One pass over `split`; with several processes each feeds its slice of every batch."""
    if crops not in CROPS:
        raise ValueError(f"unknown crops {crops!r}: use one of {CROPS}")
    processes, process = jax.process_count(), jax.process_index()
    share = batch_size // processes
    batches = pipeline.eval_batches(split, spec, mean, batch_size=batch_size, limit=limit or None, crops=crops)
    local = ({k: v[process * share:(process + 1) * share] for k, v in b.items()} for b in batches)
    return evaluate(state, (place(b) for b in local), eval_fn)
