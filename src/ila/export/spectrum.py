"""axolotl's Spectrum plugin: ``model_snr_results/snr_results_<model>.json`` (ILA's scores in the layout of
Spectrum's SNR scans) and ``axolotl.spectrum.yaml`` (the plugin, its top fraction, and the model name the
plugin finds that file by), so that ``axolotl.integrations.spectrum.SpectrumPlugin`` unfreezes layers by
ILA's scores.

axolotl ``src/axolotl/integrations/spectrum/__init__.py``, ``SpectrumPlugin.pre_model_load``: the file is
``./model_snr_results/snr_results_{slug}.json`` relative to the working directory, ``slug`` being
``spectrum_model_name`` (else ``base_model``) with every ``/`` and ``_`` replaced by ``-``. When it cannot be
read, the plugin fetches Spectrum's published scan of that name from GitHub (cognitivecomputations/spectrum),
and when that fails too it logs a warning and sets nothing, so every parameter trains. The file maps each
module name to ``{"snr": number, "type": module type}``; ``_generate_unfrozen_params_yaml`` groups the
modules by ``type``, sorts each group by ``snr``, highest first (a stable sort: ties keep the file's order),
keeps the first ``int(len(group) * spectrum_top_fraction)`` of every group and returns
``["^lm_head.weight$", "^model.embed_tokens.weight$", *kept module names]`` as ``unfrozen_parameters``,
which ``utils/freeze.py::freeze_layers_except`` applies (axolotl's rule, ``ila.export.axolotl``). A kept name
carries no anchors, so it unfreezes every parameter whose name starts with it: the module's weight, and its
bias where it has one.

So the plugin's fraction is taken within each module type: every type keeps the same share of its modules
(rounded down), however the scores compare across types, and the output head and the input embeddings always
train. ILA's top-k is global over all layers, so one module type may take most of a selection and another
none. The export writes the scores unchanged (in model order, so ties fall as in ILA's order), computes what
the plugin would unfreeze with the written fraction, and compares that with the selection.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .axolotl import _PLAIN_NAME, _axolotl_unfrozen
from .common import ExportContext, Writer, _comment, _status, _yaml

PLUGIN = "axolotl.integrations.spectrum.SpectrumPlugin"
# Always first in the plugin's unfrozen_parameters, whatever the scores.
ALWAYS = ("^lm_head.weight$", "^model.embed_tokens.weight$")


def _slug(model_name: str) -> str:
    """``SpectrumPlugin.pre_model_load``: ``model_name.replace("/", "-").replace("_", "-")``."""
    return model_name.replace("/", "-").replace("_", "-")


def _model_name(ctx: ExportContext) -> str:
    """``spectrum_model_name``: only used to name the file, so the ranking's base model name (as recorded)."""
    return str(ctx.ranking.base_model.get("name") or "model")


def _snr_path(ctx: ExportContext) -> str:
    return f"model_snr_results/snr_results_{_slug(_model_name(ctx))}.json"


def _top_fraction(ctx: ExportContext) -> float:
    """``spectrum_top_fraction``: the fraction of a ``top`` selection, else the selection's share of the
    ranked layers."""
    if ctx.mode == "top" and ctx.fraction is not None:
        return float(ctx.fraction)
    return len(ctx.chosen) / ctx.ranking.num_layers


def _snr_data(ctx: ExportContext) -> dict[str, dict[str, Any]]:
    """Every ranked layer with ILA's score as "snr" and its module type as "type", in model order."""
    return {
        layer.name: {"snr": float(ctx.ranking.scores[layer.name]), "type": layer.module_type}
        for layer in ctx.ranking.layers
    }


def _spectrum_unfrozen(snr_data: dict[str, dict[str, Any]], top_fraction: float) -> list[str]:
    """axolotl ``integrations/spectrum/__init__.py::_generate_unfrozen_params_yaml``, step for step."""
    by_type: dict[str, list[tuple[str, float]]] = {}
    for name, info in snr_data.items():
        by_type.setdefault(info["type"], []).append((name, info["snr"]))
    kept: list[str] = []
    for layers in by_type.values():
        ranked = sorted(layers, key=lambda x: x[1], reverse=True)
        kept += [name for name, _ in ranked[: int(len(layers) * top_fraction)]]
    return [*ALWAYS, *kept]


def _plan(ctx: ExportContext) -> dict[str, Any]:
    """What the plugin would unfreeze with the written fraction, compared with the selection."""
    fraction = _top_fraction(ctx)
    patterns = _spectrum_unfrozen(_snr_data(ctx), fraction)
    entry: dict[str, Any] = {"method": "full"}
    if not all(_PLAIN_NAME.match(n) for n in ctx.all_names):
        entry.update(
            status="none",
            reason="module names with characters other than letters, digits, _ and . are no axolotl patterns",
            trains=0,
            extra=0,
        )
        return {"fraction": fraction, "entry": entry}
    universe = list(ctx.all_params)
    if ctx.tied is None:  # embedding names not recorded: the plugin's two fixed names, as Llama-style models
        universe += [p.strip("^$") for p in ALWAYS if p.strip("^$") not in universe]
    trained = _axolotl_unfrozen(patterns, universe)
    entry.update(_status(ctx.selected_params, trained, "SpectrumPlugin"))

    n_type = Counter(x.module_type for x in ctx.ranking.layers)
    n_selected = Counter(x.module_type for x in ctx.chosen)
    # lm_head, a type of one module, is kept by the fixed ^lm_head.weight$ whatever the fraction
    keeps = {t: int(n * fraction) for t, n in n_type.items() if t != "lm_head"}
    shares = {(k, n_type[t]) for t, k in keeps.items()}
    if len(shares) == 1:
        ((k, n),) = shares
        kept = f"{k} of {n} in each of its {len(keeps)} module types"
    else:
        kept = ", ".join(f"{t} {k} of {n_type[t]}" for t, k in keeps.items())
    rule = f"per module type the plugin keeps the int(n x {fraction:g}) of highest score: {kept}"
    differ = [f"{t} {n_selected[t]}" for t in keeps if n_selected[t] != keeps[t]]
    if differ:
        rule += f"; the selection has {', '.join(differ)}"
    missing = sorted(ctx.selected_params - trained)
    extra = sorted(trained - ctx.selected_params)
    fixed = [p for p in extra if f"^{p}$" in ALWAYS]
    by_share = [p for p in extra if p not in fixed]
    parts = []
    if missing:
        parts.append(f"SpectrumPlugin would miss {len(missing)} selected layers' weights, e.g. {missing[0]}")
    if by_share:
        parts.append(f"it trains {len(by_share)} unselected layers' weights, e.g. {by_share[0]}")
    if fixed:
        tied = " (the input embeddings, which lm_head is tied to)" if ctx.tied else ""
        parts.append(f"it always unfreezes {' and '.join(fixed)}{tied}, selected or not")
    if parts:
        entry["reason"] = "; ".join(parts) + f" ({rule})"
        if not missing:
            entry["reason"] = "a superset: " + entry["reason"]
    if ctx.tied is None:
        entry["note"] = (
            "the ranking does not record the embeddings' parameter names; the check assumes the plugin's "
            "lm_head.weight and model.embed_tokens.weight exist"
        )
    return {"fraction": fraction, "entry": entry}


def _write_snr(ctx: ExportContext) -> tuple[dict[str, Any], dict[str, Any]]:
    entry = _plan(ctx)["entry"]
    note = (
        "read by axolotl's SpectrumPlugin as set up by axolotl.spectrum.yaml; "
        '"snr" holds ILA\'s importance score, not a signal-to-noise ratio'
    )
    entry = {**entry, "note": f"{note}; {entry['note']}" if "note" in entry else note}
    return entry, _snr_data(ctx)


def _write_yaml(ctx: ExportContext) -> tuple[dict[str, Any], str]:
    plan = _plan(ctx)
    entry = plan["entry"]
    note = '"snr" in the scores file holds ILA\'s importance score, not a signal-to-noise ratio'
    entry = {**entry, "note": f"{note}; {entry['note']}" if "note" in entry else note}
    chosen_by = "the top fraction" if ctx.mode == "top" else "the selection's share of the ranked layers"
    axo: dict[str, Any] = {}
    if ctx.base_path:
        axo["base_model"] = ctx.base_path
    axo.update(
        plugins=[PLUGIN],
        spectrum_top_fraction=plan["fraction"],
        spectrum_model_name=_model_name(ctx),
    )
    if entry["status"] == "exact":
        verdict = "SAME LAYERS: the plugin unfreezes exactly the selected layers' weights."
    else:
        head = "NOT EXACT" if entry["status"] == "approximate" else "MISSES SELECTED LAYERS"
        verdict = f"{head}: {entry['reason']}."
        if entry["status"] == "none":
            verdict += "\nFor exactly the selected layers use axolotl.full.yaml (unfrozen_parameters)."
    lines = [
        "axolotl Spectrum fragment: full fine-tuning of the layers that axolotl's SpectrumPlugin picks from "
        "ILA's scores. Merge into an axolotl config (datasets, optimiser, ... are yours); not together with "
        "axolotl.full.yaml (the plugin replaces unfrozen_parameters) or an adapter.",
        ctx.header,
        f"The plugin reads {_snr_path(ctx)} relative to the folder axolotl runs in: run axolotl in this "
        "export folder, or copy model_snr_results/ there. Without that file it downloads Spectrum's own scan "
        "for spectrum_model_name from GitHub if there is one (a selection by signal-to-noise ratio, not by "
        "ILA), else it only warns and every parameter trains.",
        '"snr" in that file holds ILA\'s importance score of each layer, not a signal-to-noise ratio; the '
        "plugin ranks each module type by it.",
        f"spectrum_top_fraction: {plan['fraction']:g} ({chosen_by}). The plugin keeps within each module "
        "type the int(n x fraction) modules of highest score (n: that type's modules), so every type gets "
        "the same share, and always unfreezes ^lm_head.weight$ and ^model.embed_tokens.weight$; ILA's "
        "top-k is global over all layers. A kept module name is an unanchored pattern: it unfreezes the "
        "module's weight and its bias, if it has one.",
        verdict,
        *([ctx.builtin_note] if ctx.builtin_note else []),
    ]
    text = _comment("\n".join(lines)) + _yaml(axo)
    return entry, text


SNR = Writer(
    "model_snr_results/snr_results_<model>.json",
    _write_snr,
    path=_snr_path,
    stale="model_snr_results/snr_results_*.json",
)
YAML = Writer("axolotl.spectrum.yaml", _write_yaml)
