"""The default experiments over several seeds: their README table, generated, never typed.

    python -m tools.default_runs                         # 5 seeds of each: docs/default_runs.json, README
    python -m tools.default_runs --experiments vgg,googlenet     # rerun some; the others are kept
    python -m tools.default_runs --experiments alexnet --seeds 2 --out /tmp/a.json   # some, elsewhere
    python -m tools.default_runs --compare there.json    # add another machine's runs (--out) beside the table

Runs `python -m experiments.<name> --config.seed=S` exactly as a user does (a fresh process,
its own workdir under --runs), times it, and reads its result line and its metrics.jsonl:
the final top-1/top-5 error, the best evaluation on the way, the wall time. Some experiments
at the default seeds replace their entries in docs/default_runs.json and keep the others,
provided those were measured on the same machine and versions (else all must be rerun); a
full rerun on another machine keeps the previous machine's results beside the table, as
the same seeds elsewhere (an experiment rerun here keeps its results elsewhere if it repeats
its own digit for digit: its code did not change). `--compare` adds the same seeds run on
another machine (`--out` there) to that comparison, which says how many of each experiment's
seeds land inside the table's range.
Once every experiment is there, the table between the README's markers is rewritten from
the JSON, with the machine and the jax/jaxlib versions it ran on. About 90 minutes on 2 CPU
cores for all five at 5 seeds (40 on a faster CPU of the same name).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

from tools.outputs import destination, refusal, write_table

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ("alexnet", "lenet", "resnet", "vgg", "googlenet")
SEEDS = 5
BEGIN, END = "<!-- default runs: begin -->", "<!-- default runs: end -->"
DEFAULT_OUT, RUNS = ROOT / "docs" / "default_runs.json", ROOT / "runs" / "default_runs"
README = ROOT / "README.md"


def machine(dated: bool = True) -> str:
    cpu = f"{_field('model name') or platform.processor() or platform.machine()}{_isa()}"
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("jax", "jaxlib", "flax"))
    described = f"{versions}, Python {platform.python_version()}, {cpu}, {_cores()} cores"
    return f"{described}, {time.strftime('%Y-%m-%d')}" if dated else described


@functools.cache
def _cpuinfo() -> list[str]:
    try:
        return pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _field(name: str) -> str:
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.split(":")[0].strip() == name), "")


def _isa() -> str:
    """Family, model and widest vector unit: two CPUs of one name (AMD EPYC) differ in them,
    and XLA's float32 code, so a run's digits, differs with them."""
    if not _field("cpu family"):
        return ""
    flags = _field("flags").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f" (family {_field('cpu family')} model {_field('model')}, {vector})"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def describe(name: str) -> dict:
    """What the experiment trains, read from its own config."""
    config = __import__(f"experiments.{name}", fromlist=["get_config"]).get_config()
    return {"model": config.model_name, "input": config.input_size, "channels": config.channels,
            "epochs": config.num_epochs, "batch": config.batch_size, "learning_rate": config.learning_rate,
            "schedule": config.schedule}


def run_one(name: str, seed: int, workdir: pathlib.Path) -> dict:
    """One run as a user starts it; its result line, best evaluation and wall time."""
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"experiments.{name}", f"--config.seed={seed}",
                           f"--workdir={workdir}"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "CNN_JAX_COMPILATION_CACHE": ""})  # each run compiles, as a first run does
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"experiments.{name} seed {seed} exited {proc.returncode}: "
                           f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        evals = [row["eval/top1_error"] for row in logged if "eval/top1_error" in row]
        return {"seed": seed, "seconds": round(seconds, 1), "top1_error": result["top1_error"],
                "top5_error": result["top5_error"], "best_top1_error": min(evals, default=result["top1_error"]),
                "evaluations": evals}
    except (ValueError, OSError, KeyError, IndexError) as err:  # a result line or log that is not there
        raise RuntimeError(f"experiments.{name} seed {seed}: no result to read in {workdir} ({err})") from None


def _read(path: pathlib.Path) -> dict | None:
    """The results file at `path`, or None where there is none to read (missing, not JSON, no results)."""
    try:
        old = json.loads(path.read_text()) if path.is_file() else None  # not a pipe: it would wait
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) and isinstance(old.get("results"), dict) else None


def _measured_here(old: dict) -> bool:
    """Whether `old` was measured on this machine and these versions (its date aside)."""
    described, day = _split_day(old.get("machine", ""))
    return day is not None and described == machine(dated=False)


def _undated(described: str) -> str:
    """A results file's machine without the day it ends with (if it ends with one)."""
    return _split_day(described)[0]


def _split_day(described: str) -> tuple[str, str | None]:
    """A results file's (machine, day), the day None where the string does not end with one."""
    head, _, last = described.rpartition(", ")
    return (head, last) if re.fullmatch(r"\d{4}-\d{2}-\d{2}", last) else (described, None)


def _kept(old: dict | None, rerun: list[str]) -> dict | None:
    """The other experiments' results in `old`, in the table's order, if measured here on these versions."""
    if old is None or not _measured_here(old):
        return None
    day = _split_day(old["machine"])[1]  # results written before each had its own day: the file's
    return {n: {"date": day, **old["results"][n]} for n in EXPERIMENTS if n in old.get("results", {}) and n not in rerun}


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.1%} [{min(values):.1%}–{max(values):.1%}]"


def render(data: dict) -> str:
    """The Markdown table: one row an experiment, mean [range] over its seeds."""
    rows = ["| command | model, input, epochs | time (mean) | top-1 error, mean [range] | top-5 error | "
            "worst end above its best evaluation |", "|---|---|---:|---:|---:|---:|"]
    for name, entry in data["results"].items():
        runs, d = entry["runs"], entry["config"]
        drop = max(r["top1_error"] - r["best_top1_error"] for r in runs)
        rows.append(f"| `python -m experiments.{name}` | `{d['model']}`, {d['input']}×{d['input']}"
                    f"{' grey' if d['channels'] == 1 else ''}, {d['epochs']:g} | "
                    f"{_minutes(statistics.mean(r['seconds'] for r in runs))} | "
                    f"{_spread([r['top1_error'] for r in runs])} | "
                    f"{_spread([r['top5_error'] for r in runs])} | {drop * 100:.1f} points |")
    seeds = sorted({r["seed"] for e in data["results"].values() for r in e["runs"]})
    lines = [*rows, "", f"Seeds {', '.join(map(str, seeds))}; measured with {_dated(data)}."]
    for other in others(data):
        compared = [_compared(data["results"], name, entry["runs"]) for name, entry in other["results"].items()]
        lines += ["", f"The same seeds on {other['machine']}, top-1 error and mean time: {'; '.join(compared)}."]
    return "\n".join(lines)


def _compared(table: dict, name: str, runs: list[dict]) -> str:
    """`name`'s runs on another machine: mean [range], mean time, and how many of its seeds lie
    within the table's range for `name` (ends included)."""
    errors = [r["top1_error"] for r in runs]
    took = _minutes(statistics.mean(r["seconds"] for r in runs))
    if name not in table:
        return f"`{name}` {_spread(errors)}, {took}"
    published = [r["top1_error"] for r in table[name]["runs"]]
    low, high = round(min(published), 6), round(max(published), 6)  # errors are counts over 300 images
    inside = sum(low <= round(e, 6) <= high for e in errors)
    return f"`{name}` {_spread(errors)} ({inside} of {len(errors)} seeds inside the range above), {took}"


def _minutes(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{f'{minutes} min ' if minutes else ''}{seconds} s"


def others(data: dict | None) -> list[dict]:
    """The comparison's machines, each {'machine', 'results'} (older files held one, not a list)."""
    other = (data or {}).get("elsewhere") or []
    return [other] if isinstance(other, dict) else list(other)


def _dated(data: dict) -> str:
    """The machine, and the day each experiment ran on (a partial rerun keeps the others' days)."""
    described, last = _split_day(data["machine"])
    days: dict[str, list[str]] = {}
    for name, entry in data["results"].items():
        days.setdefault(entry.get("date", last), []).append(f"`{name}`")
    if len(days) == 1:
        return f"{described}, {next(iter(days))}"
    return f"{described}, on " + " and ".join(f"{day} ({', '.join(names)})" for day, names in sorted(days.items()))


def elsewhere(old: dict | None, rerun: list[str], repeated: set[str] = frozenset()) -> list[dict]:
    """The comparison kept beside a new table: a rerun on another machine (all experiments,
    or those finished so far) adds the previous table to it; otherwise the machines recorded
    before stay, less the experiments rerun with other results (on the same machine and
    versions a run repeats digit for digit, so other results mean its code changed, and its
    results elsewhere no longer compare)."""
    if not old:
        return []
    if not _measured_here(old):
        return [{"machine": old["machine"], "results": old["results"]},
                *(o for o in others(old) if not _measured_here(o))]
    changed = {n for n in rerun if n in old["results"] and n not in repeated}  # not those new to `old`
    kept = [{**o, "results": {n: r for n, r in o.get("results", {}).items() if n not in changed}}
            for o in others(old)]
    return [o for o in kept if o["results"]]


def compare(data: dict, there: dict) -> dict:
    """`data` with `there` (a results file written by `--out` on another machine, at the table's
    seeds and recipes) in its comparison, replacing that machine's earlier entry. ValueError
    names what does not compare."""
    _check_runs(there)
    if _undated(there["machine"]) == _undated(data["machine"]):
        raise ValueError(f"it was measured on the table's own machine and versions ({_undated(data['machine'])})")
    for name, entry in there["results"].items():
        mine = data["results"].get(name)
        if mine is None:
            raise ValueError(f"it holds '{name}', which the table does not")
        if sorted(r["seed"] for r in entry["runs"]) != sorted(r["seed"] for r in mine["runs"]):
            raise ValueError(f"its '{name}' runs are not the table's seeds: rerun there with the default --seeds")
        shared = entry["config"].keys() & mine["config"].keys()  # an older entry may lack a later-recorded key
        if any(entry["config"][k] != mine["config"][k] for k in shared):
            raise ValueError(f"its '{name}' trained another recipe ({entry['config']}) than the table's "
                             f"({mine['config']}): rerun both with today's code")
    kept = [o for o in others(data) if _undated(o["machine"]) != _undated(there["machine"])]
    return {**data, "elsewhere": [*kept, {"machine": there["machine"], "results": there["results"]}]}


RUN_KEYS = ("seed", "seconds", "top1_error", "top5_error", "best_top1_error")


def _check_runs(there: dict) -> None:
    """ValueError naming the first thing in `there` that is not as `main` writes it."""
    if not isinstance(there.get("machine"), str):
        raise ValueError("it names no machine")
    if not there["results"]:
        raise ValueError("it holds no experiments")
    for name, entry in there["results"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("config"), dict) and isinstance(entry.get("runs"), list)):
            raise ValueError(f"its '{name}' has no config and list of runs")
        if not entry["runs"] or not all(isinstance(r, dict) and all(_number(r.get(k)) for k in RUN_KEYS)
                                        for r in entry["runs"]):
            raise ValueError(f"its '{name}' has no runs, or a run without numbers for {', '.join(RUN_KEYS)}")


NOT_RUNS = (ValueError, KeyError, TypeError, AttributeError)  # what a hand-edited results file raises here


def _check_file(data: dict) -> None:
    """`_check_runs` on a results file and each machine it compares with, then its table
    rendered: before anything is run or written, so that what is wrong is named in one line,
    not met in a traceback after the runs."""
    for entry in (data, *others(data)):
        try:
            _check_runs(entry)
        except ValueError as err:
            raise ValueError(err if entry is data else f"its comparison with {entry.get('machine')!r}: {err}") from None
    render(data)


def _number(value) -> bool:
    """A finite int or float: not a bool, NaN, infinity, or an int too large for a float."""
    try:
        return type(value) in (int, float) and math.isfinite(value)
    except OverflowError:
        return False


def _same(runs: list[dict], again: list[dict]) -> bool:
    result = lambda r: (r["seed"], r["top1_error"], r["top5_error"], r["best_top1_error"])  # noqa: E731
    return sorted(map(result, runs)) == sorted(map(result, again))


def repeats(old: dict | None, name: str, runs: list[dict]) -> bool:
    """Whether `runs` give `old`'s results for `name` digit for digit, on this machine and these versions."""
    if not old or not _measured_here(old) or name not in old.get("results", {}):
        return False
    return _same(old["results"][name]["runs"], runs)


def add_comparison(parser: argparse.ArgumentParser, there: pathlib.Path, out: pathlib.Path) -> int:
    """`--compare`: `there`'s runs into `out`'s comparison; with the default `out` and every
    experiment in its table, the README's table rewritten too."""
    def broken(err):  # `there` is checked: `out` was edited by hand
        parser.error(f"{out} is not a default runs file ({type(err).__name__} {err}): rewrite it with "
                     "python -m tools.default_runs")

    data, other = _read(out), _read(there)
    if data is None or other is None:
        parser.error(f"{out if data is None else there} holds no default runs: write it with python -m tools.default_runs")
    if why := refusal(out, DEFAULT_OUT, README, BEGIN, END):
        parser.error(why)
    try:
        _check_file(data)
    except NOT_RUNS as err:
        broken(err)
    try:
        data = compare(data, other)  # both files checked: only ValueError names what does not compare
    except ValueError as err:
        parser.error(f"{there} does not compare with {out}: {err}")
    try:
        table = render(data)  # before anything is written
    except NOT_RUNS as err:  # a config without the table's columns
        broken(err)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}")
    publish(table, data, out)
    return 0


def publish(table: str, data: dict, out: pathlib.Path) -> None:
    """Prints the rendered `table`, and writes it into the README when `out` is the README's
    data and holds every experiment."""
    if _is_default(out) and set(data["results"]) == set(EXPERIMENTS):
        write_readme(table)
    print(table)


def write_readme(table: str) -> None:
    write_table(README, table, BEGIN, END, kept=DEFAULT_OUT)


def _is_default(out: pathlib.Path) -> bool:
    """Whether `out` is the README's data, whose table goes into the README."""
    return out.resolve() == DEFAULT_OUT.resolve()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.default_runs", description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS), help="comma-separated names")
    parser.add_argument("--seeds", type=int, default=SEEDS, help="seeds 0..N-1 of each")
    parser.add_argument("--runs", type=pathlib.Path, default=RUNS, help="the workdirs")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--compare", type=pathlib.Path, metavar="FILE",
                        help="run nothing: add FILE (--out of the same seeds on another machine) beside the table")
    args = parser.parse_args(argv)
    if args.compare:
        if argv_given := [f for f, v, d in (("--experiments", args.experiments, ",".join(EXPERIMENTS)),
                                             ("--seeds", args.seeds, SEEDS), ("--runs", args.runs, RUNS))
                          if v != d]:
            parser.error(f"--compare runs nothing, so {', '.join(argv_given)} has no use: leave it out")
        return add_comparison(parser, args.compare, args.out)
    names = [n for n in args.experiments.split(",") if n]
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if not names:
        parser.error("--experiments names none: leave it out for all of them")
    if unknown or args.seeds < 1:
        parser.error(f"unknown experiments {unknown}; choose from {', '.join(EXPERIMENTS)}" if unknown
                     else "--seeds must be at least 1")
    if why := refusal(args.out, DEFAULT_OUT, README, BEGIN, END):
        parser.error(why)
    args.out = destination(args.out)  # the file checked is the file written
    default_out = _is_default(args.out)
    if default_out and args.seeds != SEEDS:
        parser.error(f"the README's data has {SEEDS} seeds: pass --out for fewer, e.g. --out /tmp/{names[0]}.json")
    old = _read(args.out) if default_out else None
    try:
        if old:
            _check_file(old)  # before any run: its table is rendered after them
    except NOT_RUNS as err:
        parser.error(f"{args.out} is not a default runs file ({type(err).__name__} {err}): move it away and rerun")
    data = {"machine": machine(), "results": {}}
    if default_out and set(names) != set(EXPERIMENTS):
        kept = _kept(old, names)
        if kept is None:
            parser.error(f"{args.out} is missing or was measured on another machine or versions: "
                         "rerun every experiment (no --experiments)")
        data["results"] = kept
    print(data["machine"], flush=True)
    total, done = len(names) * args.seeds, 0
    for name in names:
        runs = []
        for seed in range(args.seeds):
            done += 1
            print(f"[{done}/{total}] experiments.{name} --config.seed={seed} ...", end=" ", flush=True)
            try:
                run = run_one(name, seed, args.runs / f"{name}_{seed}")
            except RuntimeError as err:
                print(f"\nerror: {err}", file=sys.stderr)
                return 1
            print(f"top-1 {run['top1_error']:.1%} (best {run['best_top1_error']:.1%}), {run['seconds']:.0f} s",
                  flush=True)
            runs.append(run)
        data["results"][name] = {"config": describe(name), "date": time.strftime("%Y-%m-%d"), "runs": runs}
        data["results"] = {n: data["results"][n] for n in EXPERIMENTS if n in data["results"]}
        finished = [n for n in names if n in data["results"]]  # a stopped run keeps the others' comparison
        same = {n for n in finished if repeats(old, n, data["results"][n]["runs"])}
        data.pop("elsewhere", None)
        data.update({"elsewhere": other} if (other := elsewhere(old, finished, same)) else {})
        if same:
            print(f"    {', '.join(sorted(same))}: the same results as before, digit for digit", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")  # after each experiment: a stopped run keeps them
    print(f"wrote {args.out}")
    publish(render(data), data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
