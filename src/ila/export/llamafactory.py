"""LLaMA-Factory: ``llamafactory.yaml`` (LoRA arguments) and ``llamafactory.freeze.yaml`` (freeze tuning, the
closest expressible superset of the selection).

LLaMA-Factory ``hparams/finetuning_args.py`` (``lora_target``, ``freeze_trainable_layers``,
``freeze_trainable_modules``, ``freeze_extra_modules``; comma-separated strings are split on commas),
``model/adapter.py::_setup_lora_tuning`` (``lora_target`` goes to ``peft.LoraConfig(target_modules=...)``
after ``model_utils/visual.py::patch_target_modules``, which leaves it unchanged for text-only models and
substring-matches it against module names for registered multimodal models) and ``_setup_freeze_tuning``
(trainable blocks are the last N for ``freeze_trainable_layers: N > 0`` or the first N for ``-N``; a
parameter trains when its name contains ``".{block}.{module}"`` for a trainable block and a
``freeze_trainable_modules`` entry, which must be a direct child of the block such as ``self_attn`` or
``mlp``, or ``all``; ``freeze_extra_modules`` adds non-block modules such as ``lm_head``, each of which
must be the second-to-last part of a parameter name outside the blocks, else "Module ... is not found": a
tied ``lm_head`` is not, its weight being listed as ``model.embed_tokens.weight``).
"""

from __future__ import annotations

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


def _llamafactory_freeze(trainable_layers: Sequence[str], params: Sequence[str]) -> set[str]:
    """LLaMA-Factory ``_setup_freeze_tuning``: a parameter trains when any entry is a substring of its
    name."""
    return {p for p in params if any(t in p for t in trainable_layers)}


def _write_lora(ctx: ExportContext) -> tuple[dict[str, Any], str]:
    lf: dict[str, Any] = {}
    if ctx.base_path:
        lf["model_name_or_path"] = ctx.base_path
    lf.update(
        finetuning_type="lora",
        lora_rank=ctx.r,
        lora_alpha=ctx.int_alpha,
        lora_dropout=ctx.dropout,
        lora_target=",".join(ctx.model_order),
    )
    text = _comment(
        "LLaMA-Factory LoRA arguments: merge into a training YAML "
        f"""(stage, dataset, template, ... are yours).
{ctx.header}
lora_target: comma-separated module names. LLaMA-Factory splits it on commas and passes the list to
  peft.LoraConfig(target_modules=...) (src/llamafactory/model/adapter.py, _setup_lora_tuning); for text-only
  models model_utils/visual.py patch_target_modules leaves it unchanged, and peft adapts a module whose full
  name equals an entry: these full names adapt exactly the selected layers. (For a registered multimodal
  model LLaMA-Factory instead adapts every module whose name contains an entry as a substring.)
lora_rank / lora_alpha / lora_dropout: rank, scaling numerator and dropout of LoRA.
""" + (f"{ctx.builtin_note}\n" if ctx.builtin_note else "")
    ) + _yaml(lf)
    entry = {
        "method": "lora",
        **_status(ctx.selected, _peft_list_matches(ctx.model_order, ctx.all_names), "lora_target"),
        "note": "exact for text-only models; multimodal models substring-match lora_target",
    }
    if ctx.alpha_note:
        entry = _approx(entry, ctx.alpha_note)
    return entry, text


def _write_freeze(ctx: ExportContext) -> tuple[dict[str, Any], str]:
    """LLaMA-Factory freeze tuning: the smallest (first-N or last-N blocks) x (direct children of the block)
    configuration that trains every selected weight, and how far it is from the selection."""
    in_blocks = [x for x in ctx.chosen if x.block_index is not None]
    # LLaMA-Factory accepts as extra modules the second-to-last part of the names of parameters outside the
    # blocks (name.split(".")[-2]); a tied lm_head is listed only as the input embedding (embed_tokens).
    outside = [w for x, w in zip(ctx.chosen, ctx.weights, strict=True) if x.block_index is None]
    extra_modules = sorted({w.split(".")[-2] for w in outside})
    n_blocks = ctx.n_blocks
    intro = f"""LLaMA-Factory freeze tuning (partial-parameter full fine-tuning) arguments.
{ctx.header}
freeze_trainable_layers: N > 0 trains the last N blocks, -N the first N (hparams/finetuning_args.py).
freeze_trainable_modules: comma-separated direct children of a block (e.g. self_attn, mlp) to train in those
  blocks; a parameter trains when its name contains ".<block>.<module>" (model/adapter.py,
  _setup_freeze_tuning), i.e. every parameter of that child, biases and norms inside it included.
freeze_extra_modules: modules outside the blocks to train too (e.g. lm_head)."""
    if not in_blocks:
        entry = {
            "method": "freeze",
            "status": "none",
            "trains": 0,
            "extra": 0,
            "reason": "the selection has no layer inside a block; freeze tuning always trains >= 1 block",
        }
        text = _comment(f"{intro}\nNOT EXPRESSIBLE: {entry['reason']}.\n") + _yaml(
            {"finetuning_type": "freeze"}
        )
        return entry, text
    indices = sorted({x.block_index for x in in_blocks})  # type: ignore[type-var]
    last_n = n_blocks - indices[0]
    first_n = indices[-1] + 1
    n = last_n if last_n <= first_n else -first_n
    ids = range(n_blocks - n, n_blocks) if n > 0 else range(-n)
    children = sorted({x.module_type.split(".", 1)[0] for x in in_blocks})
    trainable_layers = [f".{i}.{c}" for c in children for i in ids] + extra_modules
    trained = _llamafactory_freeze(trainable_layers, ctx.all_params)
    entry = {"method": "freeze", **_status(ctx.selected_params, trained, "freeze tuning")}
    why_whole = (
        f"it trains every parameter of {', '.join(children)}, any bias or norm inside included "
        "(Llama-style blocks have none)"
    )
    if entry["status"] == "exact":
        entry = _approx(entry, why_whole)
        verdict = (
            "SAME LAYERS: these arguments train exactly the selected layers' weights, but " + why_whole + "."
        )
    else:
        entry["reason"] = f"{entry['reason']}; {why_whole}"
        sel_blocks = ", ".join(str(i) for i in indices)
        span = f"the last {n}" if n > 0 else f"the first {-n}"
        verdict = (
            f"NOT EXACT: freeze tuning can only train a contiguous run of the first or last N blocks and\n"
            f"whole children of each block. The selection touches blocks {sel_blocks} (of {n_blocks}) and\n"
            f"the children {', '.join(children)}; the closest expressible superset below trains {span}\n"
            f"blocks' {', '.join(children)}: {entry['trains']} layers, "
            f"{entry['extra']} of them not selected.\n"
            f"For exactly the selected layers use llamafactory.yaml (LoRA), or a full fine-tuning\n"
            f"tool that takes parameter names (axolotl.full.yaml, swift.full.sh, parameters.txt)."
        )
    if ctx.head is not None and ctx.tied is not False:
        entry = _named_head(ctx, entry)
        if ctx.tied:
            verdict += (
                f"\n{ctx.head_note}: freeze_extra_modules names it as {', '.join(extra_modules)}, since "
                f"LLaMA-Factory refuses a name that no parameter has ('Module {ctx.head} is not found')."
            )
        else:
            verdict += (
                f"\nMAY NOT RUN: {ctx.head_note}; LLaMA-Factory then refuses "
                f"freeze_extra_modules: {ctx.head} ('Module {ctx.head} is not found')."
            )
    lf: dict[str, Any] = {}
    if ctx.base_path:
        lf["model_name_or_path"] = ctx.base_path
    lf.update(
        finetuning_type="freeze", freeze_trainable_layers=n, freeze_trainable_modules=",".join(children)
    )
    if extra_modules:
        lf["freeze_extra_modules"] = ",".join(extra_modules)
    return entry, _comment(intro + "\n" + verdict + "\n") + _yaml(lf)


LORA = Writer("llamafactory.yaml", _write_lora)
FREEZE = Writer("llamafactory.freeze.yaml", _write_freeze)
