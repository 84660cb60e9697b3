"""Choosing the layers to export and checking them against the ranking: fractions, names, whole blocks."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ..errors import RankingError
from ..layers import Layer
from ..ranking import Ranking

Mode = Literal["top", "drop_bottom", "list"]


def check_layer_names(ranking: Ranking, names: Sequence[str]) -> None:
    """Raise :class:`RankingError` naming every unknown layer name, with the closest real names."""
    ranking.check_names(names)


def select_layers(
    ranking: Ranking, mode: Mode, fraction: float | None = None, layers: Sequence[str] = ()
) -> list[str]:
    """The selected layer names in ranking order (:meth:`ila.ranking.Ranking.select`)."""
    return ranking.select(mode, fraction, layers)


def default_export_dir(
    ranking_path: str | Path, mode: str, fraction: float | None, names: Sequence[str]
) -> Path:
    """``<ranking dir>/export-<mode>-<fraction>``; an explicit list gets a short digest of its names
    instead."""
    if mode == "list":
        tag = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:8]
        return Path(ranking_path).parent / f"export-list-{len(names)}-{tag}"
    return Path(ranking_path).parent / f"export-{mode}-{fraction:g}"


def _normalise(ranking: Ranking, names: Sequence[str]) -> tuple[list[str], list[Layer]]:
    """(names in ranking order, selected Layer objects in model order); refuses empty or unknown names."""
    names = list(dict.fromkeys(names))
    if not names:
        raise RankingError("the selection is empty: nothing would train")
    check_layer_names(ranking, names)
    chosen = set(names)
    in_ranking_order = [n for n in ranking.order if n in chosen]
    in_model_order = [layer for layer in ranking.layers if layer.name in chosen]
    return in_ranking_order, in_model_order


def whole_blocks(ranking: Ranking, names: Sequence[str]) -> tuple[list[int], list[str], str] | str:
    """If ``names`` are every layer of some blocks and nothing else, and those blocks all hold the same module
    types: (block indices, module types in model order, name of the block list attribute, e.g. ``layers``).
    Otherwise a sentence saying why not."""
    chosen = set(names)
    by_block: dict[int, list[Layer]] = {}
    for layer in ranking.layers:
        if layer.block_index is None:
            if layer.name in chosen:
                return f"{layer.name} is selected and belongs to no block"
            continue
        by_block.setdefault(layer.block_index, []).append(layer)
    picked = sorted(i for i, layers in by_block.items() if any(x.name in chosen for x in layers))
    for i in picked:
        have = [x for x in by_block[i] if x.name in chosen]
        if len(have) != len(by_block[i]):
            return f"block {i} has {len(have)} of its {len(by_block[i])} layers selected"
    types = [x.module_type for x in by_block[picked[0]]]
    for i in picked[1:]:
        if sorted(x.module_type for x in by_block[i]) != sorted(types):
            return f"blocks {picked[0]} and {i} hold different module types"
    list_names = {x.block.rsplit(".", 1)[0] for i in picked for x in by_block[i] if x.block}
    if len(list_names) != 1:
        return "the selected blocks belong to more than one block list"
    return picked, types, list_names.pop().rsplit(".", 1)[-1]
