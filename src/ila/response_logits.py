"""The output head only where a response token follows: the logits of every other position are computed and
thrown away by the loss, and on chat data the prompts are a large part of every sequence. Used by training
(the loss and its gradients) and by the held-out loss."""

from __future__ import annotations

import inspect

import torch
from transformers import modeling_utils
from transformers.loss.loss_utils import ForCausalLMLoss

from .data import IGNORE_INDEX
from .layers import unwrap


def supports_response_logits(model: torch.nn.Module) -> bool:
    """Whether ``model`` can compute its output head on a boolean mask of positions and take its loss targets
    already shifted: transformers' causal LMs with ``logits_to_keep`` and the stock causal-LM loss."""
    inner = unwrap(model)
    if not hasattr(modeling_utils, "slice_logits_to_keep"):  # boolean masks arrived with it
        return False
    try:
        accepts = "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False
    return accepts and getattr(inner, "loss_function", None) is ForCausalLMLoss


def response_logits_kwargs(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Extra model inputs that restrict the output head to the positions whose next token is a response token.

    The loss of a causal LM at position t is the cross-entropy of the logits there against token t+1, and only
    response tokens carry a label, so the logits (and their softmax over the whole vocabulary) at every other
    position are computed and thrown away. With the boolean mask ``logits_to_keep`` the model projects only
    the kept hidden states, and ``shift_labels`` hands the loss the matching targets; the loss, its
    normalisation by ``num_items_in_batch`` and every gradient are those of the full computation (tested), at
    a fraction of the output head's cost on chat data, where prompts are a large part of every sequence.
    """
    shifted, keep = next_token_targets(labels)
    return {"logits_to_keep": keep, "shift_labels": shifted[keep]}


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target of every position: token t+1 or IGNORE_INDEX, the boolean mask of positions with a target)."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return shifted, shifted != IGNORE_INDEX
