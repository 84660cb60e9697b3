"""Selections in the user's own code: pick layers from a ranking and make only those trainable.

from ila import Ranking, select, apply_selection
names = select(Ranking.load("ranking.json"), top=0.3)
model = apply_selection(model, names, method="lora", lora=LoraConfig(r=16))   # a peft model
model = apply_selection(model, names, method="full")   # same model, only those weights trainable
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

from .config import LoraConfig
from .errors import RankingError
from .layers import adaptable_layers, unwrap
from .models import attach_lora
from .ranking import Ranking


def select(
    ranking: Ranking,
    *,
    top: float | None = None,
    drop_bottom: float | None = None,
    layers: Sequence[str] | None = None,
) -> list[str]:
    """The selected layer names, most important first: exactly one of ``top`` (tune only the important),
    ``drop_bottom`` (freeze the unimportant) or ``layers`` (an explicit list, checked against the ranking)."""
    given = [x is not None for x in (top, drop_bottom, layers)]
    if sum(given) != 1:
        raise RankingError("give exactly one of top=, drop_bottom= or layers=")
    if top is not None:
        return ranking.select("top", top)
    if drop_bottom is not None:
        return ranking.select("drop_bottom", drop_bottom)
    return ranking.select("list", None, list(layers or []))


def apply_selection(
    model: nn.Module,
    layer_names: Sequence[str],
    *,
    method: Literal["lora", "full"] = "lora",
    lora: LoraConfig | None = None,
) -> Any:
    """Make only the selected layers trainable.

    ``lora``: returns a peft model with a fresh LoRA adapter on exactly ``layer_names``.
    ``full``: freezes every parameter of ``model`` except the weights (and biases) of the selected modules,
    and returns ``model`` itself.
    """
    known = {layer.name for layer in adaptable_layers(model, include_lm_head=True)}
    unknown = [n for n in layer_names if n not in known]
    if unknown:
        raise RankingError(f"{len(unknown)} selected layers are not in this model, e.g. {unknown[0]!r}")
    if not layer_names:
        raise RankingError("the selection is empty")
    if method == "lora":
        return attach_lora(model, list(layer_names), lora or LoraConfig())
    if method == "full":
        modules = dict(unwrap(model).named_modules())
        for p in model.parameters():
            p.requires_grad_(False)
        for name in layer_names:
            for p in modules[name].parameters():
                p.requires_grad_(True)
        return model
    raise RankingError(f"method must be lora or full, got {method!r}")
