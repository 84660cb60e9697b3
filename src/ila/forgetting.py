"""Forgetting: the loss on text outside the alignment data, before and after tuning.

An engineer choosing layers wants to know what tuning costs in knowledge, not only what it gains on the
alignment data (the paper's MMLU and HellaSwag numbers stand for that). PEFT's benchmarks measure it this
way: the loss on general text with the base model, then with each tuned model; the difference is what was
forgotten. ila measures it with the one held-out loss (:func:`ila.heldout.heldout_loss`) on text where every
token counts.

The text: the Python language reference's topics that ship with every CPython (``pydoc_data.topics``,
about 465,000 characters of English technical prose with code), chosen because it installs offline with
the interpreter, is not chat and is not in any alignment dataset ila tunes on. It differs between Python
versions, so results record the Python version and a digest of the text: compare only results with the same.
"""

from __future__ import annotations

import hashlib
import platform
from typing import TYPE_CHECKING, Any

import torch

from .batching import Batching
from .heldout import heldout_loss

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase


def general_text() -> str:
    """The topics of the Python language reference, in name order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def text_source() -> dict[str, Any]:
    """What the forgetting loss was measured on, recorded with every result."""
    text = general_text()
    return {
        "text": "pydoc_data.topics (Python language reference)",
        "python": platform.python_version(),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }


def general_text_rows(
    tokenizer: PreTrainedTokenizerBase, *, max_length: int = 256, max_examples: int = 64
) -> datasets.Dataset:
    """The first ``max_examples`` windows of ``max_length`` tokens of :func:`general_text`, every token a
    label (no prompt to mask: the model's whole prediction of the text is what forgetting changes)."""
    import datasets

    ids = tokenizer(general_text(), add_special_tokens=False).input_ids
    rows = []
    for start in range(0, len(ids) - max_length + 1, max_length):
        window = ids[start : start + max_length]
        rows.append({"input_ids": window, "attention_mask": [1] * len(window), "labels": list(window)})
        if len(rows) == max_examples:
            break
    return datasets.Dataset.from_list(rows)


def forgetting_loss(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: datasets.Dataset,
    *,
    batch_size: int = 4,
    batching: Batching | None = None,
) -> dict[str, Any]:
    """The held-out loss (with its interval) of ``model`` on the general-text ``rows``."""
    return {**heldout_loss(model, tokenizer, rows, batch_size=batch_size, batching=batching), **text_source()}
