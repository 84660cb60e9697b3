"""The registry of scorers: the one list of their names, what each needs, and the function that computes it.

It imports no torch, so the config loader and the command line can list and check scorer names instantly; the
functions (in :mod:`ila.scoring`) load on first use. Adding a scorer is one entry here plus its function.

| scorer | needs | cost |
| --- | --- | --- |
| ``ila`` | stage-1 update + data | ``stage2.steps`` forward/backward passes, gradients for N scores only |
| ``taylor`` | stage-1 update + data | ``stage2.sample_batches`` forward/backward passes |
| ``update-norm`` | stage-1 update | free: ||Delta_i||_F from the LoRA factors |
| ``block-influence`` | data | ``stage2.sample_batches`` forward passes of the base model |
| ``snr`` | nothing (weights) | one SVD per layer weight |
| ``random`` / ``position`` | nothing | free |
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import IlaError


@dataclass(frozen=True)
class Scorer:
    name: str
    needs_adapter: bool
    """Scores the stage-1 update Delta (the model must carry it)."""
    needs_data: bool
    """Reads batches of the alignment data."""
    function: str
    """``module:attribute`` of the function ``(ScoringInputs) -> (scores, facts)``."""

    def load(self) -> Callable[[Any], tuple[dict[str, float], dict[str, Any]]]:
        module, attribute = self.function.split(":")
        return getattr(importlib.import_module(module), attribute)


SCORERS: dict[str, Scorer] = {
    s.name: s
    for s in (
        Scorer("ila", needs_adapter=True, needs_data=True, function="ila.scoring:ila_scores"),
        Scorer("taylor", needs_adapter=True, needs_data=True, function="ila.scoring:taylor_scores"),
        Scorer(
            "update-norm", needs_adapter=True, needs_data=False, function="ila.scoring:update_norm_scores"
        ),
        Scorer(
            "block-influence",
            needs_adapter=False,
            needs_data=True,
            function="ila.scoring:block_influence_scores",
        ),
        Scorer("snr", needs_adapter=False, needs_data=False, function="ila.scoring:snr_scores"),
        Scorer("random", needs_adapter=False, needs_data=False, function="ila.scoring:random_scores"),
        Scorer("position", needs_adapter=False, needs_data=False, function="ila.scoring:position_scores"),
    )
}
SCORER_NAMES = tuple(SCORERS)
NEEDS_ADAPTER = frozenset(s.name for s in SCORERS.values() if s.needs_adapter)
NEEDS_DATA = frozenset(s.name for s in SCORERS.values() if s.needs_data)


def scorer(name: str) -> Scorer:
    """The registry entry of ``name``; a clear error naming the scorers otherwise."""
    if name not in SCORERS:
        raise IlaError(f"unknown scorer {name!r}; choose one of {', '.join(SCORER_NAMES)}")
    return SCORERS[name]
