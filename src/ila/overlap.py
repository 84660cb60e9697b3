"""How much do two rankings agree? Overlap of their important layers, with the chance level, and rank
correlations of the full scores.

The paper's headline finding (Shi et al., arXiv 2410.17875) is an overlap statistic: the *top-k* layers of
rankings learned on very different alignment datasets overlap by a Jaccard index of about 0.9, rankings agree
across seeds and already at 25 % of training, and agree less across models (~0.7). This module computes those
numbers for any set of ranking files and says how far each is from chance:

* the Jaccard index ``J(A, B) = |A & B| / |A | B|`` of the two top-k sets;
* its expectation for two *independent uniformly random* sets of the same sizes from the same ``n`` items
  (hypergeometric intersection, :func:`expected_random_jaccard`);
* the one-sided p-value ``P(J_random >= J_observed)``, exactly from the hypergeometric tail or by Monte Carlo
  permutation (:func:`permutation_p_value`);
* Spearman's rho (average ranks for ties) and Kendall's tau-b of the full score vectors over the common keys.

Everything is keyed by names, never by positions. Rankings of the same model are compared layer by layer (or
block by block) by full module name. Rankings of models with different layer sets are first mapped onto
common keys by relative depth (:func:`depth_keys`, ``mapping="depth"``):

* a layer of block ``i`` in a model of ``N`` blocks has relative depth ``d = i / (N - 1)`` (``0`` when
  ``N == 1``) and falls in depth bucket ``b = min(B - 1, floor(d * B))`` of ``B`` buckets (computed exactly in
  integers as ``min(B - 1, i * B // (N - 1))``); ``B`` defaults to the smaller model's number of blocks, so
  that every block of the smaller model has a bucket of its own;
* module types are matched by their last name component (``self_attn.q_proj`` -> ``q_proj``); when a model
  has two module types with the same last component (GPT-2's ``attn.c_proj`` and ``mlp.c_proj``) both models
  use the last two components, and so on; only module types present in both models are compared, and a
  comparison with no common module type is refused;
* the layer key is ``depth{b}/{B}.{type}`` (e.g. ``depth3/8.down_proj``), the block key ``depth{b}/{B}``, and
  ``lm_head`` is its own key ``lm_head`` (compared only when both rankings include it);
* a ranking's score for a key is the mean of the scores of its layers mapped there.

The top-k of ``n`` keys is the first ``max(1, round(fraction * n))`` by score, ties broken by model order, so
for two rankings of the same model at layer level it is exactly :meth:`ila.ranking.Ranking.top`.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._version import __version__
from .errors import RankingError
from .ranking import Ranking

SCHEMA_VERSION = 1
KIND = "ila.compare"
DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.5)
CURVE_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(1, 21))
"""The grid of fractions for the overlap-vs-fraction curve (5 %, 10 %, ..., 100 %)."""

Level = Literal["layer", "block"]
MappingMode = Literal["auto", "name", "depth"]

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

        E[J] = sum_{i = max(0, k1 + k2 - n)}^{min(k1, k2)}  C(k1, i) C(n - k1, k2 - i) / C(n, k2) * i / (k1 + k2 - i)

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


def permutation_p_value(a: Collection[Any], b: Collection[Any], n: int, *, exact: bool = True,
                        rounds: int = 10000, seed: int = 0) -> float:
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


def _scores_of(r: Ranking | Mapping[str, float]) -> Mapping[str, float]:
    return r.scores if isinstance(r, Ranking) else r


def _common(r1: Ranking | Mapping[str, float], r2: Ranking | Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    s1, s2 = _scores_of(r1), _scores_of(r2)
    keys = sorted(set(s1) & set(s2))
    if not keys:
        raise RankingError("the two rankings have no layer (key) in common; compare rankings of different "
                           "models with mapping='depth'")
    return (np.array([float(s1[k]) for k in keys], dtype=np.float64),
            np.array([float(s2[k]) for k in keys], dtype=np.float64))


def average_ranks(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` (ascending), tied values sharing the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # boundaries of runs of equal values in the sorted array
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of ranks s+1 .. e
    return ranks


def spearman(r1: Ranking | Mapping[str, float], r2: Ranking | Mapping[str, float]) -> float | None:
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


def kendall_tau(r1: Ranking | Mapping[str, float], r2: Ranking | Mapping[str, float]) -> float | None:
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
        dx = np.sign(x[lo:lo + step, None] - x[None, :])
        dy = np.sign(y[lo:lo + step, None] - y[None, :])
        s += int((dx * dy).sum())
        tx += int(np.count_nonzero(dx))
        ty += int(np.count_nonzero(dy))
    if tx == 0 or ty == 0:
        return None
    return float(np.clip(s / math.sqrt(tx * ty), -1.0, 1.0))


# -- mapping rankings onto common keys -------------------------------------------------------------------------


@dataclass
class Keyed:
    """One ranking's scores on the keys of one comparison."""

    scores: dict[str, float]
    order_hint: list[str]
    """The keys in model order, to break ties deterministically."""
    num_layers: int
    """How many of the ranking's layers contributed."""

    def top(self, k: int) -> list[str]:
        pos = {key: i for i, key in enumerate(self.order_hint)}
        return sorted(self.scores, key=lambda key: (-self.scores[key], pos[key]))[:k]


def num_blocks(ranking: Ranking) -> int:
    """Blocks of the ranking's model: one more than the largest block index among its layers."""
    idx = [layer.block_index for layer in ranking.layers if layer.block_index is not None]
    return max(idx) + 1 if idx else 0


def _type_suffix(module_type: str, depth: int) -> str:
    return ".".join(module_type.split(".")[-depth:])


def type_key_depth(rankings: Sequence[Ranking]) -> int:
    """How many trailing name components identify a module type: 1 (``q_proj``) unless some ranking has two
    module types with the same last component (GPT-2's ``attn.c_proj``, ``mlp.c_proj``), then 2, and so on."""
    types = [{layer.module_type for layer in r.layers if layer.block is not None} for r in rankings]
    depth = 1
    longest = max((t.count(".") + 1 for ts in types for t in ts), default=1)
    while depth < longest and any(len({_type_suffix(t, depth) for t in ts}) < len(ts) for ts in types):
        depth += 1
    return depth


def depth_bucket(block_index: int, blocks: int, buckets: int) -> int:
    """``min(B - 1, floor(i / (N - 1) * B))`` computed exactly; 0 for a one-block model."""
    if blocks <= 1:
        return 0
    return min(buckets - 1, block_index * buckets // (blocks - 1))


def depth_keys(rankings: Sequence[Ranking], *, level: Level = "layer", buckets: int | None = None
               ) -> tuple[list[Keyed], dict[str, Any]]:
    """Map rankings of possibly different models onto common (depth bucket, module type) keys (see the module
    docstring). Returns each ranking's keyed scores over the keys all of them hold, and a description of the
    mapping. Raises :class:`RankingError` when the rankings share no module type."""
    depth = type_key_depth(rankings)
    type_sets = [{_type_suffix(layer.module_type, depth) for layer in r.layers if layer.block is not None}
                 for r in rankings]
    common_types = set.intersection(*type_sets) if type_sets else set()
    if not common_types:
        raise RankingError(
            "the rankings have no module type in common ("
            + "; ".join(", ".join(sorted(t)) or "none" for t in type_sets)
            + "), so their layers cannot be matched by depth and type"
        )
    sizes = [num_blocks(r) for r in rankings]
    n_buckets = buckets if buckets is not None else min(sizes)
    if not isinstance(n_buckets, int) or n_buckets < 1:
        raise RankingError(f"buckets must be a positive integer, got {n_buckets!r}")
    with_head = all(any(layer.block is None for layer in r.layers) for r in rankings)
    keyed: list[Keyed] = []
    for r, blocks in zip(rankings, sizes):
        groups: dict[str, list[float]] = {}
        for layer in r.layers:
            if layer.block is None:
                if not with_head:
                    continue
                key = "lm_head"
            else:
                t = _type_suffix(layer.module_type, depth)
                if t not in common_types:
                    continue
                b = depth_bucket(int(layer.block_index), blocks, n_buckets)
                key = f"depth{b}/{n_buckets}" if level == "block" else f"depth{b}/{n_buckets}.{t}"
            groups.setdefault(key, []).append(float(r.scores[layer.name]))
        keyed.append(Keyed({k: sum(v) / len(v) for k, v in groups.items()}, list(groups),
                           sum(len(v) for v in groups.values())))
    common = set.intersection(*(set(k.scores) for k in keyed))
    if not common:
        raise RankingError("the rankings have no depth bucket and module type in common")
    for k in keyed:
        k.scores = {key: s for key, s in k.scores.items() if key in common}
        k.order_hint = [key for key in k.order_hint if key in common]
    info = {"buckets": n_buckets, "type_key": "last component" if depth == 1 else f"last {depth} components",
            "module_types": sorted(common_types), "lm_head": with_head}
    return keyed, info


def name_keys(rankings: Sequence[Ranking], *, level: Level = "layer") -> tuple[list[Keyed], dict[str, Any]]:
    """Keys are full module names (``level="layer"``) or block names (``level="block"``, scored by the block's
    mean score, ``lm_head`` its own block), restricted to those every ranking holds."""
    keyed = []
    for r in rankings:
        if level == "block":
            agg = r.block_aggregates()
            keyed.append(Keyed({b: float(a["mean_score"]) for b, a in agg.items()}, list(agg), r.num_layers))
        else:
            keyed.append(Keyed(dict(r.scores), [layer.name for layer in r.layers], r.num_layers))
    common = set.intersection(*(set(k.scores) for k in keyed))
    if not common:
        raise RankingError(
            f"the rankings have no {'block' if level == 'block' else 'layer'} name in common (e.g. "
            f"{rankings[0].layers[0].name!r} vs {rankings[1].layers[0].name!r}); to relate different models "
            "use mapping='depth'"
        )
    for k, r in zip(keyed, rankings):
        if len(common) < len(k.scores):
            k.scores = {key: s for key, s in k.scores.items() if key in common}
            k.order_hint = [key for key in k.order_hint if key in common]
            k.num_layers = sum(1 for layer in r.layers if (layer.name if level == "layer"
                                                           else layer.block or layer.module_type) in common)
    return keyed, {}


def _same_layer_sets(rankings: Sequence[Ranking]) -> bool:
    first = {layer.name for layer in rankings[0].layers}
    return all({layer.name for layer in r.layers} == first for r in rankings[1:])


def map_rankings(rankings: Sequence[Ranking], *, level: Level = "layer", mapping: MappingMode = "auto",
                 buckets: int | None = None) -> tuple[str, list[Keyed], dict[str, Any]]:
    """(mapping used, keyed scores, mapping description). ``auto`` is ``name`` when every ranking has the same
    layer names, else ``depth``."""
    if level not in ("layer", "block"):
        raise RankingError(f"level must be 'layer' or 'block', got {level!r}")
    if mapping not in ("auto", "name", "depth"):
        raise RankingError(f"mapping must be 'auto', 'name' or 'depth', got {mapping!r}")
    if len(rankings) < 2:
        raise RankingError("comparing needs at least two rankings")
    used = mapping if mapping != "auto" else ("name" if _same_layer_sets(rankings) else "depth")
    if used == "depth":
        keyed, info = depth_keys(rankings, level=level, buckets=buckets)
    else:
        keyed, info = name_keys(rankings, level=level)
    return used, keyed, info


# -- comparing ------------------------------------------------------------------------------------------------


def _check_fractions(fractions: Iterable[float]) -> list[float]:
    out = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) <= 1.0:
            raise RankingError(f"fractions must be in (0, 1], got {f!r}")
        out.append(float(f))
    if not out:
        raise RankingError("no fraction to compare at")
    return sorted(set(out))


def top_count(fraction: float, n: int) -> int:
    """``max(1, round(fraction * n))``, the rule of :meth:`ila.ranking.Ranking.count`."""
    return max(1, round(fraction * n))


def _overlap(ka: Keyed, kb: Keyed, fraction: float) -> dict[str, Any]:
    n = len(ka.scores)
    k = top_count(fraction, n)
    ta, tb = set(ka.top(k)), set(kb.top(k))
    return {
        "fraction": fraction,
        "k": k,
        "n": n,
        "intersection": len(ta & tb),
        "jaccard": jaccard(ta, tb),
        "expected_random": expected_random_jaccard(n, k, k),
        "p_value": permutation_p_value(ta, tb, n),
    }


def compare_pair(r1: Ranking, r2: Ranking, fractions: Iterable[float] = DEFAULT_FRACTIONS, *,
                 level: Level = "layer", mapping: MappingMode = "auto", buckets: int | None = None,
                 curve_fractions: Iterable[float] | None = CURVE_FRACTIONS) -> dict[str, Any]:
    """Overlap of the top-k at each fraction, Spearman and Kendall of the full scores, for two rankings."""
    fr = _check_fractions(fractions)
    used, (ka, kb), info = map_rankings([r1, r2], level=level, mapping=mapping, buckets=buckets)
    out: dict[str, Any] = {
        "mapping": used,
        **info,
        "num_keys": len(ka.scores),
        "layers_compared": [ka.num_layers, kb.num_layers],
        "spearman": spearman(ka.scores, kb.scores),
        "kendall_tau": kendall_tau(ka.scores, kb.scores),
        "fractions": [_overlap(ka, kb, f) for f in fr],
    }
    if curve_fractions is not None:
        out["curve"] = [[o["fraction"], o["jaccard"], o["expected_random"]]
                        for o in (_overlap(ka, kb, f) for f in _check_fractions(curve_fractions))]
    return out


def overlap_curve(r1: Ranking, r2: Ranking, fractions: Iterable[float] = CURVE_FRACTIONS, *,
                  level: Level = "layer", mapping: MappingMode = "auto", buckets: int | None = None
                  ) -> list[tuple[float, float, float]]:
    """``[(fraction, jaccard of the top fraction, expected jaccard of random sets)]``, for a plot of
    overlap against fraction."""
    used, (ka, kb), _ = map_rankings([r1, r2], level=level, mapping=mapping, buckets=buckets)
    return [(o["fraction"], o["jaccard"], o["expected_random"])
            for o in (_overlap(ka, kb, f) for f in _check_fractions(fractions))]


def describe(ranking: Ranking, label: str) -> dict[str, Any]:
    from .layers import layer_names_digest

    return {
        "label": label,
        "base_model": ranking.base_model,
        "scorer": ranking.scorer,
        "milestone": ranking.milestone,
        "num_layers": ranking.num_layers,
        "num_blocks": num_blocks(ranking),
        "include_lm_head": ranking.include_lm_head,
        "layer_digest": layer_names_digest([layer.name for layer in ranking.layers]),
    }


def _labels(rankings: Sequence[Ranking], labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        labels = [f"ranking{i + 1}" for i in range(len(rankings))]
    labels = [str(x) for x in labels]
    if len(labels) != len(rankings):
        raise RankingError(f"{len(labels)} labels for {len(rankings)} rankings")
    if len(set(labels)) != len(labels):
        raise RankingError(f"labels must differ from each other, got {labels}")
    return labels


def compare_rankings(rankings: Sequence[Ranking], labels: Sequence[str] | None = None,
                     fractions: Iterable[float] = DEFAULT_FRACTIONS, *, level: Level = "layer",
                     mapping: MappingMode = "auto", buckets: int | None = None,
                     curve_fractions: Iterable[float] | None = CURVE_FRACTIONS) -> dict[str, Any]:
    """Every pair of rankings at every fraction: Jaccard of the top-k, its random expectation and p-value,
    plus Spearman and Kendall of the full scores. JSON-ready (strict: undefined values are None).

    ``level="block"`` ranks blocks by their mean score and compares the top fraction of blocks. ``mapping``:
    ``name`` compares full module (or block) names, ``depth`` maps each pair onto (relative depth bucket,
    module type) keys (module docstring), ``auto`` (default) uses ``name`` for a pair with the same layer
    names and ``depth`` otherwise. ``buckets`` overrides the number of depth buckets (default: the smaller
    model's number of blocks, per pair). Each pair also carries the overlap curve over ``curve_fractions``.
    """
    rankings = list(rankings)
    if len(rankings) < 2:
        raise RankingError("comparing needs at least two rankings")
    labels = _labels(rankings, labels)
    fr = _check_fractions(fractions)
    pairs = []
    for i in range(len(rankings)):
        for j in range(i + 1, len(rankings)):
            pair = compare_pair(rankings[i], rankings[j], fr, level=level, mapping=mapping, buckets=buckets,
                                curve_fractions=curve_fractions)
            pairs.append({"a": labels[i], "b": labels[j], **pair})
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "ila_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "level": level,
        "mapping": mapping,
        "fractions": fr,
        "rankings": [describe(r, lab) for r, lab in zip(rankings, labels)],
        "pairs": pairs,
    }
    if all(p["mapping"] == "name" for p in pairs):
        # Keys in the top fraction of every ranking: the consistently important layers (or blocks).
        _, keyed, _ = map_rankings(rankings, level=level, mapping="name")
        n = len(keyed[0].scores)
        consensus = {}
        for f in fr:
            tops = [k.top(top_count(f, n)) for k in keyed]
            rest = [set(t) for t in tops[1:]]
            consensus[f"{f:g}"] = [key for key in tops[0] if all(key in t for t in rest)]
        result["consensus"] = consensus
    return result


def jaccard_matrix(result: Mapping[str, Any], fraction: float) -> tuple[list[str], list[list[float | None]]]:
    """(labels, square matrix) of the pairwise Jaccard index at ``fraction`` from a :func:`compare_rankings`
    result; the diagonal is 1."""
    labels = [r["label"] for r in result["rankings"]]
    pos = {lab: i for i, lab in enumerate(labels)}
    m: list[list[float | None]] = [[1.0 if i == j else None for j in range(len(labels))] for i in range(len(labels))]
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


# -- Markdown ---------------------------------------------------------------------------------------------------


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _p(p: float) -> str:
    if p == 0.0:
        return "< 1e-300"
    return f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def render_markdown(result: Mapping[str, Any]) -> str:
    """The comparison as Markdown: the rankings, then one row per pair with, per fraction, the Jaccard of the
    top sets, (the random expectation) and the p-value, then Spearman and Kendall."""
    lines = [f"# Ranking comparison ({result['level']} level)", "",
             "| label | model | scorer | milestone | layers | blocks |", "| --- | --- | --- | --- | --- | --- |"]
    for r in result["rankings"]:
        lines.append(f"| {r['label']} | {r['base_model'].get('name')} | {r['scorer']} | {r['milestone'] or '-'} "
                     f"| {r['num_layers']} | {r['num_blocks']} |")
    if not result["pairs"]:
        return "\n".join(lines) + "\n"
    fr = result["fractions"]
    head = ["pair", "mapping", "n"] + [f"top {f * 100:g} %: J (random), p" for f in fr] + ["Spearman", "Kendall"]
    lines += ["", "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for p in result["pairs"]:
        by_f = {o["fraction"]: o for o in p["fractions"]}
        cells = [f"{p['a']} vs {p['b']}", p["mapping"], str(p["num_keys"])]
        for f in fr:
            o = by_f[f]
            cells.append(f"{o['jaccard']:.3f} ({o['expected_random']:.3f}), p {_p(o['p_value'])}")
        cells += [_num(p["spearman"]), _num(p["kendall_tau"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "J: Jaccard index of the two top-k sets (k = round(fraction x n), n compared "
              f"{'blocks' if result['level'] == 'block' else 'layers'} or depth keys); random: its expectation "
              "for random sets of the same size; p: chance of a random pair overlapping at least as much "
              "(hypergeometric tail). Spearman / Kendall tau-b: of the full scores."]
    depth_pairs = [p for p in result["pairs"] if p["mapping"] == "depth"]
    if depth_pairs:
        p = depth_pairs[0]
        lines.append(f"Depth mapping (pairs marked depth): layers matched by relative depth ({p['buckets']} "
                     f"buckets) and module type ({p['type_key']} of the name); module types compared: "
                     f"{', '.join(p['module_types'])}; a key's score is the mean of its layers'.")
    if result.get("consensus"):
        lines += ["", "In the top fraction of every ranking:", ""]
        for f, keys in result["consensus"].items():
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more, in compare.json)" if len(keys) > 20 else "")
            lines.append(f"- top {float(f) * 100:g} %: {len(keys)}" + (f": {shown}" if keys else ""))
    return "\n".join(lines) + "\n"
