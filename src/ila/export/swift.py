"""ms-swift: ``swift.sh`` (LoRA) and ``swift.full.sh`` (full fine-tuning of the selected weights), shell
scripts that run ``swift sft`` with the selection and pass on any further arguments.

ms-swift ``docs/source_en/Instruction/Command-line-parameters.md``, Tuner Arguments: ``--target_regex``
overrides ``--target_modules`` and is handed to peft as a string ``target_modules`` (so ``re.fullmatch``);
Full Arguments: ``--freeze_parameters_ratio 1`` freezes everything and ``--trainable_parameters_regex``
makes parameters whose name matches (``re.search``, ``swift/utils`` ``activate_parameters``) trainable
again. ms-swift 3.x names the tuner flag ``--train_type``; ms-swift 4 renamed it ``--tuner_type``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from typing import Any

from .common import ExportContext, Writer, _alternation, _approx, _comment, _status


def _swift_targets(target_regex: str, names: Sequence[str]) -> set[str]:
    """``--target_regex``: peft's string ``target_modules``, ``re.fullmatch``-ed against each module name."""
    return {n for n in names if re.fullmatch(target_regex, n)}


def _swift_trainable(trainable_regex: str, params: Sequence[str]) -> set[str]:
    """``--trainable_parameters_regex``: ``re.search``-ed against each parameter name."""
    return {p for p in params if re.search(trainable_regex, p)}


def _swift_script(header: str, base_path: str | None, tuner: str, args: list[str], explain: str) -> str:
    if base_path:
        model_line = f'if [ -z "${{MODEL:-}}" ]; then MODEL={shlex.quote(base_path)}; fi'
    else:
        model_line = ': "${MODEL:?set MODEL to the base model id or folder}"'
    lines = [
        "#!/usr/bin/env bash",
        _comment(f"""ms-swift {"LoRA" if tuner == "lora" else "full fine-tuning"} of the selected layers.
{header}
Usage: MODEL=<base model id or folder> bash {"swift.sh" if tuner == "lora" else "swift.full.sh"} \\
         --dataset ... [more swift sft arguments]
{explain}
TUNER_FLAG: ms-swift 3.x calls the tuner flag --train_type; ms-swift 4 renamed it --tuner_type: set
  TUNER_FLAG=--tuner_type there.""").rstrip("\n"),
        "set -euo pipefail",
        model_line,
        'TUNER_FLAG="${TUNER_FLAG:---train_type}"',
        'exec swift sft --model "$MODEL" "$TUNER_FLAG" ' + tuner + " \\",
    ]
    for i in range(0, len(args), 2):
        lines.append(f"  {args[i]} {shlex.quote(args[i + 1])} \\")
    lines.append('  "$@"')
    return "\n".join(lines) + "\n"


def _write_lora(ctx: ExportContext) -> tuple[dict[str, Any], str]:
    target_regex = _alternation(ctx.model_order)
    text = _swift_script(
        ctx.header,
        ctx.base_path,
        "lora",
        [
            "--lora_rank",
            str(ctx.r),
            "--lora_alpha",
            str(ctx.int_alpha),
            "--lora_dropout",
            f"{ctx.dropout:g}",
            "--target_regex",
            target_regex,
        ],
        "--target_regex: a regex of module names; it overrides --target_modules "
        """and ms-swift hands it to peft as
  a string target_modules, which peft matches with re.fullmatch against each full module name: exactly
  the selected layers get LoRA (^...$ alternation of the escaped names).
--lora_rank / --lora_alpha / --lora_dropout: rank, scaling numerator and dropout of LoRA.""",
    )
    entry = {
        "method": "lora",
        **_status(ctx.selected, _swift_targets(target_regex, ctx.all_names), "--target_regex"),
    }
    if ctx.alpha_note:
        entry = _approx(entry, ctx.alpha_note)
    return entry, text


def _write_full(ctx: ExportContext) -> tuple[dict[str, Any], str]:
    """Full fine-tuning of the selected weights."""
    trainable_regex = _alternation(ctx.weights)
    text = _swift_script(
        ctx.header,
        ctx.base_path,
        "full",
        ["--freeze_parameters_ratio", "1", "--trainable_parameters_regex", trainable_regex],
        "--freeze_parameters_ratio 1: freeze every parameter; "
        """--trainable_parameters_regex: then make trainable
  again each parameter whose name matches (re.search; ^...$ anchors the escaped weight names), which takes
  precedence over the freezing (ms-swift docs, Full Arguments)."""
        + (f"\n{ctx.tied_note}" if ctx.tied_note else ""),
    )
    entry = {
        "method": "full",
        **_status(
            ctx.selected_params,
            _swift_trainable(trainable_regex, ctx.all_params),
            "--trainable_parameters_regex",
        ),
    }
    if ctx.tied_note:
        entry = _approx(entry, ctx.tied_note)
    return entry, text


LORA = Writer("swift.sh", _write_lora)
FULL = Writer("swift.full.sh", _write_full)
