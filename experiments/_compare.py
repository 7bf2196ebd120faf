"""Comparisons of many runs: variants x seeds, each run a workdir of its own, then a table,
a plot and a verdict.

An experiment names its variants (config changes, dotted keys for the model's fields:
`{"model.lrn": False}`), runs them with `run_variants` (here), reads numbers off the runs with
`_analyse` and hands `_report.write_results` a `Verdict`. Rerunning an experiment resumes its
runs and skips finished ones (each is a workdir). results.json holds the claim, the
verdict, every run's config, curves and final numbers; `python -m experiments.reproductions`
builds the README's table from those files.
"""

from __future__ import annotations

import json
import pathlib
import re

import jax
from ml_collections import config_dict

from cnn_jax.checks import ConfigError
from cnn_jax.train import NonFiniteLossError, train_and_evaluate


def small_alexnet(config) -> config_dict.ConfigDict:
    """AlexNet's layers at 67x67 input (the smallest the paper's geometry maps onto exactly:
    conv1 15x15, a 1x1 conv5 map) with half its kernels and 1,024-unit fc6/fc7: the paper's
    ablations at a size 2 CPU cores train in about a minute a run. LeCun-normal initialisation (the paper's
    N(0, 0.01) with biases 1 does not start learning on this data for 125+ steps)."""
    config.model_name = "alexnet"
    config.model = config_dict.ConfigDict(dict(init_scheme="lecun", kernels=0.5, fc_units=1024, dropout_rate=0.5,
                                               lrn=True, pool_window=3, floor=True, dtype="float32"))
    config.input_size, config.resize_size, config.channels = 67, 76, 3
    config.pca_noise, config.schedule = 0.0, "constant"
    config.batch_size, config.num_train_steps, config.log_every_steps, config.eval_every_steps = 32, 600, 20, 100
    return config


def scale_of(config) -> str:
    """'digits 67x67, 3 seeds, 600 steps of 32 (alexnet, ...)': where a verdict's numbers come from."""
    fields = ", ".join(f"{k}={v}" for k, v in config.model.items() if k in ("kernels", "fc_units"))
    return (f"{config.dataset} {config.input_size}x{config.input_size}, {len(seeds(config))} seeds, "
            f"{config.num_train_steps} steps of {config.batch_size} ({config.model_name}{', ' + fields if fields else ''})")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def with_values(config, values: dict) -> config_dict.ConfigDict:
    """A copy of `config` with `values` set; dotted keys ('model.x', 'experiment.seeds') reach
    into the nested blocks."""
    run = config_dict.ConfigDict(config.to_dict())
    with run.unlocked():
        for key, value in values.items():
            *parents, name = key.split(".")
            target = run
            for parent in parents:
                target = target[parent]
            setattr(target, name, value)
    return run


def seeds(config) -> range:
    """The seeds to run: one in smoke mode, else `experiment.seeds`."""
    if config.experiment.seeds < 1:
        raise ConfigError(f"--config.experiment.seeds={config.experiment.seeds}: must be at least 1")
    return range(1 if config.smoke else config.experiment.seeds)


def budget(config) -> int:
    """The steps of every run; comparisons in steps need a fixed number."""
    if config.num_train_steps < 1:
        raise ConfigError(f"--config.num_train_steps={config.num_train_steps}: this experiment compares runs "
                          "in steps and needs a fixed number; set it to 1 or more")
    return config.num_train_steps


def logged(folder: pathlib.Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in a run's metrics.jsonl (the last entry per step)."""
    values = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if key in entry:
            values[entry["step"]] = entry[key]
    return sorted(values), [values[s] for s in sorted(values)]


def evaluate_on(config, folder: pathlib.Path, split: str) -> dict:
    """The finished run in `folder` evaluated on `split` (centre and ten-crop), in a workdir of
    its own beside the run's checkpoints, so that the run's recorded config stays its own."""
    values = dict(eval_only=True, eval_split=split, init_from=str(folder))
    return train_and_evaluate(with_values(config, values), folder / f"eval_{split}")


def run_variants(config, root: pathlib.Path, variants: dict[str, dict], *, evaluate: tuple[str, ...] = ()) -> dict:
    """{variant: [one record per seed]}: each variant trained with each seed in root/<variant>_seed<n>.

    A record holds the seed, the run's config changes, its logged curves (validation top-1
    error at each evaluation; training top-1 error and loss at each log step, as trained:
    augmented, with dropout) and its final validation errors. `evaluate` names splits on which
    the finished run is evaluated again ('train': error without augmentation or dropout, for
    the train/validation gap), each giving `<split>_top1_error` and `<split>_ten_crop_top1_error`.
    A run whose loss turns NaN or infinite is recorded as diverged, its errors NaN (left out
    of means and verdicts), and the experiment goes on. Only process 0 gets records (it
    writes the metrics); every process runs every run.
    """
    results = {}
    for seed in seeds(config):
        for variant, changes in variants.items():
            values = {**changes, "seed": seed}
            run_config = with_values(config, values)
            with run_config.unlocked():
                run_config.checkpoint_every_steps = run_config.num_train_steps or run_config.checkpoint_every_steps
            print(f"\n== {variant} (seed {seed}) ==", flush=True)
            folder = root / f"{slug(variant)}_seed{seed}"
            nan = float("nan")
            try:
                final = train_and_evaluate(run_config, folder)
            except NonFiniteLossError as err:  # a rate too high for this network: a result, not a crash
                print(f"diverged: {err}", flush=True)
                final = {"top1_error": nan, "top5_error": nan, "loss": nan, "diverged": True}
            diverged = "diverged" in final
            record = {"seed": seed, "changes": values, "top1_error": final["top1_error"],
                      "top5_error": final.get("top5_error", nan), "loss": final["loss"], "diverged": diverged}
            for split in evaluate:
                result = {} if diverged else evaluate_on(run_config, folder, split)
                record[f"{split}_top1_error"] = result.get("top1_error", nan)
                record[f"{split}_ten_crop_top1_error"] = result.get("ten_crop_top1_error", nan)
            if jax.process_index() == 0:
                for key, name in (("eval/top1_error", "val"), ("train/top1_error", "train"), ("train/loss", "train_loss")):
                    record[f"{name}_steps"], record[f"{name}_curve"] = logged(folder, key)
                results.setdefault(variant, []).append(record)
    return results


NOTHING = {"note": "", "table": [], "files": []}  # what run_all returns on processes other than 0


