"""Transfer learning on the offline digits: `python -m experiments.transfer`.

A network pretrained on digits 0-4 learns digits 5-9. Its convolutions already detect
strokes, so with few target images training only a new classifier head should beat
training from scratch, and with many images fine-tuning everything at a lower rate should
still start ahead. Runs, evaluated every `eval_every_steps` on the validation digits of
their own classes (0-4 for the pretraining, 5-9 for the rest):

    pretrain      digits 0-4, every training image, from scratch
    small target  20 images of each of 5-9: head only | fine-tuned | from scratch
    full target   every training image of 5-9:  head only | fine-tuned | from scratch

"head only" freezes everything but the new head (`--config.head_only`); "fine-tuned"
trains everything, the pretrained layers at `backbone_lr_scale` times the head's rate.
The target runs repeat for `experiment.seeds` seeds (initialisation and batch order; the
small target is the same first images of each class for every seed). Writes results.json,
results.md and transfer.png (validation error against steps) to the workdir (default
runs/transfer). Budget: 2 1/2 minutes on 2 CPU cores (LeNet-5 with ReLU and max pooling,
32x32 grey; 19 runs).
Every run is a workdir of its own: rerunning resumes and skips finished runs.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from ml_collections import config_dict

from cnn_jax import viz
from cnn_jax.config import defaults

from experiments import _analyse, _compare, _report, _run

VARIANTS = {  # name: (target images, start from the pretrained net, config changes)
    "small, head only": ("small", True, dict(head_only=True)),
    "small, fine-tuned": ("small", True, dict(backbone_lr_scale=0.1)),
    "small, from scratch": ("small", False, {}),
    "full, head only": ("full", True, dict(head_only=True)),
    "full, fine-tuned": ("full", True, dict(backbone_lr_scale=0.1)),
    "full, from scratch": ("full", False, {}),
}


def get_config() -> config_dict.ConfigDict:
    c = defaults()
    c.model_name = "lenet5_modern"
    c.model = config_dict.ConfigDict(dict(dtype="float32"))
    c.input_size, c.resize_size, c.channels = 32, 32, 1
    c.pca_noise = 0.0
    c.learning_rate, c.weight_decay, c.decay_mask, c.schedule = 0.02, 5e-4, "kernels", "constant"
    c.batch_size, c.eval_every_steps, c.log_every_steps = 32, 20, 20
    c.experiment = config_dict.ConfigDict(dict(
        source_classes=(0, 1, 2, 3, 4), target_classes=(5, 6, 7, 8, 9), small_per_class=20,
        pretrain_steps=600, target_steps=300, seeds=3))
    return c


def _variants(config, pretrained: pathlib.Path) -> dict[str, dict]:
    """{variant: its config changes}: the target runs, starting from `pretrained` or not."""
    e = config.experiment
    devices = jax.device_count()  # a batch splits evenly over the devices
    small = max(devices, min(config.batch_size, e.small_per_class * len(e.target_classes)) // devices * devices)
    variants = {}
    for name, (size, from_pretrained, changes) in VARIANTS.items():
        variants[name] = dict(classes=tuple(e.target_classes), num_train_steps=3 if config.smoke else e.target_steps,
                              train_per_class=e.small_per_class if size == "small" else 0,
                              batch_size=small if size == "small" else config.batch_size,
                              init_from=str(pretrained) if from_pretrained else "",
                              new_head=from_pretrained,  # digits 5-9 are other classes than 0-4
                              **changes)
    return variants


def run_all(config, workdir) -> dict:
    """The pretraining, then every target variant at every seed (`_compare.run_variants`), then
    the summary files."""
    root, e = pathlib.Path(workdir), config.experiment
    once = _compare.with_values(config, {"experiment.seeds": 1})
    pretrain = dict(classes=tuple(e.source_classes), num_train_steps=3 if config.smoke else e.pretrain_steps)
    results = _compare.run_variants(once, root, {"pretrain": pretrain})
    results.update(_compare.run_variants(config, root, _variants(config, root / "pretrain_seed0")))
    if jax.process_index() != 0:
        return _compare.NOTHING
    return summarise(results, config, root)


def summarise(results: dict, config, root: pathlib.Path) -> dict:
    """results.json, results.md and transfer.png from the runs' curves."""
    e = config.experiment
    table = ["| target images | start | trained | validation top-1 error, first eval | final (mean, range over seeds) |",
             "|---|---|---|---:|---:|"]
    panels = {"small target (%d images a class)" % e.small_per_class: {}, "full target (every image)": {}}
    summary = {}
    for variant, runs in results.items():
        finals = _analyse.finite([r["top1_error"] for r in runs])  # diverged seeds are named, not averaged
        mean = float(np.mean(finals)) if len(finals) else float("nan")
        summary[variant] = {"final_top1_error_mean": mean, "min": float(np.min(finals, initial=np.nan)),
                            "max": float(np.max(finals, initial=np.nan)), "runs": runs}
        if variant == "pretrain":
            continue
        size, start = variant.split(", ", 1)
        panel = next(p for p in panels if p.startswith(size))
        panels[panel][start] = band = _analyse.band(runs, "val")
        table.append(f"| {size} | {'digits 0-4 net' if start != 'from scratch' else 'random'} | {start} | "
                     f"{band[1][0]:.1f}% | {_analyse.pm([r['top1_error'] for r in runs])} |")
    pre = summary["pretrain"]["final_top1_error_mean"]
    note = (f"Pretraining on digits {list(e.source_classes)}: validation top-1 error {pre:.1%}. Target: digits "
            f"{list(e.target_classes)}, {len(results[next(iter(VARIANTS))])} seed(s), {config.model_name}. "
            + " ".join(verdict(summary, size) for size in ("small", "full")))
    (root / "results.json").write_text(json.dumps({"config": config.to_dict(), "results": summary}, indent=1))
    (root / "results.md").write_text("\n".join([note, "", *table]) + "\n")
    viz.plot_curves(panels, root / "transfer.png", title=f"Transfer from digits 0-4 to 5-9 ({config.model_name})")
    return {"note": note, "table": table, "files": [str(root / n) for n in ("results.json", "results.md", "transfer.png")]}


def verdict(summary: dict, size: str) -> str:
    """Whether starting from the pretrained net beat training from scratch, first and last."""
    scratch = summary[f"{size}, from scratch"]
    best = min((v for v in summary if v.startswith(size) and "scratch" not in v),
               key=lambda v: summary[v]["final_top1_error_mean"])
    first = lambda v: np.nanmean([r["val_curve"][0] if r["val_curve"] else np.nan  # noqa: E731
                                  for r in summary[v]["runs"]])
    final = summary[best]["final_top1_error_mean"], scratch["final_top1_error_mean"]
    return (f"{size.capitalize()} target: the best transfer ({best.split(', ')[1]}) ends at {final[0]:.1%} against "
            f"{final[1]:.1%} from scratch ({'ahead' if final[0] < final[1] else 'not ahead'}); at the first "
            f"evaluation {first(best):.1%} against {first(f'{size}, from scratch'):.1%}.")


if __name__ == "__main__":
    _run.run(get_config, job=run_all, show=_report.show, name="transfer")
