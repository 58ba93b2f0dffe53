#!/usr/bin/python3
"""The table of benchmarks/results.sh: one row per method, each cell the median
(min–max) over the seeds' metrics.json, then the goals, checked on the medians.
    results_table.py RESULTS_DIR REPEATS METHOD..."""
import json
import pathlib
import statistics
import sys


def cell(values, fmt):
    """median (min–max), each formatted with `fmt`."""
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))})"


def main():
    results, repeats, methods = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    runs = {m: [json.loads((results / m / f"seed{s}" / "metrics.json").read_text()) for s in range(repeats)]
            for m in methods}
    print("| method | trainable params | test accuracy | test F1 | time / epoch | peak RSS | saved |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for m, r in runs.items():
        share = 100 * r[0]["trainable_params"] / r[0]["all_params"]
        print(f"| {m} | {r[0]['trainable_params']:,} ({share:.2f} %) "
              f"| {cell([x['test_accuracy'] for x in r], '{:.4f}'.format)} "
              f"| {cell([x['test_f1'] for x in r], '{:.4f}'.format)} "
              f"| {cell([x['seconds_per_epoch'] for x in r], '{:.0f} s'.format)} "
              f"| {cell([x['peak_rss_mib'] for x in r], '{:.0f} MiB'.format)} "
              f"| {r[0]['saved_bytes'] / 1024:.1f} KiB |")
    accuracy = {m: statistics.median(x["test_accuracy"] for x in r) for m, r in runs.items()}
    if "full" not in accuracy:
        return
    print("\nGoals (issue 7), on the medians: ", end="")
    goals = []
    for method, margin in (("lora", 0.5), ("adapter", 1.0), ("bitfit", 3.0)):
        if method in accuracy:
            gap = 100 * (accuracy[method] - accuracy["full"])
            verdict = "met" if gap >= -margin else "missed"
            goals.append(f"{method} ≥ full − {margin} pt: {gap:+.2f} pt, {verdict}")
    print("; ".join(goals) + ".")


if __name__ == "__main__":
    main()
