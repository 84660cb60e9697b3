"""The one Trainer set-up that every stage uses.

The three stages of ILA differ only in which parameters train and which loss is minimised:

- stage 1: every layer's LoRA A and B; the response-token loss;
- stage 2: only the layer scores s; the response-token loss plus the budget penalty;
- stage 3: the LoRA A and B of the selected layers; the response-token loss.

So a stage sets ``requires_grad`` on what it trains, describes its schedule in a :class:`TrainingPlan`, and
calls :func:`train`. Gradient accumulation, mixed precision, logging, checkpoint/resume and several
processes come from transformers' Trainer and accelerate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from .artifacts import append_jsonl, truncate_jsonl
from .batching import PADDED, Batching, PaddingFree, choose_batching, padded_collator
from .callbacks import HeldoutCurve, StepTimer
from .config import TrainConfig
from .errors import TrainingError
from .heldout import heldout_loss
from .models import resolve_device
from .precision import warn_if_emulated
from .response_logits import response_logits_kwargs, supports_response_logits

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class TrainingPlan:
    """What a stage asks of the Trainer."""

    output_dir: Path
    """Trainer checkpoints (for resuming) go here."""
    metrics_path: Path
    """JSON-lines log of every Trainer log record."""
    max_steps: int
    batch_size: int
    grad_accum: int = 1
    learning_rate: float = 2e-4
    optimizer: str = "adamw_torch"
    """A Trainer ``optim`` name; ignored when ``optimizer_cls_and_kwargs`` is set."""
    optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None
    """An optimiser class of one's own and its keyword arguments (stage 2's :class:`ila.gates.ScoreSGD`)."""
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    logging_steps: int = 5
    save_steps: int = 0
    """0: no Trainer checkpoints."""
    seed: int = 0
    device: str = "auto"
    dataloader_workers: int = 0
    penalty: Callable[[], torch.Tensor] | None = None
    """An extra term added to the loss of every optimiser step (stage 2's budget penalty)."""
    callbacks: list[TrainerCallback] = field(default_factory=list)
    resume: bool = True
    """Continue from the newest checkpoint in ``output_dir`` if there is one."""
    eval_before: bool = False
    """Also evaluate the held-out loss before training."""
    save_trainable_only: bool = False
    """Checkpoints hold only the parameters that train (stage 2: the scores)."""
    response_logits_only: bool = True
    """Compute the output head only where the next token is a response token (see
    :func:`response_logits_kwargs`)."""
    deterministic: bool = False
    """Train with the model in eval mode: every dropout (LoRA's and the base model's own) off."""
    padding_free: PaddingFree = "auto"
    """Concatenate each batch's examples without padding where the model supports it (:mod:`ila.batching`)."""
    eval_steps: int = 0
    """Held-out loss every this many steps into ``heldout_curve.jsonl`` beside the metrics (0: none)."""
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0


@dataclass
class TrainingResult:
    steps: int
    train_loss: float
    seconds: float
    seconds_per_step: float
    """``seconds`` over the steps this process ran (a resumed run's own steps), evaluations included."""
    heldout: dict[str, Any] | None
    """:func:`ila.heldout.heldout_loss` after training (loss, ci95, tokens...); None without held-out data."""
    heldout_before: dict[str, Any] | None
    """The same before the first step (a fresh LoRA adapter starts as the base model, B = 0)."""
    peak_memory_mb: float | None
    stopped_early: bool
    resumed_from: str | None
    batching: dict[str, Any] = field(default_factory=dict)
    """:meth:`ila.batching.Batching.to_dict`: padded or padding-free, and why."""
    best_step: int | None = None
    """With early stopping: the step whose weights were kept (None: the last step's)."""
    median_step_seconds: float | None = None
    """The median wall time of one optimiser step (:class:`ila.callbacks.StepTimer`)."""

    @property
    def heldout_loss(self) -> float | None:
        return None if self.heldout is None else self.heldout["loss"]

    @property
    def heldout_loss_before(self) -> float | None:
        return None if self.heldout_before is None else self.heldout_before["loss"]


def plan_for(
    train: TrainConfig, folder: Path, *, seed: int, device: str, callbacks: list | None = None, **extra: Any
) -> TrainingPlan:
    """The one translation of a stage's :class:`~ila.config.TrainConfig` into a :class:`TrainingPlan`, with
    Trainer checkpoints and metrics inside the stage's ``folder``; ``extra`` sets the plan's other fields.

    ``save_steps: 0`` in the config means a checkpoint every quarter of the run (so an interrupted stage can
    resume), as the config documents."""
    plan = TrainingPlan(
        output_dir=folder / "checkpoints",
        metrics_path=folder / "metrics.jsonl",
        max_steps=train.max_steps,
        batch_size=train.batch_size,
        grad_accum=train.grad_accum,
        learning_rate=train.learning_rate,
        lr_scheduler=train.lr_scheduler,
        warmup_ratio=train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        precision=train.precision,
        gradient_checkpointing=train.gradient_checkpointing,
        logging_steps=train.logging_steps,
        save_steps=train.save_steps or max(1, train.max_steps // 4),
        seed=seed,
        device=device,
        dataloader_workers=train.dataloader_workers,
        response_logits_only=train.response_logits_only,
        eval_steps=train.eval_steps if train.eval_heldout else 0,
        early_stopping_patience=train.early_stopping_patience,
        early_stopping_min_delta=train.early_stopping_min_delta,
        callbacks=list(callbacks or []),
    )
    return dataclasses.replace(plan, **extra)


class IlaTrainer(Trainer):
    """Trainer with an optional penalty term, a hard stop on a non-finite loss, the output head restricted to
    response positions, and (for stage 2) checkpoints that hold only the trainable parameters."""

    def __init__(
        self,
        *args: Any,
        penalty: Callable[[], torch.Tensor] | None = None,
        save_trainable_only: bool = False,
        response_logits_only: bool = True,
        deterministic: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.deterministic = deterministic
        self.penalty = penalty
        self.save_trainable_only = save_trainable_only
        self.last_penalty: float | None = None
        self.response_logits_only = response_logits_only and supports_response_logits(self.model)
        self.batching: Batching = PADDED
        """How the batches are made (set by :func:`make_trainer`)."""

    def _save_checkpoint(self, model, trial):  # type: ignore[override]
        # Never write a checkpoint that a resume would trust but that holds NaN or infinite weights.
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise TrainingError(
                f"the weights became non-finite at step {self.state.global_step} (e.g. {bad[0]}); stopping "
                f"without saving. The last good checkpoint (if any) is in {self.args.output_dir}. "
                "Lower the learning rate or keep gradient clipping on."
            )
        return super()._save_checkpoint(model, trial)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.save_trainable_only:
            return super()._save(output_dir, state_dict)
        # Stage 2 trains N scores on a frozen model: a checkpoint needs only those. Saved as
        # model.safetensors, the Trainer's own resume path loads them back with load_state_dict(strict=False).

        if self.args.should_save:
            out = Path(output_dir or self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            trainable = {
                n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad
            }
            save_file(trainable, str(out / "model.safetensors"), metadata={"format": "pt"})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        training = model.training
        if training and self.deterministic:
            # The Trainer switches the model to train mode before every step; a stage that must see a
            # deterministic model (stage 2: no dropout anywhere, the base model's own included) undoes it.
            # Gradients flow the same in eval mode.
            model.eval()
        if (
            self.response_logits_only
            and training
            and inputs.get("labels") is not None
            and self.label_smoother is None
            and self.compute_loss_func is None
        ):
            inputs = {**inputs, **response_logits_kwargs(inputs["labels"])}
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss, outputs = result if return_outputs else (result, None)
        if not torch.isfinite(loss.detach()).all():
            raise TrainingError(
                f"the loss became {loss.item()} at step {self.state.global_step + 1}; stopping. "
                "The last good "
                f"checkpoint (if any) is in {self.args.output_dir}. Lower the learning rate or use fp32/bf16."
            )
        if self.penalty is not None and training:
            penalty = self.penalty()
            self.last_penalty = float(penalty.detach())
            # The language-model loss is already normalised over the whole accumulated batch when the model
            # takes num_items_in_batch; then the penalty must be split over the micro-batches too, so that
            # each optimiser step sees it exactly once.
            scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            loss = loss + (penalty / self.current_gradient_accumulation_steps if scaled else penalty)
        return (loss, outputs) if return_outputs else loss


class JsonlMetrics(TrainerCallback):
    """Writes every Trainer log record (loss, learning rate, grad norm...) as a JSON line."""

    def __init__(self, path: Path, trainer_ref: list[IlaTrainer]):
        self.path = path
        self.trainer_ref = trainer_ref

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "time": time.time(), **logs}
            if self.trainer_ref and self.trainer_ref[0].last_penalty is not None:
                record["penalty"] = self.trainer_ref[0].last_penalty
            append_jsonl(self.path, record)


def training_arguments(plan: TrainingPlan) -> TrainingArguments:
    use_cpu = resolve_device(plan.device).type == "cpu"
    warn_if_emulated(plan.precision, "cpu" if use_cpu else "cuda")
    save_steps = plan.save_steps
    return TrainingArguments(
        output_dir=str(plan.output_dir),
        max_steps=plan.max_steps,
        per_device_train_batch_size=plan.batch_size,
        per_device_eval_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        learning_rate=plan.learning_rate,
        optim=plan.optimizer,
        lr_scheduler_type=plan.lr_scheduler,
        warmup_steps=int(math.ceil(plan.warmup_ratio * plan.max_steps)),
        weight_decay=plan.weight_decay,
        max_grad_norm=plan.max_grad_norm,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        logging_steps=plan.logging_steps,
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=save_steps if save_steps > 0 else 500,
        save_total_limit=2,
        seed=plan.seed,
        data_seed=plan.seed,
        use_cpu=use_cpu,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=plan.dataloader_workers,
        disable_tqdm=False,
        label_names=["labels"],
        # Every trainable parameter takes part in every forward pass (LoRA factors, scores), so DDP need
        # not search the graph for unused ones.
        ddp_find_unused_parameters=False,
        **_checkpointing_kwargs(plan.gradient_checkpointing),
    )


def _checkpointing_kwargs(enabled: bool) -> dict[str, Any]:
    if not enabled:
        return {}  # passing the (renamed in transformers 5) option at all triggers a deprecation warning
    # Reentrant checkpointing needs inputs that require grad, which forces gradients down to the embeddings;
    # the non-reentrant kind does not, so frozen early layers get no needless gradients.
    return {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}


class NoInputGradients(TrainerCallback):
    """Undo the input-gradient hook that transformers adds when the Trainer turns checkpointing on.

    ``activation_checkpointing_enable`` (transformers 5) calls ``enable_input_require_grads`` for every causal
    LM, which the reentrant kind needs; with the non-reentrant kind used here it only makes the embeddings'
    output require a gradient, so frozen early blocks are recomputed and back-propagated through for nothing.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        for module in model.modules() if model is not None else ():
            hooked = getattr(module, "_require_grads_hooks", None) or hasattr(module, "_require_grads_hook")
            if hooked and hasattr(module, "disable_input_require_grads"):
                module.disable_input_require_grads()


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest Trainer checkpoint that was written to the end.

    The Trainer writes ``checkpoint-N`` file by file and ``trainer_state.json`` last, so a process killed
    while saving leaves a folder without it, or with a cut-off one. Such folders are removed: resuming from
    them would fail.
    """
    found = []
    for path in folder.glob("checkpoint-*"):
        try:
            found.append((int(path.name.split("-", 1)[1]), path))
        except ValueError:
            continue
    for step, path in sorted(found, reverse=True):
        if _complete_trainer_state(path / "trainer_state.json", step):
            return str(path)
        log.warning("removing incomplete checkpoint %s (interrupted while saving)", path)
        shutil.rmtree(path, ignore_errors=True)
    return None


def _complete_trainer_state(path: Path, step: int) -> bool:
    """Whether ``path`` is a whole ``trainer_state.json`` of step ``step``: present is not enough, a process
    killed while writing it leaves a cut-off file that the Trainer's resume would fail on."""
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(state, dict) and state.get("global_step") == step


def _rewind_logs(plan: TrainingPlan, checkpoint: Path | None, extra: list[TrainerCallback]) -> None:
    """Bring the run's step logs and stateful callbacks back to the step training starts after: the
    checkpoint's, or 0 without one. The steps after it are trained, and logged, again; an attempt cut off
    before its first checkpoint leaves records that a fresh start would otherwise write a second time."""
    step = int(checkpoint.name.split("-", 1)[1]) if checkpoint is not None else 0
    truncate_jsonl(plan.metrics_path, step)
    for callback in [*plan.callbacks, *extra]:
        log_path = getattr(callback, "path", None)  # the step log of a callback that writes one
        if isinstance(log_path, Path):
            truncate_jsonl(log_path, step)
        restore = getattr(callback, "restore", None)
        if checkpoint is not None and restore is not None:
            restore(checkpoint, step)


def make_trainer(
    model: torch.nn.Module,
    plan: TrainingPlan,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: datasets.Dataset,
    batching: Batching | None = None,
) -> IlaTrainer:
    """The Trainer of a plan. Its batches are padding-free where the model supports it (``batching``, or
    decided by :func:`ila.batching.choose_batching` once the Trainer has put the model on its device: the
    check runs the model, and flash-attention runs on a GPU only); ``trainer.batching`` says which."""
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainingError("nothing to train: no parameter requires a gradient")
    ref: list[IlaTrainer] = []
    trainer = IlaTrainer(
        model=model,
        args=training_arguments(plan),
        train_dataset=train_dataset,
        data_collator=padded_collator(tokenizer),  # replaced below once the batching is decided
        processing_class=tokenizer,
        callbacks=[
            JsonlMetrics(plan.metrics_path, ref),
            *plan.callbacks,
            *([NoInputGradients()] if plan.gradient_checkpointing else []),
            StepTimer(),  # last: a step's time includes the other callbacks' work at its end
        ],
        penalty=plan.penalty,
        save_trainable_only=plan.save_trainable_only,
        response_logits_only=plan.response_logits_only,
        deterministic=plan.deterministic,
        optimizer_cls_and_kwargs=plan.optimizer_cls_and_kwargs,
    )
    ref.append(trainer)
    trainer.batching = batching or choose_batching(trainer.model, plan.padding_free)
    trainer.data_collator = trainer.batching.collator(tokenizer)
    return trainer


def train(
    model: torch.nn.Module,
    plan: TrainingPlan,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset | None = None,
) -> TrainingResult:
    """Train whatever in ``model`` requires a gradient, as the plan says; evaluate held-out loss at the
    end."""
    heldout_dataset = eval_dataset if eval_dataset is not None and len(eval_dataset) > 0 else None
    trainer = make_trainer(model, plan, tokenizer, train_dataset)
    batching = trainer.batching

    def evaluate() -> dict[str, Any]:
        # Every process computes the same number on the whole held-out split (no sampler to pad it), in the
        # training precision (bf16 autocast): as fast, same numerics.
        with trainer.accelerator.autocast():
            return heldout_loss(
                trainer.model, tokenizer, heldout_dataset, batch_size=plan.batch_size, batching=batching
            )

    curve = None
    if plan.eval_steps > 0 and heldout_dataset is not None:
        curve = HeldoutCurve(
            evaluate,
            plan.eval_steps,
            plan.metrics_path.with_name("heldout_curve.jsonl"),
            patience=plan.early_stopping_patience,
            min_delta=plan.early_stopping_min_delta,
        )
        trainer.add_callback(curve)
    checkpoint = None
    if plan.resume and plan.output_dir.is_dir():
        checkpoint = last_complete_checkpoint(plan.output_dir)
        if checkpoint:
            log.info("resuming from %s", checkpoint)
    _rewind_logs(plan, Path(checkpoint) if checkpoint else None, [curve] if curve else [])

    before = None
    device = trainer.args.device
    with batching.attending(model):
        if checkpoint is None and heldout_dataset is not None and plan.eval_before:
            before = evaluate()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        out = trainer.train(resume_from_checkpoint=checkpoint)
        seconds = time.perf_counter() - start
        steps = trainer.state.global_step
        timer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepTimer))
        heldout = evaluate() if heldout_dataset is not None else None
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return TrainingResult(
        steps=steps,
        train_loss=float(out.training_loss),
        seconds=seconds,
        seconds_per_step=seconds / max(1, len(timer.durations)),  # a resumed run timed only its own steps
        heldout=heldout,
        heldout_before=before,
        peak_memory_mb=peak,
        stopped_early=steps < plan.max_steps,
        resumed_from=checkpoint,
        batching=batching.to_dict(),
        best_step=None if curve is None else curve.restored_step,
        median_step_seconds=timer.median,
    )
