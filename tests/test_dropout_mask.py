"""runlora.ops.dropout: the seeded masks are Bernoulli(p) per entry, independent, reproducible, and
applied exactly, whether drawn dense (per-entry uniforms) or sparse (drop positions by gaps)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runlora.ops.dropout import SPARSE_MAX_P, DropMask, draw_mask

SIGMAS = 5.0
SPARSE = [0.01, 0.1, SPARSE_MAX_P]
DENSE = [0.5, 0.9]


def _x(n: int, i: int) -> torch.Tensor:
    return torch.empty(n, i)


def _is_sparse(mask: DropMask) -> bool:
    return mask.dropped is not None


@pytest.mark.parametrize("p", SPARSE + DENSE)
def test_drop_rate_and_independence(p):
    n, i = 2048, 512
    mask = draw_mask(_x(n, i), p, seed=11)
    assert _is_sparse(mask) == (p <= SPARSE_MAX_P)
    dropped = ~mask.keep()
    assert dropped.shape == (n, i) and dropped.dtype == torch.bool
    total = dropped.numel()
    std = math.sqrt(p * (1 - p) / total)
    assert abs(dropped.double().mean().item() - p) < SIGMAS * std
    # a drop does not make the next entry (same row, or wrapping to the next) likelier dropped
    flat = dropped.view(-1)
    pairs = int(flat[:-1].sum())
    after_drop = (flat[1:] & flat[:-1]).sum().item() / pairs
    assert abs(after_drop - p) < SIGMAS * math.sqrt(p * (1 - p) / pairs)
    # every column and every row block sees the same rate (no drift along the flat order)
    for part in (dropped[: n // 2], dropped[n // 2 :], dropped[:, : i // 2], dropped[:, i // 2 :]):
        std = math.sqrt(p * (1 - p) / part.numel())
        assert abs(part.double().mean().item() - p) < SIGMAS * std


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_same_seed_same_mask_other_seed_other_mask(p):
    x = _x(64, 48)
    a, b, c = (draw_mask(x, p, s).keep() for s in (5, 5, 6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_the_sparse_gap_law_has_no_cutoff_at_small_p():
    """With p = 1e-4 the gaps run to thousands; the count of drops still matches p."""
    n = 2_000_000
    mask = draw_mask(_x(n, 1), 1e-4, seed=3)
    k = mask.dropped.numel()
    assert abs(k - n * 1e-4) < SIGMAS * math.sqrt(n * 1e-4)
    assert torch.all(mask.dropped[1:] > mask.dropped[:-1])  # sorted, no repeats
    assert int(mask.dropped.min()) >= 0 and int(mask.dropped.max()) < n


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 40),
    i=st.integers(1, 40),
    p=st.sampled_from(SPARSE + DENSE),
    seed=st.integers(0, 2**62),
    transposed=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_apply_and_masked_add_equal_the_dense_formulas(n, i, p, seed, transposed, dtype):
    torch.manual_seed(seed % 2**31)
    x = torch.randn(i, n, dtype=dtype).t() if transposed else torch.randn(n, i, dtype=dtype)
    mask = draw_mask(x, p, seed)
    keep = mask.keep()
    assert keep.shape == (n, i)
    out = mask.apply(x)
    assert x.numel() == 0 or out.data_ptr() != x.data_ptr()  # a fresh buffer
    assert torch.equal(out, x * keep)
    acc = torch.randn(n, i, dtype=dtype)
    t = torch.randn(n, i, dtype=dtype)
    want = acc.double() + 0.75 * (t.double() * keep)
    got = mask.add_masked_(acc.clone(), t.clone(), 0.75)
    bound = 2 * torch.finfo(dtype).eps * (acc.double().abs() + t.double().abs())
    assert torch.all((got.double() - want).abs() <= bound)
    assert torch.equal(got[~keep], acc[~keep])  # dropped entries: untouched


@pytest.mark.parametrize("p", [0.0, 1e-19, 1e-30])
def test_vanishing_p_drops_nothing_and_does_not_overflow(p):
    mask = draw_mask(_x(300, 7), p, seed=1)
    assert mask.dropped.numel() == 0
    x = torch.randn(300, 7)
    assert torch.equal(mask.apply(x), x)
