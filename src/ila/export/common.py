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
    all_params: list[str]  # their weights' parameter names, plus the embedding weights when recorded
    weights: list[str]  # the selected layers' weights, in model order
    selected_params: set[str]
    tied: bool | None  # lm_head's weight is the input embedding's; None when the ranking does not record it
    head: str | None  # the selected output head (lm_head), if any
    n_blocks: int
    r: int
    alpha: float
    dropout: float
    int_alpha: int  # alpha for tools that take an integer, and the note if it was rounded
    alpha_note: str | None
    base_path: str | None  # what the tools load as the base model; None when they cannot
    builtin_note: str | None
    head_note: str | None  # what naming the selected lm_head's weight means, when it is tied or may be
    header: str  # the provenance lines every file's comment starts with

    @property
    def notes(self) -> list[str]:
        return [n for n in (self.builtin_note, self.head_note) if n]


# A writer returns the status entry of its file for selection.json and the file's content (a dict is written
# as JSON, a string as text), or None when it writes no file.
WriteFn = Callable[[ExportContext], tuple[dict[str, Any], dict[str, Any] | str | None]]


@dataclass(frozen=True)
class Writer:
    """One exported file: its name (its key in ``selection.json``'s formats, and its path in the export
    folder unless ``path`` gives one) and the function that writes it."""

    name: str
    write: WriteFn
    path: Callable[[ExportContext], str] | None = None
    """The file's path relative to the export folder, for a file whose name depends on the export (a tool
    that looks a file up by the model's name); ``name`` then says what varies, e.g. ``<model>``."""
    stale: str | None = None
    """A glob, relative to the export folder, of the files this writer may have written in earlier exports
    (with ``path``); by default just ``name``."""


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
    tied, param_of, embeddings = _weight_names(ranking)
    all_params = [param_of(layer) for layer in ranking.layers]
    all_params += [p for p in embeddings if p not in all_params]
    weights = [param_of(layer) for layer in chosen]
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
    heads = [layer for layer in chosen if layer.block is None]
    head = heads[0].name if heads else None
    head_note = None
    if heads and tied:
        head_note = (
            f"{head} is tied to the input embeddings: named_parameters() lists its weight only as "
            f"{param_of(heads[0])}, so training it by name trains the input embeddings too (one tensor)"
        )
    elif heads and tied is None:
        head_note = (
            f"the ranking does not record whether {head} is tied to the input embeddings (it predates ila "
            f"recording it; score again to record it); if it is, named_parameters() lists its weight only "
            f"under the embedding's name and {head}.weight names no parameter"
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
        all_params=all_params,
        weights=weights,
        selected_params=set(weights),
        tied=tied,
        head=head,
        n_blocks=n_blocks,
        r=r,
        alpha=alpha,
        dropout=dropout,
        int_alpha=int_alpha,
        alpha_note=alpha_note,
        base_path=base_path,
        builtin_note=builtin_note,
        head_note=head_note,
        header=header,
    )


def _weight_names(ranking: Ranking) -> tuple[bool | None, Callable[[Layer], str], list[str]]:
    """(whether lm_head is tied, each layer's weight as ``named_parameters()`` lists it, the recorded input
    and output embedding weights) from the ranking's ``base_model`` (:func:`ila.models.model_identity`).

    A tied head's weight is listed under the input embedding's name only; when the ranking does not record
    the tie (or the names), the tie is None and the head's weight is written as ``<head>.weight``."""
    base = ranking.base_model
    tie = base.get("tie_word_embeddings")
    names = [base.get(k) for k in ("input_embedding_weight", "output_embedding_weight")]
    known = isinstance(tie, bool) and all(isinstance(n, str) for n in names)
    embeddings = list(dict.fromkeys(names)) if known else []

    def param_of(layer: Layer) -> str:
        if layer.block is None and known:  # the output head: the layer ila ranks as lm_head
            return str(names[1])
        return f"{layer.name}.weight"

    return (tie if known else None), param_of, embeddings


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


def _named_head(ctx: ExportContext, entry: dict[str, Any]) -> dict[str, Any]:
    """The status of a file that selects parameters by name, given what its selected lm_head's weight is
    called: tied, the file trains the input embeddings too (a superset); not known to be untied, the file
    may train no head at all, so it cannot claim the selection."""
    if ctx.head is None or ctx.tied is False:
        return entry
    if ctx.tied:
        return _approx(entry, f"a superset: {ctx.head_note}")
    reason = f"may miss {ctx.head}: {ctx.head_note}"
    if entry["reason"]:
        reason = f"{reason}; {entry['reason']}"
    return {**entry, "status": "none", "reason": reason}


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
