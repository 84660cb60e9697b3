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
  with the square of the batch's total length (measured 1.8x slower than padding at batch 16 on the CPU), and
  one SDPA call per example is slower than one batched call (up to 13 % on a step of 4 x 256 tokens here), so
  for SDPA models ila registers its own attention function (:data:`SEGMENTED_SDPA`): inside attention only,
  the examples are laid side by side, right-padded to the longest, and attend causally in one batched SDPA
  call (right padding never changes a causal attention over the real tokens). Every other layer (the
  projections, the MLPs, the norms, the output head: most of the work) runs on the real tokens alone.

Whether a model supports it is decided by a check, not a list of architectures (:func:`choose_batching`): a
short probe of two examples must give, concatenated, the logits each gives alone. The decision and its
reason are logged.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator
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


PADDING_WORTH_REMOVING = 1.10
"""``auto`` flattens a batch when padding it would add more than 10 % to its tokens, and pads it otherwise:
on SmolLM2 on the CPU a flattened batch of ShareGPT conversations (4 % padding) trained about 5 % slower than
the padded one, and chitchat's (31-34 %) 1.26-1.37x faster than the plain Trainer."""


class ChoosingCollator:
    """Each batch flattened when padding would add more than ``above`` times its real tokens, else padded;
    the model's attention (:data:`SEGMENTED_SDPA` or flash-attention) takes either."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, above: float):
        self.padded = padded_collator(tokenizer)
        self.flattened = flattening_collator()
        self.above = above

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(row["input_ids"]) for row in rows]
        padded = len(rows) * -(-max(lengths) // 8) * 8  # padded_collator rounds up to a multiple of 8
        return self.flattened(rows) if padded > self.above * sum(lengths) else self.padded(rows)


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
    """transformers' SDPA attention with each example of a flattened row on its own: the examples are laid
    side by side as a batch, each padded on the right to the longest, and attend causally (within the
    layer's sliding window when it has one). Right padding never changes a causal attention over the real
    tokens (the padding comes after them), so only the attention kernel sees padding, batched as fast as a
    padded batch's; every other layer of the model runs on the real tokens alone. A padded batch goes to SDPA
    with its mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if attention_mask is not None or (bounds is not None and query.shape[0] != 1):
        # a padded batch: SDPA with the mask transformers made for it (window included)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal
        )
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if bounds is None:  # every row is one whole example (no mask was made for it: see _segmented_mask)
        return _causal_sdpa(sdpa_attention_forward, module, query, key, value, dropout, scaling, window), None
    where, examples, longest = _layout(bounds)
    side_by_side = [_side_by_side(t, where, examples, longest) for t in (query, key, value)]
    out = _causal_sdpa(sdpa_attention_forward, module, *side_by_side, dropout, scaling, window)
    # (examples, longest, heads, head_dim) back to the row: (1, tokens, heads, head_dim)
    out = out.reshape(examples * longest, *out.shape[2:])
    return (out if len(where) == len(out) else out[where]).unsqueeze(0), None


def _layout(bounds: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(where each token of the row goes in the (examples x longest) grid, examples, longest)."""
    lengths = bounds[1:] - bounds[:-1]
    examples, longest = len(lengths), int(lengths.max())
    example = torch.repeat_interleave(torch.arange(examples, device=bounds.device), lengths)
    position = torch.arange(int(bounds[-1]), device=bounds.device) - bounds[:-1].long()[example]
    return example * longest + position, examples, longest


def _side_by_side(t: torch.Tensor, where: torch.Tensor, examples: int, longest: int) -> torch.Tensor:
    """(1, heads, tokens, head_dim) of a row to (examples, heads, longest, head_dim), zeros after the end."""
    heads, dim = t.shape[1], t.shape[3]
    if examples * longest == t.shape[2]:  # every example as long as the longest: a view, no copy
        return t[0].view(heads, examples, longest, dim).transpose(0, 1)
    grid = t.new_zeros(examples * longest, heads, dim)
    grid[where] = t[0].transpose(0, 1)
    return grid.view(examples, longest, heads, dim).transpose(1, 2)


def _causal_sdpa(
    sdpa: Callable[..., tuple[torch.Tensor, Any]],
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    """Causal SDPA over (batch, heads, length, head_dim), within ``window`` tokens when given."""
    length = query.shape[2]
    mask = None
    if window is not None and length > window:
        # key j is seen by query i when i - window < j <= i (transformers' sliding_window_overlay)
        pos = torch.arange(length, device=query.device)
        offset = pos[:, None] - pos[None, :]
        mask = ((offset >= 0) & (offset < window))[None, None]
    out, _ = sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=mask is None)
    return out


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
    above: float = PADDING_WORTH_REMOVING
    """A batch is flattened when padding would make it more than this many times its real tokens (0: every
    batch, ``padding_free: on``)."""

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Any:
        return ChoosingCollator(tokenizer, self.above) if self.padding_free else padded_collator(tokenizer)

    def attending(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        """The model switched to this batching's attention for as long as the context lasts."""
        return attention(model, self.attention if self.padding_free else None)

    def describe(self) -> str:
        return ("padding-free" if self.padding_free else "padded") + f" batches ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "padding_free": self.padding_free,
            "reason": self.reason,
            "attention": self.attention,
            "flattened_above": self.above if self.padding_free else None,
        }


PADDED = Batching(False, "padding_free: off")


def choose_batching(model: torch.nn.Module, setting: PaddingFree = "auto") -> Batching:
    """Padding-free batches where ``model`` supports them and padding would add more than 10 % to a batch
    (``auto``, :data:`PADDING_WORTH_REMOVING`), for every batch (``on``: an error where the model cannot) or
    never (``off``). Supported means: the model takes position ids, its attention implementation
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
        decision = Batching(True, reason, implementation, 0.0 if setting == "on" else PADDING_WORTH_REMOVING)
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
    via = "flash-attention varlen" if implementation != SEGMENTED_SDPA else "SDPA, examples side by side"
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
