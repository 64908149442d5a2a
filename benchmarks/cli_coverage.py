"""Do the command line's intervals hold on data sets it was not built on?

Runs the README's shell recipe, exactly as a user would, over many random splits of each data
set: ``bayesdl split DATA --out train.csv held_out.csv test.csv`` (60/20/20, the seed varies),
``bayesdl fit train.csv --target COL``, ``bayesdl calibrate ... held_out.csv``, and ``bayesdl
evaluate ... test.csv --json`` on both the fitted and the calibrated model. It records, per data
set, the test coverage of the 90% intervals (the predictive mixture before calibration; the
conformal intervals after), their width, and the share of splits whose coverage falls in
0.85-0.95. Classification data sets record accuracy, NLL, ECE and conformal set coverage.

Data sets: scikit-learn's diabetes (442 rows, regression; bundled with scikit-learn), the UCI
concrete folder (1030 rows) from ``../shared/data/uci`` and the UCI mushroom file (8124 rows, 22
text columns, classification) from ``../shared/data/mushroom``; missing ones are skipped and said
so.

    python -m benchmarks.cli_coverage [--splits 20] [--data diabetes,concrete,mushroom]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._results import environment, run_bayesdl, write_results

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MUSHROOM_COLUMNS = (
    "class cap_shape cap_surface cap_color bruises odor gill_attachment gill_spacing gill_size "
    "gill_color stalk_shape stalk_root stalk_surface_above stalk_surface_below stalk_color_above "
    "stalk_color_below veil_type veil_color ring_number ring_type spore_print_color population "
    "habitat"
).split()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def prepare(name: str, folder: Path) -> tuple[str, str] | None:
    """``(data argument, target column)`` of one data set, or None when it is not here."""
    if name == "diabetes":
        from sklearn.datasets import load_diabetes

        d = load_diabetes(scaled=False)
        path = folder / "diabetes.csv"
        rows = [[*r, t] for r, t in zip(d.data.tolist(), d.target.tolist(), strict=True)]
        _write_csv(path, [*d.feature_names, "progression"], rows)
        return str(path), "progression"
    if name == "concrete":
        path = SHARED / "uci" / "concrete"
        return (str(path), "y") if path.is_dir() else None
    if name == "mushroom":
        source = SHARED / "mushroom" / "agaricus-lepiota.data"
        if not source.is_file():
            return None
        with open(source, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        path = folder / "mushrooms.csv"
        _write_csv(path, MUSHROOM_COLUMNS, rows)
        return str(path), "class"
    raise ValueError(f"unknown data set {name!r}")


def one_split(data: str, target: str, seed: int, work: Path) -> dict:
    train, held, test = (str(work / f"{p}.csv") for p in ("train", "held_out", "test"))
    model, calibrated = str(work / "model.safetensors"), str(work / "calibrated.safetensors")
    run_bayesdl("split", data, "--out", train, held, test, "--seed", str(seed))
    run_bayesdl("fit", train, "--target", target, "--out", model, "--quiet", "--seed", str(seed))
    run_bayesdl(
        "calibrate", model, held, "--target", target, "--out", calibrated, "--seed", str(seed)
    )
    result = {}
    for tag, path in (("fitted", model), ("calibrated", calibrated)):
        doc = json.loads(run_bayesdl("evaluate", path, test, "--target", target, "--json"))
        result[tag] = doc["metrics"]
        result["task"] = doc["task"]
        result["test_rows"] = doc["rows"]
    return result


def summarise(runs: list[dict]) -> dict:
    """Mean, standard deviation, min and max of every metric, per model."""
    out = {}
    for tag in ("fitted", "calibrated"):
        keys = runs[0][tag].keys()
        out[tag] = {}
        for key in keys:
            values = [r[tag][key] for r in runs]
            out[tag][key] = {
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
        if "coverage" in keys:
            inside = [0.85 <= r[tag]["coverage"] <= 0.95 for r in runs]
            out[tag]["share_of_splits_0.85_0.95"] = sum(inside) / len(inside)
    return out


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        "# The command line's intervals on data sets it was not built on",
        "",
        f"{results['date']}; {results['splits']} random 60/20/20 splits per data set (seeds 0 to "
        f"{results['splits'] - 1}), the README's recipe: split, fit (defaults: deep ensemble of "
        "5, one hidden layer of 50, early stopping on 10% of the training rows), calibrate on the "
        "20% held out (half for the scale, half for the conformal threshold), evaluate on the "
        f"20% test rows. torch {results['environment']['torch']}, "
        f"{results['environment']['threads']} threads.",
        "",
    ]
    for name, entry in results["data_sets"].items():
        if entry.get("skipped"):
            lines += [f"## {name}: skipped ({entry['skipped']})", ""]
            continue
        s = entry["summary"]
        lines += [f"## {name} ({entry['task']}, {entry['test_rows']} test rows per split)", ""]
        keys = list(s["fitted"].keys())
        keys = [k for k in keys if k != "share_of_splits_0.85_0.95"]
        lines += ["| metric | fitted: mean (sd) [min, max] | calibrated: mean (sd) [min, max] |"]
        lines += ["| --- | --- | --- |"]
        for key in keys:
            cells = []
            for tag in ("fitted", "calibrated"):
                m = s[tag].get(key)
                cells.append(
                    "-"
                    if m is None
                    else f"{m['mean']:.4g} ({m['sd']:.2g}) [{m['min']:.4g}, {m['max']:.4g}]"
                )
            lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
        if "share_of_splits_0.85_0.95" in s["fitted"]:
            lines.append(
                "| splits with coverage in 0.85-0.95 | "
                f"{s['fitted']['share_of_splits_0.85_0.95']:.0%} | "
                f"{s['calibrated']['share_of_splits_0.85_0.95']:.0%} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--data", default="diabetes,concrete,mushroom")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "splits": args.splits,
        "environment": environment(),
        "data_sets": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.data.split(","):
            prepared = prepare(name, work)
            if prepared is None:
                _log(f"{name}: not found under {SHARED}; skipped")
                results["data_sets"][name] = {"skipped": f"not found under {SHARED}"}
                continue
            data, target = prepared
            runs = []
            for seed in range(args.splits):
                runs.append(one_split(data, target, seed, work))
                cov = runs[-1]["calibrated"].get("coverage")
                _log(f"{name} split {seed}: " + ("" if cov is None else f"coverage {cov:.3f}"))
            results["data_sets"][name] = {
                "task": runs[0]["task"],
                "test_rows": runs[0]["test_rows"],
                "summary": summarise(runs),
                "runs": [{k: r[k] for k in ("fitted", "calibrated")} for r in runs],
            }
    results["seconds"] = {"total": time.perf_counter() - start}
    write_results(results, args.out, "cli_coverage", write_markdown, _log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
