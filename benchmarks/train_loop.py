"""The training loop against its bare step, and the host pipeline per core.

    python -m benchmarks.train_loop [--cases lenet5_modern_b256,alexnet_b32] [--steps-scale 1.0]

For each case, in one run: images/s of the bare jitted train step on a batch already on the
device (measured before and after the loop, averaged), of the full loop
(`train_and_evaluate` with logging and checkpoints at the experiment's defaults, evaluation
only at the end, first log window left out as compilation), their ratio, and the data-wait
fraction (the share of time the device had no step to run, from the loop's own step clock).
Then the host side alone on one thread (one core): reading AlexNet's uint8 batches from the
prepared store, raw and JPEG, and decoding JPEGs with PIL and with simplejpeg on the same
files. Prints a table, writes benchmarks/out/train_loop.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import platform
import tempfile
import time

import jax
import numpy as np

from cnn_jax import train
from cnn_jax.data import pipeline, store
from cnn_jax.data.sources import open_split

CASES = {  # experiment, overrides, steps of the loop
    "lenet5_modern_b256": ("lenet", dict(model_name="lenet5_modern", batch_size=256), 150),
    "alexnet_b32": ("alexnet", dict(batch_size=32), 24),
}


def make_config(experiment: str, overrides: dict, steps: int, data_dir: str):
    import importlib

    from experiments import _run

    config = importlib.import_module(f"experiments.{experiment}").get_config()
    written_for = config.model_name
    if "store_format" not in config:
        with config.unlocked():
            config.store_format = "raw"
    for key, value in overrides.items():
        setattr(config, key, value)
    config, _ = _run.own_model_fields(config, written_for, given=frozenset())  # as the command line does
    config.data_dir, config.num_train_steps = data_dir, steps
    config.eval_every_steps, config.eval_limit = steps, 64  # evaluation only at the end, small
    return config


def bare_step_rate(config, workdir, steps: int) -> float:
    """Images/s of the compiled step alone, on one batch already placed on the devices."""
    from cnn_jax import checks

    config = checks.check_config(config, device_count=jax.device_count(), process_count=1)
    with contextlib.ExitStack() as stack:
        run = train.Run(config, pathlib.Path(workdir), stack)
        state, batch = run.state, run.runner.place(run.stream.batch(0))
        for _ in range(2):
            state, stats = run.runner.step(state, batch, run.step_key, run.prep)
        jax.block_until_ready(stats)
        start = time.perf_counter()
        for _ in range(steps):
            state, stats = run.runner.step(state, batch, run.step_key, run.prep)
        jax.block_until_ready((state, stats))
        return config.batch_size * steps / (time.perf_counter() - start)


def loop_rate(config, workdir) -> tuple[float, float]:
    """(images/s, data-wait share) of the full loop, from its metrics log, first window left out."""
    with contextlib.redirect_stderr(io.StringIO()):
        train.train_and_evaluate(config, workdir)
    logs = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    windows = [entry for entry in logs if "train/images_per_second" in entry][1:]
    steps = np.diff([0] + [entry["step"] for entry in logs if "train/images_per_second" in entry])[1:]
    images = steps * config.batch_size
    seconds = images / np.array([w["train/images_per_second"] for w in windows])
    wait = float(np.sum(seconds * np.array([w["train/data_wait"] for w in windows])) / seconds.sum())
    return float(images.sum() / seconds.sum()), wait


def host_rates(data_dir: str, size: int = 256, channels: int = 3, batch: int = 32, batches: int = 30) -> dict:
    """Images/s on one thread, per store format: training batches of the digits' prepared
    store at `size` x `size` x `channels` (AlexNet's: 256 x 256 x 3)."""
    split = open_split("digits", "train", data_dir)
    rates = {}
    for fmt in store.FORMATS:
        prepared = store.prepare(split, store.StoreSpec(size, channels, fmt))
        stream = pipeline.TrainStream(prepared, batch_size=batch, seed=0)
        stream.batch(0)
        start = time.perf_counter()
        for i in range(1, batches + 1):
            stream.batch(i)
        rates[fmt] = batch * batches / (time.perf_counter() - start)
    return rates


def decoder_rates(repeats: int = 20) -> dict:
    """PIL against simplejpeg on the same JPEGs: scikit-learn's two 427x640 photos, and the
    same photos as the 256x256 JPEGs a 'jpeg' store holds."""
    import simplejpeg
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    files = {"photo_427x640": [simplejpeg.encode_jpeg(p, quality=90) for p in photos],
             "store_256x256": [simplejpeg.encode_jpeg(store.square(p, store.StoreSpec(256)), quality=95)
                               for p in photos]}
    decoders = {"pil": lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                "simplejpeg": lambda data: simplejpeg.decode_jpeg(data, colorspace="RGB")}
    rates = {}
    for kind, blobs in files.items():
        for name, decode in decoders.items():
            start = time.perf_counter()
            for _ in range(repeats):
                for data in blobs:
                    decode(data)
            rates[f"decode_{kind}_{name}"] = repeats * len(blobs) / (time.perf_counter() - start)
    return rates


def machine() -> dict:
    import flax

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "jax": jax.__version__, "flax": flax.__version__, "devices": [str(d) for d in jax.devices()],
            "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiplies every case's step count")
    parser.add_argument("--data_dir", default="", help="tfds data dir (default: a temporary one)")
    parser.add_argument("--out", default="benchmarks/out/train_loop.json")
    args = parser.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}: choose from {list(CASES)}")
    results = {"machine": machine(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or str(pathlib.Path(tmp) / "tfds")
        for name in args.cases.split(","):
            experiment, overrides, steps = CASES[name]
            steps = max(12, round(steps * args.steps_scale))
            config = make_config(experiment, overrides, steps, data_dir)
            before = bare_step_rate(config, f"{tmp}/{name}_bare", steps // 2)
            loop, wait = loop_rate(config, f"{tmp}/{name}_loop")
            after = bare_step_rate(config, f"{tmp}/{name}_bare", steps // 2)
            step = (before + after) / 2
            results["cases"][name] = {"step_images_per_s": step, "step_before_after": [before, after],
                                      "loop_images_per_s": loop, "loop_over_step": loop / step,
                                      "data_wait": wait, "steps": steps}
            print(f"{name}: step {step:,.0f} img/s, loop {loop:,.0f} img/s, ratio {loop / step:.2f}, "
                  f"data wait {wait:.1%}", flush=True)
        stores = {f"store_{fmt}_256_per_core": rate for fmt, rate in host_rates(data_dir).items()}
        results["host"] = {**stores, **decoder_rates()}
    print(f"\n{'case':<22}{'bare step img/s':>17}{'loop img/s':>12}{'loop/step':>11}{'data wait':>11}")
    for name, r in results["cases"].items():
        print(f"{name:<22}{r['step_images_per_s']:>17,.1f}{r['loop_images_per_s']:>12,.1f}"
              f"{r['loop_over_step']:>11.2f}{r['data_wait']:>11.1%}")
    print(f"\n{'host, one thread':<40}{'images/s':>12}")
    for key, value in results["host"].items():
        print(f"{key:<40}{value:>12,.0f}")
    print(f"\nmachine: {results['machine']}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
