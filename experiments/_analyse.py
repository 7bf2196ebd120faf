"""Numbers off many runs: means and ranges over seeds, diverged runs named, and the verdict
on a paper's claim (`compare_errors`)."""

from __future__ import annotations

import dataclasses

import numpy as np


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
