"""What is worth measuring on a machine's accelerator in a few minutes, in one command.

    python -m benchmarks.device [--models alexnet,resnet50] [--budget 450] [--results benchmarks/RESULTS.md]

In one run, on all of the machine's devices of JAX's default backend (a (devices, 1) mesh;
the two-tower AlexNet on (devices / 2, 2), which needs an even count of two or more):
1. the train step of each model at float32 and bfloat16 and two batch sizes (global): images/s,
   the first step (trace, compile, run), XLA's peak memory for the step, and the MFU: 6 x the
   forward multiply-adds of `cnn_jax.summary` x images/s over the dense peak of all the chips
   for the dtype (float32 as TF32, JAX's default matrix precision on NVIDIA GPUs), or on a
   CPU over the matrix-product rate measured in the same run;
2. the host side on one thread: images/s read (and decoded) from each store, and how many cores
   each model's fastest step needs from each;
3. the training loop (`train_and_evaluate`: logging, the data pipeline, a checkpoint at the end)
   against its bare step, AlexNet and ResNet-50, from a raw and a JPEG store of the offline digits;
4. time to first step in a fresh process, cold and then warm compilation cache;
5. the devices' peak memory over the whole run, where the backend reports it.
A case starts only before its phase's share of `--budget` has passed (`SHARES`), so a run ends
near its budget (a case under way finishes); cases left out, and cases that failed, are listed,
never estimated. A CPU machine gets batch 4 and fewer cases (`PROFILES`). Writes
benchmarks/out/device.json and replaces this device kind's section of `--results`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import device_report, train_loop, train_step
from benchmarks.train_step import progress

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("lenet5", "alexnet", "alexnet_2tower", "resnet50", "vgg16", "googlenet")
# The share of the budget by whose end each phase's last case must have started.
SHARES = {"steps": 0.5, "host": 1.0, "loop": 0.85, "first_step": 1.0}  # the host rates take seconds


@dataclasses.dataclass(frozen=True)
class Profile:
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    rounds: int  # timings per case; the median is reported
    seconds: float  # about how long each timing lasts
    loop_models: tuple[str, ...]
    loop_dtype: str
    loop_batch: int
    loop_steps: int
    first_step_models: tuple[str, ...]
    budget: float  # seconds


PROFILES = {
    "accelerator": Profile(batches=(128, 256), dtypes=("float32", "bfloat16"), rounds=3, seconds=1.0,
                           loop_models=("alexnet", "resnet50"), loop_dtype="bfloat16", loop_batch=256, loop_steps=240,
                           first_step_models=("alexnet", "resnet50"), budget=450.0),
    "cpu": Profile(batches=(4,), dtypes=("float32", "bfloat16"), rounds=2, seconds=0.3, loop_models=("alexnet",),
                   loop_dtype="float32", loop_batch=8, loop_steps=16, first_step_models=("alexnet",), budget=160.0),
}

# Dense peak FLOP/s per chip from NVIDIA's data sheets: (float32 as TF32, bfloat16), matched by
# a substring of `device.device_kind`, the first match winning.
PEAK_FLOPS = (("H200 NVL", (417.5e12, 835.5e12)), ("H200", (494.7e12, 989.4e12)), ("H100 NVL", (417.5e12, 835.5e12)),
              ("H100 PCIe", (378e12, 756e12)), ("H100", (494.7e12, 989.4e12)), ("A100", (156e12, 312e12)))
LOOP_EXPERIMENTS = {  # model: (experiment, its overrides)
    "alexnet": ("alexnet", {}),
    "lenet5": ("lenet", dict(model_name="lenet5")),
    "resnet50": ("resnet", dict(model_name="resnet50", input_size=224, resize_size=256)),
}


class Budget:
    """Seconds left of the run's budget; a case starts only while some are. A case that fails
    is recorded with its one-line error and the run goes on: one device run measures all it can."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds
        self.skipped: list[str] = []

    def allows(self, case: str, share: float = 1.0) -> bool:
        """Whether `case` may start: before `share` of the budget has passed (each phase has
        its share, so that a slow first phase leaves the others their time)."""
        if time.monotonic() < self.start + share * self.seconds:
            return True
        self.skipped.append(case)
        progress(f"out of time: skipping {case}")
        return False

    def left(self) -> float:
        return self.start + self.seconds - time.monotonic()

    @contextlib.contextmanager
    def failures(self, case: str):
        try:
            yield
        except Exception as err:  # noqa: BLE001 - reported in the table, never swallowed silently
            line = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            self.skipped.append(f"{case} failed ({line})")
            progress(f"{case} failed: {line}")


def peak_flops(device_kind: str, platform: str, dtype: str, measured: float, devices: int) -> tuple[float | None, str]:
    """(the peak rate of all `devices` together an MFU is taken of, what it is); None for a
    chip this table does not know."""
    for name, peaks in PEAK_FLOPS:
        if name in device_kind:
            return devices * peaks[dtype == "bfloat16"], f"{devices} x the {name} data sheet's dense peak"
    if platform == "cpu":
        return measured, "the matrix-product rate measured in this run"
    return None, "unknown chip: no MFU"


def time_step(step, sync, batch: int, rounds: int, seconds: float) -> list[float]:
    """Images/s of `rounds` timings of about `seconds` each (at least one step), after a
    step that sizes them (the compiled step's first run was the first-step timing)."""
    start = time.perf_counter()
    sync(step())
    steps = max(1, round(seconds / max(time.perf_counter() - start, 1e-6)))
    return [train_step.images_per_second(step, sync, batch, steps) for _ in range(rounds)]


def step_case(name: str, mesh, state, batch: int, dtype: str, profile: Profile) -> dict:
    step, sync, first, peak, macs = train_step.jax_step(name, mesh, state, batch, dtype)
    rates = time_step(step, sync, batch, profile.rounds, profile.seconds)
    return {"model": name, "dtype": dtype, "batch": batch, "images_per_s": statistics.median(rates), "all": rates,
            "first_step_s": first, "peak_bytes": peak, "forward_macs_per_image": macs}


def step_cases(models, profile: Profile, budget: Budget) -> list[dict]:
    """The step table: every model x dtype x batch the budget allows."""
    import jax

    rows = []
    for name in models:
        needed = train_step.devices_needed(name)
        if needed > jax.device_count():
            budget.skipped.append(f"{name}: needs {needed} devices, one per tower")
            continue
        if not budget.allows(f"{name}: every step case", SHARES["steps"]):
            continue
        progress(f"{name}: creating the train state")
        made = None
        with budget.failures(f"{name}: the train state"):
            made = train_step.jax_state(name)
        if made is None:
            continue
        mesh, state = made
        for dtype in profile.dtypes:
            for batch in profile.batches:
                case = f"{name} {dtype} batch {batch}"
                if not budget.allows(case, SHARES["steps"]):
                    continue
                progress(f"{case}: compiling")
                with budget.failures(case):
                    rows.append(step_case(name, mesh, state, batch, dtype, profile))
                    progress(f"{case}: {rows[-1]['images_per_s']:,.1f} img/s (first step {rows[-1]['first_step_s']:.1f} s)")
        del made, state  # the next model's state takes its memory
    return rows


def loop_config(name: str, dtype: str, store_format: str, profile: Profile, data_dir: str):
    experiment, overrides = LOOP_EXPERIMENTS[name]
    config = train_loop.make_config(experiment, {**overrides, "batch_size": profile.loop_batch}, profile.loop_steps,
                                    data_dir)
    config.store_format, config.model.dtype, config.compilation_cache = store_format, dtype, ""
    config.learning_rate = min(config.learning_rate, 1e-3)  # speed does not depend on it; this keeps the loss finite
    config.checkpoint_every_steps = profile.loop_steps  # one save, at the end, outside the timed windows
    config.log_every_steps = max(1, profile.loop_steps // 4)  # the first window (compilation) is left out
    return config


def loop_cases(profile: Profile, budget: Budget, tmp: str) -> list[dict]:
    """The loop against the bare step, per model and store; the bare step once per model (it
    reads one batch, placed on the devices once: the store does not matter to it)."""
    dtype = profile.loop_dtype
    rows = []
    for name in profile.loop_models:
        if not budget.allows(f"{name}: the loop", SHARES["loop"]):
            continue
        progress(f"{name}: the bare step ({dtype}, batch {profile.loop_batch})")
        bare = None
        with budget.failures(f"{name}: the bare step"):
            config = loop_config(name, dtype, "raw", profile, f"{tmp}/tfds")
            bare = train_loop.bare_step_rate(config, f"{tmp}/{name}_bare", profile.loop_steps // 2)
        if bare is None:
            continue
        for store_format in ("raw", "jpeg"):
            if not budget.allows(f"{name}: the loop from a {store_format} store", SHARES["loop"]):
                continue
            progress(f"{name}: the loop from a {store_format} store ({profile.loop_steps} steps)")
            with budget.failures(f"{name}: the loop from a {store_format} store"):
                config = loop_config(name, dtype, store_format, profile, f"{tmp}/tfds")
                loop, wait = train_loop.loop_rate(config, f"{tmp}/{name}_{store_format}_loop")
                rows.append({"model": name, "store": store_format, "dtype": dtype, "batch": profile.loop_batch,
                             "step_images_per_s": bare, "loop_images_per_s": loop, "loop_over_step": loop / bare,
                             "data_wait": wait})
                progress(f"{name} from {store_format}: loop {loop:,.1f} img/s, {loop / bare:.2f} of the bare step")
    return rows


def host_cases(models, steps: list[dict], budget: Budget, data_dir: str) -> dict:
    """Images/s per core from each store at each stored size, and the cores each model's
    fastest measured step needs."""
    from cnn_jax.models import get_model

    stores = {}  # model -> (stored side, channels)
    for name in models:
        shape = get_model(name).input_shape
        stores[name] = (train_step._stored_size(shape[0]), shape[2])
    key = lambda size, channels: f"{size}x{size}x{channels}"  # noqa: E731
    rates = {}
    for size, channels in sorted(set(stores.values())):
        case = f"host rates at {key(size, channels)}"
        if budget.allows(case, SHARES["host"]):
            progress(f"host: reading {key(size, channels)} stores on one thread")
            with budget.failures(case):
                rates[key(size, channels)] = train_loop.host_rates(data_dir, size=size, channels=channels)
    needed = {}
    for name, store in stores.items():
        fastest = max((r["images_per_s"] for r in steps if r["model"] == name), default=None)
        per_core = rates.get(key(*store))
        if fastest and per_core:
            needed[name] = {"step_images_per_s": fastest, "store": key(*store),
                            **{f"cores_{fmt}": fastest / rate for fmt, rate in per_core.items()}}
    return {"per_core": rates, "cores_needed": needed}


def first_step_cases(profile: Profile, budget: Budget, tmp: str) -> list[dict]:
    """Time to first step of a fresh process, cold and then warm cache (its own folder)."""
    rows = []
    batch, dtype = profile.batches[0], profile.loop_dtype
    for name in profile.first_step_models:
        cache = tempfile.mkdtemp(prefix=f"cache_{name}_", dir=tmp)
        row = {"model": name, "dtype": dtype, "batch": batch}
        for phase in ("cold", "warm"):
            if not budget.allows(f"{name}: first step, {phase} cache", SHARES["first_step"]):
                break
            progress(f"{name}: first step in a fresh process, {phase} cache")
            with budget.failures(f"{name}: first step, {phase} cache"):
                row[f"{phase}_s"] = first_step_in_child(name, batch, dtype, cache, max(budget.left(), 60))
            if f"{phase}_s" not in row:
                break  # a warm run after a failed cold one measures nothing
        if "cold_s" in row:
            rows.append(row)
    return rows


def first_step_in_child(name: str, batch: int, dtype: str, cache: str, timeout: float) -> float:
    cmd = [sys.executable, "-m", "benchmarks.device", "--first-step", name, "--batches", str(batch),
           "--dtypes", dtype, "--cache", cache]
    # this process holds most of a GPU's memory (JAX preallocates): the child takes only what it uses
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        raise RuntimeError(f"the child process exited {done.returncode}: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["first_step_s"]


def first_step(name: str, batch: int, dtype: str, cache: str) -> float:
    """Seconds from nothing (imports done) to a first step finished: state, compile, run."""
    from cnn_jax import parallel

    parallel.use_compilation_cache(cache)
    start = time.perf_counter()
    mesh, state = train_step.jax_state(name)
    made = time.perf_counter() - start
    return made + train_step.jax_step(name, mesh, state, batch, dtype)[2]


def device_peak() -> int | None:
    import jax

    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s]
    return max(peaks) if peaks and None not in peaks else None


def with_mfu(rows: list[dict], kind: str, platform: str, measured: dict, devices: int) -> list[dict]:
    """Each row's MFU: 6 x forward multiply-adds x images/s (backward ~ twice the forward) over
    the peak rate, kept beside it."""
    for r in rows:
        peak, source = peak_flops(kind, platform, r["dtype"], measured.get(r["dtype"]), devices)
        r["peak_flops"], r["mfu_of"] = peak, source
        r["mfu"] = 6 * r["forward_macs_per_image"] * r["images_per_s"] / peak if peak else None
    return rows


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--batches", default="", help="comma-separated global batch sizes (default: the profile's)")
    parser.add_argument("--dtypes", default="", help="float32, bfloat16 or both (default: both)")
    parser.add_argument("--budget", type=float, default=0, help="seconds (default: the profile's)")
    parser.add_argument("--loop-models", default=None, help=f"of {list(LOOP_EXPERIMENTS)} (default: the profile's)")
    parser.add_argument("--first-step-models", default=None, help="of --models' choices (default: the profile's)")
    parser.add_argument("--out", default="benchmarks/out/device.json")
    parser.add_argument("--results", default="benchmarks/RESULTS.md", help="Markdown file whose section is replaced")
    parser.add_argument("--first-step", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, value, known in (("--models", args.models, MODELS), ("--loop-models", args.loop_models, LOOP_EXPERIMENTS),
                               ("--first-step-models", args.first_step_models, MODELS)):
        unknown = set(names(value)) - set(known)
        if unknown:
            parser.error(f"{flag}: unknown model(s) {sorted(unknown)}: choose from {list(known)}")
    if not names(args.models):
        parser.error(f"--models names none: choose from {list(MODELS)}")
    bad = set(names(args.dtypes)) - {"float32", "bfloat16"}
    if bad:
        parser.error(f"unknown dtype(s) {sorted(bad)}: choose float32, bfloat16 or both")
    for flag, path in (("--out", args.out), ("--results", args.results)):  # refused now, not after the run
        target = pathlib.Path(path)
        if flag == "--out":  # its folder is the benchmark's own (benchmarks/out is not committed)
            with contextlib.suppress(OSError):
                target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir() or not os.access(target if target.exists() else target.parent, os.W_OK):
            parser.error(f"{flag} {path}: not a writable file in an existing folder; choose another")
    try:
        batches = tuple(int(b) for b in names(args.batches))
    except ValueError:
        parser.error(f"--batches {args.batches!r} must be comma-separated integers, e.g. 128,256")
    if any(b < 1 for b in batches) or args.budget < 0:
        parser.error("--batches must be positive and --budget at least 0")
    return args, batches


def names(value: str | None) -> tuple[str, ...]:
    """'a,b,' -> ('a', 'b')."""
    return tuple(filter(None, (value or "").split(",")))


def profile_for(platform: str, args, batches: tuple) -> Profile:
    profile = PROFILES["cpu" if platform == "cpu" else "accelerator"]
    changes = {"batches": batches} if batches else {}
    if names(args.dtypes):
        changes["dtypes"] = names(args.dtypes)
    if args.budget:
        changes["budget"] = args.budget
    for field, value in (("loop_models", args.loop_models), ("first_step_models", args.first_step_models)):
        if value is not None:  # '' measures none
            changes[field] = names(value)
    return dataclasses.replace(profile, **changes)


def main(argv=None) -> int:
    args, batches = parse(argv)
    if args.first_step:  # the child of first_step_cases
        print(json.dumps({"first_step_s": first_step(args.first_step, batches[0], args.dtypes, args.cache)}))
        return 0
    out, results = pathlib.Path(args.out), pathlib.Path(args.results)
    import jax

    device = jax.devices()[0]
    profile = profile_for(device.platform, args, batches)
    models = names(args.models)
    budget = Budget(profile.budget)
    started = time.perf_counter()
    progress(f"{jax.device_count()} x {device.device_kind} ({device.platform}); budget {profile.budget:.0f} s")
    with tempfile.TemporaryDirectory() as tmp:
        steps = step_cases(models, profile, budget)
        host = host_cases(models, steps, budget, f"{tmp}/tfds")
        loops = loop_cases(profile, budget, tmp)
        firsts = first_step_cases(profile, budget, tmp)
    measured = {d: train_step.jax_matmul_rate(d) for d in {r["dtype"] for r in steps}} \
        if device.platform == "cpu" else {}
    report = {"machine": {**train_step.machine(), "device_kind": device.device_kind, "platform": device.platform,
                          "device_count": jax.device_count()},
              "command": "python -m benchmarks.device " + " ".join(argv if argv is not None else sys.argv[1:]),
              "out": str(out),
              "profile": dataclasses.asdict(profile), "seconds": time.perf_counter() - started,
              "steps": with_mfu(steps, device.device_kind, device.platform, measured, jax.device_count()), "loops": loops,
              "host": host,
              "first_steps": firsts, "device_peak_bytes": device_peak(), "skipped": budget.skipped}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    text = device_report.markdown(report)
    device_report.replace_section(results, device_report.section_key(report), text)
    print(text)
    print(f"wrote {out} and the {device_report.section_key(report)} section of {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
