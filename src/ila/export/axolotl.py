"""axolotl: ``axolotl.yaml`` (a LoRA fragment) and ``axolotl.full.yaml`` (full fine-tuning of the selected
weights, everything else frozen).

axolotl ``loaders/adapter.py::_build_peft_lora_config`` passes ``lora_target_modules`` (plus every linear
module when ``lora_target_linear`` is true), ``peft_layers_to_transform`` and ``peft_layers_pattern`` to
``peft.LoraConfig`` unchanged; ``utils/freeze.py::freeze_layers_except`` freezes every parameter, then
unfreezes those whose name ``re.match``-es an ``unfrozen_parameters`` pattern, in which every ``.`` not
followed by ``+`` is rewritten to ``\\.`` (so a pattern must be written with bare dots:
``^model.layers.3.mlp.up_proj.weight$``; an already escaped ``\\.`` would become ``\\\\.`` and match
nothing). A tied ``lm_head``'s weight is named by the input embedding's parameter name, the only name
``named_parameters()`` lists it under.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .common import (
    ExportContext,
    Writer,
    _approx,
    _comment,
    _named_head,
    _peft_list_matches,
    _status,
    _yaml,
)

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


def _axolotl_unfrozen(patterns: Sequence[str], params: Sequence[str]) -> set[str]:
    """axolotl ``utils/freeze.py``: LayerNamePattern escapes every ``.`` not followed by ``+``, then
    re.match."""
    compiled = [re.compile(re.sub(r"\.(?!\+)", "\\.", p)) for p in patterns]
    return {p for p in params if any(c.match(p) for c in compiled)}


def _write_lora(ctx: ExportContext) -> tuple[dict[str, Any], str]:
    axo: dict[str, Any] = {}
    if ctx.base_path:
        axo["base_model"] = ctx.base_path
    axo.update(
        adapter="lora",
        lora_r=ctx.r,
        lora_alpha=ctx.int_alpha,
        lora_dropout=ctx.dropout,
        lora_target_linear=False,
        lora_target_modules=ctx.model_order,
    )
    text = _comment(
        f"""axolotl LoRA fragment: merge into an axolotl config (datasets, optimiser, ... are yours).
{ctx.header}
lora_target_modules: axolotl hands this list to peft.LoraConfig(target_modules=...) unchanged
  (src/axolotl/loaders/adapter.py, _build_peft_lora_config); peft adapts a module whose full name equals an
  entry, so these full names adapt exactly the selected layers.
lora_target_linear: must stay false; true would add every linear module of the model.
lora_r / lora_alpha / lora_dropout: rank, scaling numerator (scale = alpha / r) and dropout of LoRA.
For full fine-tuning of the same layers use axolotl.full.yaml instead (not together with adapter: lora).
"""
        + (f"{ctx.builtin_note}\n" if ctx.builtin_note else "")
    ) + _yaml(axo)
    entry = {
        "method": "lora",
        **_status(ctx.selected, _peft_list_matches(ctx.model_order, ctx.all_names), "lora_target_modules"),
    }
    if ctx.alpha_note:
        entry = _approx(entry, ctx.alpha_note)
    return entry, text


def _write_full(ctx: ExportContext) -> tuple[dict[str, Any], str]:
    """Full fine-tuning of the selected weights."""
    plain = all(_PLAIN_NAME.match(w) for w in ctx.weights)
    unfrozen = [f"^{w}$" for w in ctx.weights]
    axo_full: dict[str, Any] = {}
    if ctx.base_path:
        axo_full["base_model"] = ctx.base_path
    axo_full["unfrozen_parameters"] = unfrozen
    text = _comment(
        "axolotl full fine-tuning fragment: no adapter; "
        f"""every parameter is frozen except the selected weights.
{ctx.header}
unfrozen_parameters: regexes of parameter names (model.named_parameters()) to keep trainable; axolotl
  (src/axolotl/utils/freeze.py, freeze_layers_except) rewrites every '.' not followed by '+' to a literal
  '\\.' and applies re.match, so the dots below are deliberately unescaped and ^...$ anchors each name.
""" + (f"{ctx.head_note}\n" if ctx.head_note else "")
    ) + _yaml(axo_full)
    if plain:
        entry = _status(
            ctx.selected_params, _axolotl_unfrozen(unfrozen, ctx.all_params), "unfrozen_parameters"
        )
    else:
        entry = {
            "status": "none",
            "reason": "module names with characters other than letters, digits, _ and . "
            "cannot be written as axolotl patterns",
            "trains": 0,
            "extra": 0,
        }
    return _named_head(ctx, {"method": "full", **entry}), text


LORA = Writer("axolotl.yaml", _write_lora)
FULL = Writer("axolotl.full.yaml", _write_full)
