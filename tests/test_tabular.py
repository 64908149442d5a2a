"""Tables in, tensors out: reading CSV / Parquet / NPZ / UCI folders and the fitted encoders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bayesdl as bdl
from bayesdl.tabular import DataError, Table, TabularPipeline, infer_task, iter_table, read_table

CSV = """age,sex,score,label
30,m,1.5,yes
40,f,2.5,no
50,f,3.0,yes
61,m,0.5,no
"""


def _write(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_columns_are_typed(tmp_path):
    table = read_table(_write(tmp_path, CSV))
    assert table.names == ["age", "sex", "score", "label"] and table.n_rows == 4
    assert table.columns["age"].dtype == np.float64
    assert table.columns["sex"].dtype == object and list(table.columns["sex"]) == list("mffm")
    np.testing.assert_array_equal(table.columns["score"], [1.5, 2.5, 3.0, 0.5])


def test_missing_values_and_tabs(tmp_path):
    table = read_table(_write(tmp_path, "a\tb\n1\tx\nNA\t\n", "data.tsv"))
    assert math.isnan(table.columns["a"][1]) and table.columns["b"][1] is None


def test_pipeline_encodes_and_standardises(tmp_path):
    table = read_table(_write(tmp_path, CSV))
    pipe = TabularPipeline.fit(table, "label")
    assert pipe.task == "classification" and pipe.classes == ("no", "yes")
    assert pipe.notes == ("task: classification (the target holds text; pass --task to choose)",)
    assert pipe.feature_names == ["age", "sex=f", "sex=m", "score"] and pipe.n_features == 4
    x = pipe.transform(table)
    assert x.shape == (4, 4) and x.dtype == torch.float32
    age = np.array([30, 40, 50, 61.0])
    torch.testing.assert_close(x[:, 0].double(), torch.from_numpy((age - age.mean()) / age.std()))
    assert x[:, 1].tolist() == [0, 1, 1, 0] and x[:, 2].tolist() == [1, 0, 0, 1]
    assert pipe.transform_target(table).tolist() == [1, 0, 1, 0]
    assert TabularPipeline.from_json(pipe.to_json()) == pipe


def test_regression_target_is_standardised(tmp_path):
    table = read_table(_write(tmp_path, CSV))
    pipe = TabularPipeline.fit(table, "score")
    assert pipe.task == "regression" and pipe.n_outputs == 1
    y = pipe.transform_target(table).double()
    assert abs(float(y.mean())) < 1e-6 and float(y.std(correction=0)) == pytest.approx(1.0)
    np.testing.assert_allclose(pipe.target_values(table), [1.5, 2.5, 3.0, 0.5])


def test_task_inference():
    assert infer_task(np.array([0.0, 1, 2, 1]))[0] == "classification"
    assert infer_task(np.array([0.5, 1, 2]))[0] == "regression"
    assert infer_task(np.arange(50.0))[0] == "regression"  # more than 20 distinct integers
    assert infer_task(np.array(["a", "b"], dtype=object))[0] == "classification"


def test_numeric_class_labels_sort_as_numbers():
    table = Table({"x": np.arange(6.0), "y": np.array([10.0, 2, 2, 10, 1, 1])})
    pipe = TabularPipeline.fit(table, "y")
    assert pipe.classes == ("1", "2", "10")
    assert pipe.transform_target(table).tolist() == [2, 1, 1, 2, 0, 0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("age,label\n1,a\n,b\n", "row 2, column 'age': missing value"),
        ("age,label\n1,a\n2,\n", "row 2, column 'label': missing value"),
        ("age,label\n1,a\n2,b,3\n", "row 2: 3 values, but the header names 2"),
        ("age,age\n1,2\n", "name every column once"),
        ("age,label\n", "no rows"),
    ],
)
def test_bad_files_name_the_row_and_column(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        TabularPipeline.fit(read_table(_write(tmp_path, text)), "label")


def test_transform_errors_name_file_row_and_column(tmp_path):
    pipe = TabularPipeline.fit(read_table(_write(tmp_path, CSV)), "label")
    new = _write(tmp_path, "age,sex,score\n30,m,1\n31,x,2\n", "new.csv")
    with pytest.raises(DataError, match=r"new.csv, row 2, column 'sex': category 'x' was not seen"):
        pipe.transform(read_table(new))
    text = _write(tmp_path, "age,sex,score\n30,m,1\nold,f,2\n", "text.csv")
    with pytest.raises(DataError, match=r"text.csv, row 2, column 'age': text 'old' in a numeric"):
        pipe.transform(read_table(text))
    lacking = _write(tmp_path, "age,score\n30,1\n", "lacking.csv")
    with pytest.raises(DataError, match=r"needs the column\(s\) 'sex'"):
        pipe.transform(read_table(lacking))
    with pytest.raises(DataError, match="no column 'nope'"):
        TabularPipeline.fit(read_table(new), "nope")


def test_batches_keep_row_numbers(tmp_path):
    rows = "\n".join(f"{i},{'x' if i == 23 else i}" for i in range(30))
    path = _write(tmp_path, "a,b\n" + rows + "\n")
    batches = list(iter_table(path, batch_rows=10))
    assert [b.first_row for b in batches] == [1, 11, 21]
    assert [b.n_rows for b in batches] == [10, 10, 10]
    pipe = TabularPipeline.fit(batches[0], "a", task="regression")
    with pytest.raises(DataError, match="row 24, column 'b': text 'x'"):
        pipe.transform(batches[2])


def test_parquet_and_npz_give_the_same_table(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    csv_table = read_table(_write(tmp_path, CSV))
    pq.write_table(
        pa.table({k: list(v) for k, v in csv_table.columns.items()}), tmp_path / "d.parquet"
    )
    np.savez(
        tmp_path / "d.npz",
        age=csv_table.columns["age"],
        sex=np.array(["m", "f", "f", "m"]),
        score=csv_table.columns["score"],
        label=np.array(["yes", "no", "yes", "no"]),
    )
    pipe = TabularPipeline.fit(csv_table, "label")
    for name in ("d.parquet", "d.npz"):
        other = read_table(tmp_path / name)
        assert other.names == csv_table.names
        torch.testing.assert_close(pipe.transform(other), pipe.transform(csv_table))
        assert torch.equal(pipe.transform_target(other), pipe.transform_target(csv_table))
    batches = list(iter_table(tmp_path / "d.parquet", batch_rows=3))
    assert [b.first_row for b in batches] == [1, 4]


def test_npz_blocks_and_no_pickle(tmp_path):
    np.savez(tmp_path / "m.npz", x=np.arange(6.0).reshape(3, 2), y=np.array([1.0, 2, 3]))
    assert read_table(tmp_path / "m.npz").names == ["x0", "x1", "y"]
    np.savez(tmp_path / "o.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="without pickle"):
        read_table(tmp_path / "o.npz")


def test_uci_folder(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    data = np.arange(24.0).reshape(8, 3)
    np.savetxt(folder / "data.txt", data)
    for name, text in {
        "index_features.txt": "0 1",
        "index_target.txt": "2",
        "index_train_0.txt": "0 1 2 3 4 5",
        "index_test_0.txt": "6 7",
        "n_splits.txt": "1",
        "n_hidden.txt": "50",
        "n_epochs.txt": "40",
    }.items():
        (folder / name).write_text(text)
    table = read_table(folder)
    assert table.names == ["x0", "x1", "y"]
    np.testing.assert_array_equal(table.columns["y"], data[:, 2])


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_table(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="unknown data format '.xlsx'"):
        read_table(_write(tmp_path, "x", "d.xlsx"))


def test_pipeline_saved_in_the_model_file(tmp_path):
    table = read_table(_write(tmp_path, CSV))
    pipe = TabularPipeline.fit(table, "label")
    post = bdl.Deterministic(bdl.models.mlp(pipe.n_features, 2), "categorical")
    post.fit((pipe.transform(table), pipe.transform_target(table)), epochs=1, batch_size=4)
    bdl.save(post, tmp_path / "m.safetensors", pipeline=pipe)
    info = bdl.inspect(tmp_path / "m.safetensors")
    assert info.pipeline == pipe and info.feature_names == tuple(pipe.feature_names)
    wrong = TabularPipeline.fit(table, "score")
    with pytest.raises(ValueError, match="pipeline is for regression"):
        bdl.save(post, tmp_path / "w.safetensors", pipeline=wrong)


def test_malformed_pipeline_json():
    with pytest.raises(ValueError, match="not a tabular pipeline"):
        TabularPipeline.from_json({"columns": [{"name": "a", "kind": "numeric", "std": 0}]})
    with pytest.raises(ValueError, match="not a tabular pipeline"):
        TabularPipeline.from_json([1, 2])
