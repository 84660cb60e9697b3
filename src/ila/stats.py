"""The statistics of ranking agreement, numbers in and numbers out (no rankings, files or models here):

* the Jaccard index ``J(A, B) = |A & B| / |A | B|`` of two sets (:func:`jaccard`);
* its expectation for two *independent uniformly random* sets of the same sizes from the same ``n`` items
  (hypergeometric intersection, :func:`expected_random_jaccard`);
* the one-sided p-value ``P(J_random >= J_observed)``, exactly from the hypergeometric tail or by Monte Carlo
  permutation (:func:`permutation_p_value`);
* Spearman's rho (average ranks for ties) and Kendall's tau-b of two score mappings over their common keys
  (:func:`spearman`, :func:`kendall_tau`);
* the size of a top fraction (:func:`top_count`), the check of a list of fractions (:func:`check_fractions`)
  and the relative-depth bucket of a block (:func:`depth_bucket`).

:mod:`ila.overlap` applies them to rankings (and re-exports them).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from .errors import RankingError


class HasScores(Protocol):
    """Anything with a ``scores`` mapping of key to score, such as :class:`ila.ranking.Ranking`."""

    @property
    def scores(self) -> Mapping[str, float]: ...


Scores = HasScores | Mapping[str, float]


def top_count(fraction: float, n: int) -> int:
    """``max(1, round(fraction * n))``, the rule of :meth:`ila.ranking.Ranking.count`."""
    return max(1, round(fraction * n))


def check_fractions(fractions: Iterable[float]) -> list[float]:
    """The fractions, each in (0, 1], sorted and without repeats; raises on a bad or missing one."""
    out = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) <= 1.0:
            raise RankingError(f"fractions must be in (0, 1], got {f!r}")
        out.append(float(f))
    if not out:
        raise RankingError("no fraction to compare at")
    return sorted(set(out))


def depth_bucket(block_index: int, blocks: int, buckets: int) -> int:
    """The depth bucket of block ``i`` of ``N`` among ``B`` buckets: ``min(B - 1, floor(i / (N - 1) * B))``
    computed exactly; 0 for a one-block model."""
    if blocks <= 1:
        return 0
    return min(buckets - 1, block_index * buckets // (blocks - 1))


# -- set statistics ------------------------------------------------------------------------------------------


def jaccard(a: Collection[Any], b: Collection[Any]) -> float:
    """``|A & B| / |A | B|``; two empty sets give 1.0 (they agree perfectly)."""
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return 1.0 if union == 0 else len(sa & sb) / union


def _check_sizes(n: int, k1: int, k2: int) -> None:
    for name, v in (("n", n), ("k1", k1), ("k2", k2)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise RankingError(f"{name} must be a non-negative integer, got {v!r}")
    if k1 > n or k2 > n:
        raise RankingError(f"set sizes {k1} and {k2} cannot exceed the number of items n = {n}")


def _hypergeom_pmf(n: int, k1: int, k2: int) -> list[tuple[int, float]]:
    """``[(i, P(|A & B| = i))]`` for a fixed ``A`` of size ``k1`` and a uniformly random ``B`` of size ``k2``
    from ``n`` items: ``P(i) = C(k1, i) C(n - k1, k2 - i) / C(n, k2)``, computed from exact integers."""
    total = math.comb(n, k2)
    lo, hi = max(0, k1 + k2 - n), min(k1, k2)
    return [(i, math.comb(k1, i) * math.comb(n - k1, k2 - i) / total) for i in range(lo, hi + 1)]


def expected_random_jaccard(n: int, k1: int, k2: int) -> float:
    """Exact expected Jaccard index of two independent uniformly random subsets of sizes ``k1`` and ``k2`` of
    ``n`` items.

    Their intersection ``X`` is hypergeometric and ``|A | B| = k1 + k2 - X``, so

        E[J] = sum_{i = max(0, k1 + k2 - n)}^{min(k1, k2)}
                   C(k1, i) C(n - k1, k2 - i) / C(n, k2) * i / (k1 + k2 - i)

    Two empty sets count as J = 1.
    """
    _check_sizes(n, k1, k2)
    if k1 + k2 == 0:
        return 1.0
    return float(sum(p * i / (k1 + k2 - i) for i, p in _hypergeom_pmf(n, k1, k2)))


def _hypergeom_sf(n: int, k1: int, k2: int, i_obs: int) -> float:
    """``P(X >= i_obs)`` for the hypergeometric intersection, as one correctly rounded ratio of integers."""
    lo, hi = max(0, k1 + k2 - n), min(k1, k2)
    start = max(lo, i_obs)
    if start > hi:
        return 0.0
    tail = sum(math.comb(k1, i) * math.comb(n - k1, k2 - i) for i in range(start, hi + 1))
    return tail / math.comb(n, k2)


def permutation_p_value(
    a: Collection[Any], b: Collection[Any], n: int, *, exact: bool = True, rounds: int = 10000, seed: int = 0
) -> float:
    """One-sided p-value ``P(J(A', B') >= J(a, b))`` for independent uniformly random sets ``A'``, ``B'`` of
    sizes ``|a|`` and ``|b|`` from the same ``n`` items: how surprising an overlap this large is by chance.

    For fixed sizes the Jaccard index ``i / (k1 + k2 - i)`` increases with the intersection ``i``, so the
    p-value is the hypergeometric tail ``P(X >= |a & b|)``: ``exact=True`` (the default) computes it from
    exact integer binomials. ``exact=False`` estimates it by Monte Carlo instead: ``rounds`` random pairs of
    sets (seeded by ``seed``), ``p = (1 + #{J_random >= J_observed}) / (1 + rounds)`` (the +1 correction
    keeps the estimate a valid p-value, never 0).

    Disjoint sets give p = 1; two identical sets of size k give ``1 / C(n, k)`` (exact).
    """
    sa, sb = set(a), set(b)
    k1, k2 = len(sa), len(sb)
    _check_sizes(n, k1, k2)
    if len(sa | sb) > n:
        raise RankingError(f"the two sets hold {len(sa | sb)} distinct items, more than n = {n}")
    i_obs = len(sa & sb)
    if k1 == 0 or k2 == 0:  # the intersection is always 0: every random pair is as extreme
        return 1.0
    if exact:
        return _hypergeom_sf(n, k1, k2, i_obs)
    if rounds < 1:
        raise RankingError(f"rounds must be at least 1, got {rounds}")
    rng = np.random.default_rng(seed)
    u = k1 + k2  # J_random >= J_obs  <=>  i (u - i_obs) >= i_obs (u - i)   (denominators are positive)
    hits = 0
    chunk = max(1, min(rounds, 2_000_000 // max(n, 1)))
    done = 0
    while done < rounds:
        m = min(chunk, rounds - done)
        # By symmetry A' can be fixed to items 0..k1-1; B' is the k2 smallest of n uniform keys per row.
        keys = rng.random((m, n))
        b_idx = np.argpartition(keys, k2 - 1, axis=1)[:, :k2]
        inter = (b_idx < k1).sum(axis=1)
        hits += int(np.count_nonzero(inter * (u - i_obs) >= i_obs * (u - inter)))
        done += m
    return (hits + 1) / (rounds + 1)


# -- rank correlations ---------------------------------------------------------------------------------------


def _scores_of(r: Scores) -> Mapping[str, float]:
    return r if isinstance(r, Mapping) else r.scores


def _common(r1: Scores, r2: Scores) -> tuple[np.ndarray, np.ndarray]:
    s1, s2 = _scores_of(r1), _scores_of(r2)
    keys = sorted(set(s1) & set(s2))
    if not keys:
        raise RankingError(
            "the two rankings have no layer (key) in common; compare rankings of different "
            "models with mapping='depth'"
        )
    return (
        np.array([float(s1[k]) for k in keys], dtype=np.float64),
        np.array([float(s2[k]) for k in keys], dtype=np.float64),
    )


def average_ranks(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` (ascending), tied values sharing the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # boundaries of runs of equal values in the sorted array
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of ranks s+1 .. e
    return ranks


def spearman(r1: Scores, r2: Scores) -> float | None:
    """Spearman's rho of the scores over the layers (keys) both hold: the Pearson correlation of their
    average ranks. None where it is undefined (fewer than 2 common keys, or all scores of one side equal)."""
    x, y = _common(r1, r2)
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if den == 0.0:
        return None
    return float(np.clip(float(rx @ ry) / den, -1.0, 1.0))


def kendall_tau(r1: Scores, r2: Scores) -> float | None:
    """Kendall's tau-b of the scores over the common keys:

        tau_b = (n_c - n_d) / sqrt((n_0 - n_x) (n_0 - n_y))

    with ``n_c``/``n_d`` the concordant/discordant pairs, ``n_0 = n (n - 1) / 2`` and ``n_x``, ``n_y`` the
    pairs tied in each. O(n^2) in blocks of rows (a few milliseconds for a few hundred layers). None where
    undefined (fewer than 2 common keys, or all scores of one side equal)."""
    x, y = _common(r1, r2)
    n = len(x)
    if n < 2:
        return None
    s = 0  # n_c - n_d over ordered pairs (each unordered pair counted twice)
    tx = ty = 0  # untied ordered pairs in x, in y
    step = max(1, 4_000_000 // n)
    for lo in range(0, n, step):
        dx = np.sign(x[lo : lo + step, None] - x[None, :])
        dy = np.sign(y[lo : lo + step, None] - y[None, :])
        s += int((dx * dy).sum())
        tx += int(np.count_nonzero(dx))
        ty += int(np.count_nonzero(dy))
    if tx == 0 or ty == 0:
        return None
    return float(np.clip(s / math.sqrt(tx * ty), -1.0, 1.0))


__all__ = [
    "HasScores",
    "Scores",
    "average_ranks",
    "check_fractions",
    "depth_bucket",
    "expected_random_jaccard",
    "jaccard",
    "jaccard_matrix",
    "kendall_tau",
    "mean_interval",
    "permutation_p_value",
    "spearman",
    "top_count",
]


def jaccard_matrix(result: Mapping[str, Any], fraction: float) -> tuple[list[str], list[list[float | None]]]:
    """(labels, square matrix) of the pairwise Jaccard index at ``fraction`` from a :func:`compare_rankings`
    result; the diagonal is 1."""
    labels = [r["label"] for r in result["rankings"]]
    pos = {lab: i for i, lab in enumerate(labels)}
    size = len(labels)
    m: list[list[float | None]] = [[1.0 if i == j else None for j in range(size)] for i in range(size)]
    found = False
    for p in result["pairs"]:
        for o in p["fractions"]:
            if math.isclose(o["fraction"], fraction):
                i, j = pos[p["a"]], pos[p["b"]]
                m[i][j] = m[j][i] = o["jaccard"]
                found = True
    if not found and result["pairs"]:
        raise RankingError(f"the comparison has no fraction {fraction:g} (it has {result['fractions']})")
    return labels, m


# Student's t quantile at 0.975 for 1..30 degrees of freedom (two-sided 95 %); beyond, a close approximation.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)  # fmt: skip


def mean_interval(values: Sequence[float]) -> tuple[float, list[float] | None]:
    """(mean, its 95 % t-interval) of ``values``; no interval for fewer than two values."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, None
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96 + 2.4 / (n - 1)
    half = t * float(np.std(values, ddof=1)) / math.sqrt(n)
    return mean, [mean - half, mean + half]
