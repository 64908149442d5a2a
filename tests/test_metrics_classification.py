"""Classification metrics against scikit-learn and hand-computed calibration cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss

from bayesdl.metrics import accuracy, brier, calibration_bins, ece, mce, nll

SIZES = [(1, 2), (7, 3), (64, 2), (513, 10)]


def random_case(batch: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(n_classes), size=batch)
    y = rng.integers(0, n_classes, size=batch)
    return probs, y


def tied_case(batch: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities on a coarse grid, so that rows often have tied maxima."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 3, size=(batch, n_classes)).astype(np.float64)
    counts[counts.sum(1) == 0, 0] = 1.0
    probs = counts / counts.sum(1, keepdims=True)
    return probs, rng.integers(0, n_classes, size=batch)


def t(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x)


# ---------------------------------------------------------------- against scikit-learn


@pytest.mark.parametrize(("batch", "n_classes"), SIZES)
@pytest.mark.parametrize("make", [random_case, tied_case])
def test_accuracy_matches_sklearn(batch, n_classes, make):
    probs, y = make(batch, n_classes, seed=batch + n_classes)
    expected = accuracy_score(y, probs.argmax(1))
    got = accuracy(t(probs), t(y))
    assert got.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("batch", "n_classes"), SIZES)
def test_nll_matches_sklearn_log_loss(batch, n_classes):
    probs, y = random_case(batch, n_classes, seed=10 + batch)
    expected = log_loss(y, y_proba=probs, labels=list(range(n_classes)))
    assert nll(t(probs), t(y)).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(("batch", "n_classes"), SIZES)
def test_brier_matches_unhalved_sklearn(batch, n_classes):
    probs, y = random_case(batch, n_classes, seed=20 + batch)
    expected = brier_score_loss(y, probs, labels=list(range(n_classes)), scale_by_half=False)
    assert brier(t(probs), t(y)).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("batch", [1, 9, 200])
def test_binary_brier_is_twice_sklearn_binary(batch):
    # sklearn halves the Brier score in the binary case (scale_by_half="auto"); ours never does.
    rng = np.random.default_rng(batch)
    p1 = rng.uniform(size=batch)
    y = rng.integers(0, 2, size=batch)
    probs = np.stack([1 - p1, p1], axis=1)
    got = brier(t(probs), t(y)).item()
    assert got == pytest.approx(2 * brier_score_loss(y, p1), rel=1e-10)
    assert got == pytest.approx(2 * brier_score_loss(y, probs, labels=[0, 1]), rel=1e-10)


def test_sklearn_multiclass_brier_default_is_not_halved():
    # Pin down what sklearn 1.9 computes, since the comparison above relies on it.
    probs, y = random_case(50, 4, seed=3)
    default = brier_score_loss(y, probs, labels=[0, 1, 2, 3])
    assert brier(t(probs), t(y)).item() == pytest.approx(default, rel=1e-10)


# ---------------------------------------------------------------- closed forms and edge values


def test_nll_zero_probability_is_finite():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    tiny = torch.finfo(torch.float64).tiny
    expected = (-math.log(tiny) + math.log(2)) / 2
    got = nll(probs, y)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_perfect_predictions():
    probs = torch.eye(3, dtype=torch.float64)
    y = torch.arange(3)
    assert accuracy(probs, y).item() == 1.0
    assert nll(probs, y).item() == 0.0
    assert brier(probs, y).item() == 0.0
    assert ece(probs, y).item() == 0.0
    assert mce(probs, y).item() == 0.0
    # Always wrong and fully confident: Brier reaches its maximum of 2.
    assert brier(probs, (y + 1) % 3).item() == 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metric", [accuracy, nll, brier, ece, mce])
def test_scalar_dtype_shape_device(metric, dtype):
    probs, y = random_case(20, 3, seed=0)
    out = metric(t(probs).to(dtype), t(y))
    assert out.shape == ()
    assert out.dtype == dtype
    assert out.device == torch.device("cpu")


@pytest.mark.parametrize("metric", [accuracy, nll, brier, ece, mce])
def test_numpy_input_gives_the_same(metric):
    probs, y = random_case(30, 4, seed=1)
    assert metric(probs, y).item() == metric(t(probs), t(y)).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("metric", [accuracy, nll, brier, ece, mce])
def test_result_on_input_device(metric):
    probs, y = random_case(30, 4, seed=1)
    out = metric(t(probs).cuda(), t(y).cuda())
    assert out.device.type == "cuda"
    assert out.item() == pytest.approx(metric(t(probs), t(y)).item(), rel=1e-10)


# ---------------------------------------------------------------- calibration, by hand


def test_ece_mce_hand_computed():
    # n_bins = 5: bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1].
    #   example  probs         y  confidence  prediction  correct  bin
    #   0        [0.90, 0.10]  0  0.90        0           yes      4
    #   1        [0.70, 0.30]  1  0.70        0           no       3
    #   2        [0.35, 0.65]  1  0.65        1           yes      3
    #   3        [0.20, 0.80]  1  0.80 (edge) 1           yes      3
    #   4        [0.55, 0.45]  1  0.55        0           no       2
    # bin 2: n=1, acc 0,   conf 0.55                    -> gap 0.55
    # bin 3: n=3, acc 2/3, conf (0.7+0.65+0.8)/3 = 0.71667 -> gap 0.05
    # bin 4: n=1, acc 1,   conf 0.9                     -> gap 0.10
    # ECE = (1*0.55 + 3*0.05 + 1*0.10) / 5 = 0.16; MCE = 0.55.
    probs = torch.tensor(
        [[0.9, 0.1], [0.7, 0.3], [0.35, 0.65], [0.2, 0.8], [0.55, 0.45]], dtype=torch.float64
    )
    y = torch.tensor([0, 1, 1, 1, 1])
    assert ece(probs, y, n_bins=5).item() == pytest.approx(0.16, abs=1e-12)
    assert mce(probs, y, n_bins=5).item() == pytest.approx(0.55, abs=1e-12)
    counts, acc, conf = calibration_bins(probs.max(1).values, probs.argmax(1) == y, n_bins=5)
    assert counts.tolist() == [0, 0, 1, 3, 1]
    torch.testing.assert_close(acc, torch.tensor([0, 0, 0, 2 / 3, 1], dtype=torch.float64))
    torch.testing.assert_close(conf, torch.tensor([0, 0, 0.55, 2.15 / 3, 0.9], dtype=torch.float64))


def test_ece_single_bin_is_accuracy_minus_mean_confidence():
    probs, y = random_case(100, 3, seed=5)
    probs_t, y_t = t(probs), t(y)
    expected = abs(accuracy(probs_t, y_t) - probs_t.max(1).values.mean())
    assert ece(probs_t, y_t, n_bins=1).item() == pytest.approx(expected.item(), abs=1e-12)
    assert mce(probs_t, y_t, n_bins=1).item() == pytest.approx(expected.item(), abs=1e-12)


def test_calibration_bins_edges():
    # 10 bins; bin i covers (i/10, (i+1)/10]; 0 goes in bin 0.
    above_half = math.nextafter(0.5, 1.0)
    confidence = torch.tensor([0.0, 1.0, 0.5, above_half, 0.1, 0.3, 0.05], dtype=torch.float64)
    correct = torch.tensor([True, False, True, False, False, True, True])
    counts, acc, conf = calibration_bins(confidence, correct, n_bins=10)
    # 0 -> 0, 1 -> 9, 0.5 -> 4 (on the edge), just above 0.5 -> 5, 0.1 -> 0 (edge),
    # 0.3 -> 2 (although 0.3 * 10 = 3.0000000000000004 in float64), 0.05 -> 0.
    assert counts.tolist() == [3, 0, 1, 0, 1, 1, 0, 0, 0, 1]
    assert counts.dtype == torch.int64
    expected_acc = [2 / 3, 0, 1, 0, 1, 0, 0, 0, 0, 0]
    expected_conf = [0.15 / 3, 0, 0.3, 0, 0.5, above_half, 0, 0, 0, 1.0]
    torch.testing.assert_close(acc, torch.tensor(expected_acc, dtype=torch.float64))
    torch.testing.assert_close(conf, torch.tensor(expected_conf, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_calibration_bins_edge_values_in_both_dtypes(dtype):
    n_bins = 15
    edges = torch.arange(1, n_bins + 1, dtype=dtype) / n_bins
    counts, _, _ = calibration_bins(edges, torch.ones(n_bins), n_bins=n_bins)
    assert counts.tolist() == [1] * n_bins  # edge (i+1)/n closes bin i


def test_calibration_bins_match_ceil_reference():
    rng = np.random.default_rng(7)
    confidence = rng.uniform(size=1000)
    correct = rng.integers(0, 2, size=1000)
    n_bins = 12
    index = np.maximum(np.ceil(confidence * n_bins).astype(int) - 1, 0)
    counts, acc, conf = calibration_bins(t(confidence), t(correct), n_bins=n_bins)
    for b in range(n_bins):
        in_bin = index == b
        assert counts[b].item() == in_bin.sum()
        if in_bin.any():
            assert acc[b].item() == pytest.approx(correct[in_bin].mean(), abs=1e-12)
            assert conf[b].item() == pytest.approx(confidence[in_bin].mean(), abs=1e-12)
        else:
            assert acc[b].item() == 0.0
            assert conf[b].item() == 0.0


def test_calibration_bins_accepts_float_and_int_flags():
    confidence = torch.tensor([0.2, 0.9, 0.95])
    as_bool = calibration_bins(confidence, torch.tensor([True, False, True]), n_bins=4)
    as_int = calibration_bins(confidence, torch.tensor([1, 0, 1]), n_bins=4)
    as_float = calibration_bins(confidence, torch.tensor([1.0, 0.0, 1.0]), n_bins=4)
    for a, b, c in zip(as_bool, as_int, as_float, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


# ---------------------------------------------------------------- properties


@st.composite
def probs_and_labels(draw):
    batch = draw(st.integers(1, 30))
    n_classes = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    alpha = draw(st.sampled_from([0.1, 1.0, 10.0]))
    probs = rng.dirichlet(np.full(n_classes, alpha), size=batch)
    probs = probs / probs.sum(1, keepdims=True)
    return t(probs), t(rng.integers(0, n_classes, size=batch))


@settings(max_examples=60, deadline=None)
@given(case=probs_and_labels(), n_bins=st.integers(1, 20))
def test_calibration_errors_in_unit_interval_and_ordered(case, n_bins):
    probs, y = case
    e = ece(probs, y, n_bins=n_bins).item()
    m = mce(probs, y, n_bins=n_bins).item()
    assert 0.0 <= e <= m + 1e-12 <= 1.0 + 1e-12
    assert 0.0 <= brier(probs, y).item() <= 2.0
    assert nll(probs, y).item() >= 0.0


@settings(max_examples=40, deadline=None)
@given(case=probs_and_labels(), seed=st.integers(0, 1000))
def test_metrics_do_not_depend_on_example_order(case, seed):
    probs, y = case
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for metric in (accuracy, nll, brier, ece, mce):
        assert metric(probs[perm], y[perm]).item() == pytest.approx(
            metric(probs, y).item(), abs=1e-12
        )


# ---------------------------------------------------------------- bad input

GOOD_PROBS = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
GOOD_Y = torch.tensor([1, 0])


@pytest.mark.parametrize("metric", [accuracy, nll, brier, ece, mce])
@pytest.mark.parametrize(
    ("probs", "y", "error", "match"),
    [
        ([[0.2, 0.8], [0.6, 0.4]], GOOD_Y, TypeError, "torch.Tensor or a numpy.ndarray"),
        (GOOD_PROBS, [1, 0], TypeError, "torch.Tensor or a numpy.ndarray"),
        (torch.tensor([[0, 1], [1, 0]]), GOOD_Y, TypeError, "floating-point"),
        (torch.tensor([0.2, 0.8]), GOOD_Y, ValueError, r"shape \(B, C\)"),
        (GOOD_PROBS, GOOD_Y[:, None], ValueError, r"shape \(B,\)"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), ValueError, "empty"),
        (GOOD_PROBS, torch.tensor([1, 0, 1]), ValueError, "probs has 2, y has 3"),
        (torch.tensor([[0.2, float("nan")], [0.6, 0.4]]), GOOD_Y, ValueError, "finite"),
        (torch.tensor([[-1.2, 2.2], [0.6, 0.4]]), GOOD_Y, ValueError, "logits.softmax"),
        (torch.tensor([[0.2, 0.7], [0.6, 0.4]]), GOOD_Y, ValueError, "row 0 sums to 0.9"),
        (GOOD_PROBS, torch.tensor([1.0, 0.0]), TypeError, r"integer class labels.*\.long\(\)"),
        (GOOD_PROBS, torch.tensor([True, False]), TypeError, "integer class labels"),
        (GOOD_PROBS, torch.tensor([2, 0]), ValueError, r"in \[0, 2\).*got labels in \[0, 2\]"),
        (GOOD_PROBS, torch.tensor([-1, 0]), ValueError, r"in \[0, 2\)"),
    ],
)
def test_bad_probs_or_labels(metric, probs, y, error, match):
    with pytest.raises(error, match=match):
        metric(probs, y)


@pytest.mark.parametrize("metric", [ece, mce])
@pytest.mark.parametrize(
    ("n_bins", "error", "match"),
    [
        (0, ValueError, "positive int, got 0"),
        (-3, ValueError, "positive int"),
        (2.5, TypeError, "positive int"),
        (True, TypeError, "positive int"),
        ("15", TypeError, "positive int"),
    ],
)
def test_bad_n_bins(metric, n_bins, error, match):
    with pytest.raises(error, match=match):
        metric(GOOD_PROBS, GOOD_Y, n_bins=n_bins)


@pytest.mark.parametrize(
    ("confidence", "correct", "n_bins", "error", "match"),
    [
        (torch.tensor([0.5, 1.2]), torch.tensor([1, 0]), 10, ValueError, r"lie in \[0, 1\]"),
        (torch.tensor([0.5, -0.1]), torch.tensor([1, 0]), 10, ValueError, "not a logit"),
        (torch.tensor([0.5, 0.7]), torch.tensor([1, 2]), 10, ValueError, "only 0 and 1"),
        (torch.tensor([0.5, 0.7]), torch.tensor([1.0, 0.5]), 10, ValueError, "got 0.5"),
        (torch.tensor([1, 0]), torch.tensor([1, 0]), 10, TypeError, "floating-point"),
        (torch.tensor([[0.5, 0.7]]), torch.tensor([1, 0]), 10, ValueError, r"shape \(B,\)"),
        (torch.tensor([0.5, 0.7]), torch.tensor([1]), 10, ValueError, "same length"),
        (torch.tensor([]), torch.tensor([]), 10, ValueError, "empty"),
        (torch.tensor([0.5, float("inf")]), torch.tensor([1, 0]), 10, ValueError, "finite"),
        (torch.tensor([0.5, 0.7]), torch.tensor([1, 0]), 0, ValueError, "n_bins"),
        (torch.tensor([0.5, 0.7]), "yes", 10, TypeError, "correct must be a torch.Tensor"),
    ],
)
def test_bad_calibration_bins_input(confidence, correct, n_bins, error, match):
    with pytest.raises(error, match=match):
        calibration_bins(confidence, correct, n_bins=n_bins)
