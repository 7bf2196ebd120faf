"""The README's "Reproductions" table, built from the experiments' results.json files.

    python -m experiments.reproductions                 # collect runs/<name>/, rewrite README.md
    python -m experiments.reproductions --check         # exit 1 if README.md is out of date

Each experiment's results.json and plot are copied from runs/<name>/ (when a run that was
not a smoke run is there) into docs/reproductions/, and the table between the README's markers is
rendered from the copies: the committed table always matches committed data.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repository: defaults do not depend on the cwd
EXPERIMENTS = ("relu_vs_tanh", "lrn", "overlapping_pool", "dropout", "two_towers", "augmentation",
               "plain_vs_residual")
BEGIN, END = "<!-- reproductions: begin -->", "<!-- reproductions: end -->"


def collect(runs: pathlib.Path, docs: pathlib.Path) -> list[str]:
    """Copies each full run's results.json and plot into `docs`; returns what was copied."""
    docs.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in EXPERIMENTS:
        source = runs / name / "results.json"
        if not source.exists():
            continue
        if json.loads(source.read_text()).get("smoke"):
            print(f"skipped {source}: a smoke run (--config.smoke=True), not a result", file=sys.stderr)
            continue
        shutil.copyfile(runs / name / f"{name}.png", docs / f"{name}.png")  # the plot first: no table row without it
        shutil.copyfile(source, docs / f"{name}.json")
        copied.append(name)
    return copied


def render(docs: pathlib.Path, image_prefix: str = "docs/reproductions/") -> str:
    """The Markdown table (and plots) of every results file in `docs`, in EXPERIMENTS order."""
    rows = ["| claim (source) | paper | ours (mean [range] over seeds) | data and scale | verdict |",
            "|---|---|---|---|---|"]
    images, missing = [], []
    for name in EXPERIMENTS:
        path = docs / f"{name}.json"
        if not path.exists():
            missing.append(name)
            continue
        data = json.loads(path.read_text())
        if not {"claim", "verdict"} <= data.keys():
            raise ValueError(f"{path} has no claim and verdict: rerun python -m experiments.{name} to rewrite it")
        claim, verdict = data["claim"], data["verdict"]
        rows.append(f"| {claim['claim']} ({claim['source']}; `python -m experiments.{name}`) | {claim['paper']} | "
                    f"{verdict['ours']} | {verdict['scale']} | **{verdict['verdict']}**: {verdict['why']} |")
        images.append(f"![{name}]({image_prefix}{name}.png)")
    if missing:
        rows.append(f"\nNot yet run: {', '.join(missing)}.")
    return "\n".join([*rows, "", *images])


def rewrite(readme: pathlib.Path, table: str, begin: str = BEGIN, end: str = END) -> str:
    """The README's text with `table` between the markers `begin` and `end`."""
    text = readme.read_text(encoding="utf-8")
    head, _, rest = text.partition(begin)
    if end not in rest:  # no markers, or the end before the beginning
        raise ValueError(f"{readme} has no {begin} ... {end} markers: add them where the table goes")
    return f"{head}{begin}\n{table}\n{end}{rest.split(end, 1)[1]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.reproductions", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=pathlib.Path, default=ROOT / "runs", help="the experiments' workdirs")
    parser.add_argument("--docs", type=pathlib.Path, default=ROOT / "docs" / "reproductions")
    parser.add_argument("--readme", type=pathlib.Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true", help="only say whether the README's table is up to date")
    args = parser.parse_args(argv)
    try:
        if not args.check:
            print(f"collected: {', '.join(collect(args.runs, args.docs)) or 'nothing new'}")
        text = rewrite(args.readme, render(args.docs))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        current = args.readme.read_text(encoding="utf-8") == text
        print("README.md's reproductions table is " + ("up to date" if current else
              "out of date: run python -m experiments.reproductions"))
        return 0 if current else 1
    args.readme.write_text(text, encoding="utf-8")
    print(f"wrote the table to {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
