"""PEFT: ``adapter_config.json`` (LoRA on exactly the selected module names) and, when the selection is whole
blocks, ``adapter_config.blocks.json`` (the same layers, written compactly with ``layers_to_transform``).

peft ``tuners/tuners_utils.py::check_target_module_exists``: a *list* ``target_modules`` entry matches a
module whose full name equals it or ends with ``"." + entry``; with ``layers_to_transform`` the block index
is read after ``layers_pattern`` (``(?:^|.*?\\.){pattern}\\.(\\d+)\\.``); a *string* is a regex matched
with ``re.fullmatch`` (``utils/other.py::match_target_against_key``). Both files are checked with that very
function (``_peft_matches``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .choose import whole_blocks
from .common import ExportContext, Writer, _lora_config, _peft_matches, _status

if TYPE_CHECKING:
    import peft

# peft.LoraConfig fields written to adapter_config.json. A whole LoraConfig.to_dict() carries every field
# of the installed peft (40+ in peft 0.21), some of which older peft versions refuse; these load everywhere.
_PEFT_KEYS = (
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "layers_to_transform",
    "layers_pattern",
    "bias",
    "fan_in_fan_out",
    "init_lora_weights",
    "modules_to_save",
    "use_rslora",
    "use_dora",
)


def _peft_dict(cfg: peft.LoraConfig, order: list[str]) -> dict[str, Any]:
    d = cfg.to_dict()
    d = {k: d.get(k) for k in _PEFT_KEYS}
    for k, v in d.items():
        if isinstance(v, set):  # peft keeps target_modules as a set; write it in the order given
            d[k] = [x for x in order if x in v] + sorted(v - set(order))
        elif hasattr(v, "value"):  # peft's str enums (PeftType, TaskType)
            d[k] = v.value
    return d


def _lora_fields(ctx: ExportContext) -> dict[str, Any]:
    return {
        "r": ctx.r,
        "lora_alpha": ctx.alpha,
        "lora_dropout": ctx.dropout,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": ctx.base_path,
        "inference_mode": False,
    }


def _write_exact(ctx: ExportContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """Exact module names."""
    cfg = _lora_config(target_modules=ctx.model_order, **_lora_fields(ctx))
    entry = {"method": "lora", **_status(ctx.selected, _peft_matches(cfg, ctx.all_names), "target_modules")}
    return entry, _peft_dict(cfg, ctx.model_order)


def _write_blocks(ctx: ExportContext) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Whole blocks, compactly; not written unless that trains exactly the selection."""
    blocks = whole_blocks(ctx.ranking, ctx.model_order)
    if isinstance(blocks, str):
        return {
            "method": "lora",
            "status": "none",
            "reason": f"not whole blocks: {blocks}",
            "trains": 0,
            "extra": 0,
        }, None
    indices, types, pattern = blocks
    cfg = _lora_config(
        target_modules=types, layers_to_transform=indices, layers_pattern=pattern, **_lora_fields(ctx)
    )
    entry = _status(ctx.selected, _peft_matches(cfg, ctx.all_names), "layers_to_transform")
    if entry["status"] == "exact":
        return {"method": "lora", **entry}, _peft_dict(cfg, types)
    return {"method": "lora", **entry, "status": "none", "reason": f"not written: {entry['reason']}"}, None


ADAPTER_CONFIG = Writer("adapter_config.json", _write_exact)
BLOCKS_CONFIG = Writer("adapter_config.blocks.json", _write_blocks)
