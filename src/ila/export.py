"""A selection of layers, handed to other tools: PEFT, axolotl, LLaMA-Factory and ms-swift; and dry runs.

``export_selection`` writes one file per tool (each written atomically) plus ``selection.json``, which says
for every file whether it trains exactly the selected layers, a superset of them ("approximate", with the
reason), or could not be written ("none"). The claims are not asserted by hand: each file's selector is
run through a re-implementation of the tool's own matching rule (cited next to each writer) over the
ranking's layers, and the status follows from comparing the result with the selection. The universe of
that check is the ranking's layers, i.e. every linear module of every block (plus ``lm_head`` when ranked).

``dry_run`` puts the selection on a loaded model and counts what would train, for LoRA or for full
fine-tuning of the selected modules' weights, next to the same count for every layer.

Sources read for the option names and matching rules (public code, as of 2025):

- peft ``tuners/tuners_utils.py::check_target_module_exists``: a *list* ``target_modules`` entry matches a
  module whose full name equals it or ends with ``"." + entry``; with ``layers_to_transform`` the block index
  is read after ``layers_pattern`` (``(?:^|.*?\\.){pattern}\\.(\\d+)\\.``); a *string* is a regex matched
  with ``re.fullmatch`` (``utils/other.py::match_target_against_key``).
- axolotl ``loaders/adapter.py::_build_peft_lora_config`` passes ``lora_target_modules`` (plus every linear
  module when ``lora_target_linear`` is true), ``peft_layers_to_transform`` and ``peft_layers_pattern``
  to ``peft.LoraConfig`` unchanged; ``utils/freeze.py::freeze_layers_except`` freezes every parameter,
  then unfreezes those whose name ``re.match``-es an ``unfrozen_parameters`` pattern, in which every ``.``
  not followed by ``+`` is rewritten to ``\\.`` (so a pattern must be written with bare dots:
  ``^model.layers.3.mlp.up_proj.weight$``; an already escaped ``\\.`` would become ``\\\\.`` and match
  nothing).
- LLaMA-Factory ``hparams/finetuning_args.py`` (``lora_target``, ``freeze_trainable_layers``,
  ``freeze_trainable_modules``, ``freeze_extra_modules``; comma-separated strings are split on commas),
  ``model/adapter.py::_setup_lora_tuning`` (``lora_target`` goes to ``peft.LoraConfig(target_modules=...)``
  after ``model_utils/visual.py::patch_target_modules``, which leaves it unchanged for text-only models and
  substring-matches it against module names for registered multimodal models) and
  ``_setup_freeze_tuning`` (trainable blocks are the last N for ``freeze_trainable_layers: N > 0`` or the
  first N for ``-N``; a parameter trains when its name contains ``".{block}.{module}"`` for a trainable
  block and a ``freeze_trainable_modules`` entry, which must be a direct child of the block such as
  ``self_attn`` or ``mlp``, or ``all``; ``freeze_extra_modules`` adds non-block modules such as ``lm_head``).
- ms-swift ``docs/source_en/Instruction/Command-line-parameters.md``, Tuner Arguments: ``--target_regex``
  overrides ``--target_modules`` and is handed to peft as a string ``target_modules`` (so ``re.fullmatch``);
  Full Arguments: ``--freeze_parameters_ratio 1`` freezes everything and ``--trainable_parameters_regex``
  makes parameters whose name matches (``re.search``, ``swift/utils`` ``activate_parameters``) trainable
  again. ms-swift 3.x names the tuner flag ``--train_type``; ms-swift 4 renamed it ``--tuner_type``.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import re
import shlex
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from . import __version__
from .artifacts import write_json_atomic, write_text_atomic
from .errors import IlaError, RankingError
from .layers import Layer
from .ranking import Ranking

if TYPE_CHECKING:
    from torch import nn

SCHEMA_VERSION = 1
KIND = "ila.selection"

Mode = Literal["top", "drop_bottom", "list"]

# Every file export_selection may write; files of an earlier export that this one does not write (e.g. the
# blocks variant of a selection that was whole blocks) are removed so that a folder never mixes two exports.
EXPORT_FILES = (
    "adapter_config.json", "adapter_config.blocks.json", "axolotl.yaml", "axolotl.full.yaml",
    "llamafactory.yaml", "llamafactory.freeze.yaml", "swift.sh", "swift.full.sh", "parameters.txt",
    "selection.json",
)

# peft.LoraConfig fields written to adapter_config.json. A whole LoraConfig.to_dict() carries every field
# of the installed peft (40+ in peft 0.21), some of which older peft versions refuse; these load everywhere.
_PEFT_KEYS = (
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "r", "lora_alpha",
    "lora_dropout", "target_modules", "layers_to_transform", "layers_pattern", "bias", "fan_in_fan_out",
    "init_lora_weights", "modules_to_save", "use_rslora", "use_dora",
)

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


# -- choosing the layers ----------------------------------------------------------------------------------


def check_layer_names(ranking: Ranking, names: Sequence[str]) -> None:
    """Raise :class:`RankingError` naming every unknown layer name, with the closest real names."""
    known = [layer.name for layer in ranking.layers]
    known_set = set(known)
    unknown = [n for n in dict.fromkeys(names) if n not in known_set]
    if not unknown:
        return
    lines = []
    for name in unknown[:5]:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        lines.append(f"{name!r}" + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""))
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    raise RankingError(
        f"{len(unknown)} name(s) match no layer of this ranking: {'; '.join(lines)}{more}. "
        f"Layer names are full module names such as {known[0]!r}"
    )


def _check_fraction(mode: str, fraction: float | None) -> None:
    if mode == "list":
        return
    if fraction is None or isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise RankingError(f"selection mode {mode!r} needs a fraction in (0, 1], got {fraction!r}")
    if mode == "top" and not 0.0 < fraction <= 1.0:
        raise RankingError(f"--top fraction must be in (0, 1], got {fraction}")
    if mode == "drop_bottom" and not 0.0 < fraction < 1.0:
        raise RankingError(f"--drop-bottom fraction must be in (0, 1), got {fraction} (1 would tune nothing)")


def select_layers(ranking: Ranking, mode: Mode, fraction: float | None = None,
                  layers: Sequence[str] = ()) -> list[str]:
    """The selected layer names in ranking order, with clear errors (suggestions for misspelt names)."""
    if mode not in ("top", "drop_bottom", "list"):
        raise RankingError(f"unknown selection mode {mode!r} (top, drop_bottom or list)")
    _check_fraction(mode, fraction)
    if mode == "list":
        if not layers:
            raise RankingError("the explicit selection is empty; name at least one layer")
        check_layer_names(ranking, layers)
        return ranking.select("list", layers=list(layers))
    return ranking.select(mode, float(fraction))  # type: ignore[arg-type]


def default_export_dir(ranking_path: str | Path, mode: str, fraction: float | None, names: Sequence[str]) -> Path:
    """``<ranking dir>/export-<mode>-<fraction>``; an explicit list gets a short digest of its names instead."""
    if mode == "list":
        tag = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:8]
        return Path(ranking_path).parent / f"export-list-{len(names)}-{tag}"
    return Path(ranking_path).parent / f"export-{mode}-{fraction:g}"


def _normalise(ranking: Ranking, names: Sequence[str]) -> tuple[list[str], list[Layer]]:
    """(names in ranking order, selected Layer objects in model order); refuses empty or unknown names."""
    names = list(dict.fromkeys(names))
    if not names:
        raise RankingError("the selection is empty: nothing would train")
    check_layer_names(ranking, names)
    chosen = set(names)
    in_ranking_order = [n for n in ranking.order if n in chosen]
    in_model_order = [layer for layer in ranking.layers if layer.name in chosen]
    return in_ranking_order, in_model_order


def whole_blocks(ranking: Ranking, names: Sequence[str]) -> tuple[list[int], list[str], str] | str:
    """If ``names`` are every layer of some blocks and nothing else, and those blocks all hold the same module
    types: (block indices, module types in model order, name of the block list attribute, e.g. ``layers``).
    Otherwise a sentence saying why not."""
    chosen = set(names)
    by_block: dict[int, list[Layer]] = {}
    for layer in ranking.layers:
        if layer.block_index is None:
            if layer.name in chosen:
                return f"{layer.name} is selected and belongs to no block"
            continue
        by_block.setdefault(layer.block_index, []).append(layer)
    picked = sorted(i for i, layers in by_block.items() if any(x.name in chosen for x in layers))
    for i in picked:
        have = [x for x in by_block[i] if x.name in chosen]
        if len(have) != len(by_block[i]):
            return f"block {i} has {len(have)} of its {len(by_block[i])} layers selected"
    types = [x.module_type for x in by_block[picked[0]]]
    for i in picked[1:]:
        if sorted(x.module_type for x in by_block[i]) != sorted(types):
            return f"blocks {picked[0]} and {i} hold different module types"
    list_names = {x.block.rsplit(".", 1)[0] for i in picked for x in by_block[i] if x.block}
    if len(list_names) != 1:
        return "the selected blocks belong to more than one block list"
    return picked, types, list_names.pop().rsplit(".", 1)[-1]


# -- the tools' matching rules, re-implemented to check each file -----------------------------------------


def _peft_matches(config: Any, names: Sequence[str]) -> set[str]:
    """Module names that peft would adapt under ``config`` (peft's own matching function)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return {n for n in names if check_target_module_exists(config, n)}


def _axolotl_unfrozen(patterns: Sequence[str], params: Sequence[str]) -> set[str]:
    """axolotl ``utils/freeze.py``: LayerNamePattern escapes every ``.`` not followed by ``+``, then re.match."""
    compiled = [re.compile(re.sub(r"\.(?!\+)", "\\.", p)) for p in patterns]
    return {p for p in params if any(c.match(p) for c in compiled)}


def _llamafactory_freeze(trainable_layers: Sequence[str], params: Sequence[str]) -> set[str]:
    """LLaMA-Factory ``_setup_freeze_tuning``: a parameter trains when any entry is a substring of its name."""
    return {p for p in params if any(t in p for t in trainable_layers)}


# -- the export ----------------------------------------------------------------------------------------------


def _status(selected: set[str], trained: set[str], what: str) -> dict[str, Any]:
    if trained == selected:
        return {"status": "exact", "reason": None, "trains": len(trained), "extra": 0}
    missing = sorted(selected - trained)
    extra = sorted(trained - selected)
    if missing:
        return {"status": "none", "reason": f"{what} would miss {len(missing)} selected layers, e.g. {missing[0]}",
                "trains": len(trained & selected), "extra": len(extra)}
    return {"status": "approximate",
            "reason": f"{what} trains a superset: {len(extra)} unselected layers too, e.g. {extra[0]}",
            "trains": len(trained), "extra": len(extra)}


def _approx(entry: dict[str, Any], reason: str) -> dict[str, Any]:
    """Downgrade an exact entry to approximate for a reason the layer-set comparison cannot see."""
    if entry["status"] == "exact":
        entry = {**entry, "status": "approximate", "reason": reason}
    elif entry["reason"] and reason not in entry["reason"]:
        entry = {**entry, "reason": f"{entry['reason']}; {reason}"}
    return entry


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=10**9, allow_unicode=True)


def _comment(text: str, width: int = 110) -> str:
    """``text`` as ``#`` comment lines, long lines wrapped (continuations indented by two spaces)."""
    lines: list[str] = []
    for line in text.strip("\n").splitlines():
        lines += textwrap.wrap(line, width=width, subsequent_indent="  ", break_long_words=False,
                               break_on_hyphens=False) or [""]
    return "".join(f"# {line}".rstrip() + "\n" for line in lines)


def _int_alpha(alpha: float) -> tuple[int, str | None]:
    if float(alpha).is_integer():
        return int(alpha), None
    return round(alpha), f"lora_alpha {alpha} rounded to {round(alpha)}: this tool takes an integer"


def _alternation(items: Sequence[str]) -> str:
    return "^(" + "|".join(re.escape(x) for x in items) + ")$"


def export_selection(ranking: Ranking, names: Sequence[str], out_dir: str | Path, *, r: int = 8,
                     alpha: float = 16.0, dropout: float = 0.05, mode: Mode = "list",
                     fraction: float | None = None, ranking_path: str | Path | None = None) -> dict[str, Any]:
    """Write the selection ``names`` of ``ranking`` as PEFT, axolotl, LLaMA-Factory and ms-swift
    configurations into ``out_dir``; return the summary that is also written as ``selection.json``."""
    import peft

    if mode not in ("top", "drop_bottom", "list"):
        raise RankingError(f"unknown selection mode {mode!r} (top, drop_bottom or list)")
    _check_fraction(mode, fraction)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise IlaError(f"LoRA rank r must be an integer >= 1, got {r!r}")
    if not alpha > 0:
        raise IlaError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise IlaError(f"LoRA dropout must be in [0, 1), got {dropout}")
    in_ranking_order, chosen = _normalise(ranking, names)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise IlaError(f"export folder {out} exists and is not a folder")

    selected = {layer.name for layer in chosen}
    model_order = [layer.name for layer in chosen]
    all_names = [layer.name for layer in ranking.layers]
    all_params = [f"{n}.weight" for n in all_names]
    weights = [f"{n}.weight" for n in model_order]
    selected_params = set(weights)
    n_blocks = 1 + max((x.block_index for x in ranking.layers if x.block_index is not None), default=-1)

    from .models import BUILTIN_MODELS

    base_name = ranking.base_model.get("name")
    builtin = isinstance(base_name, str) and base_name in BUILTIN_MODELS
    base_path = None if builtin or not base_name else str(base_name)
    notes: list[str] = []
    if builtin:
        notes.append(f"the base model is the builtin {base_name!r}, which other tools cannot load by that name: "
                     f"base_model_name_or_path is left empty; point the tools at the converted folder "
                     f"(~/.cache/ila/models/{base_name}, or $ILA_CACHE/models/{base_name})")
    lm_head = [layer.name for layer in chosen if layer.block is None]
    tied_note = None
    if lm_head:
        tied_note = (f"{lm_head[0]}.weight may be tied to the input embeddings; named_parameters() then lists it "
                     f"under the embedding's name only, so a parameter pattern for {lm_head[0]}.weight matches nothing")
        notes.append(tied_note)
    selection_text = (f"{'explicit list' if mode == 'list' else f'{mode} {fraction:g}'}: "
                      f"{len(chosen)} of {ranking.num_layers} layers")
    source_text = f"ranking {ranking_path}" if ranking_path else "an ila ranking"
    header = (f"Written by ila {__version__} (ila export) from {source_text}.\n"
              f"Selection ({selection_text}) of base model {base_name or 'unknown'}.")

    files: dict[str, Any] = {}
    formats: dict[str, dict[str, Any]] = {}

    # ---- PEFT: exact module names ----
    def peft_dict(cfg: Any, order: list[str]) -> dict[str, Any]:
        d = cfg.to_dict()
        d = {k: d.get(k) for k in _PEFT_KEYS}
        for k, v in d.items():
            if isinstance(v, set):  # peft keeps target_modules as a set; write it in the order given
                d[k] = [x for x in order if x in v] + sorted(v - set(order))
            elif hasattr(v, "value"):  # peft's str enums (PeftType, TaskType)
                d[k] = v.value
        return d

    common = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                  base_model_name_or_path=base_path, inference_mode=False)
    exact_cfg = peft.LoraConfig(target_modules=model_order, **common)
    formats["adapter_config.json"] = {"method": "lora", **_status(selected, _peft_matches(exact_cfg, all_names),
                                                                  "target_modules")}
    files["adapter_config.json"] = peft_dict(exact_cfg, model_order)

    # ---- PEFT: whole blocks, compactly ----
    blocks = whole_blocks(ranking, model_order)
    if isinstance(blocks, str):
        formats["adapter_config.blocks.json"] = {"method": "lora", "status": "none",
                                                 "reason": f"not whole blocks: {blocks}", "trains": 0, "extra": 0}
    else:
        indices, types, pattern = blocks
        blocks_cfg = peft.LoraConfig(target_modules=types, layers_to_transform=indices, layers_pattern=pattern,
                                     **common)
        entry = _status(selected, _peft_matches(blocks_cfg, all_names), "layers_to_transform")
        formats["adapter_config.blocks.json"] = {"method": "lora", **entry}
        if entry["status"] == "exact":
            files["adapter_config.blocks.json"] = peft_dict(blocks_cfg, types)
        else:
            formats["adapter_config.blocks.json"].update(status="none", reason=f"not written: {entry['reason']}")

    # ---- axolotl: LoRA ----
    int_alpha, alpha_note = _int_alpha(alpha)
    axo: dict[str, Any] = {}
    if base_path:
        axo["base_model"] = base_path
    axo.update(adapter="lora", lora_r=r, lora_alpha=int_alpha, lora_dropout=dropout, lora_target_linear=False,
               lora_target_modules=model_order)
    files["axolotl.yaml"] = _comment(
        f"""axolotl LoRA fragment: merge into an axolotl config (datasets, optimiser, ... are yours).
{header}
lora_target_modules: axolotl hands this list to peft.LoraConfig(target_modules=...) unchanged
  (src/axolotl/loaders/adapter.py, _build_peft_lora_config); peft adapts a module whose full name equals an
  entry, so these full names adapt exactly the selected layers.
lora_target_linear: must stay false; true would add every linear module of the model.
lora_r / lora_alpha / lora_dropout: rank, scaling numerator (scale = alpha / r) and dropout of LoRA.
For full fine-tuning of the same layers use axolotl.full.yaml instead (not together with adapter: lora).
""" + (f"{notes[0]}\n" if builtin else "")) + _yaml(axo)
    formats["axolotl.yaml"] = {"method": "lora", **_status(
        selected, _peft_matches(peft.LoraConfig(target_modules=model_order), all_names), "lora_target_modules")}
    if alpha_note:
        formats["axolotl.yaml"] = _approx(formats["axolotl.yaml"], alpha_note)

    # ---- axolotl: full fine-tuning of the selected weights ----
    plain = all(_PLAIN_NAME.match(n) for n in model_order)
    unfrozen = [f"^{w}$" for w in weights]
    axo_full: dict[str, Any] = {}
    if base_path:
        axo_full["base_model"] = base_path
    axo_full["unfrozen_parameters"] = unfrozen
    files["axolotl.full.yaml"] = _comment(
        f"""axolotl full fine-tuning fragment: no adapter; every parameter is frozen except the selected weights.
{header}
unfrozen_parameters: regexes of parameter names (model.named_parameters()) to keep trainable; axolotl
  (src/axolotl/utils/freeze.py, freeze_layers_except) rewrites every '.' not followed by '+' to a literal
  '\\.' and applies re.match, so the dots below are deliberately unescaped and ^...$ anchors each name.
""" + (f"{tied_note}\n" if tied_note else "")) + _yaml(axo_full)
    if plain:
        entry = _status(selected_params, _axolotl_unfrozen(unfrozen, all_params), "unfrozen_parameters")
    else:
        entry = {"status": "none", "reason": "module names with characters other than letters, digits, _ and . "
                                             "cannot be written as axolotl patterns", "trains": 0, "extra": 0}
    formats["axolotl.full.yaml"] = {"method": "full", **entry}
    if tied_note:
        formats["axolotl.full.yaml"] = _approx(formats["axolotl.full.yaml"], tied_note)

    # ---- LLaMA-Factory: LoRA ----
    lf: dict[str, Any] = {}
    if base_path:
        lf["model_name_or_path"] = base_path
    lf.update(finetuning_type="lora", lora_rank=r, lora_alpha=int_alpha, lora_dropout=dropout,
              lora_target=",".join(model_order))
    files["llamafactory.yaml"] = _comment(
        f"""LLaMA-Factory LoRA arguments: merge into a training YAML (stage, dataset, template, ... are yours).
{header}
lora_target: comma-separated module names. LLaMA-Factory splits it on commas and passes the list to
  peft.LoraConfig(target_modules=...) (src/llamafactory/model/adapter.py, _setup_lora_tuning); for text-only
  models model_utils/visual.py patch_target_modules leaves it unchanged, and peft adapts a module whose full
  name equals an entry: these full names adapt exactly the selected layers. (For a registered multimodal
  model LLaMA-Factory instead adapts every module whose name contains an entry as a substring.)
lora_rank / lora_alpha / lora_dropout: rank, scaling numerator and dropout of LoRA.
""" + (f"{notes[0]}\n" if builtin else "")) + _yaml(lf)
    formats["llamafactory.yaml"] = {"method": "lora", **_status(
        selected, _peft_matches(peft.LoraConfig(target_modules=model_order), all_names), "lora_target"),
        "note": "exact for text-only models; multimodal models substring-match lora_target"}
    if alpha_note:
        formats["llamafactory.yaml"] = _approx(formats["llamafactory.yaml"], alpha_note)

    # ---- LLaMA-Factory: freeze tuning (closest expressible superset) ----
    formats["llamafactory.freeze.yaml"], files["llamafactory.freeze.yaml"] = _llamafactory_freeze_file(
        chosen, n_blocks, selected_params, all_params, header, base_path, tied_note)

    # ---- ms-swift: LoRA ----
    target_regex = _alternation(model_order)
    swift_lora = _swift_script(
        header, base_path, "lora",
        ["--lora_rank", str(r), "--lora_alpha", str(int_alpha), "--lora_dropout", f"{dropout:g}",
         "--target_regex", target_regex],
        """--target_regex: a regex of module names; it overrides --target_modules and ms-swift hands it to peft as
  a string target_modules, which peft matches with re.fullmatch against each full module name: exactly
  the selected layers get LoRA (^...$ alternation of the escaped names).
--lora_rank / --lora_alpha / --lora_dropout: rank, scaling numerator and dropout of LoRA.""")
    files["swift.sh"] = swift_lora
    formats["swift.sh"] = {"method": "lora", **_status(
        selected, {n for n in all_names if re.fullmatch(target_regex, n)}, "--target_regex")}
    if alpha_note:
        formats["swift.sh"] = _approx(formats["swift.sh"], alpha_note)

    # ---- ms-swift: full fine-tuning of the selected weights ----
    trainable_regex = _alternation(weights)
    files["swift.full.sh"] = _swift_script(
        header, base_path, "full",
        ["--freeze_parameters_ratio", "1", "--trainable_parameters_regex", trainable_regex],
        """--freeze_parameters_ratio 1: freeze every parameter; --trainable_parameters_regex: then make trainable
  again each parameter whose name matches (re.search; ^...$ anchors the escaped weight names), which takes
  precedence over the freezing (ms-swift docs, Full Arguments).""" + (f"\n{tied_note}" if tied_note else ""))
    entry = _status(selected_params, {p for p in all_params if re.search(trainable_regex, p)},
                    "--trainable_parameters_regex")
    formats["swift.full.sh"] = {"method": "full", **entry}
    if tied_note:
        formats["swift.full.sh"] = _approx(formats["swift.full.sh"], tied_note)

    # ---- plain list ----
    files["parameters.txt"] = "\n".join(weights) + "\n"
    formats["parameters.txt"] = {"method": "full", "status": "exact", "reason": None, "trains": len(weights),
                                 "extra": 0}
    if tied_note:
        formats["parameters.txt"] = _approx(formats["parameters.txt"], tied_note)

    summary: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "ila_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "fraction": None if mode == "list" else float(fraction),  # type: ignore[arg-type]
        "ranking": None if ranking_path is None else str(ranking_path),
        "base_model": ranking.base_model,
        "include_lm_head": ranking.include_lm_head,
        "num_selected": len(chosen),
        "num_layers": ranking.num_layers,
        "layers": in_ranking_order,
        "lora": {"r": r, "alpha": alpha, "dropout": dropout},
        "formats": formats,
        "notes": notes,
    }

    out.mkdir(parents=True, exist_ok=True)
    for name in EXPORT_FILES:
        if name not in files and name != "selection.json" and (out / name).is_file():
            (out / name).unlink()  # left over from an earlier export of another selection
    for name, content in [*files.items(), ("selection.json", summary)]:
        if isinstance(content, dict):
            write_json_atomic(out / name, content)
        else:
            write_text_atomic(out / name, content)
        # the atomic write goes through a private temporary file; these are configs to share and run
        (out / name).chmod(0o755 if name.endswith(".sh") else 0o644)
    return {**summary, "out_dir": str(out), "written": [*files, "selection.json"]}


def _swift_script(header: str, base_path: str | None, tuner: str, args: list[str], explain: str) -> str:
    if base_path:
        model_line = f'if [ -z "${{MODEL:-}}" ]; then MODEL={shlex.quote(base_path)}; fi'
    else:
        model_line = ': "${MODEL:?set MODEL to the base model id or folder}"'
    lines = [
        "#!/usr/bin/env bash",
        _comment(f"""ms-swift {'LoRA' if tuner == 'lora' else 'full fine-tuning'} of the selected layers.
{header}
Usage: MODEL=<base model id or folder> bash {'swift.sh' if tuner == 'lora' else 'swift.full.sh'} \\
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


def _llamafactory_freeze_file(chosen: list[Layer], n_blocks: int, selected_params: set[str],
                              all_params: list[str], header: str, base_path: str | None,
                              tied_note: str | None) -> tuple[dict[str, Any], str]:
    """LLaMA-Factory freeze tuning: the smallest (first-N or last-N blocks) x (direct children of the block)
    configuration that trains every selected weight, and how far it is from the selection."""
    in_blocks = [x for x in chosen if x.block_index is not None]
    extra_modules = sorted({x.name.rsplit(".", 1)[-1] for x in chosen if x.block_index is None})
    intro = f"""LLaMA-Factory freeze tuning (partial-parameter full fine-tuning) arguments.
{header}
freeze_trainable_layers: N > 0 trains the last N blocks, -N the first N (hparams/finetuning_args.py).
freeze_trainable_modules: comma-separated direct children of a block (e.g. self_attn, mlp) to train in those
  blocks; a parameter trains when its name contains ".<block>.<module>" (model/adapter.py,
  _setup_freeze_tuning), i.e. every parameter of that child, biases and norms inside it included.
freeze_extra_modules: modules outside the blocks to train too (e.g. lm_head)."""
    if not in_blocks:
        entry = {"method": "freeze", "status": "none", "trains": 0, "extra": 0,
                 "reason": "the selection has no layer inside a block; freeze tuning always trains >= 1 block"}
        text = _comment(f"{intro}\nNOT EXPRESSIBLE: {entry['reason']}.\n") + _yaml({"finetuning_type": "freeze"})
        return entry, text
    indices = sorted({x.block_index for x in in_blocks})  # type: ignore[type-var]
    last_n = n_blocks - indices[0]
    first_n = indices[-1] + 1
    n = last_n if last_n <= first_n else -first_n
    ids = range(n_blocks - n, n_blocks) if n > 0 else range(-n)
    children = sorted({x.module_type.split(".", 1)[0] for x in in_blocks})
    trainable_layers = [f".{i}.{c}" for c in children for i in ids] + extra_modules
    trained = _llamafactory_freeze(trainable_layers, all_params)
    entry = {"method": "freeze", **_status(selected_params, trained, "freeze tuning")}
    why_whole = (f"it trains every parameter of {', '.join(children)}, any bias or norm inside included "
                 "(Llama-style blocks have none)")
    if entry["status"] == "exact":
        entry = _approx(entry, why_whole)
        verdict = ("SAME LAYERS: these arguments train exactly the selected layers' weights, but " + why_whole + ".")
    else:
        entry["reason"] = f"{entry['reason']}; {why_whole}"
        sel_blocks = ", ".join(str(i) for i in indices)
        span = f"the last {n}" if n > 0 else f"the first {-n}"
        verdict = (f"NOT EXACT: freeze tuning can only train a contiguous run of the first or last N blocks and\n"
                   f"whole children of each block. The selection touches blocks {sel_blocks} (of {n_blocks}) and\n"
                   f"the children {', '.join(children)}; the closest expressible superset below trains {span}\n"
                   f"blocks' {', '.join(children)}: {entry['trains']} layers, {entry['extra']} of them not selected.\n"
                   f"For exactly the selected layers use llamafactory.yaml (LoRA), or a full fine-tuning\n"
                   f"tool that takes parameter names (axolotl.full.yaml, swift.full.sh, parameters.txt).")
    if tied_note and extra_modules:
        entry = _approx(entry, tied_note)
        verdict += f"\n{tied_note}; LLaMA-Factory then refuses freeze_extra_modules: lm_head."
    lf: dict[str, Any] = {}
    if base_path:
        lf["model_name_or_path"] = base_path
    lf.update(finetuning_type="freeze", freeze_trainable_layers=n, freeze_trainable_modules=",".join(children))
    if extra_modules:
        lf["freeze_extra_modules"] = ",".join(extra_modules)
    return entry, _comment(intro + "\n" + verdict + "\n") + _yaml(lf)


# -- dry run ---------------------------------------------------------------------------------------------------


def _model_layers(ranking: Ranking, model: "nn.Module") -> list[Layer]:
    """The model's layers as the ranking counts them (restricted to the ranking's module types if it was)."""
    from .layers import adaptable_layers

    layers = adaptable_layers(model, include_lm_head=ranking.include_lm_head)
    mine = {x.name for x in ranking.layers}
    if mine < {x.name for x in layers}:  # ranked with lora.module_types: compare like with like
        types = sorted({x.module_type for x in ranking.layers if x.block is not None})
        layers = adaptable_layers(model, include_lm_head=ranking.include_lm_head, module_types=types)
    return layers


def _lora_count(model: "nn.Module", names: list[str], r: int) -> tuple[int, int]:
    """(trainable, total) as peft reports them for LoRA of rank ``r`` on ``names``; leaves ``model`` as it was."""
    from .config import LoraConfig
    from .models import attach_lora

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


def _full_count(model: "nn.Module", names: list[str]) -> tuple[int, int]:
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


def dry_run(ranking: Ranking, names: Sequence[str], model: "nn.Module", method: Literal["lora", "full"] = "lora",
            r: int = 8, *, model_name: str | None = None) -> dict[str, Any]:
    """Check that ``ranking`` is of ``model``, put the selection on it and count what would train.

    ``method="lora"``: LoRA of rank ``r`` on the selected modules (counted by peft, then removed again);
    ``"full"``: the selected modules' weights. The same count for every ranked layer is under ``all_layers``.
    """
    from .models import model_identity

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
        b = blocks.setdefault(key, {"block": key, "index": x.block_index, "types": [], "selected": [],
                                    "num_layers": 0, "num_selected": 0})
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


# -- text for the command line ---------------------------------------------------------------------------


def render_dry_run(result: dict[str, Any], selection_text: str) -> str:
    """The dry run as a compact table: one row per block, one column per module type."""
    types = result["module_types"]
    short = [t.rsplit(".", 1)[-1] for t in types]
    heads = short if len(set(short)) == len(short) else types
    width = [max(len(h), 1) for h in heads]
    rows = result["blocks"]
    labels = [str(b["index"]) if b["index"] is not None else b["block"] for b in rows]
    label_w = max(len(x) for x in ["block", *labels])
    out = [f"model      {result['model']}",
           f"selection  {selection_text}: {result['num_selected']} of {result['num_layers']} layers",
           "",
           "block".rjust(label_w) + "  " + "  ".join(h.rjust(w) for h, w in zip(heads, width)) + "  selected"]
    for b, label in zip(rows, labels):
        cells = []
        for t, w in zip(types, width):
            cell = ("x" if t in b["selected"] else ".") if t in b["types"] else " "
            cells.append(cell.rjust(w))
        out.append(label.rjust(label_w) + "  " + "  ".join(cells) + f"  {b['num_selected']}/{b['num_layers']}")
    out.append("")
    out.append("per module type: " + ", ".join(
        f"{t} {c['selected']}/{c['total']}" for t, c in result["per_module_type"].items()))
    what = f"LoRA r={result['r']}" if result["method"] == "lora" else "full fine-tuning of the selected weights"
    sel, every = result["selection"], result["all_layers"]
    out.append(f"trainable parameters ({what}):")
    out.append(f"  selection   {sel['trainable']:>14,}  {sel['percent']:7.3f} % of {sel['total']:,}")
    out.append(f"  all layers  {every['trainable']:>14,}  {every['percent']:7.3f} % of {every['total']:,}")
    return "\n".join(out)


def render_export(summary: dict[str, Any]) -> str:
    """The exported files and whether each expresses the selection exactly."""
    sel = "explicit list" if summary["mode"] == "list" else f"{summary['mode']} {summary['fraction']:g}"
    lines = [f"exported {sel}: {summary['num_selected']} of {summary['num_layers']} layers -> {summary['out_dir']}"]
    formats = summary["formats"]
    w = max(len(n) for n in formats)
    lines.append(f"{'file'.ljust(w)}  {'method':6}  {'status':11}  reason")
    for name, f in formats.items():
        status = f["status"] if name in summary["written"] else "not written"
        lines.append(f"{name.ljust(w)}  {f['method']:6}  {status:11}  {f.get('reason') or ''}".rstrip())
    lines.append(f"{'selection.json'.ljust(w)}  {'':6}  {'summary':11}  this table, the layers and the base model")
    for note in summary.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
