"""Trainer callbacks of the stages: step times, milestone adapters, epsilon-stability, score trajectories,
the held-out curve and early stopping on it.

The Trainer calls them; nothing here orchestrates a stage (ILA inside someone else's Trainer is
:mod:`ila.integration`)."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .adapters import AdapterMeta, save_adapter
from .artifacts import append_jsonl, envelope, finite_or_null, read_json, write_json_atomic
from .gates import LayerGates
from .rundir import milestone_name
from .stability import (
    LoraFactors,
    full_update_norm,
    relative_change,
    relative_change_full,
    update_norms,
    weight_snapshot,
)

log = logging.getLogger(__name__)

STABILITY_STATE = "ila_stability.json"
STABILITY_TENSORS = "ila_stability.safetensors"


class StepTimer(TrainerCallback):
    """The wall time of every optimiser step this process runs, from the step's start to the end of its
    callbacks: the median is the step time, which neither the held-out evaluations every ``eval_steps``
    nor a burst of other work on the machine moves, while the total does (``seconds``)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self._start is not None:
            self.durations.append(time.perf_counter() - self._start)
            self._start = None

    @property
    def median(self) -> float | None:
        return float(statistics.median(self.durations)) if self.durations else None


def milestone_steps(fractions: list[float], planned_steps: int) -> dict[int, float]:
    """Step at which each milestone fraction of the planned schedule falls (at least step 1)."""
    return {max(1, round(f * planned_steps)): f for f in fractions}


class MilestoneSaver(TrainerCallback):
    """Saves the stage-1 adapter at fixed fractions of the planned steps (default 25/50/75/100 %)."""

    def __init__(
        self,
        folder: Path,
        fractions: list[float],
        planned_steps: int,
        meta: Callable[[int, float], AdapterMeta],
    ):
        self.folder = folder
        self.steps = milestone_steps(fractions, planned_steps)
        self.meta = meta

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        fraction = self.steps.get(state.global_step)
        if fraction is not None and state.is_world_process_zero:
            name = milestone_name(fraction)
            save_adapter(model, self.folder / name, self.meta(state.global_step, fraction))
            log.info("saved milestone %s%% at step %d", name, state.global_step)


class StabilityTracker(TrainerCallback):
    """Records the epsilon-stability figure r_t every ``window`` steps and can stop training once stable."""

    def __init__(
        self,
        layer_names: list[str],
        window: int,
        epsilon: float,
        path: Path,
        stop_when_stable: bool,
        base_weights: dict[str, Any] | None = None,
        criterion: str = "update",
        fraction: float = 0.3,
        patience: int = 2,
    ):
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
        self.previous: LoraFactors | dict[str, torch.Tensor] | None = None
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
            current: LoraFactors | dict[str, torch.Tensor] = weight_snapshot(model, self.layer_names)
        else:
            current = LoraFactors.snapshot(model, self.layer_names)
        top = self._top_by_update_norm(current)
        if self.previous is not None:
            if self.base_weights is not None:
                r = relative_change_full(self.base_weights, self.previous, current)
            else:
                r, _ = relative_change(self.previous, current)
            overlap = (
                len(top & self.previous_top) / len(top | self.previous_top) if self.previous_top else 0.0
            )
            if self.criterion == "ranking":
                self.calm_windows = self.calm_windows + 1 if overlap >= 1 - self.epsilon else 0
                stable = self.calm_windows >= self.patience
            else:
                stable = r <= self.epsilon
            record = {
                "step": state.global_step,
                "window": self.window,
                "relative_change": r,
                "top_overlap": overlap,
                "criterion": self.criterion,
                "epsilon": self.epsilon,
                "stable": stable,
                "time": time.time(),
            }
            self.history.append(record)
            if state.is_world_process_zero:
                append_jsonl(self.path, record)
            if stable and self.stable_at is None:
                self.stable_at = state.global_step
                log.info(
                    "epsilon-stable at step %d (%s criterion: r=%.4f, top-%.0f%% overlap %.3f)",
                    state.global_step,
                    self.criterion,
                    r,
                    self.fraction * 100,
                    overlap,
                )
                # r is computed from replicated weights, so every process takes the same decision.
                if self.stop_when_stable:
                    control.should_training_stop = True
        self.previous = current
        self.previous_top = top

    def save_state(self, checkpoint: Path) -> None:
        """Write what the tracker carries between windows into ``checkpoint`` (tensors, then JSON)."""
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
        write_json_atomic(
            checkpoint / STABILITY_STATE,
            {
                **envelope("ila.stability_state"),
                "previous": None if self.previous is None else ("lora" if scaling else "full"),
                "scaling": scaling,
                "previous_top": sorted(self.previous_top or []),
                "calm_windows": self.calm_windows,
                "stable_at": self.stable_at,
                "history": [finite_or_null(r) for r in self.history],
            },
        )

    def restore(self, checkpoint: Path, step: int) -> None:
        """Continue from the state saved in ``checkpoint`` (the step a resumed run starts after), so that the
        resumed run records the same figures, at the same steps, as an uninterrupted one."""
        path = checkpoint / STABILITY_STATE
        if not path.is_file():
            log.warning(
                "%s holds no epsilon-stability state; stability is tracked afresh from step %d",
                checkpoint,
                step,
            )
            return
        saved = read_json(path, "epsilon-stability state")
        self.history = [r for r in saved["history"] if r["step"] <= step]
        self.stable_at, self.calm_windows = saved["stable_at"], saved["calm_windows"]
        self.previous_top = set(saved["previous_top"]) if saved["previous"] is not None else None
        if saved["previous"] == "lora":
            tensors = load_file(str(checkpoint / STABILITY_TENSORS))
            self.previous = LoraFactors(
                {n: (scale, tensors[f"{n}.A"], tensors[f"{n}.B"]) for n, scale in saved["scaling"].items()}
            )
        elif saved["previous"] == "full":
            self.previous = load_file(str(checkpoint / STABILITY_TENSORS))

    def _top_by_update_norm(self, snapshot: LoraFactors | dict[str, torch.Tensor]) -> set[str]:
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

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step % self.every == 0 and state.is_world_process_zero:
            g = self.gates.gates().detach()
            append_jsonl(
                self.path,
                {
                    "step": state.global_step,
                    "mean_gate": float(g.mean()),
                    "min_gate": float(g.min()),
                    "max_gate": float(g.max()),
                    "scores": self.gates.as_dict(),
                },
            )


BEST_STATE = "ila_best.json"
BEST_WEIGHTS = "ila_best.safetensors"


class HeldoutCurve(TrainerCallback):
    """The held-out loss every ``every`` steps, written to ``path`` (the curve that shows where training
    stops improving), and optional early stopping on it.

    With ``patience`` > 0, training stops once ``patience`` evaluations in a row have not improved the best
    loss by more than ``min_delta``, and the trainable weights of the lowest loss are put back when
    training ends, so that the stage saves the model at its held-out optimum. The loss is then chosen on the
    split it is reported on, which flatters it; to compare selections, read a fixed schedule off the curve
    instead and train every selection on it."""

    def __init__(
        self,
        evaluate: Callable[[], dict[str, Any]],
        every: int,
        path: Path,
        *,
        patience: int = 0,
        min_delta: float = 0.0,
    ):
        self.evaluate = evaluate
        self.every = every
        self.path = path
        self.patience = patience
        self.min_delta = min_delta
        self.history: list[dict[str, Any]] = []
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.misses = 0
        self.restored_step: int | None = None
        """The step whose weights were put back at the end (None: the last step's were kept)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if state.global_step % self.every == 0:
            self._record(state, control, model)
        if control.should_save and state.is_world_process_zero:  # inside the checkpoint, as stability's
            self.save_state(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def _record(self, state, control, model) -> None:  # noqa: ANN001
        result = self.evaluate()
        loss = result["loss"]
        # as transformers' EarlyStoppingCallback: the best weights are the lowest loss's, but only an
        # improvement by more than min_delta resets the patience
        improved = self.best is None or loss < self.best - self.min_delta
        self.misses = 0 if improved else self.misses + 1
        if self.best is None or loss < self.best:
            self.best, self.best_step = loss, state.global_step
            if self.patience:
                self.best_weights = {
                    n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad
                }
        record = {
            "step": state.global_step,
            "loss": loss,
            "ci95": result["ci95"],
            "tokens": result["tokens"],
            "best_step": self.best_step,
            "improved": improved,
            "time": time.time(),
        }
        self.history.append(record)
        if state.is_world_process_zero:
            append_jsonl(self.path, record)
        # the loss is computed on the whole split by every process: they all take the same decision
        if self.patience and self.misses >= self.patience:
            log.info(
                "held-out loss has not improved for %d evaluations (best %.4f at step %d); stopping",
                self.misses,
                self.best,
                self.best_step,
            )
            control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if not self.patience or self.best_weights is None or self.best_step == state.global_step:
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, weight in self.best_weights.items():
                params[name].copy_(weight.to(params[name].device))
        self.restored_step = self.best_step
        log.info("put back the weights of step %d, the best held-out loss (%.4f)", self.best_step, self.best)

    def save_state(self, checkpoint: Path) -> None:
        checkpoint.mkdir(parents=True, exist_ok=True)
        if self.best_weights:
            weights = {n: w.contiguous() for n, w in self.best_weights.items()}
            save_file(weights, str(checkpoint / BEST_WEIGHTS))
        write_json_atomic(
            checkpoint / BEST_STATE,
            {
                **envelope("ila.heldout_curve_state"),
                "best": self.best,
                "best_step": self.best_step,
                "misses": self.misses,
                "history": [finite_or_null(r) for r in self.history],
            },
        )

    def restore(self, checkpoint: Path, step: int) -> None:
        """Continue from ``checkpoint``: the curve so far, the best loss and its weights."""
        path = checkpoint / BEST_STATE
        if not path.is_file():
            log.warning("%s holds no held-out curve state; the curve restarts at step %d", checkpoint, step)
            return
        saved = read_json(path, "held-out curve state")
        self.history = [r for r in saved["history"] if r["step"] <= step]
        self.best, self.best_step, self.misses = saved["best"], saved["best_step"], saved["misses"]
        if (checkpoint / BEST_WEIGHTS).is_file():
            self.best_weights = load_file(str(checkpoint / BEST_WEIGHTS))
