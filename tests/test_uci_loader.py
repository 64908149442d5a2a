"""The UCI folder loader on a tiny fixture written in the same format, and its standardiser."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bayesdl.data import Standardizer, load_uci
from bayesdl.data.uci import UCIFormatError


def write_uci(
    root: Path, *, n_rows: int = 30, n_features: int = 3, n_splits: int = 2, seed: int = 0
) -> Path:
    """A UCI folder: ``n_features`` inputs then a target column, ``n_splits`` 80/20 splits."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_rows, n_features)) * np.arange(1, n_features + 1) + 3.0
    y = x @ rng.normal(size=n_features) + 0.1 * rng.normal(size=n_rows) + 10.0
    root.mkdir(parents=True, exist_ok=True)
    np.savetxt(root / "data.txt", np.column_stack([x, y]))
    (root / "index_features.txt").write_text("\n".join(map(str, range(n_features))) + "\n")
    (root / "index_target.txt").write_text(f"{n_features}\n")
    n_test = max(1, n_rows // 5)
    for i in range(n_splits):
        perm = rng.permutation(n_rows)
        # Floats, as some published index files write them.
        (root / f"index_train_{i}.txt").write_text("\n".join(f"{v}.0" for v in perm[n_test:]))
        (root / f"index_test_{i}.txt").write_text("\n".join(map(str, perm[:n_test])))
    (root / "n_splits.txt").write_text(f"{n_splits}\n")
    (root / "n_hidden.txt").write_text("50\n")
    (root / "n_epochs.txt").write_text("40\n")
    return root


@pytest.fixture
def uci_dir(tmp_path) -> Path:
    return write_uci(tmp_path / "toy")


def test_loads_data_indices_and_splits(uci_dir):
    ds = load_uci(uci_dir)
    raw = np.loadtxt(uci_dir / "data.txt")
    assert ds.name == "toy" and ds.n_splits == 2 and ds.n_hidden == 50 and ds.n_epochs == 40
    assert ds.features == (0, 1, 2) and ds.target == 3 and ds.n_features == 3
    for i, split in enumerate(ds.splits):
        tr = np.loadtxt(uci_dir / f"index_train_{i}.txt").astype(int)
        te = np.loadtxt(uci_dir / f"index_test_{i}.txt").astype(int)
        assert split.index == i
        np.testing.assert_allclose(split.x_train.numpy(), raw[tr, :3], rtol=1e-6)
        np.testing.assert_allclose(split.y_test.numpy(), raw[te, 3], rtol=1e-6)
        assert split.x_train.dtype == torch.float32 and split.y_train.shape == (len(tr),)
    assert ds.split(1, dtype=torch.float64).x_test.dtype == torch.float64
    with pytest.raises(ValueError, match=r"split index must be an integer in \[0, 2\)"):
        ds.split(2)


@pytest.mark.parametrize(
    "name",
    ["data.txt", "index_features.txt", "index_target.txt", "index_test_1.txt", "n_epochs.txt"],
)
def test_missing_file_is_named(uci_dir, name):
    (uci_dir / name).unlink()
    with pytest.raises(UCIFormatError, match=f"missing file {name}"):
        load_uci(uci_dir)


def test_not_a_directory(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        load_uci(tmp_path / "nope")


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("index_train_0.txt", "1\n2\nthree\n", r"index_train_0.txt must hold whitespace-separated "
         r"integers, found 'three'"),
        ("index_features.txt", "0 1.5\n", r"index_features.txt must hold integers, found '1.5'"),
        ("index_test_1.txt", "", "index_test_1.txt is empty"),
        ("index_target.txt", "2 3\n", r"index_target.txt must hold one column index"),
        ("index_target.txt", "2\n", "target column 2 is also listed"),
        ("n_splits.txt", "0\n", r"n_splits.txt must hold one integer >= 1, got \[0\]"),
        ("n_hidden.txt", "50 100\n", "n_hidden.txt must hold one integer"),
        ("index_train_1.txt", "1 2 2 3\n", "index_train_1.txt lists row index 2 more than once"),
        ("data.txt", "1 2 x 4\n", "data.txt must be a table of numbers"),
        ("data.txt", "1 2 nan 4\n", r"data.txt contains NaN or inf \(first in row 0\)"),
    ],
)  # fmt: skip
def test_malformed_files(uci_dir, name, text, match):
    (uci_dir / name).write_text(text)
    with pytest.raises(UCIFormatError, match=match):
        load_uci(uci_dir)


def test_index_out_of_range_names_file_and_value(uci_dir):
    (uci_dir / "index_test_0.txt").write_text("0\n30\n")
    with pytest.raises(UCIFormatError, match=r"index_test_0.txt holds row index 30, out of range"):
        load_uci(uci_dir)
    write_uci(uci_dir)
    (uci_dir / "index_features.txt").write_text("0\n-1\n")
    with pytest.raises(UCIFormatError, match=r"index_features.txt holds column index -1"):
        load_uci(uci_dir)


def test_more_splits_than_files(uci_dir):
    (uci_dir / "n_splits.txt").write_text("3\n")
    with pytest.raises(UCIFormatError, match="missing file index_train_2.txt"):
        load_uci(uci_dir)


def test_overlapping_train_and_test(uci_dir):
    train = (uci_dir / "index_train_1.txt").read_text().split()
    (uci_dir / "index_test_1.txt").write_text(f"{train[3]}\n")
    with pytest.raises(UCIFormatError, match=r"split 1: 1 row\(s\) are in both"):
        load_uci(uci_dir)


def test_standardizer_uses_training_statistics_and_maps_back():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64) * 4 + 2
    x[:, 2] = 7.0  # a constant feature: std 1, maps to 0
    y = torch.randn(50, generator=g, dtype=torch.float64) * 3 - 5
    s = Standardizer.fit(x, y)
    xs, ys = s.transform_x(x), s.transform_y(y)
    np.testing.assert_allclose(xs[:, :2].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(xs[:, :2].std(0, correction=0), 1, atol=1e-12)
    assert torch.equal(xs[:, 2], torch.zeros(50, dtype=torch.float64))
    np.testing.assert_allclose(s.y_std, np.std(y.numpy()), rtol=1e-12)
    torch.testing.assert_close(s.inverse_mean(ys), y)
    # Change of variables: a Gaussian on the standardised scale is, on the original scale, the
    # Gaussian with mapped mean and variance, and its log-density differs by -log(y_std).
    mu, var = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    z = torch.distributions.Normal(mu, var.sqrt()).log_prob(ys)
    direct = torch.distributions.Normal(s.inverse_mean(mu), s.inverse_variance(var).sqrt())
    torch.testing.assert_close(z + s.log_density_correction(), direct.log_prob(y))
    assert s.log_density_correction() == pytest.approx(-math.log(s.y_std))
    with pytest.raises(ValueError, match=r"expects x \(N, F\) and y \(N,\)"):
        Standardizer.fit(x, y[:10])


def test_split_standardizer_ignores_test_rows(uci_dir):
    split = load_uci(uci_dir).split(0, dtype=torch.float64)
    s = split.standardizer()
    torch.testing.assert_close(s.x_mean, split.x_train.mean(0))
    assert s.y_mean == pytest.approx(float(split.y_train.mean()))
