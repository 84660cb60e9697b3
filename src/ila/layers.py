"""The one place that knows module names: which modules are layers, and which block each belongs to.

In ILA a *layer* is one adapted linear module, named by its full module name in the base model
(``model.layers.12.mlp.down_proj``); a *block* is one decoder layer (``model.layers.12``). The paper counts
225 layers for LLaMA-2-7B: 32 blocks x 7 projections + ``lm_head`` (Shi et al., arXiv 2410.17875).
Everything downstream is keyed by these names, never by a position that depends on traversal order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from torch import nn

from .errors import ModelError

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Layer:
    name: str
    """Full module name in the base model."""
    block: str | None
    """Full name of the decoder block that holds it; None for ``lm_head``."""
    block_index: int | None
    module_type: str
    """Name inside the block (``self_attn.q_proj``), or ``lm_head``."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model inside a peft wrapper (module names then match the base model)."""
    base = getattr(model, "base_model", None)
    if base is not None and hasattr(base, "model") and type(model).__name__.startswith("Peft"):
        return base.model
    return model


def lora_adapter_name(model: nn.Module, layer_names: list[str]) -> str:
    """The name of the one LoRA adapter that acts on ``layer_names`` of a peft ``model``.

    ILA gates a layer's update Delta_i, so exactly one adapter must be active and unmerged on every layer:
    with two active adapters the update is their sum and gating one of them ranks something else; a merged
    adapter is already inside W and a gate on its LoRA path would change nothing.
    """
    modules = dict(model.named_modules())
    missing = [n for n in layer_names if not hasattr(modules.get(PEFT_PREFIX + n), "lora_A")]
    if missing:
        raise ModelError(
            f"{len(missing)} of {len(layer_names)} layers carry no LoRA adapter, e.g. {missing[0]}; "
            "the adapter does not match the layers being scored"
        )
    names: set[str] = set()
    for layer in layer_names:
        module = modules[PEFT_PREFIX + layer]
        active = [a for a in _as_list(getattr(module, "active_adapters", [])) if a in module.lora_A]
        if getattr(module, "merged", False):
            raise ModelError(
                f"the LoRA adapter on {layer} is merged into the base weights, "
                "so its update cannot be gated; "
                "call model.unmerge_adapter() (or load the adapter unmerged) before scoring"
            )
        if getattr(module, "disable_adapters", False) or not active:
            raise ModelError(
                f"no LoRA adapter is active on {layer}; activate the one to score with "
                "model.set_adapter(name)"
            )
        if len(active) > 1:
            raise ModelError(
                f"{len(active)} LoRA adapters are active on {layer} ({', '.join(active)}); "
                "ILA scores one update per layer: activate exactly one with model.set_adapter(name), "
                "or merge them into one adapter first"
            )
        names.add(active[0])
    if len(names) > 1:
        raise ModelError(
            f"the layers carry different active LoRA adapters ({', '.join(sorted(names))}); "
            "activate one adapter on every layer"
        )
    if not names:
        raise ModelError("no layer to score")
    return names.pop()


def _as_list(value: object) -> list[str]:
    return [value] if isinstance(value, str) else list(value)  # type: ignore[arg-type]


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):  # includes bitsandbytes Linear4bit / Linear8bitLt
        return True
    # GPT-2 style Conv1D is a linear projection with transposed weights.
    return type(module).__name__ == "Conv1D"


def find_blocks(model: nn.Module) -> tuple[str, int]:
    """(full name of the ModuleList of decoder blocks, number of blocks).

    The block list is the longest ``nn.ModuleList`` whose entries contain linear modules; this covers
    ``model.layers`` (Llama, Gemma, Qwen, Mistral), ``transformer.h`` (GPT-2) and ``gpt_neox.layers``.
    """
    model = unwrap(model)
    best: tuple[str, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if all(any(_is_linear(m) for m in child.modules()) for child in module):
                if best is None or len(module) > best[1]:
                    best = (name, len(module))
    if best is None:
        raise ModelError(f"{type(model).__name__} has no list of decoder blocks with linear layers")
    return best


def output_head_name(model: nn.Module) -> str | None:
    model = unwrap(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def adaptable_layers(
    model: nn.Module, *, include_lm_head: bool = False, module_types: list[str] | None = None
) -> list[Layer]:
    """Every linear module inside a decoder block (optionally restricted to ``module_types``), in model order,
    plus the output head when ``include_lm_head``."""
    model = unwrap(model)
    blocks_name, n_blocks = find_blocks(model)
    layers: list[Layer] = []
    prefix = blocks_name + "."
    for name, module in model.named_modules():
        if not name.startswith(prefix) or not _is_linear(module):
            continue
        # peft replaces an adapted module by a wrapper holding the original as `base_layer` plus lora_A /
        # lora_B; the layer is the wrapper's name, and the LoRA factors are not layers.
        if ".lora_" in name or ".base_layer." in name:
            continue
        name = name.removesuffix(".base_layer")
        index_str, _, inner = name[len(prefix) :].partition(".")
        module_type = inner
        if (
            module_types is not None
            and module_type not in module_types
            and module_type.rsplit(".", 1)[-1] not in module_types
        ):
            continue
        layers.append(Layer(name, f"{blocks_name}.{index_str}", int(index_str), module_type))
    if include_lm_head:
        head = output_head_name(model)
        if head is None:
            raise ModelError(f"lora.include_lm_head is set but {type(model).__name__} has no output head")
        layers.append(Layer(head, None, None, "lm_head"))
    if not layers:
        raise ModelError(
            f"no adaptable layer found in {type(model).__name__}"
            + (f" for module_types {module_types}" if module_types else "")
        )
    return layers


def layer_names_digest(names: list[str]) -> str:
    """Short hash of a layer set, to tell two models' layer sets apart in artefacts."""
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]


def describe_layers(layers: list[Layer]) -> dict[str, object]:
    """Counts per block and module type, for logs and dry runs."""
    per_type: dict[str, int] = {}
    per_block: dict[str, int] = {}
    for layer in layers:
        per_type[layer.module_type] = per_type.get(layer.module_type, 0) + 1
        key = layer.block or layer.module_type
        per_block[key] = per_block.get(key, 0) + 1
    return {"num_layers": len(layers), "per_module_type": per_type, "per_block": per_block}
