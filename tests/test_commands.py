"""The data-file commands (bayesdl.commands): fit -> predict -> evaluate -> calibrate -> info on
small CSV and Parquet files, and every user error as one line with exit status 2."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from bayesdl.commands import add_subcommands, run

SPECIES = ("setosa", "versicolor", "virginica")
CENTERS = ((-2.0, 0.0), (2.0, 0.0), (0.0, 3.0))


def main(argv: list[str]) -> int:
    """What cli.main does with these commands."""
    parser = argparse.ArgumentParser(prog="bayesdl")
    add_subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return run(args)


def write_csv(path: Path, columns: dict[str, list]) -> Path:
    names = list(columns)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        writer.writerows(zip(*(columns[n] for n in names), strict=True))
    return path


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def species_data(n: int, seed: int) -> dict[str, list]:
    """Three well separated blobs; a text feature that leans towards the class."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 3, n)
    xy = np.asarray(CENTERS)[k] + 0.6 * rng.standard_normal((n, 2))
    colors = np.array(["red", "green", "blue"])
    color = np.where(rng.random(n) < 0.7, colors[k], colors[rng.integers(0, 3, n)])
    return {
        "length": [f"{v:.4f}" for v in xy[:, 0]],
        "width": [f"{v:.4f}" for v in xy[:, 1]],
        "color": list(color),
        "species": [SPECIES[i] for i in k],
    }


def price_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """A noisy linear target far from 0 (so target units are tested), noise grows with |a|."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(-2, 2, n), rng.uniform(-2, 2, n)
    noise = (0.3 + 0.3 * np.abs(a)) * rng.standard_normal(n)
    return {"a": a, "b": b, "price": 100.0 + 5.0 * a - 3.0 * b + noise}


def expect_error(capsys, argv: list[str], *fragments: str) -> str:
    """Exit status 2, one line "bayesdl: error: ..." on stderr holding ``fragments``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bayesdl: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def species(tmp_path_factory):
    """A small deep ensemble fitted on species_data (shared by the tests)."""
    folder = tmp_path_factory.mktemp("species")
    train = write_csv(folder / "train.csv", species_data(240, seed=0))
    model = folder / "model.safetensors"
    args = ["fit", str(train), "--target", "species", "--out", str(model)]
    args += ["--epochs", "30", "--members", "2", "--hidden", "16", "--quiet"]
    assert main(args) == 0
    return model


# ------------------------------------------------------------------------------ end to end
def test_classification_end_to_end(species, tmp_path, capsys):
    model = species
    capsys.readouterr()
    test = species_data(150, seed=1)
    test_csv = write_csv(tmp_path / "test.csv", test)
    pred_csv = tmp_path / "pred.csv"
    assert main(["predict", str(model), str(test_csv), "--out", str(pred_csv)]) == 0
    header, rows = read_csv(pred_csv)
    assert header == [
        "predicted",
        *(f"p_{s}" for s in SPECIES),
        *("confidence", "total", "aleatoric", "epistemic"),
    ]
    assert len(rows) == 150
    probs = np.array([[float(v) for v in r[1:4]] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    predicted = [r[0] for r in rows]
    assert predicted == [SPECIES[i] for i in probs.argmax(1)]
    # In order: the labels of the file's own rows (shuffled rows would match a third).
    agree = np.mean([p == t for p, t in zip(predicted, test["species"], strict=True)])
    assert agree > 0.85

    capsys.readouterr()
    assert main(["evaluate", str(model), str(test_csv), "--target", "species", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert before["rows"] == 150 and before["task"] == "classification"
    assert set(before["metrics"]) == {"accuracy", "nll", "brier", "ece"}
    assert before["metrics"]["accuracy"] == pytest.approx(agree)

    cal_csv = write_csv(tmp_path / "cal.csv", species_data(300, seed=2))
    calibrated = tmp_path / "calibrated.safetensors"
    args = ["calibrate", str(model), str(cal_csv), "--target", "species", "--out", str(calibrated)]
    assert main([*args, "--target-risk", "0.1", "--ood-false-alarm", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "temperature:" in out and "conformal sets: alpha 0.1" in out
    assert "referral:" in out and "OOD gate:" in out

    pred2_csv = tmp_path / "pred2.csv"
    assert main(["predict", str(calibrated), str(test_csv), "--out", str(pred2_csv)]) == 0
    header2, rows2 = read_csv(pred2_csv)
    assert header2 == [*header, "set", "refer", "hand_over"]
    assert len(rows2) == 150
    assert {r[-2] for r in rows2} <= {"true", "false"} and {r[-1] for r in rows2} <= {
        "true",
        "false",
    }
    for r in rows2:  # a non-randomised conformal set is never empty and holds the top class
        members = r[header2.index("set")].split("|")
        assert r[0] in members and set(members) <= set(SPECIES)

    capsys.readouterr()
    ood_csv = write_csv(
        tmp_path / "ood.csv", {"length": [9.0] * 20, "width": [-9.0] * 20, "color": ["red"] * 20}
    )
    report = tmp_path / "report.html"
    args = ["evaluate", str(calibrated), str(test_csv), "--json", "--ood", str(ood_csv)]
    assert main([*args, "--report", str(report)]) == 0
    after = json.loads(capsys.readouterr().out)
    assert {"set_coverage", "mean_set_size", "referral_coverage"} <= set(after["metrics"])
    assert set(after["ood"]) >= {"ood_auroc_epistemic", "ood_auroc_confidence"}
    page = report.read_text()
    assert "<html" in page and "data:image/png;base64" in page

    assert main(["info", str(calibrated), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "deep_ensemble" and info["task"] == "classification"
    assert [w["name"] for w in info["wrappers"]] == [
        "ood_gate",
        "referral",
        "conformal",
        "calibration",
    ]
    assert info["pipeline"]["classes"] == list(SPECIES)
    kinds = {c["name"]: c["kind"] for c in info["pipeline"]["columns"]}
    assert kinds == {"length": "numeric", "width": "numeric", "color": "categorical"}
    assert main(["info", str(calibrated)]) == 0
    text = capsys.readouterr().out
    assert "color" in text and "categorical, 3 categories" in text and "referral:" in text


def test_regression_end_to_end_with_parquet(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    def parquet(name, data):
        path = tmp_path / name
        pq.write_table(pa.table(data), path)
        return path

    train = parquet("train.parquet", price_data(300, seed=0))
    model = tmp_path / "model.safetensors"
    args = ["fit", str(train), "--target", "price", "--out", str(model), "--method", "mc_dropout"]
    assert main([*args, "--epochs", "40", "--hidden", "32", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "task: regression (the target holds numbers that are not a few integers" in out
    assert "using --dropout 0.1" in out and "validation: RMSE" in out

    fresh = price_data(1000, seed=3)
    test = parquet("test.parquet", {k: v for k, v in fresh.items() if k != "price"})
    pred_csv = tmp_path / "pred.csv"
    assert main(["predict", str(model), str(test), "--out", str(pred_csv), "--samples", "50"]) == 0
    header, rows = read_csv(pred_csv)
    assert header == ["mean", "lower", "upper", "aleatoric_std", "epistemic_std"]
    values = np.array(rows, dtype=float)
    assert len(values) == 1000
    assert np.all(values[:, 1] < values[:, 0]) and np.all(values[:, 0] < values[:, 2])
    # In the target's units and in row order: the mean follows the truth.
    assert np.corrcoef(values[:, 0], fresh["price"])[0, 1] > 0.95

    cal = parquet("cal.parquet", price_data(400, seed=2))
    calibrated = tmp_path / "calibrated.safetensors"
    args = ["calibrate", str(model), str(cal), "--target", "price", "--out", str(calibrated)]
    assert main([*args, "--target-risk", "0.2", "--tolerance", "1.5", "--samples", "50"]) == 0
    out = capsys.readouterr().out
    assert "variance scale:" in out and "conformal intervals: alpha 0.1" in out
    assert "referral:" in out

    pred2_csv = tmp_path / "pred2.csv"
    assert (
        main(["predict", str(calibrated), str(test), "--out", str(pred2_csv), "--samples", "50"])
        == 0
    )
    assert "conformal at the model's 1 - alpha = 0.9" in capsys.readouterr().err
    header2, rows2 = read_csv(pred2_csv)
    assert header2 == [*header, "refer"]
    lower, upper = (np.array([float(r[i]) for r in rows2]) for i in (1, 2))
    coverage = np.mean((lower <= fresh["price"]) & (fresh["price"] <= upper))
    assert 0.8 <= coverage <= 0.97

    test_labelled = write_csv(tmp_path / "test.csv", {k: list(v) for k, v in fresh.items()})
    report = tmp_path / "report.html"
    args = ["evaluate", str(calibrated), str(test_labelled), "--json", "--samples", "50"]
    assert main([*args, "--report", str(report)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "data:image/png;base64" in report.read_text()
    assert result["intervals"] == "conformal" and result["interval_level"] == pytest.approx(0.9)
    assert result["metrics"]["coverage"] == pytest.approx(coverage, abs=0.02)
    noise = np.sqrt(np.mean((0.3 + 0.3 * np.abs(fresh["a"])) ** 2))  # the best RMSE
    assert noise <= result["metrics"]["rmse"] < 2 * noise

    assert main(["info", str(calibrated)]) == 0
    text = capsys.readouterr().out
    assert "method: mc_dropout" in text and "target: price, mean 1" in text
    assert "conformal: alpha 0.1" in text and "calibration: scale" in text


def test_integer_target_is_inferred_as_classes(tmp_path, capsys):
    data = species_data(60, seed=0)
    data["species"] = [str(SPECIES.index(s) + 1) for s in data["species"]]
    train = write_csv(tmp_path / "train.csv", data)
    args = ["fit", str(train), "--target", "species", "--out", str(tmp_path / "m.safetensors")]
    assert main([*args, "--epochs", "1", "--members", "1", "--quiet"]) == 0
    assert "task: classification (the target holds 3 distinct integers" in capsys.readouterr().out
    assert main([*args, "--epochs", "1", "--quiet", "--task", "regression"]) == 0
    out = capsys.readouterr().out
    assert "task: regression (given by --task)" in out and "target: species, mean" in out


# ------------------------------------------------------------------------------ predict
def test_batched_predict_matches_one_batch(species, tmp_path):
    model = species
    test_csv = write_csv(tmp_path / "test.csv", species_data(50, seed=4))
    whole, batched = tmp_path / "whole.csv", tmp_path / "batched.csv"
    assert main(["predict", str(model), str(test_csv), "--out", str(whole)]) == 0
    assert (
        main(["predict", str(model), str(test_csv), "--out", str(batched), "--batch-rows", "7"])
        == 0
    )
    head_a, rows_a = read_csv(whole)
    head_b, rows_b = read_csv(batched)
    assert head_a == head_b and len(rows_a) == len(rows_b) == 50
    assert [r[0] for r in rows_a] == [r[0] for r in rows_b]
    # float32 matrix products round differently for other batch shapes: equal to round-off.
    a = np.array([r[1:] for r in rows_a], dtype=float)
    b = np.array([r[1:] for r in rows_b], dtype=float)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_predict_is_reproducible_with_a_seed(tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", {k: list(v) for k, v in price_data(80, 0).items()})
    model = tmp_path / "m.safetensors"
    args = ["fit", str(train), "--target", "price", "--out", str(model), "--method", "mc_dropout"]
    assert main([*args, "--epochs", "2", "--quiet"]) == 0
    paths = [tmp_path / f"p{i}.csv" for i in range(3)]
    for path, seed in zip(paths, ("5", "5", "6"), strict=True):
        argv = ["predict", str(model), str(train), "--out", str(path), "--samples", "20"]
        assert main([*argv, "--seed", seed]) == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()  # other dropout masks


def test_help_texts(capsys):
    for command in ("fit", "predict", "evaluate", "calibrate", "info"):
        assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--val-fraction", "--batch-rows", "--ood", "--target-risk", "--json"):
        assert option in out


# ------------------------------------------------------------------------------ errors
def test_fit_errors(tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    data = species_data(30, seed=0)
    train = write_csv(tmp_path / "train.csv", data)
    fit = ["fit", str(train), "--target", "species", "--out", str(model), "--epochs", "1"]
    expect_error(
        capsys,
        ["fit", str(tmp_path / "none.csv"), "--target", "y", "--out", str(model)],
        "none.csv",
    )
    expect_error(
        capsys, ["fit", str(train), "--target", "kind", "--out", str(model)], "no column 'kind'"
    )
    data["width"][11] = "NaN"
    with_nan = write_csv(tmp_path / "nan.csv", data)
    expect_error(
        capsys,
        ["fit", str(with_nan), "--target", "species", "--out", str(model)],
        "nan.csv, row 12, column 'width'",
    )
    expect_error(capsys, [*fit, "--members", "3", "--method", "swag"], "--members")
    expect_error(capsys, [*fit, "--method", "mc_dropout", "--dropout", "0"], "--dropout")
    expect_error(capsys, [*fit, "--val-fraction", "1.5"], "--val-fraction", "[0, 1)")
    expect_error(capsys, [*fit, "--hidden", "50,x"], "--hidden")
    expect_error(capsys, [*fit, "--method", "magic"], "invalid choice: 'magic'")
    elsewhere = ["fit", str(train), "--target", "species", "--out", str(tmp_path / "no" / "m")]
    expect_error(capsys, elsewhere, "does not exist")
    assert not model.exists()


def test_command_errors_leave_no_output(species, tmp_path, capsys):
    model = species
    good = species_data(20, seed=5)
    test_csv = write_csv(tmp_path / "test.csv", good)
    out = tmp_path / "pred.csv"
    out.write_text("old predictions\n")  # must survive every failed run

    def predict(data, *extra, model=model):
        return ["predict", str(model), str(data), "--out", str(out), *extra]

    text = dict(good, width=list(good["width"]))
    text["width"][6] = "wide"
    lacking = {k: v for k, v in good.items() if k != "width"}
    unseen = dict(good, color=list(good["color"]))
    unseen["color"][2] = "purple"
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(model.read_bytes()[: len(model.read_bytes()) // 2])
    cases = [
        (predict(tmp_path / "none.csv"), ("none.csv",)),
        (
            predict(write_csv(tmp_path / "text.csv", text)),
            ("text.csv, row 7, column 'width'", "'wide'"),
        ),
        (predict(write_csv(tmp_path / "lacking.csv", lacking)), ("lacking.csv", "'width'")),
        (
            predict(write_csv(tmp_path / "unseen.csv", unseen)),
            ("row 3, column 'color'", "'purple'"),
        ),
        (predict(test_csv, model=damaged), ("damaged.safetensors",)),
        (predict(test_csv, model=tmp_path / "none.safetensors"), ("none.safetensors",)),
        (predict(test_csv, "--samples", "3"), ("--samples 3", "2 members")),
        (predict(test_csv, "--level", "1.2"), ("--level",)),
        (predict(test_csv, "--batch-rows", "0"), ("--batch-rows",)),
        ([*predict(test_csv)[:-1], str(tmp_path / "pred.parquet")], ("CSV",)),
    ]
    for argv, fragments in cases:
        expect_error(capsys, argv, *fragments)
        assert out.read_text() == "old predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    report = tmp_path / "report.html"
    evaluate = ["evaluate", str(model), str(test_csv)]
    expect_error(capsys, [*evaluate, "--target", "color"], "--target 'color'", "'species'")
    unlabelled = write_csv(
        tmp_path / "unlabelled.csv", {k: v for k, v in good.items() if k != "species"}
    )
    expect_error(capsys, ["evaluate", str(model), str(unlabelled)], "no column 'species'")
    expect_error(capsys, [*evaluate, "--samples", "4", "--report", str(report)], "--samples 4")
    expect_error(
        capsys,
        [*evaluate, "--ood", str(tmp_path / "lacking.csv"), "--report", str(report)],
        "'width'",
    )
    assert not report.exists()
    calibrated = tmp_path / "calibrated.safetensors"
    calibrate = ["calibrate", str(model), str(test_csv), "--out", str(calibrated)]
    expect_error(capsys, [*calibrate, "--tolerance", "1"], "--tolerance")
    expect_error(capsys, [*calibrate, "--alpha", "0"], "--alpha")
    expect_error(capsys, [*calibrate[:2], str(tmp_path / "lacking.csv"), *calibrate[3:]], "'width'")
    assert not calibrated.exists()
    expect_error(capsys, ["info", str(damaged)], "damaged.safetensors")


def test_model_without_pipeline_is_refused(tmp_path, capsys):
    import torch

    import bayesdl
    from bayesdl.models import mlp

    posterior = bayesdl.Deterministic(mlp(2, 3, hidden=(4,)), "categorical")
    posterior.fit((torch.randn(20, 2), torch.randint(0, 3, (20,))), epochs=1, progress=False)
    model = tmp_path / "plain.safetensors"
    bayesdl.save(posterior, model)
    data = write_csv(tmp_path / "d.csv", {"a": [1.0], "b": [2.0]})
    expect_error(
        capsys, ["predict", str(model), str(data), "--out", str(tmp_path / "p.csv")], "pipeline="
    )
    assert main(["info", str(model)]) == 0
    assert "none recorded" in capsys.readouterr().out


# ------------------------------------------------------------------------------ split
def test_split_partitions_rows_and_reads_back_the_same_values(tmp_path, capsys):
    data = price_data(50, seed=3)
    data["city"] = ["oslo", "", "rome", "lima", "oslo"] * 10  # text, with a missing value
    data["count"] = list(range(50))  # integers stay integers
    source = write_csv(tmp_path / "all.csv", {k: list(v) for k, v in data.items()})
    parts = [tmp_path / f"{p}.csv" for p in ("train", "held_out", "test")]
    assert main(["split", str(source), "--out", *map(str, parts), "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "50 rows" in out and "train.csv: 30 rows" in out and "test.csv: 10 rows" in out
    header, original = read_csv(source)
    seen = []
    for part in parts:
        h, rows = read_csv(part)
        assert h == header
        seen += rows
        counts = [int(r[header.index("count")]) for r in rows]
        assert counts == sorted(counts)  # each part keeps the file's order
    assert len(seen) == 50
    by_count = {r[header.index("count")]: r for r in seen}
    for row in original:
        back = by_count[row[header.index("count")]]
        for name, a, b in zip(header, row, back, strict=True):
            if name in ("a", "b", "price"):
                assert float(a) == float(b)  # repr round-trips exactly
            else:
                assert a == b
    # Another seed gives another split; the same seed the same one.
    again = tmp_path / "again.csv"
    assert main(["split", str(source), "--out", str(again), str(tmp_path / "rest.csv")]) == 0
    assert (
        main(
            [
                "split",
                str(source),
                "--out",
                str(again),
                str(tmp_path / "rest.csv"),
                "--seed",
                "4",
                "--fractions",
                "0.6,0.4",
            ]
        )
        == 0
    )
    assert read_csv(again)[1] == read_csv(parts[0])[1]


def test_split_errors(tmp_path, capsys):
    source = write_csv(tmp_path / "all.csv", {k: list(v) for k, v in price_data(5, 0).items()})
    a, b = str(tmp_path / "a.csv"), str(tmp_path / "b.csv")
    four = [str(tmp_path / f"{i}.csv") for i in range(4)]
    expect_error(capsys, ["split", str(source), "--out", *four], "no shares", "0.25,0.25")
    expect_error(capsys, ["split", str(source), "--out", a, a], "same file twice")
    expect_error(
        capsys, ["split", str(source), "--out", a, b, "--fractions", "0.5,0.6"], "sum to 1"
    )
    expect_error(
        capsys,
        ["split", str(source), "--out", a, b, "--fractions", "0.5,0.25,0.25"],
        "2 files",
        "3 shares",
    )
    expect_error(capsys, ["split", str(source), "--out", str(tmp_path / "a.parquet")], "writes CSV")
    expect_error(
        capsys,
        ["split", str(source), "--out", a, b, "--fractions", "0.99,0.01"],
        "5 rows cannot give every part a row",
    )
    expect_error(capsys, ["split", str(tmp_path / "nope.csv"), "--out", a], "nope.csv")
    assert not Path(a).exists() and not Path(b).exists()
