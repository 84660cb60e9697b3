"""How much do two rankings agree? Overlap of their important layers, with the chance level, and rank
correlations of the full scores.

The paper's headline finding (Shi et al., arXiv 2410.17875) is an overlap statistic: the *top-k* layers of
rankings learned on very different alignment datasets overlap by a Jaccard index of about 0.9, rankings agree
across seeds and already at 25 % of training, and agree less across models (~0.7). This module computes those
numbers for any set of ranking files and says how far each is from chance: the Jaccard index of the two top-k
sets, its expectation for random sets of the same sizes and the one-sided p-value of the overlap, and
Spearman's rho and Kendall's tau-b of the full scores over the common keys. The statistics themselves are in
:mod:`ila.stats` (and importable from here); this module maps rankings onto common keys, compares them
(:func:`compare_rankings`); :mod:`ila.comparison` writes the folder behind ``ila compare``.

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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .artifacts import envelope
from .errors import RankingError
from .layers import layer_names_digest
from .ranking import Ranking
from .stats import (  # the statistics used to live here: re-exported (__all__)
    average_ranks,
    check_fractions,
    depth_bucket,
    expected_random_jaccard,
    jaccard,
    jaccard_matrix,
    kendall_tau,
    permutation_p_value,
    spearman,
    top_count,
)

SCHEMA_VERSION = 1
KIND = "ila.compare"
DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.5)
CURVE_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(1, 21))
"""The grid of fractions for the overlap-vs-fraction curve (5 %, 10 %, ..., 100 %)."""

Level = Literal["layer", "block"]
MappingMode = Literal["auto", "name", "depth"]

# -- mapping rankings onto common keys -----------------------------------------------------------------------


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


def depth_keys(
    rankings: Sequence[Ranking], *, level: Level = "layer", buckets: int | None = None
) -> tuple[list[Keyed], dict[str, Any]]:
    """Map rankings of possibly different models onto common (depth bucket, module type) keys (see the module
    docstring). Returns each ranking's keyed scores over the keys all of them hold, and a description of the
    mapping. Raises :class:`RankingError` when the rankings share no module type."""
    depth = type_key_depth(rankings)
    type_sets = [
        {_type_suffix(layer.module_type, depth) for layer in r.layers if layer.block is not None}
        for r in rankings
    ]
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
    for r, blocks in zip(rankings, sizes, strict=True):
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
        keyed.append(
            Keyed(
                {k: sum(v) / len(v) for k, v in groups.items()},
                list(groups),
                sum(len(v) for v in groups.values()),
            )
        )
    common = set.intersection(*(set(k.scores) for k in keyed))
    if not common:
        raise RankingError("the rankings have no depth bucket and module type in common")
    for k in keyed:
        k.scores = {key: s for key, s in k.scores.items() if key in common}
        k.order_hint = [key for key in k.order_hint if key in common]
    info = {
        "buckets": n_buckets,
        "type_key": "last component" if depth == 1 else f"last {depth} components",
        "module_types": sorted(common_types),
        "lm_head": with_head,
    }
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
    for k, r in zip(keyed, rankings, strict=True):
        if len(common) < len(k.scores):
            k.scores = {key: s for key, s in k.scores.items() if key in common}
            k.order_hint = [key for key in k.order_hint if key in common]
            k.num_layers = sum(
                1
                for layer in r.layers
                if (layer.name if level == "layer" else layer.block or layer.module_type) in common
            )
    return keyed, {}


def _same_layer_sets(rankings: Sequence[Ranking]) -> bool:
    first = {layer.name for layer in rankings[0].layers}
    return all({layer.name for layer in r.layers} == first for r in rankings[1:])


def map_rankings(
    rankings: Sequence[Ranking],
    *,
    level: Level = "layer",
    mapping: MappingMode = "auto",
    buckets: int | None = None,
) -> tuple[str, list[Keyed], dict[str, Any]]:
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


# -- comparing -----------------------------------------------------------------------------------------------


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


def compare_pair(
    r1: Ranking,
    r2: Ranking,
    fractions: Iterable[float] = DEFAULT_FRACTIONS,
    *,
    level: Level = "layer",
    mapping: MappingMode = "auto",
    buckets: int | None = None,
    curve_fractions: Iterable[float] | None = CURVE_FRACTIONS,
) -> dict[str, Any]:
    """Overlap of the top-k at each fraction, Spearman and Kendall of the full scores, for two rankings."""
    fr = check_fractions(fractions)
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
        out["curve"] = [
            [o["fraction"], o["jaccard"], o["expected_random"]]
            for o in (_overlap(ka, kb, f) for f in check_fractions(curve_fractions))
        ]
    return out


def overlap_curve(
    r1: Ranking,
    r2: Ranking,
    fractions: Iterable[float] = CURVE_FRACTIONS,
    *,
    level: Level = "layer",
    mapping: MappingMode = "auto",
    buckets: int | None = None,
) -> list[tuple[float, float, float]]:
    """``[(fraction, jaccard of the top fraction, expected jaccard of random sets)]``, for a plot of
    overlap against fraction."""
    used, (ka, kb), _ = map_rankings([r1, r2], level=level, mapping=mapping, buckets=buckets)
    return [
        (o["fraction"], o["jaccard"], o["expected_random"])
        for o in (_overlap(ka, kb, f) for f in check_fractions(fractions))
    ]


def describe(ranking: Ranking, label: str) -> dict[str, Any]:
    """What a comparison records of each ranking."""
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


def compare_rankings(
    rankings: Sequence[Ranking],
    labels: Sequence[str] | None = None,
    fractions: Iterable[float] = DEFAULT_FRACTIONS,
    *,
    level: Level = "layer",
    mapping: MappingMode = "auto",
    buckets: int | None = None,
    curve_fractions: Iterable[float] | None = CURVE_FRACTIONS,
) -> dict[str, Any]:
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
    fr = check_fractions(fractions)
    pairs = []
    for i in range(len(rankings)):
        for j in range(i + 1, len(rankings)):
            pair = compare_pair(
                rankings[i],
                rankings[j],
                fr,
                level=level,
                mapping=mapping,
                buckets=buckets,
                curve_fractions=curve_fractions,
            )
            pairs.append({"a": labels[i], "b": labels[j], **pair})
    result: dict[str, Any] = {
        **envelope(KIND, SCHEMA_VERSION),
        "level": level,
        "mapping": mapping,
        "fractions": fr,
        "rankings": [describe(r, lab) for r, lab in zip(rankings, labels, strict=True)],
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


# -- Markdown ------------------------------------------------------------------------------------------------


__all__ = [
    "CURVE_FRACTIONS",
    "DEFAULT_FRACTIONS",
    "KIND",
    "SCHEMA_VERSION",
    "Keyed",
    "Level",
    "MappingMode",
    "average_ranks",
    "check_fractions",
    "compare_pair",
    "compare_rankings",
    "depth_bucket",
    "depth_keys",
    "describe",
    "expected_random_jaccard",
    "jaccard",
    "jaccard_matrix",
    "kendall_tau",
    "map_rankings",
    "name_keys",
    "num_blocks",
    "overlap_curve",
    "permutation_p_value",
    "spearman",
    "top_count",
    "type_key_depth",
]
