"""The one held-out loss: token-weighted mean cross-entropy of the response tokens, with a 95 % interval.

Every number ila reports as "held-out loss" (before and after stage 1, after stage 3, ``ila evaluate``, the
strategy comparison) is this one: the sum of the response tokens' losses over the sum of their count, on the
whole held-out split, so that a selection is compared with another on the same tokens with the same
weights. The interval is a percentile bootstrap over examples (an example's tokens stay together, because
they are not independent): resampling examples with replacement and recomputing the token-weighted ratio,
with a fixed seed so that the same losses give the same interval.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .batching import Batching, choose_batching, example_index
from .errors import DataError
from .layers import unwrap
from .progress import progress
from .response_logits import next_token_targets, supports_response_logits

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

RESAMPLES = 2000
"""Bootstrap resamples for the interval: enough that its ends move by well under their width between seeds."""


@torch.no_grad()
def example_losses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset,
    *,
    batch_size: int = 4,
    batching: Batching | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(summed response-token loss, response-token count) of every example of ``dataset`` (rows with
    input_ids, attention_mask and labels, IGNORE_INDEX on prompt tokens), in dataset order. ``batching``
    (default: padding-free where the model supports it, :func:`ila.batching.choose_batching`) does not change
    the numbers beyond floating-point rounding: each example's tokens see only that example."""
    if dataset is None or len(dataset) == 0:
        raise DataError("no held-out examples: set data.heldout_fraction > 0")
    batching = batching or choose_batching(model)
    collate = batching.collator(tokenizer)
    device = next(model.parameters()).device
    head_on_mask = supports_response_logits(model)
    vocab = unwrap(model).get_output_embeddings().weight.shape[0] if head_on_mask else 0
    was_training = model.training
    model.eval()
    sums, counts = [], []
    try:
        with batching.attending(model):
            starts = range(0, len(dataset), batch_size)
            for start in progress(starts, "held-out loss", total=len(starts), unit="batch"):
                rows = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
                batch = collate(rows)
                targets, keep = next_token_targets(batch["labels"].to(device))
                inputs = {k: _to(v, device) for k, v in batch.items() if k != "labels"}
                if head_on_mask:  # the output head only where a response token follows (ila.response_logits)
                    logits = model(**inputs, logits_to_keep=keep).logits.reshape(-1, vocab)
                else:
                    logits = model(**inputs).logits[keep]
                loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="none")
                example = example_index(batch).to(device)[keep]
                sums.append(
                    torch.zeros(len(rows), dtype=torch.float64, device=device)
                    .index_add_(0, example, loss.double())
                    .cpu()
                )
                counts.append(torch.bincount(example, minlength=len(rows)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(sums).numpy(), torch.cat(counts).numpy()


def _to(value: object, device: torch.device) -> object:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def interval(sums: np.ndarray, counts: np.ndarray, *, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of ``sums.sum() / counts.sum()`` over examples."""
    rng = np.random.default_rng(seed)
    n = len(sums)
    picks = rng.integers(0, n, size=(RESAMPLES, n))
    ratios = sums[picks].sum(axis=1) / np.maximum(counts[picks].sum(axis=1), 1)
    tail = (1 - level) / 2
    return [float(np.quantile(ratios, tail)), float(np.quantile(ratios, 1 - tail))]


def summarise(sums: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    """``loss`` (token-weighted), ``ci95`` (its bootstrap interval), ``perplexity``, ``tokens`` and
    ``examples`` from per-example (loss sum, token count)."""
    tokens = int(counts.sum())
    if tokens == 0:
        raise DataError("the held-out examples have no response token")
    mean = float(sums.sum() / tokens)
    return {
        "loss": mean,
        "ci95": interval(sums, counts),
        "perplexity": math.exp(min(mean, 50.0)),
        "tokens": tokens,
        "examples": len(sums),
    }


def heldout_loss(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset,
    *,
    batch_size: int = 4,
    batching: Batching | None = None,
) -> dict[str, Any]:
    """:func:`summarise` of ``model``'s losses on ``dataset``."""
    return summarise(*example_losses(model, tokenizer, dataset, batch_size=batch_size, batching=batching))


def paired_interval(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], *, seed: int = 0, level: float = 0.95
) -> list[float]:
    """Bootstrap interval of loss(a) - loss(b), two models' (sums, counts) on the same examples: each
    resample takes the same examples for both, so the shared difficulty of an example cancels and the
    interval is that of the difference, far narrower than the two losses' own intervals side by side."""
    (sa, ca), (sb, cb) = a, b
    if len(sa) != len(sb) or not np.array_equal(ca, cb):
        raise DataError("a paired comparison needs the two models' losses on the same examples")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sa), size=(RESAMPLES, len(sa)))
    tokens = np.maximum(ca[picks].sum(axis=1), 1)
    diffs = (sa[picks].sum(axis=1) - sb[picks].sum(axis=1)) / tokens
    tail = (1 - level) / 2
    return [float(np.quantile(diffs, tail)), float(np.quantile(diffs, 1 - tail))]
