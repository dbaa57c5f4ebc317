#!/usr/bin/env python
"""Mean ± std over seeds of ``benchmarks/learning.py`` results: one Markdown table from several results files.

    python benchmarks/seed_table.py results/fashion-mnist_small_recipe_seeds/*/fashion-mnist_results.json

Rows are grouped by feature set (the ``model`` of each row); every probe a row has (linear, k-NN, low-shot linear,
attentive) gets ``mean ± std (n runs)`` with the sample standard deviation (n - 1), and the per-run values. A second
table gives each trained method's budget and cost per run: steps, images seen, wall-clock, threads, images/s and
training FLOPs (counted by ``learning.py`` on real steps; runs older than that count show "–"). The margins the
issue asks for (I-JEPA minus each other feature set, against the larger of the two stds) end the output.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROBES = (("linear_accuracy", "linear"), ("knn_accuracy", "20-NN"), ("low_shot_accuracy", "low-shot linear (1%)"),
          ("attentive_accuracy", "attentive"))
REFERENCE = "I-JEPA target encoder"


def _cell(values: Sequence[float], draws: Sequence[float] = ()) -> str:
    if not values:
        return "–"
    percent = [100.0 * v for v in values]
    runs = ", ".join(f"{v:.1f}" for v in percent)
    if len(percent) == 1:
        # One run of the low-shot probe still shows how much its labelled subsets move it.
        spread = f"; draws {', '.join(f'{100.0 * v:.1f}' for v in draws)}" if len(draws) > 1 else ""
        return f"{percent[0]:.1f} (1 run{spread})"
    return f"{statistics.mean(percent):.1f} ± {statistics.stdev(percent):.1f} ({runs})"


def collect(paths: Sequence[str | Path]) -> tuple[dict[str, dict[str, list[float]]], list[dict[str, Any]]]:
    """``({model: {probe key: [value per run]}}, [training summary per run and method])``; the low-shot probe's
    per-draw accuracies of every run are under the key ``"low_shot_draws"``."""
    # One entry per feature set and seed: a seed probed in two files (e.g. random init once beside I-JEPA and again
    # with the newer probes) is one run, its probes merged (the same features give the same linear / k-NN result).
    runs: dict[str, dict[Any, dict[str, Any]]] = {}
    training: list[dict[str, Any]] = []
    for path in paths:
        results = json.loads(Path(path).read_text())
        seed = results.get("settings", {}).get("seed")
        for row in results["rows"]:
            run = runs.setdefault(row["model"], {}).setdefault(seed if seed is not None else str(path), {})
            for key, _ in PROBES:
                if row.get(key) is not None:
                    run.setdefault(key, float(row[key]))
            draws = row.get("probes", {}).get("low_shot_linear", {}).get("accuracies")
            if draws:
                run.setdefault("low_shot_draws", list(draws))
        threads = results.get("machine", {}).get("torch_threads")
        for method, summary in results.get("training", {}).items():
            training.append({"file": str(path), "method": method, "seed": seed,
                             "threads": threads, "cpu": results.get("machine", {}).get("cpu"), **summary})
    values: dict[str, dict[str, list[float]]] = {}
    for model, per_seed in runs.items():
        values[model] = {key: [run[key] for run in per_seed.values() if key in run] for key, _ in PROBES}
        values[model]["low_shot_draws"] = [v for run in per_seed.values() for v in run.get("low_shot_draws", [])]
    return values, training


def format_tables(values: dict[str, dict[str, list[float]]], training: list[dict[str, Any]]) -> str:
    lines = ["| features | " + " | ".join(f"{name} acc (%) mean ± std (runs)" for _, name in PROBES) + " |",
             "|---|" + "---|" * len(PROBES)]
    for model, per_probe in values.items():
        lines.append(f"| {model} | " + " | ".join(
            _cell(per_probe[key], per_probe["low_shot_draws"] if key == "low_shot_accuracy" else ())
            for key, _ in PROBES) + " |")
    lines += ["", "| method | seed | steps | images seen | wall-clock (min) | threads | images/s | training FLOPs |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in sorted(training, key=lambda r: (r["method"], r["seed"] if r["seed"] is not None else -1)):
        flops = run.get("training_flops")
        lines.append(f"| {run['method']} | {run['seed']} | {run['steps']} | {run['images_seen']:,} | "
                     f"{run['seconds'] / 60:.1f} | {run['threads']} | {run['images_per_s']:.0f} | "
                     f"{'–' if flops is None else f'{flops:.3g}'} |")
    if REFERENCE in values:
        lines.append("")
        reference = values[REFERENCE]
        for model, per_probe in values.items():
            if model == REFERENCE:
                continue
            parts = []
            for key, name in PROBES:
                ours, theirs = reference[key], per_probe[key]
                if not ours or not theirs:
                    continue
                margin = 100 * (statistics.mean(ours) - statistics.mean(theirs))
                if len(ours) < 2 or len(theirs) < 2:
                    parts.append(f"{name} {margin:+.1f} ({min(len(ours), len(theirs))} run on one side: not "
                                 "established)")
                    continue
                larger = 100 * max(statistics.stdev(ours), statistics.stdev(theirs))
                verdict = "established" if margin > larger else "not established"
                parts.append(f"{name} {margin:+.1f} (larger std {larger:.1f}: {verdict})")
            lines.append(f"- I-JEPA minus {model}: " + "; ".join(parts))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="learning.py results JSON files (one per run)")
    args = parser.parse_args(argv)
    missing = [path for path in args.results if not Path(path).is_file()]
    if missing:
        raise SystemExit(f"no such results file: {', '.join(missing)}")
    text = format_tables(*collect(args.results))
    print(text)
    return text


if __name__ == "__main__":
    main()
