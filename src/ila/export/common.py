"""What every export writer shares: the facts of one export (:class:`ExportContext`), the :class:`Writer`
record the registry in ``ila.export`` lists, the comparison of what a file trains with the selection
(``_status``, ``_approx``), peft's matching rule (which axolotl and LLaMA-Factory hand their LoRA targets
to), the ``selection.json`` envelope, and YAML / comment formatting."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .._version import __version__
from ..layers import Layer
from ..models import BUILTIN_MODELS
from ..ranking import Ranking

if TYPE_CHECKING:
    import peft

SCHEMA_VERSION = 1
KIND = "ila.selection"


# -- one export's facts, and the writers ---------------------------------------------------------------------


@dataclass(frozen=True)
class ExportContext:
    """Everything a writer needs to know about one export; built once by :func:`export_context`."""

    ranking: Ranking
    mode: str
    fraction: float | None
    ranking_path: str | Path | None
    layers: list[str]  # the selected names in ranking order
    chosen: list[Layer]  # the selected layers in model order
    model_order: list[str]  # their names
    selected: set[str]
    all_names: list[str]  # every ranked layer: the universe each file is checked over
    all_params: list[str]  # their weights' parameter names
    weights: list[str]  # the selected layers' weights, in model order
    selected_params: set[str]
    n_blocks: int
    r: int
    alpha: float
    dropout: float
    int_alpha: int  # alpha for tools that take an integer, and the note if it was rounded
    alpha_note: str | None
    base_path: str | None  # what the tools load as the base model; None when they cannot
    builtin_note: str | None
    tied_note: str | None
    header: str  # the provenance lines every file's comment starts with

    @property
    def notes(self) -> list[str]:
        return [n for n in (self.builtin_note, self.tied_note) if n]


# A writer returns the status entry of its file for selection.json and the file's content (a dict is written
# as JSON, a string as text), or None when it writes no file.
WriteFn = Callable[[ExportContext], tuple[dict[str, Any], dict[str, Any] | str | None]]


@dataclass(frozen=True)
class Writer:
    """One exported file: its name and the function that writes it."""

    name: str
    write: WriteFn


def export_context(
    ranking: Ranking,
    layers: list[str],
    chosen: list[Layer],
    *,
    r: int,
    alpha: float,
    dropout: float,
    mode: str,
    fraction: float | None,
    ranking_path: str | Path | None,
) -> ExportContext:
    """The facts of exporting ``chosen`` (``layers`` in ranking order, as ``_normalise`` returns them)."""
    model_order = [layer.name for layer in chosen]
    all_names = [layer.name for layer in ranking.layers]
    weights = [f"{n}.weight" for n in model_order]
    n_blocks = 1 + max((x.block_index for x in ranking.layers if x.block_index is not None), default=-1)

    base_name = ranking.base_model.get("name")
    builtin = isinstance(base_name, str) and base_name in BUILTIN_MODELS
    base_path = None if builtin or not base_name else str(base_name)
    builtin_note = None
    if builtin:
        builtin_note = (
            f"the base model is the builtin {base_name!r}, which other tools cannot load by that name: "
            f"base_model_name_or_path is left empty; point the tools at the converted folder "
            f"(~/.cache/ila/models/{base_name}, or $ILA_CACHE/models/{base_name})"
        )
    lm_head = [layer.name for layer in chosen if layer.block is None]
    tied_note = None
    if lm_head:
        tied_note = (
            f"{lm_head[0]}.weight may be tied to the input embeddings; named_parameters() then lists it "
            f"under the embedding's name only, so a parameter pattern for {lm_head[0]}.weight matches nothing"
        )
    selection_text = (
        f"{'explicit list' if mode == 'list' else f'{mode} {fraction:g}'}: "
        f"{len(chosen)} of {ranking.num_layers} layers"
    )
    source_text = f"ranking {ranking_path}" if ranking_path else "an ila ranking"
    header = (
        f"Written by ila {__version__} (ila export) from {source_text}.\n"
        f"Selection ({selection_text}) of base model {base_name or 'unknown'}."
    )
    int_alpha, alpha_note = _int_alpha(alpha)
    return ExportContext(
        ranking=ranking,
        mode=mode,
        fraction=fraction,
        ranking_path=ranking_path,
        layers=layers,
        chosen=chosen,
        model_order=model_order,
        selected=set(model_order),
        all_names=all_names,
        all_params=[f"{n}.weight" for n in all_names],
        weights=weights,
        selected_params=set(weights),
        n_blocks=n_blocks,
        r=r,
        alpha=alpha,
        dropout=dropout,
        int_alpha=int_alpha,
        alpha_note=alpha_note,
        base_path=base_path,
        builtin_note=builtin_note,
        tied_note=tied_note,
        header=header,
    )


def selection_summary(ctx: ExportContext, formats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``selection.json`` envelope: the selection, the base model, and each file's status."""
    return {
        **ctx.ranking.selection_record(
            ctx.layers, mode=ctx.mode, fraction=ctx.fraction, ranking_path=ctx.ranking_path
        ),
        "num_selected": len(ctx.chosen),
        "lora": {"r": ctx.r, "alpha": ctx.alpha, "dropout": ctx.dropout},
        "formats": formats,
        "notes": ctx.notes,
    }


# -- what a file trains, compared with the selection -----------------------------------------------------


def _peft_matches(config: peft.LoraConfig, names: Sequence[str]) -> set[str]:
    """Module names that peft would adapt under ``config`` (peft's own matching function)."""
    from peft.tuners.tuners_utils import check_target_module_exists  # peft is slow to import: only on export

    return {n for n in names if check_target_module_exists(config, n)}


def _lora_config(**kwargs: Any) -> peft.LoraConfig:
    """``peft.LoraConfig(**kwargs)``."""
    import peft  # slow to import: only on export

    return peft.LoraConfig(**kwargs)


def _peft_list_matches(targets: list[str], names: Sequence[str]) -> set[str]:
    """Module names that peft adapts for the list ``target_modules=targets`` (axolotl and LLaMA-Factory hand
    their LoRA target lists to peft unchanged)."""
    return _peft_matches(_lora_config(target_modules=targets), names)


def _status(selected: set[str], trained: set[str], what: str) -> dict[str, Any]:
    if trained == selected:
        return {"status": "exact", "reason": None, "trains": len(trained), "extra": 0}
    missing = sorted(selected - trained)
    extra = sorted(trained - selected)
    if missing:
        return {
            "status": "none",
            "reason": f"{what} would miss {len(missing)} selected layers, e.g. {missing[0]}",
            "trains": len(trained & selected),
            "extra": len(extra),
        }
    return {
        "status": "approximate",
        "reason": f"{what} trains a superset: {len(extra)} unselected layers too, e.g. {extra[0]}",
        "trains": len(trained),
        "extra": len(extra),
    }


def _approx(entry: dict[str, Any], reason: str) -> dict[str, Any]:
    """Downgrade an exact entry to approximate for a reason the layer-set comparison cannot see."""
    if entry["status"] == "exact":
        entry = {**entry, "status": "approximate", "reason": reason}
    elif entry["reason"] and reason not in entry["reason"]:
        entry = {**entry, "reason": f"{entry['reason']}; {reason}"}
    return entry


# -- formatting ------------------------------------------------------------------------------------------


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=10**9, allow_unicode=True)


def _comment(text: str, width: int = 110) -> str:
    """``text`` as ``#`` comment lines, long lines wrapped (continuations indented by two spaces)."""
    lines: list[str] = []
    for line in text.strip("\n").splitlines():
        lines += textwrap.wrap(
            line, width=width, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False
        ) or [""]
    return "".join(f"# {line}".rstrip() + "\n" for line in lines)


def _int_alpha(alpha: float) -> tuple[int, str | None]:
    if float(alpha).is_integer():
        return int(alpha), None
    return round(alpha), f"lora_alpha {alpha} rounded to {round(alpha)}: this tool takes an integer"


def _alternation(items: Sequence[str]) -> str:
    return "^(" + "|".join(re.escape(x) for x in items) + ")$"
