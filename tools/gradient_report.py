"""Per family and path, how far the first update of `train_step` is from float64.

    python -m tools.gradient_report                  # every family: docs/gradients.json, README table
    python -m tools.gradient_report --families lenet5 --out /tmp/g.json   # some, elsewhere

Uses the references of `tests/test_gradients.py` (float64 JAX; float32 and float64 PyTorch
where a counterpart exists) and records, for every family the tests know, the largest layer
deviation through each path and float32 PyTorch's own, with the layer it occurs in. The
tests judge the families they can; this measures all of them. Needs the `[dev]` extra (and
`torch` for the PyTorch column); about 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os

if "device_count" not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts: the meshes need 2
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

from tests import test_gradients as tg  # noqa: E402
from tools.default_runs import machine as describe_machine  # noqa: E402
from tools.outputs import destination, refusal, write_table  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT, README = ROOT / "docs" / "gradients.json", ROOT / "README.md"
BEGIN, END = "<!-- gradients: begin -->", "<!-- gradients: end -->"
COLUMNS = {"ties": "float64, weights moved 1e-6", "jit_runner": "jit runner", "pmap_runner": "pmap runner", "own_jit": "plain `jax.jit`",
           "tower_mesh": "two-tower mesh", "pytorch_float32": "float32 PyTorch"}


def worst(found: dict[str, float]) -> tuple[str, float]:
    layer = max(found, key=found.get)
    return layer, found[layer]


def worst_over_parts(name: str, found_for) -> tuple[str, float]:
    """The worst layer of `found_for(shards)` over the parts of the batch the tests judge
    `name` on (the whole batch, and with batch norm also each pmap device's half)."""
    return max((worst(found_for(shards)) for shards in tg.shard_counts(name)), key=lambda found: found[1])


def measure(name: str) -> dict:
    """Each path's worst layer, and how far the float64 update itself moves when the weights
    move by a relative 1e-6 (above 1e-5, and not shrinking in proportion to the move: the
    batch sits on a tie, and float32 may differ from float64 there with nothing wrong)."""
    tg.one_family_at_a_time(name)  # the families before it are done: their references go
    paths = tg.paths_of(name)
    row = {"ties": worst_over_parts(name, lambda shards: tg.tie_jump(name, shards))}
    for path in paths:
        reference = tg.float64_update(name, tg.reference_shards(name, path))
        row[path] = worst(tg.deviations(tg.project_update(name, path), reference))
    if name in tg.TORCH_LAYOUTS and importlib.util.find_spec("torch"):
        row["pytorch_float32"] = worst_over_parts(name, lambda shards: tg.deviations(
            tg.torch_update(name, "float32", shards), tg.torch_update(name, "float64", shards)))
    return row


def batch_record(name: str) -> dict:
    """What identifies a family's measurement: its input, batch, batch seed and verdict."""
    return {"input": tg.SPECS[name][1][0], "batch": tg.batch_size(name), "seed": tg.BATCH_SEEDS.get(name, 0),
            "judged": name in tg.JUDGED}


def render(data: dict) -> str:
    """The Markdown table of a report: one row a family, one column a path."""
    rows = [f"| family (input, batch, its seed) | judged | {' | '.join(COLUMNS.values())} |",
            "|---|---|" + "---:|" * len(COLUMNS)]
    for name, entry in data["results"].items():
        found = entry["worst"]
        cells = [f"{found[k][1]:.1e} ({found[k][0]})" if k in found else "" for k in COLUMNS]
        judged = {True: "yes", False: "no"}.get(entry.get("judged"), "")
        rows.append(f"| `{name}` ({entry['input']}, {entry['batch']}, {entry['seed']}) | {judged} | "
                    f"{' | '.join(cells)} |")
    return "\n".join([*rows, "", f"Measured with {data['machine']}."])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.gradient_report", description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(tg.SPECS), help="comma-separated names")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    names = [n for n in args.families.split(",") if n]
    unknown = sorted(set(names) - set(tg.SPECS))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(tg.SPECS)}")
    if why := refusal(args.out, DEFAULT_OUT, README, BEGIN, END):  # before minutes of measuring, not after
        parser.error(why)
    args.out = destination(args.out)  # the file checked is the file written
    to_readme = args.out == DEFAULT_OUT.resolve()
    if to_readme and set(names) != set(tg.SPECS):
        parser.error(f"--families {args.families}: {DEFAULT_OUT.relative_to(ROOT)} holds every family; "
                     "write some elsewhere with --out")
    torch = importlib.util.find_spec("torch") and importlib.metadata.version("torch")
    machine = f"{describe_machine(dated=False)}, {f'torch {torch}' if torch else 'without torch'}, {time.strftime('%Y-%m-%d')}"
    print(machine, flush=True)
    results = {}
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} {tg.SPECS[name][1]} ...", flush=True)
        results[name] = {**batch_record(name), "worst": measure(name)}
        for what, (layer, value) in results[name]["worst"].items():
            print(f"    {COLUMNS[what]:16s} {value:.1e}  ({layer})", flush=True)
    data = {"machine": machine, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}")
    if to_readme:
        write_table(README, render(data), BEGIN, END, kept=args.out)


if __name__ == "__main__":
    main()
