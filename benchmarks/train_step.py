"""The train step, cnn_jax against the same network in PyTorch, side by side in one run.

    python -m benchmarks.train_step [--models alexnet,resnet50] [--batch 32] [--dtype float32]

For each model: images/s of one full train step (forward, backward, the paper's momentum and
weight-decay update) for cnn_jax (the compiled step the training loop runs, on a uint8 batch
already on the device, so it also crops, mirrors and adds colour noise) and for the network
written in PyTorch (`benchmarks/torch_models.py`, eager, `torch.optim.SGD`, input already a
float tensor), timed alternately over `--repeats` rounds (A B, then B A, ...): the median and the range of
each, and the ratio of the medians. Achieved FLOP/s count 3 x 2 x the forward multiply-adds
of `cnn_jax.summary` per image (backward ~ twice the forward; GoogLeNet's auxiliary heads, ~0.5%,
not counted), as a share of the faster of the two frameworks' matrix-multiply rates measured
in the same run. cnn_jax's first step (trace + compile + run) and its peak device memory
(XLA's buffer assignment, per device) are reported on their own. `alexnet_2tower` runs on two
simulated CPU devices, a (1, 2) mesh with one tower each, and every other model on one; a model
whose device count differs from this process's runs in a child process. The two-tower PyTorch
peer is one process with grouped convolutions. Prints a table, writes
benchmarks/out/train_step.json. PyTorch is the `[bench]` extra; without it only cnn_jax is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

MODELS = ("alexnet", "alexnet_2tower", "resnet50", "vgg16", "googlenet", "lenet5")
DEVICE_FLAG = "--xla_force_host_platform_device_count"


def devices_needed(name: str) -> int:
    """One device per tower the model declares (the two-tower split: two), else one."""
    from cnn_jax.models import get_model, spec_of

    return spec_of(get_model(name)).towers


def _stored_size(input_size: int) -> int:
    """The side of the stored squares the step crops from (256 for ImageNet-sized input)."""
    return 256 if input_size > 64 else input_size + 4


def jax_state(name: str):
    """(mesh, fresh train state) for `name`: one state serves its float32 and bfloat16 steps
    (the mixed-precision models keep float32 parameters), so it is made once per model. The
    mesh holds every device: the model's towers on 'model', the batch split over 'data'."""
    import jax

    from cnn_jax import optim, parallel, train
    from cnn_jax.models import get_model, spec_of

    model = get_model(name)
    towers = spec_of(model).towers
    mesh = parallel.make_mesh((jax.device_count() // towers, towers))
    state = train.create_train_state(jax.random.key(0), model, optim.make_optimizer("paper_sgd", 0.01),
                                     model.input_shape)
    return mesh, state


def jax_step(name: str, mesh, state, batch: int, dtype: str):
    """(step(), sync(), first-step seconds, peak bytes, forward multiply-adds per image) of
    cnn_jax's compiled train step on a copy of `state` (the step donates its state)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cnn_jax import parallel, summary, train
    from cnn_jax.data import augment
    from cnn_jax.models import get_model

    model = get_model(name, **({"dtype": jnp.bfloat16} if dtype == "bfloat16" else {}))
    size, channels = model.input_shape[0], model.input_shape[2]
    stored = _stored_size(size)
    state = jax.tree.map(jnp.copy, state).replace(apply_fn=parallel.apply_fn(model, mesh))
    runner = parallel.make_runner("jit", mesh, model, state, train.train_step, train.eval_step, batch)
    state = jax.device_put(state, runner.state_shardings)
    prep = augment.make_preprocessor(np.full((stored, stored, channels), 120.0), np.ones(channels),
                                     np.eye(channels), input_size=size, flip=True, pca_noise=0.1)
    rng = np.random.default_rng(0)
    data = runner.place({"image": rng.integers(0, 256, (batch, stored, stored, channels), np.uint8),
                         "label": rng.integers(0, 10, batch).astype(np.int32)})
    key = jax.random.key(1)
    start = time.perf_counter()  # the first step a user waits for: trace, compile, run
    compiled = runner.step.lower(state, data, key, prep).compile()
    box = [runner.step(state, data, key, prep)[0]]  # the compiled program, from jit's cache
    jax.block_until_ready(box[0])
    first = time.perf_counter() - start
    memory = compiled.memory_analysis()
    peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes) if memory is not None else None

    def step():
        box[0], stats = runner.step(box[0], data, key, prep)
        return stats

    def sync(stats):
        jax.block_until_ready((box[0], stats))

    macs = summary.totals(summary.layer_table(model)).macs
    return step, sync, first, peak, macs


def jax_case(name: str, batch: int, dtype: str):
    """(step(), sync(), first-step seconds, peak bytes, forward multiply-adds per image)."""
    return jax_step(name, *jax_state(name), batch, dtype)


def torch_case(name: str, batch: int, dtype: str):
    """step() and sync() for the PyTorch peer, or None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    from benchmarks.torch_models import PEERS

    torch.manual_seed(0)
    net = PEERS[name]().train()
    size, channels = (32, 1) if name.startswith("lenet") else (227 if name.startswith("alexnet") else 224, 3)
    x = torch.randn(batch, channels, size, size)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        with autocast:
            out = net(x)
            logits, aux = out if isinstance(out, tuple) else (out, [])
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            for a in aux:
                loss = loss + 0.3 * torch.nn.functional.cross_entropy(a.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step, lambda loss: loss.item()


def images_per_second(step, sync, batch: int, steps: int) -> float:
    start = time.perf_counter()
    out = None
    for _ in range(steps):
        out = step()
    sync(out)
    return batch * steps / (time.perf_counter() - start)


def matmul_rates(dtype: str, n: int = 2048, repeats: int = 10) -> dict:
    """FLOP/s of an n x n matrix product: jitted JAX (the step's compiler options) and PyTorch."""
    rates = {"jax": jax_matmul_rate(dtype, n, repeats)}
    try:
        import torch
    except ImportError:
        return rates
    t = torch.ones(n, n, dtype=getattr(torch, dtype))
    t @ t
    start = time.perf_counter()
    for _ in range(repeats):
        t @ t
    rates["torch"] = 2 * n**3 * repeats / (time.perf_counter() - start)
    return rates


def jax_matmul_rate(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a jitted n x n matrix product under the step's compiler options (alone: PyTorch's
    bfloat16 product runs at about 1 GFLOP/s on some CPUs, minutes at this size)."""
    import jax.numpy as jnp

    from cnn_jax import parallel

    a = jnp.ones((n, n), jnp.dtype(dtype))
    f = parallel.jit(lambda a: a @ a)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def _summary(rates: list[float]) -> dict:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "all": rates}


def progress(message: str):
    """A line on stderr for every phase of a case, so that no wait goes unexplained (stdout
    keeps the table)."""
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_model(name: str, batch: int, dtype: str, repeats: int, seconds: float) -> dict:
    progress(f"{name}: compiling the train step (batch {batch}, {dtype})")
    step, sync, first, peak, macs = jax_case(name, batch, dtype)
    progress(f"{name}: compiled in {first:.1f} s; building the PyTorch peer")
    peer = torch_case(name, batch, dtype)
    sync(step())
    probe = images_per_second(step, sync, batch, 2)
    steps = max(2, round(seconds * probe / batch))
    if peer:
        peer[1](peer[0]())  # PyTorch's first step allocates: keep it out of the timing
    jax_rates, torch_rates = [], []
    for round_ in range(repeats):  # A B, then B A: neither always runs on the warmer machine
        progress(f"{name}: timing round {round_ + 1} of {repeats} ({steps} steps each side)")
        timings = [(jax_rates, (step, sync))] + ([(torch_rates, peer)] if peer else [])
        for rates, (run, wait) in timings[:: 1 if round_ % 2 == 0 else -1]:
            rates.append(images_per_second(run, wait, batch, steps))
    result = {"batch": batch, "dtype": dtype, "steps_per_repeat": steps, "first_step_s": first,
              "peak_bytes": peak, "forward_macs_per_image": macs, "cnn_jax": _summary(jax_rates)}
    if peer:
        result["pytorch"] = _summary(torch_rates)
        result["ratio"] = result["cnn_jax"]["median"] / result["pytorch"]["median"]
    return result


def machine() -> dict:
    import flax
    import jax

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "flax": flax.__version__, "devices": [str(d) for d in jax.devices()],
            "date": time.strftime("%Y-%m-%d")}
    try:
        import torch

        info["torch"], info["torch_threads"] = torch.__version__, torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def _in_child(models: list[str], devices: int, args) -> dict:
    """Runs `models` in a child process with `devices` simulated CPU devices; returns its results."""
    out = pathlib.Path(args.out).with_suffix(f".{devices}_devices.json")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    env = {**os.environ, "XLA_FLAGS": " ".join([*flags, f"{DEVICE_FLAG}={devices}"])}
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--models", ",".join(models), "--batch",
           str(args.batch), "--dtype", args.dtype, "--repeats", str(args.repeats), "--seconds",
           str(args.seconds), "--out", str(out), "--quiet"]
    if subprocess.run(cmd, env=env).returncode != 0:
        raise SystemExit(f"the {', '.join(models)} benchmark failed in its {devices}-device child process (its "
                         f"error is above); the other models' results are in the table printed so far")
    return json.loads(out.read_text())["models"]


def format_table(results: dict, rates: dict) -> str:
    peak_rate = max(rates.values())
    lines = [f"{'model':<16}{'cnn_jax img/s (range)':>26}{'PyTorch img/s (range)':>26}{'ratio':>7}"
             f"{'GFLOP/s':>9}{'of matmul':>10}{'1st step':>9}{'peak MB':>9}"]
    for name, r in results.items():
        jax_r, torch_r = r["cnn_jax"], r.get("pytorch")
        flops = 6 * r["forward_macs_per_image"] * jax_r["median"]
        spread = lambda s: f"{s['median']:,.1f} ({s['min']:,.1f}-{s['max']:,.1f})"  # noqa: E731
        lines.append(f"{name:<16}{spread(jax_r):>26}{spread(torch_r) if torch_r else 'n/a':>26}"
                     f"{r.get('ratio', float('nan')):>7.2f}{flops / 1e9:>9.0f}{flops / peak_rate:>10.0%}"
                     f"{r['first_step_s']:>8.1f}s{(r['peak_bytes'] or 0) / 2**20:>9,.0f}")
    lines.append("matrix product rate (GFLOP/s): " + ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in rates.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5, help="rounds of A B timing")
    parser.add_argument("--seconds", type=float, default=3.0, help="about how long each timing lasts")
    parser.add_argument("--out", default="benchmarks/out/train_step.json")
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}: choose from {list(MODELS)}")
    if args.repeats < 1 or args.batch < 1 or args.seconds <= 0:
        parser.error("--repeats and --batch must be at least 1, --seconds positive")
    out = pathlib.Path(args.out)
    try:  # refuse now what would otherwise fail after the whole run
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
    except OSError as err:
        parser.error(f"cannot write --out {out}: {err.strerror}; choose a writable path")
    import jax

    results = {}
    for name in models:  # a model on more devices than it needs would run data-parallel over them
        if jax.device_count() == devices_needed(name):
            results[name] = run_model(name, args.batch, args.dtype, args.repeats, args.seconds)
        else:
            results.update(_in_child([name], devices_needed(name), args))
        if not args.quiet:
            r = results[name]
            peer = f", PyTorch {r['pytorch']['median']:,.1f}, ratio {r['ratio']:.2f}" if "pytorch" in r else ""
            print(f"{name}: cnn_jax {r['cnn_jax']['median']:,.1f} img/s{peer}", flush=True)
    rates = matmul_rates(args.dtype)
    report = {"machine": machine(), "batch": args.batch, "dtype": args.dtype, "matmul_flops": rates,
              "models": results}
    out.write_text(json.dumps(report, indent=1))
    if not args.quiet:
        print("\n" + format_table(results, rates))
        print(f"\nmachine: {report['machine']}\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
