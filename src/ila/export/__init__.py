"""A selection of layers, handed to other tools: PEFT, axolotl (and its Spectrum plugin), LLaMA-Factory and
ms-swift; and dry runs.

``export_selection`` writes one file per tool (each written atomically) plus ``selection.json``, which says
for every file whether it trains exactly the selected layers, a superset of them ("approximate", with the
reason), or neither ("none": it would miss selected layers, or could not be written). The claims are not
asserted by hand: each file's selector is run through a re-implementation of the tool's own matching rule
(cited in each tool's module, next to its writers) over the ranking's layers, and the status follows from
comparing the result with the selection.
The universe of that check is the ranking's layers, i.e. every linear module of every block (plus
``lm_head`` when ranked), and, for the files that name parameters, the input embedding and output head
weights as ``named_parameters()`` lists them (recorded in the ranking's ``base_model``): a tied ``lm_head``'s
weight is listed only as the embedding's, so a file that trains it by name trains the input embeddings too
(approximate), and when the ranking does not record the tie such a file cannot claim the head (none).

Spectrum (``spectrum``): ``model_snr_results/snr_results_<model>.json`` carries ILA's scores in the field
axolotl's ``SpectrumPlugin`` ranks by ("snr"), and ``axolotl.spectrum.yaml`` turns the plugin on. The plugin
keeps the same top fraction of every module type and always trains ``lm_head`` and the input embeddings,
where ILA's top-k is global; the status says how far the plugin's choice is from the selection.

``dry_run`` puts the selection on a loaded model and counts what would train, for LoRA or for full
fine-tuning of the selected modules' weights, next to the same count for every layer.

Layout: ``choose`` picks and checks the layers; ``common`` holds what the writers share (the export's facts,
the status comparison, the ``selection.json`` envelope, formatting); one module per tool (``peft``,
``axolotl``, ``spectrum``, ``llamafactory``, ``swift``, ``plain``) holds that tool's writers and matching
rules; ``dry_run`` the parameter counts. A new export target is a module with a :class:`Writer` per file and
an entry in ``WRITERS`` below. The ms-swift scripts pick the tuner flag of the installed ms-swift when they
run (``--train_type`` for 3.x, ``--tuner_type`` from 4 on).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..artifacts import write_json_atomic, write_text_atomic
from ..errors import IlaError, RankingError
from ..ranking import Ranking
from . import axolotl, llamafactory, peft, plain, spectrum, swift
from .choose import (
    Mode,
    _normalise,
    check_layer_names,
    default_export_dir,
    select_layers,
    whole_blocks,
)
from .common import KIND, SCHEMA_VERSION, Writer, export_context, selection_summary
from .dry_run import dry_run, render_dry_run

__all__ = [
    "EXPORT_FILES",
    "KIND",
    "SCHEMA_VERSION",
    "WRITERS",
    "Mode",
    "Writer",
    "check_layer_names",
    "default_export_dir",
    "dry_run",
    "export_selection",
    "render_dry_run",
    "render_export",
    "select_layers",
    "whole_blocks",
]

# The files an export writes, in this order (the order of selection.json's "formats" too).
WRITERS: tuple[Writer, ...] = (
    peft.ADAPTER_CONFIG,
    peft.BLOCKS_CONFIG,
    axolotl.LORA,
    axolotl.FULL,
    spectrum.YAML,
    spectrum.SNR,
    llamafactory.LORA,
    llamafactory.FREEZE,
    swift.LORA,
    swift.FULL,
    plain.PARAMETERS,
)

# Every fixed-name file export_selection may write (a writer with a ``path`` names its files by a glob,
# Writer.stale); files of an earlier export that this one does not write (e.g. the blocks variant of a
# selection that was whole blocks, or the Spectrum scores of another model) are removed so that a folder
# never mixes two exports.
EXPORT_FILES = (*(w.name for w in WRITERS if w.path is None), "selection.json")


def _check_export_args(
    ranking: Ranking, mode: Mode, fraction: float | None, r: int, alpha: float, dropout: float
) -> None:
    if mode != "list":  # the mode and fraction the files are labelled with must be a valid selection
        ranking.select(mode, fraction)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise IlaError(f"LoRA rank r must be an integer >= 1, got {r!r}")
    if not alpha > 0:
        raise IlaError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise IlaError(f"LoRA dropout must be in [0, 1), got {dropout}")


def export_selection(
    ranking: Ranking,
    names: Sequence[str],
    out_dir: str | Path,
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    mode: Mode = "list",
    fraction: float | None = None,
    ranking_path: str | Path | None = None,
) -> dict[str, Any]:
    """Write the selection ``names`` of ``ranking`` as PEFT, axolotl (plain and Spectrum), LLaMA-Factory
    and ms-swift configurations into ``out_dir``; return the summary that is also written as
    ``selection.json``."""
    if mode not in ("top", "drop_bottom", "list"):
        raise RankingError(f"unknown selection mode {mode!r} (top, drop_bottom or list)")
    _check_export_args(ranking, mode, fraction, r, alpha, dropout)
    in_ranking_order, chosen = _normalise(ranking, names)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise IlaError(f"export folder {out} exists and is not a folder")

    ctx = export_context(
        ranking,
        in_ranking_order,
        chosen,
        r=r,
        alpha=alpha,
        dropout=dropout,
        mode=mode,
        fraction=fraction,
        ranking_path=ranking_path,
    )
    files: dict[str, Any] = {}
    formats: dict[str, dict[str, Any]] = {}
    for writer in WRITERS:
        entry, content = writer.write(ctx)
        if content is not None:
            path = writer.path(ctx) if writer.path else writer.name
            if writer.path:
                entry = {**entry, "file": path}
            files[path] = content
        formats[writer.name] = entry
    summary = selection_summary(ctx, formats)
    _write_files(out, files, summary)
    return {**summary, "out_dir": str(out), "written": [*files, "selection.json"]}


def _earlier_files(out: Path) -> list[Path]:
    """Files in ``out`` that an export may have written."""
    found = [out / name for name in EXPORT_FILES if name != "selection.json"]
    for writer in WRITERS:
        if writer.stale:
            found += sorted(out.glob(writer.stale))
    return [p for p in found if p.is_file()]


def _write_files(out: Path, files: dict[str, Any], summary: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path in _earlier_files(out):
        if path.relative_to(out).as_posix() not in files:
            path.unlink()  # left over from an earlier export of another selection
    for name, content in [*files.items(), ("selection.json", summary)]:
        if isinstance(content, dict):
            write_json_atomic(out / name, content)
        else:
            write_text_atomic(out / name, content)
        # the atomic write goes through a private temporary file; these are configs to share and run
        (out / name).chmod(0o755 if name.endswith(".sh") else 0o644)


def render_export(summary: dict[str, Any]) -> str:
    """The exported files and whether each expresses the selection exactly."""
    sel = "explicit list" if summary["mode"] == "list" else f"{summary['mode']} {summary['fraction']:g}"
    lines = [
        f"exported {sel}: {summary['num_selected']} of {summary['num_layers']} layers -> {summary['out_dir']}"
    ]
    formats = summary["formats"]
    shown = {name: f.get("file", name) for name, f in formats.items()}
    w = max(len(n) for n in shown.values())
    lines.append(f"{'file'.ljust(w)}  {'method':6}  {'status':11}  reason")
    for name, f in formats.items():
        status = f["status"] if shown[name] in summary["written"] else "not written"
        reason = f.get("reason") or ""
        lines.append(f"{shown[name].ljust(w)}  {f['method']:6}  {status:11}  {reason}".rstrip())
    lines.append(
        f"{'selection.json'.ljust(w)}  {'':6}  {'summary':11}  this table, the layers and the base model"
    )
    for note in summary.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
