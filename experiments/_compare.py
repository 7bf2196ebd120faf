"""Comparisons of many runs: variants x seeds, each run a workdir of its own, then a table,
a plot and a verdict.

An experiment names its variants (config changes, dotted keys for the model's fields:
`{"model.lrn": False}`), runs them with `run_variants`, reads numbers off the runs with the
helpers here, and hands `write_results` a `Verdict`. Rerunning an experiment resumes its
runs and skips finished ones (each is a workdir). results.json holds the claim, the
verdict, every run's config, curves and final numbers; `python -m experiments.reproductions`
builds the README's table from those files.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import jax
import numpy as np
from ml_collections import config_dict

from cnn_jax import viz
from cnn_jax.train import train_and_evaluate


@dataclasses.dataclass(frozen=True)
class Claim:
    """What a paper says, in the README table's words."""

    claim: str  # e.g. "LRN lowers test error (four-layer CNN, CIFAR-10)"
    paper: str  # the published number, e.g. "13% -> 11% test error"
    source: str  # e.g. "Krizhevsky et al. 2012, section 3.3"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Our number beside the paper's: 'reproduced', 'same direction' or 'not reproduced'."""

    ours: str  # e.g. "3.1% +- 0.4 -> 2.8% +- 0.3 validation error"
    verdict: str
    why: str  # the reason, in one or two sentences, with the numbers it rests on
    scale: str  # the data and scale the numbers come from

    def __post_init__(self):
        if self.verdict not in ("reproduced", "same direction", "not reproduced"):
            raise ValueError(f"verdict {self.verdict!r}: use reproduced, same direction or not reproduced")


def small_alexnet(config) -> config_dict.ConfigDict:
    """AlexNet's layers at 67x67 input (the smallest the paper's geometry maps onto exactly:
    conv1 15x15, a 1x1 conv5 map) with half its kernels and 1,024-unit fc6/fc7: the paper's
    ablations at a size 2 CPU cores train in seconds. LeCun-normal initialisation (the paper's
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
    """A copy of `config` with `values` set; 'model.x' keys set the model's fields."""
    run = config_dict.ConfigDict(config.to_dict())
    with run.unlocked():
        for key, value in values.items():
            target, name = (run.model, key.removeprefix("model.")) if key.startswith("model.") else (run, key)
            setattr(target, name, value)
    return run


def seeds(config) -> range:
    return range(1 if config.smoke else config.experiment.seeds)


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
    error at each evaluation, training top-1 error and loss at each log step, as trained:
    augmented, with dropout) and its final validation errors; `evaluate` names splits on which
    the finished run is evaluated again ('train': error without augmentation or dropout, for
    the train/validation gap), each giving `<split>_top1_error` and `<split>_ten_crop_top1_error`.
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
            final = train_and_evaluate(run_config, folder)
            if jax.process_index() != 0:  # process 0 writes the metrics and the summary
                continue
            record = {"seed": seed, "changes": values, "top1_error": final["top1_error"],
                      "top5_error": final["top5_error"], "loss": final["loss"]}
            for key, name in (("eval/top1_error", "val"), ("train/top1_error", "train"), ("train/loss", "train_loss")):
                record[f"{name}_steps"], record[f"{name}_curve"] = logged(folder, key)
            for split in evaluate:
                result = evaluate_on(run_config, folder, split)
                record[f"{split}_top1_error"] = result["top1_error"]
                record[f"{split}_ten_crop_top1_error"] = result["ten_crop_top1_error"]
            results.setdefault(variant, []).append(record)
    return results


def add_gap(results: dict):
    """Each record's 'gap': validation error minus training-split error (needs evaluate=('train',))."""
    for runs in results.values():
        for r in runs:
            r["gap"] = r["top1_error"] - r["train_top1_error"]


def spread(values) -> dict:
    """Mean, lowest and highest of per-seed numbers."""
    values = np.asarray(values, float)
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()),
            "seeds": [float(v) for v in values]}


def pm(values, scale: float = 100.0, unit: str = "%") -> str:
    """'12.3% +- 0.8' (mean +- half the range over seeds)."""
    s = spread(values)
    half = (s["max"] - s["min"]) / 2 * scale
    return f"{s['mean'] * scale:.1f}{unit} +- {half:.1f}"


def first_below(steps, values, threshold: float):
    """The first logged step whose value is <= threshold, or None."""
    return next((s for s, v in zip(steps, values) if v <= threshold), None)


def band(runs: list[dict], key: str) -> tuple:
    """(steps, mean, low, high) of a curve over seeds, in percent, for `viz.plot_curves`."""
    steps = runs[0][f"{key}_steps"]
    n = min(len(r[f"{key}_curve"]) for r in runs)
    curves = np.array([r[f"{key}_curve"][:n] for r in runs]) * 100
    return steps[:n], curves.mean(0), curves.min(0), curves.max(0)


def compare_errors(results: dict, better: str, worse: str, paper_drop: float, scale: str) -> Verdict:
    """The verdict on 'variant `better` has the lower final validation error', by `paper_drop`
    points in the paper: reproduced when ours drops by at least half as much, by more than half
    the spread over seeds, with two seeds or more; same direction when the mean drops at all."""
    a = [r["top1_error"] for r in results[better]]
    b = [r["top1_error"] for r in results[worse]]
    drop = (np.mean(b) - np.mean(a)) * 100
    noise = (max(np.ptp(a), np.ptp(b)) / 2) * 100
    if drop >= paper_drop / 2 and drop > noise and min(len(a), len(b)) >= 2:
        kind = "reproduced"
    elif drop > 0:
        kind = "same direction"
    else:
        kind = "not reproduced"
    why = (f"{worse} {pm(b)} against {better} {pm(a)}: a {drop:+.1f}-point drop where the paper "
           f"has {paper_drop:.1f}; the seeds spread by up to {noise:.1f} points either side")
    return Verdict(ours=f"{pm(b)} -> {pm(a)} ({drop:+.1f} points)", verdict=kind, why=why, scale=scale)


def error_table(results: dict, extra: dict | None = None) -> list[str]:
    """One row per variant: final validation error (and any `extra` columns: name -> key)."""
    extra = extra or {}
    rows = ["| " + " | ".join(["variant", "final validation top-1 error", *extra]) + " |", "|---|---:|" + "---:|" * len(extra)]
    for variant, runs in results.items():
        cells = [pm([r["top1_error"] for r in runs])] + [pm([r[k] for r in runs]) for k in extra.values()]
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    return rows


def write_results(root: pathlib.Path, name: str, config, claim: Claim, verdict: Verdict, results: dict,
                  table: list[str], panels: dict, *, title: str, ylabel: str = "top-1 error (%)") -> dict:
    """results.json, results.md and <name>.png in `root`; returns what `show` prints."""
    note = f"{claim.claim} ({claim.source}): paper {claim.paper}; ours {verdict.ours}. {verdict.verdict.capitalize()}: {verdict.why}"
    files = [root / "results.json", root / "results.md", root / f"{name}.png"]
    if jax.process_index() == 0:
        data = {"experiment": name, "claim": dataclasses.asdict(claim), "verdict": dataclasses.asdict(verdict),
                "smoke": bool(config.smoke), "config": config.to_dict(), "runs": results}
        files[0].write_text(json.dumps(data, indent=1, default=str))
        files[1].write_text("\n".join([f"# {name}", "", note, "", f"Scale: {verdict.scale}", "", *table]) + "\n")
        viz.plot_curves(panels, files[2], title=title, ylabel=ylabel)
    return {"note": note, "table": table, "files": [str(f) for f in files]}


def show(config, result: dict):
    print("\n" + result["note"] + "\n\n" + "\n".join(result["table"]))
    for path in result["files"]:
        print(f"  wrote {path}")
