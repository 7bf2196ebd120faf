"""Input pipeline against the train step, side by side in one run on this machine.

    python -m benchmarks.input_pipeline [--images 256] [--steps 6]

1. images/s of the AlexNet training transform (JPEG decode of real 427x640 photos, resize
   to 256, mean subtraction, random 227 crop + flip), through grain with 0, 1 and 2 worker
   processes (per worker = total / workers);
2. images/s of the AlexNet train step (batch 32, 227x227, float32) on the same machine;
3. the fraction of wall time the device sits idle waiting for data in the training loop's
   own `overlapped_step` (0 workers: the next batch is decoded on the main thread while the
   step runs in XLA's threads).
Prints a table and writes benchmarks/out/input_pipeline.json with the machine description.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import platform
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from cnn_jax import get_model, optim, train
from cnn_jax.data import pipeline
from cnn_jax.data.sources import Split
from cnn_jax.data.transforms import decode


class JpegSource:
    """n JPEG-encoded crops of scikit-learn's two sample photos, decoded on read."""

    def __init__(self, n: int):
        photos = [Image.fromarray(a) for a in load_sample_images().images]
        self.blobs = []
        for i in range(min(n, 64)):
            buf = io.BytesIO()
            photos[i % 2].save(buf, "JPEG", quality=90)
            self.blobs.append(buf.getvalue())
        self.n = n

    def __len__(self):
        return self.n

    def __repr__(self):
        return f"JpegSource({self.n})"

    def __getitem__(self, i):
        return {"image": decode(self.blobs[i % len(self.blobs)]), "label": i % 2}


def loader_rate(split, spec, mean, workers: int, batch: int, images: int) -> float:
    it = iter(pipeline.train_loader(split, spec, mean, batch_size=batch, seed=0, worker_count=workers))
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(images // batch):
        next(it)
    return (images // batch) * batch / (time.perf_counter() - start)


def step_rate_and_wait(split, spec, mean, steps: int, batch: int):
    model = get_model("alexnet", num_classes=2, init_scheme="lecun")
    state = train.create_train_state(jax.random.key(0), model, optim.make_optimizer("paper_sgd", 0.01),
                                     (227, 227, 3))
    step = jax.jit(train.train_step, donate_argnums=(0,))
    fixed = {"image": jnp.zeros((batch, 227, 227, 3)), "label": jnp.zeros((batch,), jnp.int32)}
    state, stats = step(state, fixed, jax.random.key(0))
    jax.block_until_ready(stats)
    start = time.perf_counter()
    for _ in range(steps):  # the step alone, on a batch already on the device
        state, stats = step(state, fixed, jax.random.key(0))
        jax.block_until_ready(stats)
    step_rate = steps * batch / (time.perf_counter() - start)
    runner = SimpleNamespace(step=step, place=lambda b: b)
    data = pipeline.Lookahead(iter(pipeline.train_loader(split, spec, mean, batch_size=batch, seed=0)))
    waited, start = 0.0, time.perf_counter()
    for _ in range(steps):  # the training loop's own step: next batch decoded while the step runs
        state, stats, idle = train.overlapped_step(runner, state, data, jax.random.key(0))
        waited += idle
    elapsed = time.perf_counter() - start
    return step_rate, steps * batch / elapsed, waited / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    spec = pipeline.ImageSpec(227, 256, True, 3)
    split = Split("photos", "train", JpegSource(4096), 2, pathlib.Path("/tmp"))
    mean = np.full((256, 256, 3), 118.0, np.float32)
    rows = []
    for workers in (0, 1, 2):
        rate = loader_rate(split, spec, mean, workers, args.batch, args.images)
        rows.append({"workers": workers, "images_per_s": rate, "per_worker": rate / max(workers, 1)})
    step_rate, loop_rate, wait = step_rate_and_wait(split, spec, mean, args.steps, args.batch)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "jax": jax.__version__, "devices": str(jax.devices())}
    print(f"machine: {machine['cpus']} CPUs, {machine['platform']}, jax {machine['jax']}, {machine['devices']}")
    print(f"{'pipeline (decode+augment)':<30}{'images/s':>10}{'per worker':>12}{'x train step':>14}")
    for r in rows:
        print(f"{'grain, ' + str(r['workers']) + ' workers':<30}{r['images_per_s']:>10.1f}"
              f"{r['per_worker']:>12.1f}{r['images_per_s'] / step_rate:>14.1f}")
    print(f"{'AlexNet train step (batch 32)':<30}{step_rate:>10.1f}{'':>12}{1.0:>14.1f}")
    print(f"{'train loop with the pipeline':<30}{loop_rate:>10.1f}{'':>12}{loop_rate / step_rate:>14.2f}")
    print(f"data-wait fraction of the training loop (0 workers): {wait:.1%}")
    out = pathlib.Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    result = {"machine": machine, "pipeline": rows, "train_step_images_per_s": step_rate,
              "train_loop_images_per_s": loop_rate, "data_wait_fraction": wait, "args": vars(args)}
    (out / "input_pipeline.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'input_pipeline.json'}")


if __name__ == "__main__":
    main()
