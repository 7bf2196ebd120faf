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
from cnn_jax.checks import ConfigError
from cnn_jax.train import NonFiniteLossError, train_and_evaluate


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


GAP_COLUMNS = {"training-split error": "train_top1_error", "gap (points)": "gap"}  # error_table's extra columns


def add_gap(results: dict) -> dict:
    """Each record's 'gap': validation error minus training-split error (needs evaluate=('train',));
    returns each variant's mean gap over the seeds that did not diverge, in points."""
    for runs in results.values():
        for r in runs:
            r["gap"] = r["top1_error"] - r["train_top1_error"]
    return {v: np.nanmean([r["gap"] for r in runs]) * 100 for v, runs in results.items()}


def finite(values) -> np.ndarray:
    """The per-seed numbers of runs that did not diverge."""
    values = np.asarray(values, float)
    return values[np.isfinite(values)]


def pm(values, scale: float = 100.0, unit: str = "%") -> str:
    """'12.0% [11.0-14.0]': the mean and the range over seeds (diverged seeds named, not averaged)."""
    kept = finite(values)
    lost = len(values) - len(kept)
    note = f", {lost} of {len(values)} diverged" if lost else ""
    if not len(kept):
        return f"diverged ({len(values)} of {len(values)})"
    if len(kept) == 1:
        return f"{kept[0] * scale:.1f}{unit}{' (' + note[2:] + ')' if note else ''}"
    return f"{kept.mean() * scale:.1f}{unit} [{kept.min() * scale:.1f}-{kept.max() * scale:.1f}{note}]"


def first_below(steps, values, threshold: float):
    """The first logged step whose value is <= threshold, or None."""
    return next((s for s, v in zip(steps, values) if v <= threshold), None)


def band(runs: list[dict], key: str) -> tuple:
    """(steps, mean, low, high) of a curve over the seeds that did not diverge, in percent, for
    `viz.plot_curves` (all seeds when every one diverged, up to where they stopped)."""
    kept = [r for r in runs if not r["diverged"]] or runs
    n = min(len(r[f"{key}_curve"]) for r in kept)
    curves = np.array([r[f"{key}_curve"][:n] for r in kept]).reshape(len(kept), n) * 100
    return kept[0][f"{key}_steps"][:n], curves.mean(0), curves.min(0), curves.max(0)


PANEL_TITLES = {"val": "validation error", "train": "training error (logged, as trained)"}


def panels(results: dict, *keys: str) -> dict:
    """`viz.plot_curves` panels: one per curve key ('val', 'train'), a line per variant."""
    return {PANEL_TITLES[key]: {v: band(runs, key) for v, runs in results.items()} for key in keys}


def compare_errors(results: dict, better: str, worse: str, paper: tuple[float, float], scale: str) -> Verdict:
    """The verdict on 'variant `better` has the lower final validation error', where the paper
    has `paper` = (worse's error, better's error) in percent. Reproduced: ours falls by at least
    half the paper's relative amount, the two ranges over seeds do not overlap, and each variant
    has two or more seeds that did not diverge. Same direction: the mean falls. Else not reproduced."""
    every_a, every_b = [r["top1_error"] for r in results[better]], [r["top1_error"] for r in results[worse]]
    a, b = finite(every_a), finite(every_b)
    if not len(a) or not len(b):
        return Verdict(ours=f"{pm(every_b)} -> {pm(every_a)}", verdict="not reproduced",
                       why="every run of a variant diverged", scale=scale)
    change = (a.mean() - b.mean()) * 100  # negative: lower error, as the paper has
    relative, paper_relative = -change / (b.mean() * 100), (paper[0] - paper[1]) / paper[0]
    apart = a.max() < b.min()
    if change < 0 and relative >= paper_relative / 2 and apart and min(len(a), len(b)) >= 2:
        kind = "reproduced"
    elif change < 0:
        kind = "same direction"
    else:
        kind = "not reproduced"
    why = (f"{worse} {pm(every_b)}, {better} {pm(every_a)}: {change:+.1f} points ({-relative:+.0%} relative; the paper "
           f"{paper[1] - paper[0]:+.1f} points, {-paper_relative:+.0%}); the ranges over seeds "
           f"{'do not overlap' if apart else 'overlap'}")
    return Verdict(ours=f"{pm(every_b)} -> {pm(every_a)} ({change:+.1f} points)", verdict=kind, why=why, scale=scale)


def error_table(results: dict, extra: dict | None = None) -> list[str]:
    """One row per variant: final validation error, then `extra` columns ({title: record key};
    titles ending in '(points)' are differences, shown without a % sign)."""
    extra = extra or {}
    rows = ["| " + " | ".join(["variant", "final validation top-1 error", *extra]) + " |",
            "|---|---:|" + "---:|" * len(extra)]
    for variant, runs in results.items():
        cells = [pm([r["top1_error"] for r in runs])] + [
            pm([r[key] for r in runs], unit="" if title.endswith("(points)") else "%") for title, key in extra.items()]
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
