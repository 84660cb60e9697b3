"""A stage's update on disk: the adapter folder and the one ``ila_adapter.json`` that describes it.

A stage-1 milestone, a stage-3 result and a milestone written by :class:`ila.integration.IlaCallback` are all
the same thing to the stages that read them: a PEFT LoRA adapter folder (or, for full fine-tuning, the trained
layer weights in ``layers.safetensors``) plus :class:`AdapterMeta`. Every writer and every reader goes through
this module, so a field is written once and read with one default. So does finding the stage-1 update that
stage 2 scores (a milestone name or a folder), checking it is of the loaded model, and putting it on that
model frozen (LoRA) or as Delta_i = W_T - W_0 (full fine-tuning).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file, save_file

from .artifacts import atomic_dir, envelope, read_json, write_json_atomic
from .errors import ModelError
from .layers import Layer, adaptable_layers, unwrap
from .models import load_base_model, load_lora
from .rundir import RunDir
from .stability import bias_key

if TYPE_CHECKING:
    import peft
    import torch
    from torch import nn
    from transformers import PreTrainedModel

    from .config import ModelConfig

ADAPTER_META = "ila_adapter.json"
LAYER_WEIGHTS = "layers.safetensors"


@dataclass
class AdapterMeta:
    """What ``ila_adapter.json`` records about an update."""

    kind: str
    """``ila.stage1_adapter`` (scored by stage 2) or ``ila.stage3_adapter``."""
    layers: list[str]
    """The layers the update is on (full module names of the base model)."""
    method: str = "lora"
    """``lora``: a PEFT adapter folder; ``full``: W_T (and trained biases) in ``layers.safetensors``."""
    include_lm_head: bool = False
    step: int | None = None
    planned_steps: int | None = None
    fraction: float | None = None
    """Fraction of the planned steps at which a milestone was saved."""
    base_model: dict[str, Any] = field(default_factory=dict)
    module_types: list[str] | None = None
    lora: dict[str, Any] | None = None
    data: str | None = None
    selection: dict[str, Any] | None = None
    config_sha256: str | None = None
    layer_digest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**envelope(d.pop("kind")), **d}

    @property
    def label(self) -> str | None:
        """How a ranking names the milestone it scored (``50%``)."""
        return None if self.fraction is None else f"{self.fraction * 100:.0f}%"

    @classmethod
    def read(cls, folder: Path) -> AdapterMeta:
        """The metadata of ``folder``; fields that older writers left out get their defaults, and ``layers``
        missing entirely is read from the PEFT config's target modules."""
        raw = read_json(Path(folder) / ADAPTER_META, "adapter metadata")
        if not isinstance(raw, dict):
            raise ModelError(f"{folder / ADAPTER_META} is not an adapter description (a JSON object)")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values.setdefault("kind", "ila.stage1_adapter")
        if not values.get("layers"):
            values["layers"] = _peft_target_layers(Path(folder))
        values.setdefault("include_lm_head", any(n.split(".")[-1] == "lm_head" for n in values["layers"]))
        return cls(**values)


def _peft_target_layers(folder: Path) -> list[str]:
    config = folder / "adapter_config.json"
    targets = read_json(config, "PEFT adapter config").get("target_modules") if config.is_file() else None
    if not isinstance(targets, list) or not targets:
        raise ModelError(
            f"{folder} does not say which layers its update is on ({ADAPTER_META} has no layers, and "
            "adapter_config.json no list of target_modules)"
        )
    return sorted(targets)


def is_adapter_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a whole update: its weights and its metadata (written last)."""
    weights = (folder / "adapter_model.safetensors").is_file() or (folder / LAYER_WEIGHTS).is_file()
    return weights and (folder / ADAPTER_META).is_file()


def save_adapter(model: nn.Module, folder: Path, meta: AdapterMeta) -> Path:
    """The update of ``model`` plus ``ila_adapter.json``, written atomically (the metadata file last).

    For LoRA a PEFT adapter folder; for full fine-tuning the trained weights W_T of ``meta.layers``, and their
    biases, as ``layers.safetensors`` (W_0 is the base model).
    """
    with atomic_dir(folder) as tmp:
        if meta.method == "full":
            modules = dict(unwrap(model).named_modules())
            weights = {}
            for name in meta.layers:  # W_T and, where the layer has one, its trained bias
                weights[name] = modules[name].weight.detach().cpu().contiguous()
                if getattr(modules[name], "bias", None) is not None:
                    weights[bias_key(name)] = modules[name].bias.detach().cpu().contiguous()
            save_file(weights, str(tmp / LAYER_WEIGHTS), metadata={"format": "pt"})
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        write_json_atomic(tmp / ADAPTER_META, meta.to_dict())
    return folder


def adapter_digest(folder: Path) -> str:
    """sha256 of an adapter folder's files (names and contents): which update a result was computed from,
    whatever the folder is called."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_full_updates(folder: Path, base_model: nn.Module, layer_names: list[str]) -> dict[str, torch.Tensor]:
    """Delta_i = W_T - W_0 for every layer, from a full fine-tuning milestone and the base model: the weight
    update under the layer's name and, for a layer with a bias, the bias update under
    :func:`ila.stability.bias_key` (stage 1 trains both; a milestone that lacks them is read as an unchanged
    bias)."""
    path = folder / LAYER_WEIGHTS
    if not path.is_file():
        raise ModelError(f"{folder} has no {LAYER_WEIGHTS}; the full fine-tuning milestone is incomplete")
    trained = load_file(str(path))
    modules = dict(unwrap(base_model).named_modules())
    missing = [n for n in layer_names if n not in trained]
    if missing:
        raise ModelError(f"{path} lacks the weights of {len(missing)} layers, e.g. {missing[0]}")
    deltas = {}
    for n in layer_names:
        deltas[n] = trained[n].to(modules[n].weight.dtype) - modules[n].weight.detach().cpu()
        bias = getattr(modules[n], "bias", None)
        if bias is not None and bias_key(n) in trained:
            deltas[bias_key(n)] = trained[bias_key(n)].to(bias.dtype) - bias.detach().cpu()
    return deltas


def load_result(model_cfg: ModelConfig, folder: Path) -> nn.Module:
    """The model that a result folder describes: the base model of ``model_cfg`` with a PEFT adapter, or a
    full model folder (stage 3 with ``method: full``) loaded with the same dtype and device settings."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        return load_lora(load_base_model(model_cfg), folder)
    if (folder / "config.json").is_file():
        return load_base_model(replace(model_cfg, name=str(folder)))
    raise ModelError(f"{folder} is neither a PEFT adapter folder nor a model folder")


def lm_eval_source(base_source: str, folder: Path | None) -> tuple[str, str | None]:
    """(``pretrained``, ``peft``) for lm-eval's HFLM.

    The base model and the adapter, or the full model folder.
    """
    if folder is None:
        return base_source, None
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        return base_source, str(folder)
    return str(folder), None


def frozen_adapter_model(model: PreTrainedModel, adapter_dir: Path) -> peft.PeftModel:
    """The base model with a stage-1 LoRA adapter, every parameter frozen, LoRA dropout off: the gates (and
    the other scorers) must see the update the adapter actually learned (ila-method.md, stage 2)."""
    import peft

    adapter_cfg = peft.PeftConfig.from_pretrained(str(adapter_dir))
    adapter_cfg.lora_dropout = 0.0
    adapter_cfg.inference_mode = True
    peft_model = peft.PeftModel.from_pretrained(
        model, str(adapter_dir), config=adapter_cfg, is_trainable=False
    )
    for p in peft_model.parameters():
        p.requires_grad_(False)
    return peft_model


# -------------------------------------------------------------------------------------------------------
# the stage-1 update that stage 2 scores


def check_adapter_model(meta: AdapterMeta, identity: dict[str, Any], adapter_dir: Path) -> None:
    """Refuse a stage-1 adapter that was trained on another base model."""
    theirs = meta.base_model or {}
    for key in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size"):
        a, b = theirs.get(key), identity.get(key)
        if a is not None and b is not None and a != b:
            raise ModelError(
                f"the adapter in {adapter_dir} was trained on {theirs.get('name')} ({key} {a}), not on "
                f"{identity.get('name')} ({key} {b}); score it with the model it was trained on"
            )


def identity_name(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__)


def resolve_stage1_adapter(run_dir: Path, milestone: str | Path) -> Path:
    """The adapter folder that ``stage2.milestone`` names: ``last``, a percentage, or a path (a ``Path`` is
    always a folder); refused unless it holds a whole stage-1 adapter."""
    rd = RunDir(run_dir)
    if isinstance(milestone, Path):
        folder = milestone
    elif milestone == "last":
        folder = rd.stage1_final
    else:
        try:
            folder = rd.milestone(float(milestone) / 100)
        except ValueError:
            folder = Path(milestone)
    if not is_adapter_folder(folder):
        available = []
        if rd.milestones.is_dir():
            available = sorted(p.name for p in rd.milestones.iterdir() if not p.name.startswith("."))
        raise ModelError(
            f"no complete stage-1 adapter at {folder}; run stage 1 first (ila train) or pick another "
            f"stage2.milestone (available milestones: {', '.join(available) or 'none'})"
        )
    return folder


def adapter_layers(model: nn.Module, meta: AdapterMeta, adapter_dir: Path) -> list[Layer]:
    """The layers of ``model`` that the adapter's update is on, in model order."""
    names = set(meta.layers)
    layers = [layer for layer in adaptable_layers(model, include_lm_head=True) if layer.name in names]
    if len(layers) != len(names):
        missing = sorted(names - {layer.name for layer in layers})
        raise ModelError(
            f"the stage-1 adapter in {adapter_dir} was trained on {len(names)} layers of "
            f"{meta.base_model.get('name')}, {len(missing)} of which {identity_name(model)} does not have "
            f"(e.g. {missing[0]})"
        )
    return layers


def with_update(
    model: PreTrainedModel, meta: AdapterMeta, adapter_dir: Path, layers: list[Layer]
) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """(the model that scoring runs, Delta_i = W_T - W_0 of a full update or None for LoRA)."""
    if meta.method == "full":
        return model, load_full_updates(adapter_dir, model, [layer.name for layer in layers])
    return frozen_adapter_model(model, adapter_dir), None
