"""ila inside someone else's code: score an in-memory model (:func:`rank_layers`), or let a Trainer of one's
own save milestones and rank the layers when it ends (:class:`IlaCallback`, for transformers' Trainer and
trl's SFTTrainer). Both go through the same scorers as stage 2 (:func:`ila.scoring.score`)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from transformers import TrainerCallback

from .adapters import AdapterMeta, save_adapter
from .callbacks import milestone_steps
from .config import Stage2Config
from .data import IGNORE_INDEX
from .errors import IlaError
from .layers import PEFT_PREFIX, Layer, adaptable_layers, unwrap
from .models import model_identity
from .ranking import Ranking
from .rundir import milestone_name
from .scorers import NEEDS_DATA
from .scorers import scorer as scorer_of
from .scoring import score

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from .ranking import Ranking


def lora_layers(model: nn.Module) -> list[Layer]:
    """The layers of ``model`` that carry a LoRA adapter (all layers for a plain model)."""
    layers = adaptable_layers(model, include_lm_head=True)
    modules = dict(model.named_modules())
    adapted = [layer for layer in layers if hasattr(modules.get(PEFT_PREFIX + layer.name), "lora_A")]
    if adapted:
        return adapted
    return [layer for layer in layers if layer.block is not None]


def check_sft_model(model: nn.Module) -> None:
    """Refuse, saying what to do instead, a model that trl's ``SFTTrainer`` would refuse with a traceback.

    trl (1.x) computes the log-probabilities from ``lm_head.weight`` directly (its fused LM head), so a LoRA
    adapter on ``lm_head`` would never train and trl rejects the model. That happens with
    ``lora.include_lm_head`` in stage 1, and with ``apply_selection`` of a ranking that includes ``lm_head``
    when the head is selected. Call this before building an ``SFTTrainer`` on such a model.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "lora_A"):
        raise IlaError(
            "lm_head carries a LoRA adapter, which trl's SFTTrainer refuses: it computes the loss from "
            "lm_head.weight directly, so the adapter would never train. Leave lm_head out "
            "(lora.include_lm_head: false, or drop it from the selection), or train with transformers' "
            "Trainer, which IlaCallback supports as well"
        )


def rank_layers(
    model: nn.Module,
    *,
    scorer: str = "ila",
    tokenizer: PreTrainedTokenizerBase | None = None,
    dataset: datasets.Dataset | None = None,
    stage2: Any = None,
    seed: int = 0,
    device: str = "auto",
    output_dir: str | Path | None = None,
    model_name: str | None = None,
) -> Ranking:
    """Score the layers of an in-memory model and return the :class:`~ila.ranking.Ranking`.

    ``model`` is a peft LoRA model (stage 1 already trained) for ``ila``, ``taylor`` and ``update-norm``,
    or any model for the others. ``dataset`` holds ``input_ids`` / ``attention_mask`` / ``labels`` rows
    (as :func:`ila.data.build_datasets` makes) for the scorers that need data. The model is left as it
    was: its trainable flags and LoRA dropout are restored.
    """
    entry = scorer_of(scorer)
    s2 = stage2 or Stage2Config()
    layers = lora_layers(model)
    if entry.needs_adapter and not hasattr(
        dict(model.named_modules()).get(PEFT_PREFIX + layers[0].name), "lora_A"
    ):
        raise IlaError(f"the {scorer} scorer needs a model with a trained LoRA adapter on its layers")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(output_dir) if output_dir is not None else Path(tmp)
        scores, meta = score(
            scorer,
            model,
            layers,
            s2=s2,
            seed=seed,
            tokenizer=tokenizer,
            dataset=dataset,
            device=device,
            folder=folder,
        )
    include_head = any(layer.block is None for layer in layers)
    return Ranking(
        scores=scores,
        layers=layers,
        base_model=_identity(model, model_name),
        include_lm_head=include_head,
        scorer=scorer,
        meta=meta,
    )


class IlaCallback(TrainerCallback):
    """ILA inside your own LoRA training run (transformers Trainer or trl's SFTTrainer).

    Saves the adapter at ``milestones`` (fractions of the planned steps) into ``output_dir/milestones/NNN``
    and, when training ends, scores the layers with ``scorer`` and writes ``output_dir/ranking.json``::

        trainer = SFTTrainer(model=peft_model, ..., callbacks=[IlaCallback("runs/mine")])
        trainer.train()
        ranking = Ranking.load("runs/mine/ranking.json")

    The ``ila`` scorer trains the gates for ``stage2.steps`` steps on ``dataset`` (default: the trainer's own
    training data; its ``labels``, or ``completion_mask`` / ``assistant_masks``, decide which tokens count).
    Only the main process writes files.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        milestones: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
        scorer: str = "ila",
        stage2: Any = None,
        dataset: datasets.Dataset | None = None,
        seed: int = 0,
    ):
        self.output_dir = Path(output_dir)
        self.fractions = list(milestones)
        self.scorer = scorer
        self.stage2 = stage2
        self.dataset = dataset
        self.seed = seed
        self.steps: dict[int, float] = {}
        self.ranking: Ranking | None = None

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.steps = milestone_steps(self.fractions, state.max_steps)

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        fraction = self.steps.get(state.global_step)
        if fraction is not None and state.is_world_process_zero:
            layers = lora_layers(model)
            save_adapter(
                model,
                self.output_dir / "milestones" / milestone_name(fraction),
                AdapterMeta(
                    kind="ila.stage1_adapter",
                    layers=[layer.name for layer in layers],
                    include_lm_head=any(layer.block is None for layer in layers),
                    step=state.global_step,
                    planned_steps=state.max_steps,
                    fraction=fraction,
                    base_model=_identity(model),
                ),
            )

    def on_train_end(
        self,
        args,
        state,
        control,
        model=None,
        processing_class=None,
        train_dataloader=None,  # noqa: ANN001
        **kwargs,
    ):
        dataset = self.dataset
        if dataset is None and self.scorer in NEEDS_DATA and train_dataloader is not None:
            dataset = labelled_rows(train_dataloader.dataset)
        ranking = rank_layers(
            model,
            scorer=self.scorer,
            tokenizer=processing_class,
            dataset=dataset,
            stage2=self.stage2,
            seed=self.seed,
            device="cpu" if args.use_cpu else "auto",
            output_dir=self.output_dir / "scoring",
        )
        ranking.milestone = f"step {state.global_step}"
        self.ranking = ranking
        if state.is_world_process_zero:
            ranking.save(self.output_dir / "ranking.json")


def labelled_rows(dataset: datasets.Dataset) -> datasets.Dataset:
    """A trainer's tokenized dataset as ``input_ids`` / ``attention_mask`` / ``labels`` rows.

    trl marks the trained tokens with ``completion_mask`` or ``assistant_masks``; without either, every
    token counts, as in trl's default.
    """

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        ids = list(row["input_ids"])
        if "labels" in row and row["labels"] is not None:
            labels = list(row["labels"])
        else:
            mask = row.get("completion_mask") or row.get("assistant_masks")
            labels = [
                t if (mask is None or m) else IGNORE_INDEX
                for t, m in zip(ids, mask or [1] * len(ids), strict=True)
            ]
        return {
            "input_ids": ids,
            "attention_mask": list(row.get("attention_mask") or [1] * len(ids)),
            "labels": labels,
        }

    keep = [c for c in dataset.column_names]
    return dataset.map(convert, remove_columns=keep)


def _identity(model: nn.Module, name: str | None = None) -> dict[str, object]:
    inner = unwrap(model)
    return model_identity(
        inner, name or getattr(getattr(inner, "config", None), "name_or_path", None) or "model"
    )
