"""theta_0 loaded once for the stages of one process (``ila run``, the study): what a LoRA stage hands on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import RunConfig
from .errors import ConfigError
from .models import load_base_model, load_tokenizer, model_identity

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def check_model_fits(cfg: RunConfig, model: PreTrainedModel) -> None:
    """Refuse sequence lengths the model cannot take (position embeddings would run out)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.data.max_length > limit:
        raise ConfigError(
            f"data.max_length: {cfg.data.max_length} tokens is more than {cfg.model.name} takes "
            f"(max_position_embeddings = {limit}); set data.max_length <= {limit}"
        )


class SharedBase:
    """The base model theta_0 and its tokenizer, loaded once for the stages of one process.

    A LoRA stage leaves the base weights as they were loaded (they are frozen; only the adapter trains), so
    the next stage can take the same model back once the adapter is removed: :meth:`release` unloads it
    (peft's ``unload``: the original modules back, nothing merged) and switches off what the Trainer turned
    on. A stage that changed base weights (full fine-tuning) releases nothing, and the next stage loads
    theta_0 again. Stage 3's fresh adapter on the shared model equals one on a freshly loaded model (tested).
    """

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self._loaded: tuple[PreTrainedTokenizerBase, PreTrainedModel, dict[str, Any]] | None = None
        self.loads = 0
        """How many times theta_0 was read from disk."""

    def take(self) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, dict[str, Any]]:
        """(tokenizer, base model theta_0, the model's identity as results record it)."""
        loaded, self._loaded = self._loaded, None
        if loaded is None:
            tokenizer = load_tokenizer(self.cfg.model)
            model = load_base_model(self.cfg.model)
            check_model_fits(self.cfg, model)
            self.loads += 1
            return tokenizer, model, model_identity(model, self.cfg.model.name)
        return loaded

    def release(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model: nn.Module,
        identity: dict[str, Any],
        *,
        pristine: bool,
    ) -> None:
        """Hand the model back after a stage; ``pristine``: the stage left every base weight untouched."""
        if not pristine or self.cfg.model.quantization != "none":
            return  # quantised weights are not worth the risk of a second adapter on a prepared model
        base = model.unload() if hasattr(model, "unload") and hasattr(model, "peft_config") else model
        if any("lora_" in name for name, _ in base.named_modules()) or "ila_gates" in base._modules:
            return
        if getattr(base, "is_activation_checkpointing", getattr(base, "is_gradient_checkpointing", False)):
            base.gradient_checkpointing_disable()
        for p in base.parameters():
            p.requires_grad_(False)
        base.train(False)
        self._loaded = (tokenizer, base, identity)
