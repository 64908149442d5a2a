"""Parallel normal draws: right distribution, reproducible, independent of the thread count."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from bayesdl._random import MIN_PARALLEL, randn


def test_large_draws_are_standard_normal_and_streams_are_independent():
    z = randn(MIN_PARALLEL + 11, generator=torch.Generator().manual_seed(0))
    assert z.shape == (MIN_PARALLEL + 11,) and z.dtype == torch.float32
    sample = z[::41].double().numpy()  # a thinned sample keeps the KS test quick
    assert stats.kstest(sample, "norm").pvalue > 1e-3
    # neighbouring streams (the chunks) are not copies or shifts of each other
    a, b = z.chunk(8)[:2]
    n = min(len(a), len(b))
    assert abs(torch.corrcoef(torch.stack([a[:n], b[:n]]))[0, 1]) < 0.01


def test_same_generator_state_same_numbers_whatever_the_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = randn(3, MIN_PARALLEL // 2, generator=torch.Generator().manual_seed(5))
        torch.set_num_threads(max(2, threads))
        many = randn(3, MIN_PARALLEL // 2, generator=torch.Generator().manual_seed(5))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    other = randn(3, MIN_PARALLEL // 2, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(one, other)


def test_small_draws_are_torch_randn():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(randn(4, 5, generator=g1), torch.randn(4, 5, generator=g2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype(dtype):
    assert randn(MIN_PARALLEL, dtype=dtype).dtype == dtype
