"""Kills a short training run with SIGKILL at random moments, resuming it after each kill,
and compares its final state and metrics log with an uninterrupted run's.

    python -m tools.kill_resume [--kills 20] [--seed 0] [--workdir DIR]

SIGKILL cannot be caught: the run gets no chance to save, so this checks what survives a
power cut or an out-of-memory kill. The victim is LeNet-5 (ReLU variant) on the offline
digits, checkpointed every 4 of its 80 steps and logged every step. Kill moments cycle
through three kinds: a random instant after the run has passed a random step of training,
the moment a checkpoint write is under way (orbax's temporary directory exists), and a
random instant of start-up or restore. On CPU the killed-and-resumed run must end with
bit-identical parameters, optimiser and schedule state, and every metrics line it wrote (a
step re-run after a kill logs again) must equal the uninterrupted run's line for that step.
Exits 0 when everything matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

STEPS, EVERY = 80, 4
FLAGS = ("--config.model_name=lenet5_modern", "--config.batch_size=128", f"--config.num_train_steps={STEPS}",
         f"--config.checkpoint_every_steps={EVERY}", "--config.keep_checkpoints=2",
         "--config.eval_every_steps=20", "--config.eval_limit=64", "--config.log_every_steps=1")
KINDS = ("training", "checkpoint write", "start-up")
TIMING_KEYS = {"time", "train/data_wait", "train/images_per_second"}  # wall-clock: differ by nature


@dataclasses.dataclass
class Kill:
    kind: str
    after_s: float
    killed: bool  # False: the run finished before the moment came
    newest_checkpoint: int | None
    unfinished: tuple = ()  # checkpoint writes the kill left half done (orbax temporary directories)


def command(workdir: pathlib.Path, data_dir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "experiments.lenet", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
            *FLAGS]


def read_log(path: pathlib.Path, start: int = 0, strict: bool = True) -> list[dict]:
    """The complete JSON lines of `path` from byte `start` (a killed writer may leave a fragment,
    and a resumed writer cuts it, so a line may begin before `start`: with `strict=False`
    unreadable lines are skipped)."""
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(start)
        lines = f.read().split(b"\n")[:-1]
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if strict:
                raise
    return entries


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def unfinished_writes(workdir: pathlib.Path) -> set:
    """Steps whose checkpoint write has begun and not finished (orbax's temporary folders)."""
    try:
        return {p.name.split(".")[0] for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name}
    except FileNotFoundError:
        return set()


def _logged_step(path: pathlib.Path, start: int) -> int:
    return max((entry["step"] for entry in read_log(path, start, strict=False)), default=-1)


def _failed(what: str, output: pathlib.Path) -> RuntimeError:
    tail = output.read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-1:] if output.exists() else []
    return RuntimeError(f"{what}; its last line: {tail[0] if tail else '(none)'} (all of it: {output})")


def kill_once(cmd: list[str], workdir: pathlib.Path, kind: str, target: int, rng: np.random.Generator,
              startup_s: float, timeout_s: float) -> Kill:
    """Starts the run and SIGKILLs it at a moment of `kind`; `target` is the step of training
    to pass first (for 'training' and 'checkpoint write')."""
    log, output = workdir / "metrics.jsonl", workdir.parent / "attempt.log"
    offset = log.stat().st_size if log.exists() else 0
    leftover, began = unfinished_writes(workdir), time.perf_counter()
    with open(output, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    delay = rng.uniform(0.0, startup_s) if kind == "start-up" else rng.uniform(0.0, 0.05)
    while proc.poll() is None:
        if time.perf_counter() - began > timeout_s:
            proc.kill()
            raise _failed(f"the run did not reach its kill moment in {timeout_s:.0f} s", output)
        if kind == "start-up":
            ready = time.perf_counter() - began >= delay
        else:
            ready = _logged_step(log, offset) >= target
            if ready and kind == "checkpoint write":
                ready = bool(unfinished_writes(workdir) - leftover)
        if ready:
            if kind == "training":
                time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                steps = checkpoint_steps(workdir)
                cut = tuple(sorted(unfinished_writes(workdir) - leftover))
                return Kill(kind, time.perf_counter() - began, True, steps[-1] if steps else None, cut)
        time.sleep(0.002)
    if proc.returncode != 0:
        raise _failed(f"the run failed (exit status {proc.returncode}) before its kill moment", output)
    steps = checkpoint_steps(workdir)
    return Kill(kind, time.perf_counter() - began, False, steps[-1] if steps else None)


def run_to_end(cmd: list[str], log: pathlib.Path, output: pathlib.Path, timeout_s: float) -> tuple[float, float]:
    """Runs `cmd` to its end; returns (seconds to its first metrics line, seconds in all)."""
    began, first = time.perf_counter(), None
    with open(output, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    while proc.poll() is None:
        if first is None and log.exists() and log.stat().st_size > 0:
            first = time.perf_counter() - began
        if time.perf_counter() - began > timeout_s:
            proc.kill()
            raise _failed(f"the run did not finish in {timeout_s:.0f} s", output)
        time.sleep(0.01)
    if proc.returncode != 0:
        raise _failed(f"the run failed (exit status {proc.returncode})", output)
    took = time.perf_counter() - began
    return first or took, took


def final_state(workdir: pathlib.Path) -> dict:
    from cnn_jax.checkpoint import restore_as_numpy

    return restore_as_numpy(workdir / "checkpoints" / str(STEPS) / "state")


def compare(reference: pathlib.Path, killed: pathlib.Path) -> list[str]:
    """Differences between the two runs' final states and metrics logs ([] when identical)."""
    import jax

    problems = []
    ref_leaves = jax.tree_util.tree_flatten_with_path(final_state(reference))[0]
    got_leaves = jax.tree_util.tree_flatten_with_path(final_state(killed))[0]
    if [p for p, _ in ref_leaves] != [p for p, _ in got_leaves]:
        problems.append("the final states have different structures")
    for (path, a), (_, b) in zip(ref_leaves, got_leaves):
        if not np.array_equal(np.asarray(a), np.asarray(b)):
            problems.append(f"final state differs at {jax.tree_util.keystr(path)}")
    expected = {}
    for entry in read_log(reference / "metrics.jsonl"):
        expected.setdefault(entry["step"], {}).update(entry)
    seen = set()
    for entry in read_log(killed / "metrics.jsonl"):
        want = expected.get(entry["step"], {})
        for key, value in entry.items():
            if key not in TIMING_KEYS and key in want and want[key] != value:
                problems.append(f"metrics log, step {entry['step']}: {key} {value} vs {want[key]} uninterrupted")
            seen.add((entry["step"], key))
    missing = {(s, k) for s, entry in expected.items() for k in entry if k not in TIMING_KEYS} - seen
    problems += [f"metrics log: {key} of step {step} never written" for step, key in sorted(missing)]
    return problems


def run(kills: int, seed: int, root: pathlib.Path, report=print) -> tuple[list[Kill], list[str]]:
    """Runs the whole check under `root`; returns the kills made and the differences found.
    Raises RuntimeError (one line, naming the run's output) if a run fails or hangs."""
    data_dir, reference, killed = root / "tfds", root / "uninterrupted", root / "killed"
    run_to_end(command(reference, data_dir), reference / "metrics.jsonl", root / "prepare.log", timeout_s=900)
    shutil.rmtree(reference)  # the first run also prepared the data: time a second one
    startup, took = run_to_end(command(reference, data_dir), reference / "metrics.jsonl", root / "reference.log",
                               timeout_s=900)
    report(f"uninterrupted run: {took:.1f} s for {STEPS} steps, {startup:.1f} s of it before the first step")
    rng = np.random.default_rng(seed)
    # targets end 10 steps early, so that the run never finishes before a kill lands
    targets = np.sort(rng.choice(np.arange(1, STEPS - 10), size=kills, replace=kills > STEPS - 11))
    cmd, made, timeout = command(killed, data_dir), [], max(120.0, 10 * took)
    for i, target in enumerate(targets):
        kind = KINDS[i % len(KINDS)]
        kill = kill_once(cmd, killed, kind, int(target), rng, startup_s=startup, timeout_s=timeout)
        made.append(kill)
        report(f"kill {i + 1:2d}/{kills}: {kind:<16} after {kill.after_s:5.2f} s"
               f"{'' if kill.killed else ' (finished first)'}, newest checkpoint {kill.newest_checkpoint}"
               + (f", write of step {', '.join(kill.unfinished)} cut short" if kill.unfinished else ""))
    run_to_end(cmd, killed / "metrics.jsonl", root / "attempt.log", timeout_s=timeout)  # the last resume
    return made, compare(reference, killed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--workdir", default="", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(args.workdir or tmp)
        if args.workdir and any(root.glob("*")):
            parser.error(f"--workdir {root} is not empty: choose a new directory")
        try:
            root.mkdir(parents=True, exist_ok=True)
            made, problems = run(args.kills, args.seed, root)
        except (RuntimeError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    landed = sum(k.killed for k in made)
    by_kind = {kind: sum(k.killed for k in made if k.kind == kind) for kind in KINDS}
    print(f"{landed}/{len(made)} kills landed ({', '.join(f'{n} {kind}' for kind, n in by_kind.items())})")
    for problem in problems[:20]:
        print(f"DIFFERENT: {problem}")
    print("identical to the uninterrupted run: final state and every metrics line" if not problems else
          f"{len(problems)} difference(s)")
    return 0 if not problems and landed == len(made) else 1


if __name__ == "__main__":
    raise SystemExit(main())
