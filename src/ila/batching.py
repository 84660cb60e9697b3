"""How tokenized examples become batches: padded to the longest example, or padding-free.

Padding-free (the default where the model supports it): the examples of a batch are concatenated into one
row with no padding token, position ids restart at 0 at each example, and attention never crosses from one
example into another (transformers' :class:`~transformers.DataCollatorWithFlattening`, which also hands the
model each example's boundaries, ``cu_seq_lens``). No example is split or dropped, and the loss, its
normalisation over the response tokens and every gradient are those of the padded batch (tested to
floating-point tolerance): the first label of every example is IGNORE_INDEX, so the last token of one example
is never trained to predict the first of the next.

Attention is what has to know about the boundaries:

- flash-attention (``model.attn_implementation: flash_attention_2`` on a GPU) takes ``cu_seq_lens`` as it is
  (varlen kernels) and does no work across examples;
- transformers' SDPA path would build a block-diagonal mask over the whole concatenated row, whose cost grows
  with the square of the batch's total length (measured 1.8x slower than padding at batch 16 on the CPU), so
  for SDPA models ila registers its own attention function (:data:`SEGMENTED_SDPA`) that runs transformers'
  SDPA attention on each example separately, with the causal mask (and a model's sliding window) inside it:
  the work of the padded batch without the padding.

Whether a model supports it is decided by a check, not a list of architectures (:func:`choose_batching`): a
short probe of two examples must give, concatenated, the logits each gives alone. The decision and its
reason are logged.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from .data import IGNORE_INDEX
from .errors import ConfigError
from .layers import unwrap

if TYPE_CHECKING:
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SEGMENTED_SDPA = "ila_segmented_sdpa"
"""The attention implementation ila registers with transformers for padding-free batches of SDPA models."""

PaddingFree = Literal["auto", "on", "off"]

_PROBE_LENGTHS = (7, 5)


# -------------------------------------------------------------------------------------------------------
# collators


def padded_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Batches padded to the longest example (to a multiple of 8, which tensor cores like), the labels padded
    with IGNORE_INDEX."""
    from transformers import DataCollatorForSeq2Seq  # transformers is slow to import: only when batching

    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8
    )


def flattening_collator() -> DataCollatorWithFlattening:
    """One row per batch: the examples concatenated, position ids restarting at each, their boundaries as
    ``cu_seq_lens_q/k`` (which flash-attention and :data:`SEGMENTED_SDPA` read)."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE_INDEX)


def example_index(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The example each position of a batch belongs to, as a (rows, length) tensor: the row for a padded
    batch, the running count of restarts of the position ids for a flattened one."""
    if "position_ids" not in batch:
        rows, length = batch["input_ids"].shape
        return torch.arange(rows).unsqueeze(1).expand(rows, length)
    return (batch["position_ids"] == 0).cumsum(dim=1) - 1


# -------------------------------------------------------------------------------------------------------
# attention that stays inside each example


def _segmented_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention on each example of a flattened row alone (causal, and within the
    layer's sliding window when it has one); a padded batch goes to SDPA with its mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if attention_mask is not None or (bounds is not None and query.shape[0] != 1):
        # a padded batch: SDPA with the mask transformers made for it (window included)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal
        )
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    # without boundaries every row is one whole example (no mask was made for it: see _segmented_mask)
    edges = [0, query.shape[2]] if bounds is None else bounds.tolist()
    outputs = []
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        mask = None
        if window is not None and end - start > window:
            # causal and within the window: key j is seen by query i when i - window < j <= i
            pos = torch.arange(end - start, device=query.device)
            offset = pos[:, None] - pos[None, :]
            mask = ((offset >= 0) & (offset < window))[None, None]
        out, _ = sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=mask is None,
        )
        outputs.append(out)  # (1, length, heads, head_dim)
    return torch.cat(outputs, dim=1), None


def _segmented_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask for :data:`SEGMENTED_SDPA`: none for an unpadded row (the attention makes its own causal
    mask per example), SDPA's own where a padding mask was given."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(SEGMENTED_SDPA, _segmented_sdpa)
    AttentionMaskInterface.register(SEGMENTED_SDPA, _segmented_mask)


@contextlib.contextmanager
def attention(model: torch.nn.Module, implementation: str | None) -> Iterator[None]:
    """Run ``model`` with the attention ``implementation`` (None: as it is) and restore its own afterwards,
    so that what is saved or generated later sees the model as loaded."""
    inner = unwrap(model)
    current = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    if implementation is None or implementation == current:
        yield
        return
    if implementation == SEGMENTED_SDPA:
        _register()
    inner.set_attn_implementation(implementation)
    try:
        yield
    finally:
        inner.set_attn_implementation(current)


# -------------------------------------------------------------------------------------------------------
# the decision


@dataclass(frozen=True)
class Batching:
    """How a stage batches its examples."""

    padding_free: bool
    reason: str
    """Why (logged, and written into the stages' summaries)."""
    attention: str | None = None
    """The attention implementation the model runs with while batches are flattened (None: its own)."""

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Any:
        return flattening_collator() if self.padding_free else padded_collator(tokenizer)

    def attending(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        """The model switched to this batching's attention for as long as the context lasts."""
        return attention(model, self.attention if self.padding_free else None)

    def describe(self) -> str:
        return ("padding-free" if self.padding_free else "padded") + f" batches ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        return {"padding_free": self.padding_free, "reason": self.reason, "attention": self.attention}


PADDED = Batching(False, "padding_free: off")


def choose_batching(model: torch.nn.Module, setting: PaddingFree = "auto") -> Batching:
    """Padding-free batches where ``model`` supports them (``auto``), always (``on``: an error where it
    cannot) or never (``off``). Supported means: the model takes position ids, its attention implementation
    is flash-attention or SDPA, and a probe of two short examples gives, concatenated, the logits each gives
    alone."""
    if setting == "off":
        return PADDED
    supported, reason, implementation = _support(model)
    if not supported:
        if setting == "on":
            raise ConfigError(f"data.padding_free: on, but {reason}; set it to auto or off")
        decision = Batching(False, reason)
    else:
        decision = Batching(True, reason, implementation)
    log.info("batching: %s", decision.describe())
    return decision


def _support(model: torch.nn.Module) -> tuple[bool, str, str | None]:
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    current = getattr(config, "_attn_implementation", None)
    try:
        takes_positions = "position_ids" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        takes_positions = False
    if not takes_positions:
        return False, f"{type(inner).__name__} takes no position ids", None
    if current is None or current.startswith("flash_attention"):
        implementation = current
    elif current == "sdpa":
        implementation = SEGMENTED_SDPA
    else:
        return False, f"attention implementation {current!r} is neither SDPA nor flash-attention", None
    if not getattr(inner, "_can_set_attn_implementation", lambda: True)() and implementation != current:
        return False, f"{type(inner).__name__} cannot switch its attention implementation", None
    try:
        with attention(model, implementation):
            error = _probe(inner)
    except Exception as err:  # any model that fails the probe is batched the padded way
        return False, f"the padding-free probe failed ({type(err).__name__}: {err})", None
    if error is not None:
        return (
            False,
            f"attention crosses examples when they are concatenated (logits differ by {error:.2g})",
            None,
        )
    via = "flash-attention varlen" if implementation != SEGMENTED_SDPA else "SDPA per example"
    return True, f"{current} model, {via}", implementation


@torch.no_grad()
def _probe(model: torch.nn.Module) -> float | None:
    """None when two short examples give, concatenated, the logits each gives alone; else the largest
    difference."""
    param = next(model.parameters())
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    examples = [torch.randint(1, vocab, (1, n), generator=generator) for n in _PROBE_LENGTHS]
    lengths = torch.tensor([0, *_PROBE_LENGTHS]).cumsum(0).to(torch.int32)
    flat = {
        "input_ids": torch.cat(examples, dim=1).to(param.device),
        "position_ids": torch.cat([torch.arange(n) for n in _PROBE_LENGTHS])[None].to(param.device),
        "cu_seq_lens_q": lengths.to(param.device),
        "cu_seq_lens_k": lengths.to(param.device),
        "max_length_q": max(_PROBE_LENGTHS),
        "max_length_k": max(_PROBE_LENGTHS),
    }
    was_training = model.training
    model.eval()
    try:
        together = model(**flat).logits.float()
        alone = torch.cat([model(input_ids=e.to(param.device)).logits.float() for e in examples], dim=1)
    finally:
        model.train(was_training)
    error = float((together - alone).abs().max())
    scale = float(alone.abs().max()) or 1.0
    # bf16 or fp16 weights round differently when the shapes differ; the second example's logits would be
    # off by far more than that if it saw the first
    tolerance = (1e-4 if param.dtype == torch.float32 else 3e-2) * scale
    return None if error <= tolerance else error
