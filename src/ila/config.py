"""Typed, strictly validated configuration for every stage of an ila run.

A run is configured by one YAML file (a path, or a builtin config by name: ``smollm2``) plus dotted
``--set key=value`` overrides. Loading is strict: an unknown key, a value of the wrong type or a value out of
range raises :class:`ConfigError` naming the dotted key. This module imports no torch.

Defaults marked [spec] in the docstrings are this project's reconstruction of details the paper does not
state (Shi et al., arXiv 2410.17875); each of them is an option here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .precision import resolve_precision
from .scorers import SCORER_NAMES
from .strict import apply_overrides, from_dict, read_yaml_mapping

Precision = Literal["fp32", "bf16", "fp16", "auto"]


@dataclass
class ModelConfig:
    """Which causal LM to load and how."""

    name: str = "smollm2"
    """A builtin name (``smollm2``), a local folder with safetensors weights, or a Hub model id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the loaded weights. Use ``bfloat16`` on GPUs; mixed precision is ``train.precision``."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    trust_remote_code: bool = False
    """Run model code from the model folder. Off unless asked: it executes arbitrary Python."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """Load the frozen base in 4 bits (QLoRA: NF4, double quantisation, bf16 compute) or 8 bits through
    bitsandbytes. Needs CUDA and ``pip install bitsandbytes``; LoRA stages only."""
    allow_pickle: bool = False
    """Also load pickled ``.bin`` weights. Off: unpickling can run arbitrary code; safetensors cannot."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``name`` is a Hub id."""
    cache_dir: str | None = None
    """Where builtin models are converted to safetensors (default ``$ILA_CACHE`` or ``~/.cache/ila``)."""
    attn_implementation: str | None = None
    """transformers' attention implementation (``sdpa``, ``eager``, ``flash_attention_2``...); null for
    transformers' default. ``flash_attention_2`` on a GPU makes padding-free batches varlen kernels."""

    def validate(self, prefix: str) -> None:
        _require(bool(self.name.strip()), prefix, "name", "must not be empty")
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.split(":")[0] in ("cuda", "mps"),
            prefix,
            "device",
            f"must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )


@dataclass
class DataConfig:
    """The alignment dataset and how it becomes tokens (see :mod:`ila.data`)."""

    name: str = "sharegpt"
    """A builtin (``sharegpt``, ``chitchat``, ``mtbench``, ``gsm8k``, ``humaneval``), a .json/.jsonl file, a
    ``save_to_disk`` folder, or a ``datasets`` Hub name."""
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion"] = "auto"
    split: str = "train"
    subset: str | None = None
    """Configuration name for ``datasets`` Hub datasets."""
    template: Literal["auto", "chat", "plain"] = "auto"
    """``auto`` uses the tokenizer's chat template when it has one, else the documented plain template."""
    max_length: int = 256
    """Tokens per example; longer examples are truncated, and dropped if no response token remains."""
    max_examples: int | None = 2000
    """Examples drawn (seeded) from the dataset before the held-out split; null for all."""
    heldout_fraction: float = 0.2
    max_heldout_examples: int | None = 400
    """Several hundred held-out conversations where the data has them: with fewer the held-out loss's 95 %
    interval is wider than most differences between layer selections (the demo config keeps 32 for time)."""
    seed: int = 0
    """Seed of the sample and of the train/held-out split."""
    skip_bad_records: bool = False
    """Skip malformed records (and count them) instead of stopping at the first one."""
    padding_free: Literal["auto", "on", "off"] = "auto"
    """Batch without padding: each batch's examples concatenated, attention kept inside each example
    (:mod:`ila.batching`). ``auto``: where a check finds the model supports it (logged); ``on``: an error
    where it does not; ``off``: padded batches. It does not change the numbers, only the time."""

    def tokenization(self) -> dict[str, Any]:
        """The settings the tokenized examples depend on (all but how they are batched)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "padding_free"}

    def validate(self, prefix: str) -> None:
        _require(bool(self.name.strip()), prefix, "name", "must not be empty")
        _require(self.max_length >= 8, prefix, "max_length", f"must be >= 8, got {self.max_length}")
        _require(
            self.max_examples is None or self.max_examples >= 1,
            prefix,
            "max_examples",
            f"must be >= 1 or null, got {self.max_examples}",
        )
        _require(
            0.0 <= self.heldout_fraction < 1.0,
            prefix,
            "heldout_fraction",
            f"must be in [0, 1), got {self.heldout_fraction}",
        )
        _require(
            self.max_heldout_examples is None or self.max_heldout_examples >= 0,
            prefix,
            "max_heldout_examples",
            f"must be >= 0 or null, got {self.max_heldout_examples}",
        )


@dataclass
class LoraConfig:
    """The LoRA adapter put on every layer in stage 1 and on the selected layers in stage 3."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    """LoRA dropout in stages 1 and 3; stage 2 always runs with dropout off."""
    include_lm_head: bool = False
    """Adapt ``lm_head`` too (the paper's 225 layers of LLaMA-2-7B include it). Recorded with every result.
    trl's SFTTrainer (1.x) refuses a LoRA adapter on ``lm_head`` (:func:`ila.integration.check_sft_model`)."""
    module_types: list[str] | None = None
    """Restrict layers to these module types (e.g. ``[q_proj, v_proj]``); null: every linear projection."""

    def validate(self, prefix: str) -> None:
        _require(self.r >= 1, prefix, "r", f"must be >= 1, got {self.r}")
        _require(self.alpha > 0, prefix, "alpha", f"must be > 0, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, prefix, "dropout", f"must be in [0, 1), got {self.dropout}")
        _require(
            self.module_types is None or len(self.module_types) > 0,
            prefix,
            "module_types",
            "must be null or a non-empty list",
        )


@dataclass
class TrainConfig:
    """Optimisation settings shared by stage 1 and stage 3 (handed to transformers' TrainingArguments)."""

    max_steps: int = 60
    batch_size: int = 4
    """Per-device batch size."""
    grad_accum: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: Precision = "fp32"
    """Mixed precision: ``bf16`` autocasts (also on CPUs with bf16 instructions); ``fp16`` needs CUDA;
    ``auto`` is bf16 where the device computes it natively and fp32 elsewhere (:mod:`ila.precision`),
    decided when the config is loaded, so that the run records the precision it trained in."""
    gradient_checkpointing: bool = False
    logging_steps: int = 5
    save_steps: int = 0
    """Trainer checkpoints for resuming every this many steps; 0 picks a quarter of the run."""
    eval_heldout: bool = True
    """Report held-out loss at the end of the stage."""
    eval_steps: int = 0
    """Also evaluate the held-out loss every this many steps (``stageN/heldout_curve.jsonl``: where training
    stops improving); 0: at the end only."""
    early_stopping_patience: int = 0
    """Stop once this many held-out evaluations in a row improved the best loss by no more than
    ``early_stopping_min_delta``, and keep the weights of the best one (needs ``eval_steps``); 0: never. The
    held-out loss is then chosen on the split it is reported on: compare selections on a fixed schedule."""
    early_stopping_min_delta: float = 0.0
    dataloader_workers: int = 0
    response_logits_only: bool = True
    """Compute the output head (and its softmax over the vocabulary) only at positions whose next token is a
    response token; the loss and gradients are unchanged. Falls back to every position for models that cannot
    (see ila/training.py)."""

    def validate(self, prefix: str) -> None:
        _require(self.max_steps >= 1, prefix, "max_steps", f"must be >= 1, got {self.max_steps}")
        _require(self.batch_size >= 1, prefix, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.grad_accum >= 1, prefix, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        _require(self.learning_rate > 0, prefix, "learning_rate", f"must be > 0, got {self.learning_rate}")
        _require(
            0.0 <= self.warmup_ratio < 1.0,
            prefix,
            "warmup_ratio",
            f"must be in [0, 1), got {self.warmup_ratio}",
        )
        _require(self.weight_decay >= 0, prefix, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.max_grad_norm >= 0, prefix, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        _require(self.logging_steps >= 1, prefix, "logging_steps", f"must be >= 1, got {self.logging_steps}")
        _require(self.save_steps >= 0, prefix, "save_steps", f"must be >= 0, got {self.save_steps}")
        _require(self.dataloader_workers >= 0, prefix, "dataloader_workers", "must be >= 0")
        _require(self.eval_steps >= 0, prefix, "eval_steps", f"must be >= 0, got {self.eval_steps}")
        _require(
            self.early_stopping_patience == 0 or (self.eval_steps > 0 and self.eval_heldout),
            prefix,
            "early_stopping_patience",
            "needs eval_steps > 0 and eval_heldout: true (it stops on the held-out loss)",
        )
        _require(self.early_stopping_patience >= 0, prefix, "early_stopping_patience", "must be >= 0")
        _require(self.early_stopping_min_delta >= 0, prefix, "early_stopping_min_delta", "must be >= 0")


@dataclass
class Stage1Config:
    """Stage 1: LoRA on every layer until epsilon-stable."""

    method: Literal["lora", "full"] = "lora"
    """``lora``: a LoRA adapter on every layer (Delta = scaling * B A). ``full``: full fine-tuning of every
    layer's weights (Delta = W_T - W_0); embeddings and norms stay frozen so that all gates at 0 give
    theta_0."""
    train: TrainConfig = field(default_factory=TrainConfig)
    milestones: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    """Fractions of the planned steps at which the adapter is saved (``stage1/milestone-050`` ...)."""
    stability_window: int = 10
    """[spec] w: epsilon-stability compares the LoRA updates now with those w steps ago."""
    stability_epsilon: float = 0.1
    """[spec] epsilon: training is stable when ||Delta_t - Delta_{t-w}||_F / ||Delta_t||_F <= epsilon."""
    stop_when_stable: bool = False
    """Stop stage 1 at the first stable window instead of running the planned schedule."""
    stability_criterion: Literal["update", "ranking"] = "update"
    """[spec] What must settle: ``update`` is r_t <= epsilon above; ``ranking`` compares the top
    ``stability_fraction`` of layers ranked by update norm ||Delta_i||_F (free to compute) with the same set
    one window earlier, and is stable when their Jaccard overlap is >= 1 - epsilon for ``stability_patience``
    windows in a row."""
    stability_fraction: float = 0.3
    stability_patience: int = 2

    def validate(self, prefix: str) -> None:
        self.train.validate(prefix + "train.")
        _require(len(self.milestones) > 0, prefix, "milestones", "must list at least one fraction")
        for m in self.milestones:
            _require(0.0 < m <= 1.0, prefix, "milestones", f"every milestone must be in (0, 1], got {m}")
        _require(
            sorted(set(self.milestones)) == list(self.milestones),
            prefix,
            "milestones",
            f"must be increasing without repeats, got {self.milestones}",
        )
        _require(self.stability_window >= 1, prefix, "stability_window", "must be >= 1")
        _require(self.stability_epsilon > 0, prefix, "stability_epsilon", "must be > 0")
        _require(0 < self.stability_fraction <= 1, prefix, "stability_fraction", "must be in (0, 1]")
        _require(self.stability_patience >= 1, prefix, "stability_patience", "must be >= 1")


@dataclass
class Stage2Config:
    """Stage 2: only the layer scores s train; the gate of layer i is sigmoid(s_i)."""

    scorer: str = "ila"
    """How layers are scored: ``ila`` learns the gates (the method); the others are baselines and cheap
    alternatives (one of ``ila.scorers.SCORER_NAMES``: ila, taylor, update-norm, block-influence, snr, random,
    position). Rankings go to ``stage2/ranking.json`` for ``ila`` and to
    ``stage2/ranking-<scorer>.json`` for the others."""
    sample_batches: int = 8
    """Batches of data that the ``taylor`` and ``block-influence`` scorers look at."""
    position_from: Literal["last", "first"] = "last"
    """For the ``position`` scorer: rank the last blocks first, or the first blocks first."""
    milestone: str = "last"
    """Which stage-1 adapter to score: ``last``, a milestone such as ``50`` (percent), or a folder."""
    steps: int = 100
    """[spec] A fixed number of optimiser steps on the scores."""
    batch_size: int = 4
    grad_accum: int = 1
    optimizer: Literal["adam", "sgd"] = "sgd"
    """[spec] Optimiser of the scores. Plain SGD keeps the size of each layer's cumulative gradient in its
    score; Adam normalises every score's step, so without a penalty the layers whose gradients keep one sign
    rise at the same rate and their order is left to noise. Settled by measurement (docs/method.md, "Choosing
    the optimiser"): SGD without a penalty was as seed-stable as Adam with one, found planted updates as well,
    and leaves the gate of a zero update where it started."""
    learning_rate: float = 0.05
    """[spec] Learning rate of the scores. With SGD and ``normalise_step`` it is the largest score move of the
    first step, on any model; it sets how far the scores travel, not their order (keep it small enough that
    the gates do not saturate: 100 steps move a score by at most about 100 x this). With Adam about 0.05
    too."""
    normalise_step: bool = True
    """[spec] SGD only: divide every step by the largest score gradient of the first step, so that the step
    does not depend on the model's gradient scale (see ila.gates.ScoreSGD and docs/method.md, "The step
    size"). Off: plain SGD, whose learning rate must then fit the model (about 100 on SmolLM2-135M)."""
    init_mean: float = 0.0
    """[spec] s starts at init_mean (gate 0.5 for 0) ..."""
    init_std: float = 0.01
    """[spec] ... plus N(0, init_std) noise drawn from the run's seed."""
    budget_fraction: float = 0.5
    """[spec] H/N of the budget penalty lambda * max(0, mean(gate) - H/N)."""
    budget_lambda: float = 0.0
    """[spec] lambda of the budget penalty; 0 (the default, see ``optimizer``) turns it off. The penalty makes
    gates compete for the budget, and moves every gate, a zero update's too; use it (lambda 1) with Adam."""
    precision: Precision = "fp32"
    """As ``train.precision`` of stages 1 and 3."""
    logging_steps: int = 5
    response_logits_only: bool = True
    """As ``train.response_logits_only`` of stages 1 and 3: the output head only where a response token
    follows."""

    def as_train_config(self) -> TrainConfig:
        """Stage 2's schedule in the form every stage's training takes: a constant learning rate, no warm-up,
        no weight decay and no gradient clipping (clipping would rescale all score gradients together and
        change their ratios)."""
        return TrainConfig(
            max_steps=self.steps,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            learning_rate=self.learning_rate,
            lr_scheduler="constant",
            warmup_ratio=0.0,
            weight_decay=0.0,
            max_grad_norm=0.0,
            precision=self.precision,
            logging_steps=self.logging_steps,
            eval_heldout=False,
            response_logits_only=self.response_logits_only,
        )

    def validate(self, prefix: str) -> None:
        _require(
            self.scorer in SCORER_NAMES,
            prefix,
            "scorer",
            f"must be one of {', '.join(SCORER_NAMES)}, got {self.scorer!r}",
        )
        _require(self.steps >= 1, prefix, "steps", f"must be >= 1, got {self.steps}")
        _require(
            self.sample_batches >= 1, prefix, "sample_batches", f"must be >= 1, got {self.sample_batches}"
        )
        _require(self.batch_size >= 1, prefix, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.grad_accum >= 1, prefix, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        _require(self.learning_rate > 0, prefix, "learning_rate", f"must be > 0, got {self.learning_rate}")
        # A config written for plain SGD (learning rate 100) would move a normalised score by 100 at once,
        # where sigmoid is flat: say so instead of returning a ranking frozen by the first batch.
        _require(
            not (self.optimizer == "sgd" and self.normalise_step and self.learning_rate > 5),
            prefix,
            "learning_rate",
            f"{self.learning_rate} with normalise_step is the largest score move of the first "
            "step, and a gate saturates beyond |s| = 5; use about 0.05, or set normalise_step: false for "
            "plain SGD",
        )
        _require(self.init_std >= 0, prefix, "init_std", f"must be >= 0, got {self.init_std}")
        _require(
            0.0 < self.budget_fraction <= 1.0,
            prefix,
            "budget_fraction",
            f"must be in (0, 1], got {self.budget_fraction}",
        )
        _require(self.budget_lambda >= 0, prefix, "budget_lambda", f"must be >= 0, got {self.budget_lambda}")
        _require(self.logging_steps >= 1, prefix, "logging_steps", "must be >= 1")
        if self.milestone not in ("last",):
            try:
                pct = float(self.milestone)
            except ValueError:
                pct = None  # a path to an adapter folder; checked when the stage runs
            if pct is not None:
                _require(0 < pct <= 100, prefix, "milestone", f"a percentage must be in (0, 100], got {pct}")


@dataclass
class SelectionConfig:
    """Which layers stage 3 fine-tunes, taken from a ranking."""

    mode: Literal["top", "drop_bottom", "list"] = "top"
    """``top``: tune only the top ``fraction``; ``drop_bottom``: freeze the bottom ``fraction`` and tune the
    rest; ``list``: tune exactly ``layers``."""
    fraction: float = 0.3
    layers: list[str] = field(default_factory=list)
    """Full module names for ``mode: list``."""

    def validate(self, prefix: str) -> None:
        _require(0.0 < self.fraction <= 1.0, prefix, "fraction", f"must be in (0, 1], got {self.fraction}")
        if self.mode == "drop_bottom":
            _require(self.fraction < 1.0, prefix, "fraction", "drop_bottom 1.0 would tune nothing")
        if self.mode == "list":
            _require(
                len(self.layers) > 0, prefix, "layers", "mode list needs a non-empty list of layer names"
            )
        else:
            _require(len(self.layers) == 0, prefix, "layers", f"is only used with mode list, not {self.mode}")


@dataclass
class Stage3Config:
    """Stage 3: a fresh LoRA run from the base model on the selected layers only."""

    method: Literal["lora", "full"] = "lora"
    """``lora``: a LoRA adapter on the selected layers (written as a PEFT folder). ``full``: selective full
    fine-tuning, every unselected parameter frozen (written as a transformers model folder)."""
    ranking: str | None = None
    """A ranking.json to select from; null means this run's ``stage2/ranking.json``."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, prefix: str) -> None:
        self.selection.validate(prefix + "selection.")
        self.train.validate(prefix + "train.")


@dataclass
class RunConfig:
    """One ILA run: the model, the data, and the three stages."""

    seed: int = 0
    """Seed of training order, LoRA initialisation and the stage-2 score noise."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    stage3: Stage3Config = field(default_factory=Stage3Config)

    def validate(self) -> RunConfig:
        self.model.validate("model.")
        self.data.validate("data.")
        self.lora.validate("lora.")
        self.stage1.validate("stage1.")
        self.stage2.validate("stage2.")
        self.stage3.validate("stage3.")
        for stage in ("stage1", "stage3"):
            if getattr(self, stage).train.precision == "fp16" and self.model.device == "cpu":
                raise ConfigError(
                    f"{stage}.train.precision: fp16 mixed precision needs CUDA; use bf16 or fp32 on the CPU"
                )
        if self.model.quantization != "none":
            if self.model.device == "cpu":
                raise ConfigError(
                    "model.quantization: 4-bit and 8-bit bases (bitsandbytes) need CUDA, not the CPU"
                )
            for stage in ("stage1", "stage3"):
                if getattr(self, stage).method == "full":
                    raise ConfigError(
                        f"{stage}.method: full fine-tuning cannot train quantized weights; use "
                        "lora (QLoRA) or model.quantization: none"
                    )
        if self.stage2.precision == "fp16" and self.model.device == "cpu":
            raise ConfigError(
                "stage2.precision: fp16 mixed precision needs CUDA; use bf16 or fp32 on the CPU"
            )
        # `auto` becomes what this machine computes natively, here, so that the hashes and every record of
        # the run name the precision it trains in
        for train in (self.stage1.train, self.stage3.train):
            train.precision = resolve_precision(train.precision, self.model.device)
        self.stage2.precision = resolve_precision(self.stage2.precision, self.model.device)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sha256(self) -> str:
        """Hash of the resolved config, recorded in every artefact so that results can be traced to it."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def stage_sha256(self, stage: str) -> str:
        """Hash of the parts of the config that a stage's result depends on.

        A completed stage is reused only while this hash is unchanged: changing ``stage3`` does not
        invalidate stage 1, but changing ``data`` or ``lora`` does.
        """
        d = self.to_dict()
        common = {k: d[k] for k in ("seed", "model", "data", "lora")}
        # The device, the cache location, the attention kernel and the batching do not change what a stage
        # computes (beyond floating-point rounding).
        common["model"] = {
            k: v
            for k, v in common["model"].items()
            if k not in ("device", "cache_dir", "attn_implementation")
        }
        common["data"] = self.data.tokenization()
        parts = {
            "stage1": ["stage1"],
            "stage2": ["stage1", "stage2"],
            "stage3": ["stage1", "stage2", "stage3"],
        }[stage]
        blob = json.dumps({**common, **{k: d[k] for k in parts}}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _require(ok: bool, prefix: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{prefix}{key}: {message}")


BUILTIN_CONFIGS = Path(__file__).parent / "configs"
"""The configs that ship inside the package (``configs/`` of a clone links here)."""


def builtin_config_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml"))


def resolve_config(spec: str | Path, what: str = "config file") -> Path:
    """The file ``spec`` names: an existing path, else a builtin config by name (``smollm2`` or
    ``smollm2.yaml``), so that ``--config smollm2`` works from any folder after a plain ``pip install``."""
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    builtin = BUILTIN_CONFIGS / f"{name}.yaml"
    # A bare name, or a path into a clone's configs/ folder run from elsewhere.
    if builtin.is_file() and (path.parent == Path(".") or path.parent.name == "configs"):
        return builtin
    raise ConfigError(
        f"{what} {spec} does not exist (builtin configs, usable by name: {', '.join(builtin_config_names())})"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config (a path or a builtin name; the defaults when ``path`` is None), apply
    overrides, validate strictly."""
    data = read_yaml_mapping(resolve_config(path)) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data).validate()
