"""What a comparison writes and prints: the table, the plot of its curves, results.json and
results.md (read by `python -m experiments.reproductions` for the README)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax

from cnn_jax import viz
from experiments._analyse import Claim, Verdict, band, pm


GAP_COLUMNS = {"training-split error": "train_top1_error", "gap (points)": "gap"}  # error_table's extra columns


PANEL_TITLES = {"val": "validation error", "train": "training error (logged, as trained)"}


def panels(results: dict, *keys: str) -> dict:
    """`viz.plot_curves` panels: one per curve key ('val', 'train'), a line per variant."""
    return {PANEL_TITLES[key]: {v: band(runs, key) for v, runs in results.items()} for key in keys}


def error_table(results: dict, extra: dict | None = None) -> list[str]:
    """One row per variant: final validation error, then `extra` columns ({title: record key};
    titles ending in '(points)' are differences, shown without a % sign)."""
    extra = extra or {}
    rows = ["| " + " | ".join(["variant", "final validation top-1 error", *extra]) + " |",
            "|---|---:|" + "---:|" * len(extra)]
    for variant, runs in results.items():
        cells = [pm([r["top1_error"] for r in runs])] + [
            pm([r[key] for r in runs], unit="" if title.endswith("(points)") else "%") for title, key in extra.items()]
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    return rows


def write_results(root: pathlib.Path, name: str, config, claim: Claim, verdict: Verdict, results: dict,
                  table: list[str], panels: dict, *, title: str, ylabel: str = "top-1 error (%)") -> dict:
    """results.json, results.md and <name>.png in `root`; returns what `show` prints."""
    note = f"{claim.claim} ({claim.source}): paper {claim.paper}; ours {verdict.ours}. {verdict.verdict.capitalize()}: {verdict.why}"
    files = [root / "results.json", root / "results.md", root / f"{name}.png"]
    if jax.process_index() == 0:
        data = {"experiment": name, "claim": dataclasses.asdict(claim), "verdict": dataclasses.asdict(verdict),
                "smoke": bool(config.smoke), "config": config.to_dict(), "runs": results}
        files[0].write_text(json.dumps(data, indent=1, default=str))
        files[1].write_text("\n".join([f"# {name}", "", note, "", f"Scale: {verdict.scale}", "", *table]) + "\n")
        viz.plot_curves(panels, files[2], title=title, ylabel=ylabel)
    return {"note": note, "table": table, "files": [str(f) for f in files]}


def show(config, result: dict):
    print("\n" + result["note"] + "\n\n" + "\n".join(result["table"]))
    for path in result["files"]:
        print(f"  wrote {path}")
