"""Selective-prediction metrics on hand-computed cases (with ties) and as properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bayesdl.metrics import accuracy_at_coverage, aurc, risk_coverage_curve

F64 = torch.float64


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def reference_aurc(uncertainty: np.ndarray, loss: np.ndarray) -> float:
    """The docstring's definition, literally: mean over k of the risk at the k-th threshold."""
    order = np.argsort(uncertainty, kind="stable")
    total = 0.0
    for k in range(1, len(loss) + 1):
        threshold = uncertainty[order[k - 1]]
        kept = uncertainty <= threshold  # the whole tied group enters with the k-th example
        total += loss[kept].mean()
    return total / len(loss)


# ---------------------------------------------------------------- by hand


def test_curve_and_aurc_without_ties():
    # Sorted by uncertainty: 0.1 (loss 0), 0.2 (loss 1), 0.3 (loss 1).
    # Risks of the 1, 2, 3 most certain: 0, 1/2, 2/3 -> AURC = (0 + 1/2 + 2/3) / 3 = 7/18.
    uncertainty = f64([0.3, 0.1, 0.2])
    loss = f64([1.0, 0.0, 1.0])
    coverage, risk = risk_coverage_curve(uncertainty, loss)
    torch.testing.assert_close(coverage, f64([1 / 3, 2 / 3, 1.0]))
    torch.testing.assert_close(risk, f64([0.0, 1 / 2, 2 / 3]))
    assert aurc(uncertainty, loss).item() == pytest.approx(7 / 18, abs=1e-15)


@pytest.mark.parametrize("loss", [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
def test_curve_and_aurc_with_ties(loss):
    # The two examples at 0.2 enter together, whatever their order:
    # group {0.1}: n=1, risk 0; group {0.2, 0.2}: n=2, risk (0 + 1 + 0) / 3 = 1/3.
    # AURC = (1 * 0 + 2 * 1/3) / 3 = 2/9 (not (0 + 1/2 + 1/3) / 3 nor (0 + 0 + 1/3) / 3).
    uncertainty = f64([0.1, 0.2, 0.2])
    coverage, risk = risk_coverage_curve(uncertainty, f64(loss))
    torch.testing.assert_close(coverage, f64([1 / 3, 1.0]))
    torch.testing.assert_close(risk, f64([0.0, 1 / 3]))
    assert aurc(uncertainty, f64(loss)).item() == pytest.approx(2 / 9, abs=1e-15)


def test_aurc_two_tied_groups():
    # Groups (most certain first): {0, 1} with losses 1, 0 -> risk 1/2 for k = 1, 2;
    # {5, 5, 5} with losses 0, 0, 1 -> risk 2/5 for k = 3, 4, 5.
    # AURC = (2 * 1/2 + 3 * 2/5) / 5 = (1 + 6/5) / 5 = 11/25.
    uncertainty = torch.tensor([5, 0, 5, 0, 5])
    loss = f64([0.0, 1.0, 0.0, 0.0, 1.0])
    assert aurc(uncertainty, loss).item() == pytest.approx(11 / 25, abs=1e-15)
    coverage, risk = risk_coverage_curve(uncertainty, loss)
    torch.testing.assert_close(coverage, f64([2 / 5, 1.0]))
    torch.testing.assert_close(risk, f64([1 / 2, 2 / 5]))


def test_all_tied_gives_mean_loss():
    loss = f64([0.3, 2.0, 0.0, 1.1])
    uncertainty = torch.full((4,), 0.7, dtype=F64)
    assert aurc(uncertainty, loss).item() == pytest.approx(loss.mean().item(), abs=1e-15)
    coverage, risk = risk_coverage_curve(uncertainty, loss)
    torch.testing.assert_close(coverage, f64([1.0]))
    torch.testing.assert_close(risk, loss.mean()[None])


def test_aurc_of_oracle_and_anti_oracle():
    # Two errors in four: an oracle that puts them last has risks 0, 0, 1/3, 1/2 -> 5/24;
    # putting them first gives risks 1, 1, 2/3, 1/2 -> 19/24.
    loss = f64([0.0, 0.0, 1.0, 1.0])
    assert aurc(f64([1.0, 2.0, 3.0, 4.0]), loss).item() == pytest.approx(5 / 24, abs=1e-15)
    assert aurc(f64([4.0, 3.0, 2.0, 1.0]), loss).item() == pytest.approx(19 / 24, abs=1e-15)


def test_accuracy_at_coverage_hand_computed():
    # Stable ascending order: index 1 (0.1), index 2 (0.1), index 0 (0.5), index 3 (0.9),
    # with correct = 0, 1, 1, 1 in that order.
    uncertainty = f64([0.5, 0.1, 0.1, 0.9])
    correct = torch.tensor([True, False, True, True])
    expected = {0.25: 0.0, 0.5: 0.5, 0.6: 2 / 3, 0.75: 2 / 3, 0.76: 3 / 4, 1.0: 3 / 4, 0.01: 0.0}
    for coverage, acc in expected.items():
        assert accuracy_at_coverage(uncertainty, correct, coverage).item() == pytest.approx(acc)


def test_accuracy_at_coverage_ties_keep_lower_index_first():
    uncertainty = torch.zeros(4)
    correct = torch.tensor([1, 0, 0, 1])
    assert accuracy_at_coverage(uncertainty, correct, 0.25).item() == 1.0
    assert accuracy_at_coverage(uncertainty, correct, 0.5).item() == 0.5
    assert accuracy_at_coverage(uncertainty, correct.flip(0), 0.25).item() == 1.0


@pytest.mark.parametrize(
    ("coverage", "n_kept"), [(0.07, 7), (0.14, 14), (0.55, 55), (0.3, 30), (0.071, 8), (1.0, 100)]
)
def test_accuracy_at_coverage_count_is_robust_to_roundoff(coverage, n_kept):
    # 0.07 * 100 = 7.000000000000001 in float64 (likewise 0.14, 0.55); the intended 7 examples
    # must be kept, not 8.
    uncertainty = torch.arange(100, dtype=F64)
    correct = torch.zeros(100)
    correct[:n_kept] = 1.0  # all kept examples are right, the next one is wrong
    assert accuracy_at_coverage(uncertainty, correct, coverage).item() == 1.0


def test_accuracy_at_coverage_large_tied_input_is_stable():
    # Many ties: an unstable sort would mix the later (wrong) examples into the kept half.
    uncertainty = torch.zeros(20_000)
    correct = torch.arange(20_000) < 10_000
    assert accuracy_at_coverage(uncertainty, correct, 0.5).item() == 1.0
    uncertainty[::2] = 1.0  # now the odd indices are the most certain, in index order
    correct = torch.zeros(20_000, dtype=torch.bool)
    correct[1:10_000:2] = True
    assert accuracy_at_coverage(uncertainty, correct, 0.25).item() == 1.0


# ---------------------------------------------------------------- against the definition


@pytest.mark.parametrize(("batch", "levels"), [(1, 1), (10, 3), (57, 8), (300, 1000)])
def test_aurc_matches_reference_definition(batch, levels):
    rng = np.random.default_rng(batch)
    uncertainty = rng.integers(0, levels, size=batch).astype(float)
    loss = rng.exponential(size=batch)
    got = aurc(torch.as_tensor(uncertainty), torch.as_tensor(loss)).item()
    assert got == pytest.approx(reference_aurc(uncertainty, loss), rel=1e-12)


def test_without_ties_aurc_is_mean_of_prefix_risks():
    rng = np.random.default_rng(0)
    uncertainty = rng.permutation(200).astype(float)
    loss = rng.integers(0, 2, size=200).astype(float)
    sorted_loss = loss[np.argsort(uncertainty)]
    prefix_risk = np.cumsum(sorted_loss) / np.arange(1, 201)
    coverage, risk = risk_coverage_curve(uncertainty, loss)  # numpy in
    np.testing.assert_allclose(risk.numpy(), prefix_risk, rtol=1e-12)
    np.testing.assert_allclose(coverage.numpy(), np.arange(1, 201) / 200, rtol=1e-12)
    assert aurc(uncertainty, loss).item() == pytest.approx(prefix_risk.mean(), rel=1e-12)


def test_accuracy_at_full_coverage_is_accuracy():
    rng = np.random.default_rng(1)
    correct = rng.integers(0, 2, size=77)
    uncertainty = rng.normal(size=77)
    got = accuracy_at_coverage(torch.as_tensor(uncertainty), torch.as_tensor(correct), 1.0)
    assert got.item() == pytest.approx(correct.mean(), abs=1e-12)


# ---------------------------------------------------------------- dtype and device


@pytest.mark.parametrize(
    ("uncertainty", "values", "expected"),
    [
        (torch.tensor([0.1, 0.2]), torch.tensor([1.0, 0.0]), torch.float32),
        (torch.tensor([0.1, 0.2], dtype=F64), torch.tensor([1, 0]), F64),
        (torch.tensor([1, 2]), torch.tensor([True, False]), torch.get_default_dtype()),
    ],
)
def test_result_dtype(uncertainty, values, expected):
    out = aurc(uncertainty, values)
    assert out.shape == () and out.dtype == expected
    out = accuracy_at_coverage(uncertainty, values, 0.5)
    assert out.shape == () and out.dtype == expected
    coverage, risk = risk_coverage_curve(uncertainty, values)
    assert coverage.dtype == risk.dtype == expected
    assert coverage.ndim == risk.ndim == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_result_on_input_device():
    uncertainty = torch.tensor([0.3, 0.1, 0.1, 0.7], device="cuda")
    loss = torch.tensor([1.0, 0.0, 1.0, 0.0], device="cuda")
    assert aurc(uncertainty, loss).device.type == "cuda"
    assert accuracy_at_coverage(uncertainty, 1 - loss, 0.5).device.type == "cuda"
    assert all(x.device.type == "cuda" for x in risk_coverage_curve(uncertainty, loss))
    assert aurc(uncertainty, loss).item() == pytest.approx(aurc(uncertainty.cpu(), loss.cpu()))


# ---------------------------------------------------------------- properties

cases = st.integers(1, 40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 5), min_size=n, max_size=n),
        st.lists(st.floats(-10, 10), min_size=n, max_size=n),
        st.integers(0, 2**31 - 1),
    )
)


@settings(max_examples=80, deadline=None)
@given(case=cases)
def test_aurc_between_min_and_max_loss_and_order_free(case):
    uncertainty, loss, seed = case
    u, l_ = torch.tensor(uncertainty, dtype=F64), torch.tensor(loss, dtype=F64)
    value = aurc(u, l_).item()
    assert min(loss) - 1e-9 <= value <= max(loss) + 1e-9
    perm = torch.randperm(len(loss), generator=torch.Generator().manual_seed(seed))
    assert aurc(u[perm], l_[perm]).item() == pytest.approx(value, abs=1e-9)
    coverage, risk = risk_coverage_curve(u[perm], l_[perm])
    expected_coverage, expected_risk = risk_coverage_curve(u, l_)
    torch.testing.assert_close(coverage, expected_coverage)
    torch.testing.assert_close(risk, expected_risk)
    assert coverage[-1].item() == 1.0
    assert risk[-1].item() == pytest.approx(l_.mean().item(), abs=1e-9)
    assert bool((coverage.diff() > 0).all())


# ---------------------------------------------------------------- bad input

U = torch.tensor([0.1, 0.2, 0.3])
L = torch.tensor([0.0, 1.0, 1.0])


@pytest.mark.parametrize("metric", [aurc, risk_coverage_curve])
@pytest.mark.parametrize(
    ("uncertainty", "loss", "error", "match"),
    [
        ([0.1, 0.2, 0.3], L, TypeError, "uncertainty must be a torch.Tensor or a numpy.ndarray"),
        (U, None, TypeError, "loss must be a torch.Tensor"),
        (torch.tensor([]), torch.tensor([]), ValueError, "uncertainty is empty"),
        (U[None], L, ValueError, r"uncertainty must have shape \(B,\)"),
        (U, L[:, None], ValueError, r"loss must have shape \(B,\)"),
        (U, L[:2], ValueError, "uncertainty has 3, loss has 2"),
        (torch.tensor([0.1, float("nan"), 0.3]), L, ValueError, "uncertainty must be finite"),
        (U, torch.tensor([0.0, float("inf"), 1.0]), ValueError, "loss must be finite"),
        (U.to(torch.complex64), L, TypeError, "real numbers"),
    ],
)
def test_bad_uncertainty_or_loss(metric, uncertainty, loss, error, match):
    with pytest.raises(error, match=match):
        metric(uncertainty, loss)


@pytest.mark.parametrize(
    ("correct", "coverage", "error", "match"),
    [
        (torch.tensor([1, 0, 2]), 0.5, ValueError, "correct must be boolean or hold only 0 and 1"),
        (torch.tensor([1.0, 0.5, 0.0]), 0.5, ValueError, "got 0.5 at index 1"),
        (torch.tensor([1, 0]), 0.5, ValueError, "same length"),
        (torch.tensor([1, 0, 1]), 0.0, ValueError, r"coverage must be a fraction in \(0, 1\]"),
        (torch.tensor([1, 0, 1]), 1.01, ValueError, "fraction"),
        (torch.tensor([1, 0, 1]), 50, ValueError, "coverage=0.95 for 95%"),
        (torch.tensor([1, 0, 1]), "half", TypeError, "coverage must be a number"),
    ],
)
def test_bad_accuracy_at_coverage_input(correct, coverage, error, match):
    with pytest.raises(error, match=match):
        accuracy_at_coverage(U, correct, coverage)
