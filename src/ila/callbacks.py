"""Trainer callbacks of stage 1 and stage 2: milestone adapters, epsilon-stability, score trajectories."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .artifacts import append_jsonl, atomic_dir, finite_or_null, read_json, truncate_jsonl, write_json_atomic
from .gates import LayerGates
from .stability import (
    LoraFactors,
    bias_key,
    full_update_norm,
    relative_change,
    relative_change_full,
    update_norms,
    weight_snapshot,
)

log = logging.getLogger(__name__)

ADAPTER_META = "ila_adapter.json"
STABILITY_STATE = "ila_stability.json"
STABILITY_TENSORS = "ila_stability.safetensors"


def milestone_steps(fractions: list[float], planned_steps: int) -> dict[int, float]:
    """Step at which each milestone fraction of the planned schedule falls (at least step 1)."""
    return {max(1, round(f * planned_steps)): f for f in fractions}


def milestone_name(fraction: float) -> str:
    return f"{round(fraction * 100):03d}"


LAYER_WEIGHTS = "layers.safetensors"


def save_adapter(model: Any, folder: Path, meta: dict[str, Any]) -> Path:
    """A stage-1 (or stage-3) update plus ``ila_adapter.json``, written atomically (the metadata file last).

    For LoRA (``meta["method"]`` absent or ``lora``) a PEFT adapter folder; for full fine-tuning the trained
    weights W_T of the layers in ``meta["layers"]`` as ``layers.safetensors`` (W_0 is the base model).
    """
    with atomic_dir(folder) as tmp:
        if meta.get("method", "lora") == "full":
            from safetensors.torch import save_file

            from .layers import unwrap

            modules = dict(unwrap(model).named_modules())
            weights = {}
            for name in meta["layers"]:  # W_T and, where the layer has one, its trained bias
                weights[name] = modules[name].weight.detach().cpu().contiguous()
                if getattr(modules[name], "bias", None) is not None:
                    weights[bias_key(name)] = modules[name].bias.detach().cpu().contiguous()
            save_file(weights, str(tmp / LAYER_WEIGHTS), metadata={"format": "pt"})
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        write_json_atomic(tmp / ADAPTER_META, meta)
    return folder


def adapter_digest(folder: Path) -> str:
    """sha256 of an adapter folder's files (names and contents): which update a result was computed from,
    whatever the folder is called."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_full_updates(folder: Path, base_model: Any, layer_names: list[str]) -> dict[str, Any]:
    """Delta_i = W_T - W_0 for every layer, from a full fine-tuning milestone and the base model: the weight
    update under the layer's name and, for a layer with a bias, the bias update under
    :func:`ila.stability.bias_key` (stage 1 trains both; a bias file of an older milestone that lacks them
    is read as an unchanged bias)."""
    from safetensors.torch import load_file

    from .errors import ModelError
    from .layers import unwrap

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


class MilestoneSaver(TrainerCallback):
    """Saves the stage-1 adapter at fixed fractions of the planned steps (default 25/50/75/100 %)."""

    def __init__(self, folder: Path, fractions: list[float], planned_steps: int,
                 meta: Callable[[int, float], dict[str, Any]]):
        self.folder = folder
        self.steps = milestone_steps(fractions, planned_steps)
        self.meta = meta
        self.saved: dict[str, int] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        fraction = self.steps.get(state.global_step)
        if fraction is not None and state.is_world_process_zero:
            name = milestone_name(fraction)
            save_adapter(model, self.folder / name, self.meta(state.global_step, fraction))
            self.saved[name] = state.global_step
            log.info("saved milestone %s%% at step %d", name, state.global_step)


class StabilityTracker(TrainerCallback):
    """Records the epsilon-stability figure r_t every ``window`` steps and can stop training once stable."""

    def __init__(self, layer_names: list[str], window: int, epsilon: float, path: Path, stop_when_stable: bool,
                 base_weights: dict[str, Any] | None = None, criterion: str = "update", fraction: float = 0.3,
                 patience: int = 2):
        self.layer_names = layer_names
        self.criterion = criterion
        self.fraction = fraction
        self.patience = patience
        self.previous_top: set[str] | None = None
        self.calm_windows = 0
        # Full fine-tuning: Delta_t = W_t - W_0 needs W_0 (LoRA needs nothing: Delta_0 = 0 as B starts at 0).
        self.base_weights = base_weights
        self.window = window
        self.epsilon = epsilon
        self.path = path
        self.stop_when_stable = stop_when_stable
        self.previous: Any = None
        self.history: list[dict[str, Any]] = []
        self.stable_at: int | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if state.global_step % self.window == 0:
            self._record(state, control, model)
        # The Trainer writes the checkpoint of this step right after the step-end callbacks, and its
        # trainer_state.json last: state written now is inside every checkpoint that a resume trusts.
        if control.should_save and state.is_world_process_zero:
            self.save_state(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def _record(self, state, control, model) -> None:  # noqa: ANN001
        if self.base_weights is not None:
            current: Any = weight_snapshot(model, self.layer_names)
        else:
            current = LoraFactors.snapshot(model, self.layer_names)
        top = self._top_by_update_norm(current)
        if self.previous is not None:
            if self.base_weights is not None:
                r = relative_change_full(self.base_weights, self.previous, current)
            else:
                r, _ = relative_change(self.previous, current)
            overlap = len(top & self.previous_top) / len(top | self.previous_top) if self.previous_top else 0.0
            if self.criterion == "ranking":
                self.calm_windows = self.calm_windows + 1 if overlap >= 1 - self.epsilon else 0
                stable = self.calm_windows >= self.patience
            else:
                stable = r <= self.epsilon
            record = {"step": state.global_step, "window": self.window, "relative_change": r,
                      "top_overlap": overlap, "criterion": self.criterion,
                      "epsilon": self.epsilon, "stable": stable, "time": time.time()}
            self.history.append(record)
            if state.is_world_process_zero:
                append_jsonl(self.path, record)
            if stable and self.stable_at is None:
                self.stable_at = state.global_step
                log.info("epsilon-stable at step %d (%s criterion: r=%.4f, top-%.0f%% overlap %.3f)", state.global_step,
                         self.criterion, r, self.fraction * 100, overlap)
                # r is computed from replicated weights, so every process takes the same decision.
                if self.stop_when_stable:
                    control.should_training_stop = True
        self.previous = current
        self.previous_top = top

    def save_state(self, checkpoint: Path) -> None:
        """Write what the tracker carries between windows into ``checkpoint`` (tensors, then JSON)."""
        from safetensors.torch import save_file

        checkpoint.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Any] = {}
        scaling: dict[str, float] = {}
        if isinstance(self.previous, LoraFactors):
            for name, (scale, a, b) in self.previous.factors.items():
                tensors[f"{name}.A"], tensors[f"{name}.B"] = a.contiguous(), b.contiguous()
                scaling[name] = scale
        elif self.previous is not None:
            tensors = {name: w.contiguous() for name, w in self.previous.items()}
        if tensors:
            save_file(tensors, str(checkpoint / STABILITY_TENSORS))
        write_json_atomic(checkpoint / STABILITY_STATE, {
            "schema_version": 1, "kind": "ila.stability_state",
            "previous": None if self.previous is None else ("lora" if scaling else "full"),
            "scaling": scaling, "previous_top": sorted(self.previous_top or []),
            "calm_windows": self.calm_windows, "stable_at": self.stable_at,
            "history": [finite_or_null(r) for r in self.history],
        })

    def restore(self, checkpoint: Path, step: int) -> None:
        """Continue from the state saved in ``checkpoint`` (the step a resumed run starts after), so that the
        resumed run records the same figures, at the same steps, as an uninterrupted one."""
        from safetensors.torch import load_file

        path = checkpoint / STABILITY_STATE
        if not path.is_file():
            log.warning("%s holds no epsilon-stability state; stability is tracked afresh from step %d",
                        checkpoint, step)
            return
        saved = read_json(path, "epsilon-stability state")
        self.history = [r for r in saved["history"] if r["step"] <= step]
        self.stable_at, self.calm_windows = saved["stable_at"], saved["calm_windows"]
        self.previous_top = set(saved["previous_top"]) if saved["previous"] is not None else None
        if saved["previous"] == "lora":
            tensors = load_file(str(checkpoint / STABILITY_TENSORS))
            self.previous = LoraFactors({n: (scale, tensors[f"{n}.A"], tensors[f"{n}.B"])
                                         for n, scale in saved["scaling"].items()})
        elif saved["previous"] == "full":
            self.previous = load_file(str(checkpoint / STABILITY_TENSORS))
        truncate_jsonl(self.path, step)  # the records of the steps after the checkpoint come again

    def _top_by_update_norm(self, snapshot: Any) -> set[str]:
        """The top ``fraction`` of layers by ||Delta_i||_F (ties by name, for a deterministic set)."""
        if self.base_weights is not None:
            update = {k: snapshot[k] - self.base_weights[k] for k in snapshot}
            norms = {n: full_update_norm(update, n) for n in self.layer_names}
        else:
            norms = update_norms(snapshot)
        k = max(1, round(self.fraction * len(norms)))
        return set(sorted(norms, key=lambda n: (-norms[n], n))[:k])


class ScoreTrajectory(TrainerCallback):
    """Stage 2: writes the scores s (and the mean gate) every logging step."""

    def __init__(self, gates: LayerGates, path: Path, every: int):
        self.gates = gates
        self.path = path
        self.every = every

    def restore(self, checkpoint: Path, step: int) -> None:
        """A resumed stage 2 writes the steps after ``step`` again."""
        truncate_jsonl(self.path, step)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step % self.every == 0 and state.is_world_process_zero:
            g = self.gates.gates().detach()
            append_jsonl(self.path, {"step": state.global_step, "mean_gate": float(g.mean()),
                                     "min_gate": float(g.min()), "max_gate": float(g.max()),
                                     "scores": self.gates.as_dict()})


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

    def __init__(self, output_dir: str | Path, *, milestones: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
                 scorer: str = "ila", stage2: Any = None, dataset: Any = None, seed: int = 0):
        self.output_dir = Path(output_dir)
        self.fractions = list(milestones)
        self.scorer = scorer
        self.stage2 = stage2
        self.dataset = dataset
        self.seed = seed
        self.steps: dict[int, float] = {}
        self.ranking: Any = None

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.steps = milestone_steps(self.fractions, state.max_steps)

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        fraction = self.steps.get(state.global_step)
        if fraction is not None and state.is_world_process_zero:
            save_adapter(model, self.output_dir / "milestones" / milestone_name(fraction), {
                "schema_version": 1, "kind": "ila.stage1_adapter", "step": state.global_step,
                "planned_steps": state.max_steps, "fraction": fraction,
            })

    def on_train_end(self, args, state, control, model=None, processing_class=None, train_dataloader=None,  # noqa: ANN001
                     **kwargs):
        from .scoring import NEEDS_DATA, rank_layers

        dataset = self.dataset
        if dataset is None and self.scorer in NEEDS_DATA and train_dataloader is not None:
            dataset = labelled_rows(train_dataloader.dataset)
        ranking = rank_layers(model, scorer=self.scorer, tokenizer=processing_class, dataset=dataset,
                              stage2=self.stage2, seed=self.seed,
                              device="cpu" if args.use_cpu else "auto", output_dir=self.output_dir / "scoring")
        ranking.milestone = f"step {state.global_step}"
        self.ranking = ranking
        if state.is_world_process_zero:
            ranking.save(self.output_dir / "ranking.json")


def labelled_rows(dataset: Any) -> Any:
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
            labels = [t if (mask is None or m) else -100 for t, m in zip(ids, mask or [1] * len(ids))]
        return {"input_ids": ids, "attention_mask": list(row.get("attention_mask") or [1] * len(ids)),
                "labels": labels}

    keep = [c for c in dataset.column_names]
    return dataset.map(convert, remove_columns=keep)
