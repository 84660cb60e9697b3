"""ms-swift: ``swift.sh`` (LoRA) and ``swift.full.sh`` (full fine-tuning of the selected weights), shell
scripts that run ``swift sft`` with the selection and pass on any further arguments.

ms-swift ``docs/source_en/Instruction/Command-line-parameters.md``, Tuner Arguments: ``--target_regex``
overrides ``--target_modules`` and is handed to peft as a string ``target_modules`` (so ``re.fullmatch``);
Full Arguments: ``--freeze_parameters_ratio 1`` freezes everything and ``--trainable_parameters_regex``
makes parameters whose name matches trainable again (``swift/utils`` ``activate_parameters``, ``re.search``
over ``named_parameters()``; it runs after ``freeze_parameters`` for ``full``, ``pipelines/train/tuner.py``).
A tied ``lm_head``'s weight is named by the input embedding's parameter name, the only one listed.

The tuner flag: ms-swift 3.x (``swift/llm/argument/base_args/base_args.py``, 3.12.6) has ``train_type``
only, so ``--tuner_type`` is left over and ``parse_args`` raises ``ValueError: remaining_argv``; 4.0
(``swift/arguments/base_args/base_args.py``) renamed it ``tuner_type`` and kept ``train_type`` as a
deprecated alias; 4.1 dropped the alias, so from then on ``--train_type`` is refused the same way. The
scripts pick the flag when they run, from the installed version.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from typing import Any

from .common import ExportContext, Writer, _alternation, _approx, _comment, _named_head, _status


def _swift_targets(target_regex: str, names: Sequence[str]) -> set[str]:
    """``--target_regex``: peft's string ``target_modules``, ``re.fullmatch``-ed against each module name."""
    return {n for n in names if re.fullmatch(target_regex, n)}


def _swift_trainable(trainable_regex: str, params: Sequence[str]) -> set[str]:
    """``--trainable_parameters_regex``: ``re.search``-ed against each parameter name."""
    return {p for p in params if re.search(trainable_regex, p)}


# The tuner flag is chosen when the script runs, from the installed ms-swift: 3.x takes only --train_type
# and refuses --tuner_type; 4.0 takes both; 4.1 and later only --tuner_type (ValueError: remaining_argv).
# importlib.metadata reads the version without importing swift (which pulls in torch and transformers).
_TUNER_FLAG = r"""if [ -z "${TUNER_FLAG:-}" ]; then
  if [ -n "${SWIFT_PYTHON:-}" ]; then pythons=("$SWIFT_PYTHON"); else pythons=(python python3); fi
  swift_version=""
  for py in "${pythons[@]}"; do
    if swift_version="$("$py" -c 'import importlib.metadata as m; print(m.version("ms-swift"))' 2>/dev/null)"
    then break; fi
    swift_version=""
  done
  case "$swift_version" in
    3.*) TUNER_FLAG=--train_type ;;
    [0-2].*)
      echo "$0: ms-swift $swift_version is older than 3.0, whose flags this script uses; upgrade ms-swift" >&2
      exit 2 ;;
    "")
      TUNER_FLAG=--tuner_type
      echo "$0: no ms-swift found for ${pythons[*]}; using $TUNER_FLAG (ms-swift >= 4)." \
        "Set SWIFT_PYTHON to the Python that has ms-swift, or TUNER_FLAG=--train_type for ms-swift 3.x" >&2 ;;
    *) TUNER_FLAG=--tuner_type ;;
  esac
fi"""


def _swift_script(header: str, base_path: str | None, tuner: str, args: list[str], explain: str) -> str:
    name = "swift.sh" if tuner == "lora" else "swift.full.sh"
    if base_path:
        model_line = f'if [ -z "${{MODEL:-}}" ]; then MODEL={shlex.quote(base_path)}; fi'
        model_usage = "[MODEL=<base model id or folder>]"
    else:
        model_line = ': "${MODEL:?set MODEL to the base model id or folder}"'
        model_usage = "MODEL=<base model id or folder>"
    lines = [
        "#!/usr/bin/env bash",
        _comment(f"""ms-swift {"LoRA" if tuner == "lora" else "full fine-tuning"} of the selected layers.
{header}
Usage: {model_usage} bash {name} --dataset <data> [more swift sft arguments]
  With a local model folder add ms-swift's model type and chat template, which it cannot always infer from
  config.json (several of its model types share one architecture):
  --model_type <ms-swift model type> --template <ms-swift template>; for SmolLM2, a Llama-architecture ChatML
  model: bash {name} --model_type llama --template chatml --dataset <data>
{explain}
Tuner flag: ms-swift 3.x takes --train_type and refuses --tuner_type, ms-swift 4.1 and later take only
  --tuner_type (4.0 both). The script reads the installed ms-swift version with python (or python3;
  SWIFT_PYTHON=<interpreter> names another) and passes the matching flag; without one it uses --tuner_type.
  TUNER_FLAG=--train_type or --tuner_type skips the check.""").rstrip("\n"),
        "set -euo pipefail",
        model_line,
        _TUNER_FLAG,
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
        + (f"\n{ctx.head_note}" if ctx.head_note else ""),
    )
    entry = {
        "method": "full",
        **_status(
            ctx.selected_params,
            _swift_trainable(trainable_regex, ctx.all_params),
            "--trainable_parameters_regex",
        ),
    }
    return _named_head(ctx, entry), text


LORA = Writer("swift.sh", _write_lora)
FULL = Writer("swift.full.sh", _write_full)
