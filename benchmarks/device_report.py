"""The Markdown of a `benchmarks.device` run, and its place in benchmarks/RESULTS.md: one
section per device kind, replaced by that kind's next run and left alone by the others'."""

from __future__ import annotations

import math
import pathlib
import re

HEADING = "## The device benchmark (`python -m benchmarks.device`)"
# Goals on an H100/H200 in bfloat16 (images/s of the train step; the loop from a raw store as
# a share of its bare step).
GOALS = {"alexnet": 40_000, "resnet50": 5_000}
LOOP_GOAL = 0.95


def section_key(report: dict) -> str:
    machine = report["machine"]
    return f"{machine['device_count']} x {machine['device_kind']}"


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- benchmarks.device: {key} -->", f"<!-- /benchmarks.device: {key} -->"


def replace_section(path: pathlib.Path, key: str, text: str):
    """Writes `text` between `key`'s markers in `path`: in place of the old section, else at the
    end under the benchmark's heading."""
    begin, end = _markers(key)
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old, count=1)
    else:
        new = old.rstrip() + ("\n\n" if old else "") + ("" if HEADING in old else f"{HEADING}\n\n") + block
    path.write_text(new)


def _mb(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MB"


def _cores(x: float) -> str:
    return f"{x:.2g}"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.1%}"


def _table(columns: list[str], left: int, rows: list[list[str]]) -> list[str]:
    """A Markdown table: its first `left` columns aligned left, the numbers after them right."""
    rule = "|".join(["---"] * left + ["---:"] * (len(columns) - left))
    return [f"| {' | '.join(columns)} |", f"|{rule}|", *(f"| {' | '.join(cells)} |" for cells in rows)]


def step_table(rows: list[dict]) -> list[str]:
    lines = _table(["model", "dtype", "batch", "img/s", "first step", "peak memory per device", "MFU"], 2,
                   [[f"`{r['model']}`", r["dtype"], str(r["batch"]), _rate(r["images_per_s"]), f"{r['first_step_s']:.1f} s",
                     _mb(r["peak_bytes"]), _pct(r["mfu"])] for r in rows])
    if rows:
        lines.append(f"\nMFU of: {rows[0]['mfu_of']}. First step: trace, compile and run. Peak: XLA's buffer "
                     "assignment for the step on one device (arguments, outputs, temporaries, less donated buffers).")
    return lines


def loop_table(rows: list[dict]) -> list[str]:
    return _table(["model", "store", "dtype", "batch", "bare step img/s", "loop img/s", "loop ÷ step", "data wait"], 3,
                  [[f"`{r['model']}`", r["store"], r["dtype"], str(r["batch"]), _rate(r["step_images_per_s"]),
                    _rate(r["loop_images_per_s"]), f"{r['loop_over_step']:.2f}", f"{r['data_wait']:.1%}"] for r in rows])


def host_table(host: dict) -> list[str]:
    lines = _table(["store", "raw img/s per core", "JPEG img/s per core"], 1,
                   [[size, _rate(rates["raw"]), _rate(rates["jpeg"])] for size, rates in host["per_core"].items()])
    lines += ["", *_table(["model", "fastest step img/s", "cores needed, raw store", "cores needed, JPEG store"], 1,
                          [[f"`{name}`", _rate(r["step_images_per_s"]), _cores(r["cores_raw"]), _cores(r["cores_jpeg"])]
                           for name, r in host["cores_needed"].items()])]
    lines += ["", "The stores hold the offline digits: nearly flat images, whose JPEGs decode about twice as "
              "fast as photos' (`python -m benchmarks.train_loop` times both), so the JPEG columns here are a "
              "lower bound on the cores photos need."]
    rates = host["per_core"].get("256x256x3")
    if rates:  # what the GPU goals would ask of this host, from its measured rates per core
        at_goals = "; ".join(f"`{name}` at {goal:,} img/s: {_cores(goal / rates['raw'])} (raw), "
                             f"{_cores(goal / rates['jpeg'])} (JPEG)" for name, goal in GOALS.items())
        lines += ["", f"Cores this host would need at the H100/H200 goal rates: {at_goals}."]
    return lines


def first_step_table(rows: list[dict]) -> list[str]:
    return _table(["model", "dtype", "batch", "cold cache", "warm cache"], 2,
                  [[f"`{r['model']}`", r["dtype"], str(r["batch"]), f"{r['cold_s']:.1f} s",
                    f"{r['warm_s']:.1f} s" if "warm_s" in r else "skipped"] for r in rows])


def goals(report: dict) -> list[str]:
    """Met or not, for an H100/H200 run only (the goals are set for those chips)."""
    if not any(chip in report["machine"]["device_kind"] for chip in ("H100", "H200")):
        return []
    lines, devices = [], report["machine"]["device_count"]
    for name, goal in GOALS.items():  # per chip: a machine of 8 is held to 8 times the rate
        rates = [r["images_per_s"] / devices for r in report["steps"] if r["model"] == name and r["dtype"] == "bfloat16"]
        best = max(rates, default=None)
        verdict = "not measured" if best is None else f"{'met' if best >= goal else 'not met'} ({best:,.0f})"
        lines.append(f"- `{name}` bfloat16 train step ≥ {goal:,} img/s per chip: **{verdict}**")
    ratios = [r["loop_over_step"] for r in report["loops"] if r["store"] == "raw"]
    verdict = "not measured" if not ratios else \
        f"{'met' if min(ratios) >= LOOP_GOAL else 'not met'} ({', '.join(f'{x:.2f}' for x in ratios)})"
    lines.append(f"- the loop from a raw store ≥ {LOOP_GOAL} of the bare step: **{verdict}**")
    return lines


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"### {m['date']}: {section_key(report)} ({m['platform']})", "",
             f"Python {m['python']}, jax {m['jax']}, flax {m['flax']}, {m['cpus']} host cores. Command: "
             f"`{report['command'].strip()}` ({report['seconds']:.0f} s; JSON: `{report['out']}`). Each rate: the "
             f"median of {report['profile']['rounds']} timings in the step table, one timing elsewhere.", "",
             "**The train step** (global batch over all devices):", "", *step_table(report["steps"]), "",
             "**The training loop against its bare step** (the offline digits, stored at the model's size):", "",
             *loop_table(report["loops"]), "",
             "**The host, one thread** (reading training batches; the JPEG store also decodes):", "",
             *host_table(report["host"]), "",
             "**Time to first step** in a fresh process (state, compile, run):", "",
             *first_step_table(report["first_steps"]), "",
             f"Peak device memory over the run: {_mb(report['device_peak_bytes'])}"
             f"{'' if report['device_peak_bytes'] is not None else ' (this backend does not report it)'}."]
    if report["skipped"]:
        lines += ["", "Not measured: " + "; ".join(report["skipped"]) + "."]
    met = goals(report)
    if met:
        lines += ["", "Goals:", *met]
    return "\n".join(lines) + "\n"
