"""The stages of ILA as functions that read and write a run directory.

    run_dir/
      config.yaml                 resolved config (written first)
      stage1/milestones/025/ ...  PEFT adapters at 25/50/75/100 % of the planned steps (+ ila_adapter.json)
      stage1/final/               the adapter where stage 1 ended
      stage1/metrics.jsonl        Trainer logs;  stage1/stability.jsonl  epsilon-stability figure
      stage1/summary.json         written last: marks stage 1 complete
      stage2/ranking.json         the ranking (strict, versioned JSON)
      stage2/scores.jsonl         score trajectories;  stage2/summary.json
      stage3/adapter/             PEFT adapter on the selected layers only
      stage3/selection.json       the selected layers;  stage3/summary.json

Each stage reads only files written by earlier stages, so any stage can be re-run alone or fed a ranking or
an adapter from another run. A stage whose ``summary.json`` exists is complete and is not redone by ``run``.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .artifacts import read_json, write_json_atomic, write_text_atomic
from .callbacks import ADAPTER_META, MilestoneSaver, ScoreTrajectory, StabilityTracker, milestone_name, save_adapter
from .config import RunConfig, TrainConfig, load_config
from .errors import ConfigError, IlaError, ModelError
from .gates import LayerGates, attach_gates
from .layers import Layer, adaptable_layers, describe_layers, layer_names_digest
from .models import attach_lora, count_parameters, load_base_model, load_lora, load_tokenizer, model_identity
from .ranking import Ranking
from .training import TrainingPlan, train

log = logging.getLogger(__name__)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -------------------------------------------------------------------------------------------------------
# run directory


def prepare_run_dir(cfg: RunConfig, run_dir: str | Path) -> Path:
    """Create ``run_dir`` and write the resolved config into it (first, before any stage output)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} exists and is not a folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", f"# ila {__version__} resolved config, {_now()}\n" + cfg.to_yaml())
    return run_dir


def run_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The config a run directory was made with, plus ``overrides``."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no config.yaml: is it an ila run directory?")
    return load_config(path, overrides)


def stage_done(run_dir: Path, stage: str, cfg: RunConfig | None = None) -> bool:
    """Whether ``stage`` is complete in ``run_dir``; with ``cfg``, refuse a result made with another config."""
    path = run_dir / stage / "summary.json"
    if not path.is_file():
        return False
    if cfg is not None:
        recorded = read_json(path, f"{stage} summary").get("stage_sha256")
        if recorded is not None and recorded != cfg.stage_sha256(stage):
            raise ConfigError(
                f"{run_dir} holds a completed {stage} made with a different config (model, data, lora, seed or "
                f"{stage} settings changed) and `run` does not overwrite it: use another --run-dir, --redo to "
                f"run every stage again, or run one stage alone (ila train / ila score / ila finetune)"
            )
    return True


def _train_plan(cfg: RunConfig, train_cfg: TrainConfig, folder: Path, callbacks: list) -> TrainingPlan:
    return TrainingPlan(
        output_dir=folder / "checkpoints",
        metrics_path=folder / "metrics.jsonl",
        max_steps=train_cfg.max_steps,
        batch_size=train_cfg.batch_size,
        grad_accum=train_cfg.grad_accum,
        learning_rate=train_cfg.learning_rate,
        lr_scheduler=train_cfg.lr_scheduler,
        warmup_ratio=train_cfg.warmup_ratio,
        weight_decay=train_cfg.weight_decay,
        max_grad_norm=train_cfg.max_grad_norm,
        precision=train_cfg.precision,
        gradient_checkpointing=train_cfg.gradient_checkpointing,
        logging_steps=train_cfg.logging_steps,
        save_steps=train_cfg.save_steps or max(1, train_cfg.max_steps // 4),
        seed=cfg.seed,
        device=cfg.model.device,
        dataloader_workers=train_cfg.dataloader_workers,
        callbacks=callbacks,
    )


def _datasets(cfg: RunConfig, tokenizer: Any, folder: Path) -> tuple[Any, Any]:
    from .data import build_datasets

    train_ds, heldout_ds, stats = build_datasets(cfg.data, tokenizer)
    write_json_atomic(folder / "data.json", stats.to_dict())
    log.info("data: %d train / %d held-out examples (%s, %s template)", stats.train_examples,
             stats.heldout_examples, stats.format, stats.template)
    return train_ds, (heldout_ds if len(heldout_ds) > 0 else None)


def _layers(cfg: RunConfig, model: Any) -> list[Layer]:
    return adaptable_layers(model, include_lm_head=cfg.lora.include_lm_head, module_types=cfg.lora.module_types)


def _cleanup_checkpoints(folder: Path) -> None:
    """Trainer checkpoints exist for resuming an interrupted stage; a completed stage no longer needs them."""
    import shutil

    shutil.rmtree(folder / "checkpoints", ignore_errors=True)


# -------------------------------------------------------------------------------------------------------
# stage 1


def stage1(cfg: RunConfig, run_dir: str | Path) -> dict[str, Any]:
    """LoRA on every layer, milestones saved, epsilon-stability recorded."""
    run_dir = Path(run_dir)
    folder = run_dir / "stage1"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # LoRA A is initialised randomly when the adapter is attached
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model)
    identity = model_identity(model, cfg.model.name)
    layers = _layers(cfg, model)
    names = [layer.name for layer in layers]
    train_ds, heldout_ds = _datasets(cfg, tokenizer, folder)
    peft_model = attach_lora(model, names, cfg.lora)
    trainable, total = count_parameters(peft_model)
    log.info("stage 1: LoRA r=%d on %d layers (%s trainable of %s parameters)", cfg.lora.r, len(names),
             f"{trainable:,}", f"{total:,}")

    s1 = cfg.stage1
    planned = s1.train.max_steps

    def meta(step: int, fraction: float | None) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "kind": "ila.stage1_adapter",
            "ila_version": __version__,
            "step": step,
            "planned_steps": planned,
            "fraction": fraction,
            "base_model": identity,
            "include_lm_head": cfg.lora.include_lm_head,
            "module_types": cfg.lora.module_types,
            "layers": names,
            "layer_digest": layer_names_digest(names),
            "config_sha256": cfg.sha256(),
            "lora": asdict(cfg.lora),
            "data": cfg.data.name,
        }

    milestones = MilestoneSaver(folder / "milestones", s1.milestones, planned, meta)
    stability = StabilityTracker(names, s1.stability_window, s1.stability_epsilon, folder / "stability.jsonl",
                                 s1.stop_when_stable)
    plan = _train_plan(cfg, s1.train, folder, [milestones, stability])
    plan.eval_before = True  # LoRA B starts at zero, so this is the base model's held-out loss
    result = train(peft_model, plan, tokenizer, train_ds, heldout_ds if s1.train.eval_heldout else None)
    save_adapter(peft_model, folder / "final", meta(result.steps, result.steps / planned))
    summary = {
        "stage": 1,
        "finished": _now(),
        "steps": result.steps,
        "planned_steps": planned,
        "stopped_when_stable": result.stopped_early and stability.stable_at is not None,
        "stable_at_step": stability.stable_at,
        "stability": stability.history,
        "milestones": sorted(p.name for p in (folder / "milestones").iterdir() if not p.name.startswith(".")),
        "train_loss": result.train_loss,
        "heldout_loss": result.heldout_loss,
        "base_heldout_loss": result.heldout_loss_before,
        "seconds": result.seconds,
        "seconds_per_step": result.seconds_per_step,
        "peak_memory_mb": result.peak_memory_mb,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "layers": describe_layers(layers),
        "include_lm_head": cfg.lora.include_lm_head,
        "base_model": identity,
        "resumed_from": result.resumed_from,
        "config_sha256": cfg.sha256(),
        "stage_sha256": cfg.stage_sha256("stage1"),
    }
    write_json_atomic(folder / "summary.json", summary)
    _cleanup_checkpoints(folder)
    return summary


# -------------------------------------------------------------------------------------------------------
# stage 2


def resolve_stage1_adapter(run_dir: Path, milestone: str) -> Path:
    """The adapter folder that ``stage2.milestone`` names: ``last``, a percentage, or a path."""
    if milestone == "last":
        folder = run_dir / "stage1" / "final"
    else:
        try:
            folder = run_dir / "stage1" / "milestones" / milestone_name(float(milestone) / 100)
        except ValueError:
            folder = Path(milestone)
    if not (folder / ADAPTER_META).is_file() or not (folder / "adapter_config.json").is_file():
        available = []
        ms = run_dir / "stage1" / "milestones"
        if ms.is_dir():
            available = sorted(p.name for p in ms.iterdir() if not p.name.startswith("."))
        raise ModelError(
            f"no complete stage-1 adapter at {folder}; run stage 1 first (ila train) or pick another "
            f"stage2.milestone (available milestones: {', '.join(available) or 'none'})"
        )
    return folder


def stage2(cfg: RunConfig, run_dir: str | Path, adapter: str | Path | None = None) -> Ranking:
    """Freeze everything, learn one score per layer, write ``stage2/ranking.json``."""
    import peft

    run_dir = Path(run_dir)
    folder = run_dir / "stage2"
    folder.mkdir(parents=True, exist_ok=True)
    adapter_dir = Path(adapter) if adapter is not None else resolve_stage1_adapter(run_dir, cfg.stage2.milestone)
    meta = read_json(adapter_dir / ADAPTER_META, "stage-1 adapter metadata")
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model)
    identity = model_identity(model, cfg.model.name)
    layers = adaptable_layers(model, include_lm_head=meta["include_lm_head"], module_types=meta.get("module_types"))
    names = [layer.name for layer in layers]
    if set(names) != set(meta["layers"]):
        raise ModelError(
            f"the stage-1 adapter in {adapter_dir} was trained on {len(meta['layers'])} layers of "
            f"{meta['base_model'].get('name')}, which do not match the {len(names)} layers of {cfg.model.name}"
        )
    train_ds, heldout_ds = _datasets(cfg, tokenizer, folder)

    # Dropout off: the gates must see the update the adapter actually learned (ila-method.md, stage 2).
    adapter_cfg = peft.PeftConfig.from_pretrained(str(adapter_dir))
    adapter_cfg.lora_dropout = 0.0
    adapter_cfg.inference_mode = True
    peft_model = peft.PeftModel.from_pretrained(model, str(adapter_dir), config=adapter_cfg, is_trainable=False)
    for p in peft_model.parameters():
        p.requires_grad_(False)
    s2 = cfg.stage2
    gates = LayerGates(names, init_mean=s2.init_mean, init_std=s2.init_std, seed=cfg.seed)
    attach_gates(peft_model, gates)

    def penalty() -> torch.Tensor:
        return s2.budget_lambda * gates.budget_penalty(s2.budget_fraction)

    plan = TrainingPlan(
        output_dir=folder / "checkpoints",
        metrics_path=folder / "metrics.jsonl",
        max_steps=s2.steps,
        batch_size=s2.batch_size,
        grad_accum=s2.grad_accum,
        learning_rate=s2.learning_rate,
        # AdamW with zero weight decay is Adam.
        optimizer={"adam": "adamw_torch", "sgd": "sgd"}[s2.optimizer],
        lr_scheduler="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # clipping would distort the relative size of the score gradients
        precision=s2.precision,
        logging_steps=s2.logging_steps,
        save_steps=0,
        seed=cfg.seed,
        device=cfg.model.device,
        penalty=penalty if s2.budget_lambda > 0 else None,
        callbacks=[ScoreTrajectory(gates, folder / "scores.jsonl", s2.logging_steps)],
        resume=False,
    )
    result = train(peft_model, plan, tokenizer, train_ds, None)
    milestone_label = f"{meta['fraction'] * 100:.0f}%" if meta.get("fraction") is not None else adapter_dir.name
    ranking = Ranking(
        scores=gates.as_dict(),
        layers=layers,
        base_model=identity,
        include_lm_head=meta["include_lm_head"],
        scorer="ila",
        milestone=milestone_label,
        config_sha256=cfg.sha256(),
        meta={
            "stage1_adapter": str(adapter_dir),
            "stage1_step": meta.get("step"),
            "steps": result.steps,
            "optimizer": s2.optimizer,
            "learning_rate": s2.learning_rate,
            "budget_fraction": s2.budget_fraction,
            "budget_lambda": s2.budget_lambda,
            "init_mean": s2.init_mean,
            "init_std": s2.init_std,
            "seed": cfg.seed,
            "data": cfg.data.name,
            "train_loss": result.train_loss,
            "seconds_per_step": result.seconds_per_step,
        },
    )
    ranking.save(folder / "ranking.json")
    _cleanup_checkpoints(folder)
    gate_values = gates.gates().detach()
    write_json_atomic(folder / "summary.json", {
        "stage": 2, "finished": _now(), "steps": result.steps, "train_loss": result.train_loss,
        "seconds": result.seconds, "seconds_per_step": result.seconds_per_step,
        "peak_memory_mb": result.peak_memory_mb, "trainable_parameters": len(names),
        "mean_gate": float(gate_values.mean()), "top10": ranking.order[:10], "ranking": str(folder / "ranking.json"),
        "stage_sha256": cfg.stage_sha256("stage2"),
    })
    return ranking


# -------------------------------------------------------------------------------------------------------
# stage 3


def stage3(cfg: RunConfig, run_dir: str | Path) -> dict[str, Any]:
    """A fresh LoRA run from the base model on the selected layers only; writes ``stage3/adapter``."""
    run_dir = Path(run_dir)
    folder = run_dir / "stage3"
    folder.mkdir(parents=True, exist_ok=True)
    ranking_path = Path(cfg.stage3.ranking) if cfg.stage3.ranking else run_dir / "stage2" / "ranking.json"
    if not ranking_path.is_file():
        raise IlaError(f"no ranking at {ranking_path}; run stage 2 first (ila score) or set stage3.ranking")
    ranking = Ranking.load(ranking_path)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model)
    identity = model_identity(model, cfg.model.name)
    layers = adaptable_layers(model, include_lm_head=ranking.include_lm_head,
                              module_types=None if cfg.lora.module_types is None else cfg.lora.module_types)
    ranking.check_matches(layers, identity)
    sel = cfg.stage3.selection
    selected = ranking.select(sel.mode, sel.fraction, sel.layers)
    train_ds, heldout_ds = _datasets(cfg, tokenizer, folder)
    peft_model = attach_lora(model, selected, cfg.lora)
    trainable, total = count_parameters(peft_model)
    log.info("stage 3: LoRA on %d of %d layers (%s trainable parameters)", len(selected), len(layers), f"{trainable:,}")
    selection = {
        "schema_version": 1, "kind": "ila.selection", "mode": sel.mode, "fraction": sel.fraction,
        "ranking": str(ranking_path), "num_selected": len(selected), "num_layers": len(layers),
        "layers": selected, "base_model": identity,
    }
    write_json_atomic(folder / "selection.json", selection)
    plan = _train_plan(cfg, cfg.stage3.train, folder, [])
    result = train(peft_model, plan, tokenizer, train_ds, heldout_ds if cfg.stage3.train.eval_heldout else None)
    save_adapter(peft_model, folder / "adapter", {
        "schema_version": 1, "kind": "ila.stage3_adapter", "ila_version": __version__, "step": result.steps,
        "base_model": identity, "layers": selected, "selection": {k: selection[k] for k in ("mode", "fraction")},
        "config_sha256": cfg.sha256(),
    })
    summary = {
        "stage": 3, "finished": _now(), "steps": result.steps, "train_loss": result.train_loss,
        "heldout_loss": result.heldout_loss, "seconds": result.seconds,
        "seconds_per_step": result.seconds_per_step, "peak_memory_mb": result.peak_memory_mb,
        "trainable_parameters": trainable, "total_parameters": total, "num_selected": len(selected),
        "num_layers": len(layers), "adapter": str(folder / "adapter"), "resumed_from": result.resumed_from,
        "stage_sha256": cfg.stage_sha256("stage3"),
    }
    write_json_atomic(folder / "summary.json", summary)
    _cleanup_checkpoints(folder)
    return summary


# -------------------------------------------------------------------------------------------------------
# all stages


def run_all(cfg: RunConfig, run_dir: str | Path, *, redo: bool = False) -> dict[str, Any]:
    """Stages 1-3 in order. A stage that is complete in ``run_dir`` with the same config is reused, unless
    ``redo``; once a stage runs, every later stage runs again too."""
    run_dir = Path(run_dir)
    stages = ("stage1", "stage2", "stage3")
    # Check before writing anything, so a refused run leaves the directory as it was.
    done = {s: (not redo) and stage_done(run_dir, s, cfg) for s in stages}
    prepare_run_dir(cfg, run_dir)
    out: dict[str, Any] = {"run_dir": str(run_dir)}
    rerun = False
    for name, fn in (("stage1", stage1), ("stage2", stage2), ("stage3", stage3)):
        if rerun or not done[name]:
            fn(cfg, run_dir)
            rerun = True
        else:
            log.info("%s already complete in %s; skipping", name.replace("stage", "stage "), run_dir)
        out[name] = read_json(run_dir / name / "summary.json", f"{name} summary")
    return out
