"""Dry runs: put a selection on a loaded model and count what would train, for LoRA or for full fine-tuning
of the selected modules' weights, next to the same count for every layer; and the table for the CLI."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from ..config import LoraConfig
from ..errors import IlaError
from ..layers import Layer, adaptable_layers
from ..models import attach_lora, model_identity
from ..ranking import Ranking
from .choose import _normalise

if TYPE_CHECKING:
    from torch import nn


def _model_layers(ranking: Ranking, model: nn.Module) -> list[Layer]:
    """The model's layers as the ranking counts them (restricted to the ranking's module types if it was)."""
    layers = adaptable_layers(model, include_lm_head=ranking.include_lm_head)
    mine = {x.name for x in ranking.layers}
    if mine < {x.name for x in layers}:  # ranked with lora.module_types: compare like with like
        types = sorted({x.module_type for x in ranking.layers if x.block is not None})
        layers = adaptable_layers(model, include_lm_head=ranking.include_lm_head, module_types=types)
    return layers


def _lora_count(model: nn.Module, names: list[str], r: int) -> tuple[int, int]:
    """(trainable, total) as peft reports them for LoRA of rank ``r`` on ``names``.

    Leaves ``model`` as it was.
    """
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from transformers/peft internals
        peft_model = attach_lora(model, names, LoraConfig(r=r, alpha=float(r), dropout=0.0))
        try:
            trainable, total = peft_model.get_nb_trainable_parameters()
        finally:
            peft_model.unload()  # puts the original modules back into `model`
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))
    return int(trainable), int(total)


def _full_count(model: nn.Module, names: list[str]) -> tuple[int, int]:
    """(weights of the modules ``names``, all parameters); a weight shared by two modules counts once."""
    modules = dict(model.named_modules())
    seen: set[int] = set()
    trainable = 0
    for name in names:
        weight = getattr(modules[name], "weight", None)
        if weight is not None and id(weight) not in seen:
            seen.add(id(weight))
            trainable += weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def dry_run(
    ranking: Ranking,
    names: Sequence[str],
    model: nn.Module,
    method: Literal["lora", "full"] = "lora",
    r: int = 8,
    *,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Check that ``ranking`` is of ``model``, put the selection on it and count what would train.

    ``method="lora"``: LoRA of rank ``r`` on the selected modules (counted by peft, then removed again);
    ``"full"``: the selected modules' weights. The same count for every ranked layer is under ``all_layers``.
    """
    if method not in ("lora", "full"):
        raise IlaError(f"method must be lora or full, got {method!r}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise IlaError(f"LoRA rank r must be an integer >= 1, got {r!r}")
    in_ranking_order, chosen = _normalise(ranking, names)
    name = model_name or str(ranking.base_model.get("name") or type(model).__name__)
    ranking.check_matches(_model_layers(ranking, model), model_identity(model, name))

    selected = {x.name for x in chosen}
    model_order = [x.name for x in chosen]
    every = [x.name for x in ranking.layers]
    if method == "lora":
        sel_t, sel_total = _lora_count(model, model_order, r)
        all_t, all_total = _lora_count(model, every, r)
    else:
        sel_t, sel_total = _full_count(model, model_order)
        all_t, all_total = _full_count(model, every)

    types: list[str] = []
    for x in ranking.layers:
        if x.module_type not in types:
            types.append(x.module_type)
    per_type = {t: {"selected": 0, "total": 0} for t in types}
    blocks: dict[str, dict[str, Any]] = {}
    for x in ranking.layers:
        key = x.block or x.name
        b = blocks.setdefault(
            key,
            {
                "block": key,
                "index": x.block_index,
                "types": [],
                "selected": [],
                "num_layers": 0,
                "num_selected": 0,
            },
        )
        b["types"].append(x.module_type)
        b["num_layers"] += 1
        per_type[x.module_type]["total"] += 1
        if x.name in selected:
            b["selected"].append(x.module_type)
            b["num_selected"] += 1
            per_type[x.module_type]["selected"] += 1

    def pct(a: int, b: int) -> float:
        return 100.0 * a / b if b else 0.0

    return {
        "model": name,
        "method": method,
        "r": r if method == "lora" else None,
        "num_layers": ranking.num_layers,
        "num_selected": len(chosen),
        "num_blocks": sum(1 for b in blocks.values() if b["index"] is not None),
        "module_types": types,
        "blocks": list(blocks.values()),
        "per_module_type": per_type,
        "selection": {"trainable": sel_t, "total": sel_total, "percent": pct(sel_t, sel_total)},
        "all_layers": {"trainable": all_t, "total": all_total, "percent": pct(all_t, all_total)},
        "layers": in_ranking_order,
    }


def render_dry_run(result: dict[str, Any], selection_text: str) -> str:
    """The dry run as a compact table: one row per block, one column per module type."""
    types = result["module_types"]
    short = [t.rsplit(".", 1)[-1] for t in types]
    heads = short if len(set(short)) == len(short) else types
    width = [max(len(h), 1) for h in heads]
    rows = result["blocks"]
    labels = [str(b["index"]) if b["index"] is not None else b["block"] for b in rows]
    label_w = max(len(x) for x in ["block", *labels])
    out = [
        f"model      {result['model']}",
        f"selection  {selection_text}: {result['num_selected']} of {result['num_layers']} layers",
        "",
        "block".rjust(label_w)
        + "  "
        + "  ".join(h.rjust(w) for h, w in zip(heads, width, strict=True))
        + "  selected",
    ]
    for b, label in zip(rows, labels, strict=True):
        cells = []
        for t, w in zip(types, width, strict=True):
            cell = ("x" if t in b["selected"] else ".") if t in b["types"] else " "
            cells.append(cell.rjust(w))
        out.append(
            label.rjust(label_w) + "  " + "  ".join(cells) + f"  {b['num_selected']}/{b['num_layers']}"
        )
    out.append("")
    out.append(
        "per module type: "
        + ", ".join(f"{t} {c['selected']}/{c['total']}" for t, c in result["per_module_type"].items())
    )
    what = (
        f"LoRA r={result['r']}" if result["method"] == "lora" else "full fine-tuning of the selected weights"
    )
    sel, every = result["selection"], result["all_layers"]
    out.append(f"trainable parameters ({what}):")
    out.append(f"  selection   {sel['trainable']:>14,}  {sel['percent']:7.3f} % of {sel['total']:,}")
    out.append(f"  all layers  {every['trainable']:>14,}  {every['percent']:7.3f} % of {every['total']:,}")
    return "\n".join(out)
