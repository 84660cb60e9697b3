"""Sampling and splitting conversations into a training and a held-out set."""

from __future__ import annotations

import random
from collections.abc import Sequence

from ila.errors import DataError

from .formats import Conversation


def split_conversations(
    convs: Sequence[Conversation],
    *,
    heldout_fraction: float,
    seed: int,
    max_examples: int | None,
    max_heldout_examples: int | None,
) -> tuple[list[Conversation], list[Conversation]]:
    """A seeded sample of ``convs`` split into ``(train, heldout)``; the same seed gives the same split.

    The conversations are shuffled with ``random.Random(seed)`` and the first ``max_examples`` (all when
    None) are kept. Of these ``n``, ``round(heldout_fraction * n)`` are held out, at least one when the
    fraction is positive and ``n >= 2``, at most ``max_heldout_examples``, and never all of them.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    if max_examples is not None:
        order = order[:max_examples]
    n = len(order)
    n_heldout = round(heldout_fraction * n)
    if heldout_fraction > 0 and n >= 2:
        n_heldout = max(n_heldout, 1)
    if max_heldout_examples is not None:
        n_heldout = min(n_heldout, max_heldout_examples)
    n_heldout = max(0, min(n_heldout, n - 1))  # keep at least one training example
    train = [convs[i] for i in order[: n - n_heldout]]
    heldout = [convs[i] for i in order[n - n_heldout :]]
    return train, heldout
