"""OOD-detection metrics against scikit-learn, by hand and as properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from bayesdl.metrics import fpr95, fpr_at_tpr, ood_aupr, ood_auroc

SIZES = [(1, 1), (1, 5), (6, 3), (50, 80), (400, 250)]


def scores(n_in: int, n_out: int, seed: int, tied: bool) -> tuple[np.ndarray, np.ndarray]:
    """OOD scores shifted up a little; ``tied`` draws from a few integers so ties are common."""
    rng = np.random.default_rng(seed)
    if tied:
        return rng.integers(0, 6, size=n_in).astype(float), rng.integers(2, 8, size=n_out) * 1.0
    return rng.normal(size=n_in), rng.normal(loc=1.0, size=n_out)


def sklearn_inputs(s_in: np.ndarray, s_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.concatenate([np.zeros(len(s_in)), np.ones(len(s_out))])
    return labels, np.concatenate([s_in, s_out])


def sklearn_fpr_at_tpr(s_in: np.ndarray, s_out: np.ndarray, tpr: float) -> float:
    fpr_curve, tpr_curve, _ = roc_curve(*sklearn_inputs(s_in, s_out), drop_intermediate=False)
    return float(fpr_curve[np.argmax(tpr_curve >= tpr)])


def t(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x)


# ---------------------------------------------------------------- against scikit-learn


@pytest.mark.parametrize(("n_in", "n_out"), SIZES)
@pytest.mark.parametrize("tied", [False, True])
def test_auroc_matches_sklearn(n_in, n_out, tied):
    s_in, s_out = scores(n_in, n_out, seed=n_in * 7 + n_out, tied=tied)
    expected = roc_auc_score(*sklearn_inputs(s_in, s_out))
    assert ood_auroc(t(s_in), t(s_out)).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("n_in", "n_out"), SIZES)
@pytest.mark.parametrize("tied", [False, True])
def test_aupr_matches_sklearn(n_in, n_out, tied):
    s_in, s_out = scores(n_in, n_out, seed=n_in * 11 + n_out, tied=tied)
    expected = average_precision_score(*sklearn_inputs(s_in, s_out))
    assert ood_aupr(t(s_in), t(s_out)).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("n_in", "n_out"), SIZES)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("tpr", [0.05, 0.5, 0.8, 0.95, 1.0])
def test_fpr_at_tpr_matches_sklearn_roc_curve(n_in, n_out, tied, tpr):
    s_in, s_out = scores(n_in, n_out, seed=n_in * 13 + n_out, tied=tied)
    expected = sklearn_fpr_at_tpr(s_in, s_out, tpr)
    assert fpr_at_tpr(t(s_in), t(s_out), tpr=tpr).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n_out", [20, 40, 100, 60])
def test_fpr95_exact_tpr_boundary(n_out):
    # With N_out a multiple of 20, exactly 95% of the OOD examples can be flagged; 19/20 must
    # count as reaching 0.95 (sklearn compares k / N_out >= 0.95 in float64).
    s_out = np.arange(n_out, dtype=float) + 0.5
    s_in = np.arange(200, dtype=float) / 2
    expected = sklearn_fpr_at_tpr(s_in, s_out, 0.95)
    assert fpr95(t(s_in), t(s_out)).item() == pytest.approx(expected, abs=1e-12)
    assert fpr95(t(s_in).float(), t(s_out).float()).item() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- by hand


def test_hand_computed():
    s_in = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    s_out = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    # AUROC: out=2 beats 1, ties 2 -> 1.5; out=3 beats 1, 2, ties 3 -> 2.5; out=4 -> 3. 7/9.
    assert ood_auroc(s_in, s_out).item() == pytest.approx(7 / 9, abs=1e-15)
    # AP: thresholds 4, 3, 2 each add one OOD example (recall step 1/3) at precisions
    # 1/1, 2/3 and 3/5: (1 + 2/3 + 3/5) / 3 = 34/45.
    assert ood_aupr(s_in, s_out).item() == pytest.approx(34 / 45, abs=1e-15)
    # All three OOD examples are first flagged at threshold 2, which flags in-dist {2, 3}.
    assert fpr95(s_in, s_out).item() == pytest.approx(2 / 3, abs=1e-15)
    assert fpr_at_tpr(s_in, s_out, tpr=0.3).item() == 0.0  # threshold 4 flags 1/3 of OOD
    assert fpr_at_tpr(s_in, s_out, tpr=0.5).item() == pytest.approx(1 / 3)  # threshold 3


def test_perfect_and_reversed_separation():
    s_in = torch.tensor([0.0, 1.0, 2.0])
    s_out = torch.tensor([5.0, 6.0])
    assert ood_auroc(s_in, s_out).item() == 1.0
    assert ood_aupr(s_in, s_out).item() == 1.0
    assert fpr95(s_in, s_out).item() == 0.0
    assert ood_auroc(s_out, s_in).item() == 0.0
    assert fpr95(s_out, s_in).item() == 1.0


def test_all_tied_is_chance():
    s_in = torch.ones(4)
    s_out = torch.ones(6)
    assert ood_auroc(s_in, s_out).item() == 0.5
    assert ood_aupr(s_in, s_out).item() == pytest.approx(0.6)  # the OOD fraction
    assert fpr95(s_in, s_out).item() == 1.0


# ---------------------------------------------------------------- dtype, device, input kinds

METRICS = [ood_auroc, ood_aupr, fpr95]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    ("dtype_in", "dtype_out", "expected"),
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.float64, torch.float32, torch.float64),
        (torch.int64, torch.float32, torch.float32),
        (torch.int64, torch.int32, torch.get_default_dtype()),
    ],
)
def test_result_dtype(metric, dtype_in, dtype_out, expected):
    out = metric(torch.tensor([0, 1, 2, 3]).to(dtype_in), torch.tensor([2, 3, 5]).to(dtype_out))
    assert out.shape == ()
    assert out.dtype == expected


@pytest.mark.parametrize("metric", METRICS)
def test_numpy_and_integer_scores(metric):
    s_in, s_out = scores(30, 20, seed=0, tied=True)
    reference = metric(t(s_in), t(s_out)).item()
    assert metric(s_in, s_out).item() == pytest.approx(reference, abs=1e-12)
    ints = metric(t(s_in).long(), t(s_out).long()).item()
    assert ints == pytest.approx(reference, abs=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_boolean_scores_are_allowed(metric):
    out = metric(torch.tensor([False, False, True]), torch.tensor([True, True]))
    assert out.item() == pytest.approx(metric(torch.tensor([0, 0, 1]), torch.tensor([1, 1])).item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("metric", METRICS)
def test_result_on_input_device(metric):
    s_in, s_out = scores(100, 80, seed=1, tied=True)
    out = metric(t(s_in).cuda(), t(s_out).cuda())
    assert out.device.type == "cuda"
    assert out.item() == pytest.approx(metric(t(s_in), t(s_out)).item(), abs=1e-12)


# ---------------------------------------------------------------- properties

score_lists = st.lists(
    st.one_of(st.integers(-3, 3).map(float), st.floats(-1e6, 1e6)), min_size=1, max_size=30
)


@settings(max_examples=80, deadline=None)
@given(s_in=score_lists, s_out=score_lists)
def test_auroc_swap_sums_to_one(s_in, s_out):
    a = ood_auroc(torch.tensor(s_in, dtype=torch.float64), torch.tensor(s_out, dtype=torch.float64))
    b = ood_auroc(torch.tensor(s_out, dtype=torch.float64), torch.tensor(s_in, dtype=torch.float64))
    assert a.item() + b.item() == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(s_in=score_lists, s_out=score_lists)
def test_invariant_to_increasing_transform(s_in, s_out):
    # Replace every score by 10 * (rank among the distinct scores) - 7: a strictly increasing
    # map computed exactly, which must leave all three rank-based metrics unchanged.
    x_in = torch.tensor(s_in, dtype=torch.float64)
    x_out = torch.tensor(s_out, dtype=torch.float64)
    _, rank = torch.unique(torch.cat([x_in, x_out]), return_inverse=True)
    mapped = 10.0 * rank.double() - 7.0
    m_in, m_out = mapped[: len(s_in)], mapped[len(s_in) :]
    for metric in METRICS:
        assert metric(m_in, m_out).item() == pytest.approx(metric(x_in, x_out).item(), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(s_in=score_lists, s_out=score_lists, a=st.floats(0.01, 1.0), b=st.floats(0.01, 1.0))
def test_fpr_is_monotone_in_tpr_and_bounded(s_in, s_out, a, b):
    x_in = torch.tensor(s_in, dtype=torch.float64)
    x_out = torch.tensor(s_out, dtype=torch.float64)
    lo, hi = sorted([a, b])
    assert 0.0 <= fpr_at_tpr(x_in, x_out, lo).item() <= fpr_at_tpr(x_in, x_out, hi).item() <= 1
    assert 0.0 <= ood_aupr(x_in, x_out).item() <= 1.0


# ---------------------------------------------------------------- bad input

GOOD = torch.tensor([0.1, 0.5])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    ("s_in", "s_out", "error", "match"),
    [
        ([0.1, 0.5], GOOD, TypeError, "score_in must be a torch.Tensor or a numpy.ndarray"),
        (GOOD, 0.3, TypeError, "score_out must be a torch.Tensor"),
        (torch.tensor([]), GOOD, ValueError, "score_in is empty"),
        (GOOD, torch.tensor([]), ValueError, "score_out is empty"),
        (GOOD[None], GOOD, ValueError, r"score_in must have shape \(N_in,\)"),
        (GOOD, GOOD[:, None], ValueError, r"score_out must have shape \(N_out,\)"),
        (torch.tensor([0.1, float("nan")]), GOOD, ValueError, "score_in must be finite"),
        (GOOD, torch.tensor([float("-inf")]), ValueError, "score_out must be finite"),
        (GOOD.to(torch.complex64), GOOD, TypeError, "real numbers"),
    ],
)
def test_bad_scores(metric, s_in, s_out, error, match):
    with pytest.raises(error, match=match):
        metric(s_in, s_out)


@pytest.mark.parametrize(
    ("tpr", "error", "match"),
    [
        (0.0, ValueError, r"tpr must be a fraction in \(0, 1\], got 0.0"),
        (1.5, ValueError, "fraction"),
        (95, ValueError, "e.g. tpr=0.95 for 95%"),
        (float("nan"), ValueError, "fraction"),
        ("0.95", TypeError, "number"),
        (None, TypeError, "number"),
    ],
)
def test_bad_tpr(tpr, error, match):
    with pytest.raises(error, match=match):
        fpr_at_tpr(GOOD, GOOD, tpr=tpr)
