"""Epsilon-stability: the factor-based norms equal the dense computation."""

from __future__ import annotations

import pytest
import torch

from ila.stability import LoraFactors, relative_change, update_norms


def _factors(seed, layers=("a", "b", "c"), scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return LoraFactors({n: (scale, torch.randn(4, 12, generator=g), torch.randn(9, 4, generator=g)) for n in layers})


def test_matches_dense_frobenius():
    prev, cur = _factors(0), _factors(1)
    dense = {n: s * b @ a for n, (s, a, b) in cur.factors.items()}
    dense_prev = {n: s * b @ a for n, (s, a, b) in prev.factors.items()}
    norms = update_norms(cur)
    for n in dense:
        assert norms[n] == pytest.approx(torch.linalg.norm(dense[n]).item(), rel=1e-4)
    r, per_layer = relative_change(prev, cur)
    num = sum(torch.linalg.norm(dense[n] - dense_prev[n]) ** 2 for n in dense) ** 0.5
    den = sum(torch.linalg.norm(dense[n]) ** 2 for n in dense) ** 0.5
    assert r == pytest.approx((num / den).item(), rel=1e-4)
    for n in dense:
        expect = torch.linalg.norm(dense[n] - dense_prev[n]) / torch.linalg.norm(dense[n])
        assert per_layer[n] == pytest.approx(expect.item(), rel=1e-4)


def test_identical_snapshots_are_stable_and_zero_update_is_not():
    f = _factors(3)
    assert relative_change(f, f)[0] == pytest.approx(0.0, abs=1e-3)
    zero = LoraFactors({n: (s, a, torch.zeros_like(b)) for n, (s, a, b) in f.factors.items()})
    assert relative_change(zero, f)[0] == pytest.approx(1.0, rel=1e-4)  # everything learned since the start
