"""The stages of ILA as functions that read and write a run directory (its layout: :mod:`ila.rundir`).

Each stage reads only files written by earlier stages, so any stage can be re-run alone or fed a ranking or
an adapter from another run. A stage whose ``summary.json`` exists is complete and is not redone by ``run``.
Every stage reads as: load the model and data, attach what trains, train, save.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .artifacts import atomic_dir, read_json, sync_processes, write_json_atomic, write_text_atomic
from .adapters import (
    ADAPTER_META,
    AdapterMeta,
    adapter_digest,
    frozen_adapter_model,
    is_adapter_folder,
    load_full_updates,
    save_adapter,
)
from .callbacks import MilestoneSaver, StabilityTracker
from .rundir import STAGES, RunDir
from .config import RunConfig, TrainConfig, load_config
from .errors import ConfigError, IlaError, ModelError
from .layers import Layer, adaptable_layers, describe_layers, layer_names_digest
from .models import attach_lora, count_parameters, load_base_model, load_tokenizer, model_identity, resolve_device
from .ranking import Ranking
from .scorers import NEEDS_ADAPTER, NEEDS_DATA
from .scoring import score
from .training import plan_for, train

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
    write_text_atomic(RunDir(run_dir).config, f"# ila {__version__} resolved config, {_now()}\n" + cfg.to_yaml())
    return run_dir


def run_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The config a run directory was made with, plus ``overrides``."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no config.yaml: is it an ila run directory?")
    return load_config(path, overrides)


def stage_done(run_dir: Path, stage: str, cfg: RunConfig | None = None) -> bool:
    """Whether ``stage`` is complete in ``run_dir``; with ``cfg``, refuse a result made with another config."""
    path = RunDir(run_dir).summary(stage)
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


def _datasets(cfg: RunConfig, tokenizer: Any, folder: Path) -> tuple[Any, Any]:
    from .data import build_datasets

    train_ds, heldout_ds, stats = build_datasets(cfg.data, tokenizer)
    write_json_atomic(folder / "data.json", stats.to_dict())
    log.info("data: %d train / %d held-out examples (%s, %s template)", stats.train_examples,
             stats.heldout_examples, stats.format, stats.template)
    return train_ds, (heldout_ds if len(heldout_ds) > 0 else None)


def check_model_fits(cfg: RunConfig, model: Any) -> None:
    """Refuse sequence lengths the model cannot take (position embeddings would run out)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.data.max_length > limit:
        raise ConfigError(
            f"data.max_length: {cfg.data.max_length} tokens is more than {cfg.model.name} takes "
            f"(max_position_embeddings = {limit}); set data.max_length <= {limit}"
        )


def check_adapter_model(meta: AdapterMeta, identity: dict[str, Any], adapter_dir: Path) -> None:
    """Refuse a stage-1 adapter that was trained on another base model."""
    theirs = meta.base_model or {}
    for key in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size"):
        a, b = theirs.get(key), identity.get(key)
        if a is not None and b is not None and a != b:
            raise ModelError(
                f"the adapter in {adapter_dir} was trained on {theirs.get('name')} ({key} {a}), not on "
                f"{identity.get('name')} ({key} {b}); score it with the model it was trained on"
            )


def _adapter_layers(model: Any, meta: AdapterMeta, adapter_dir: Path) -> list[Layer]:
    """The layers of ``model`` that the adapter's update is on, in model order."""
    known = adaptable_layers(model, include_lm_head=True)
    names = set(meta.layers)
    layers = [layer for layer in known if layer.name in names]
    if len(layers) != len(names):
        missing = sorted(names - {layer.name for layer in layers})
        raise ModelError(
            f"the stage-1 adapter in {adapter_dir} was trained on {len(names)} layers of "
            f"{meta.base_model.get('name')}, {len(missing)} of which {identity_name(model)} does not have "
            f"(e.g. {missing[0]})"
        )
    return layers


def identity_name(model: Any) -> str:
    return str(getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__)


def _start_stage(cfg: RunConfig, folder: Path, stage: str, inputs: dict[str, Any] | None = None) -> None:
    """Record which config (and which ``inputs`` from outside the config, such as the adapter that stage 2
    scores) a stage runs with; refuse to resume an interrupted stage under others (its checkpoints would mix
    two runs, and the result would carry the wrong label)."""
    import hashlib
    import json

    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "started.json"
    sha = cfg.stage_sha256(stage)
    if inputs:
        blob = json.dumps({"config": sha, **inputs}, sort_keys=True)
        sha = hashlib.sha256(blob.encode()).hexdigest()
    if (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir()) and marker.is_file():
        if read_json(marker, f"{stage} start marker").get("stage_sha256") != sha:
            what = "config" + (" or " + " / ".join(sorted(inputs)) if inputs else "")
            raise ConfigError(
                f"{folder} holds checkpoints of an interrupted {stage} made with a different {what}; run the "
                f"same command again to resume it, or delete {folder / 'checkpoints'} to start {stage} afresh"
            )
    write_json_atomic(marker, {"stage": stage, "started": _now(), "stage_sha256": sha, "inputs": inputs or {}})


def _layers(cfg: RunConfig, model: Any) -> list[Layer]:
    return adaptable_layers(model, include_lm_head=cfg.lora.include_lm_head, module_types=cfg.lora.module_types)


def _finish_stage(folder: Path) -> None:
    """Drop the Trainer checkpoints (they exist for resuming an interrupted stage) and let every process
    catch up with the files the main process wrote."""
    import shutil

    from .artifacts import is_main_process

    if is_main_process():
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    sync_processes()


# -------------------------------------------------------------------------------------------------------
# stage 1


def stage1(cfg: RunConfig, run_dir: str | Path) -> dict[str, Any]:
    """LoRA on every layer, milestones saved, epsilon-stability recorded."""
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    folder = rd.stage("stage1")
    _start_stage(cfg, folder, "stage1")
    torch.manual_seed(cfg.seed)  # LoRA A is initialised randomly when the adapter is attached
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model)
    check_model_fits(cfg, model)
    identity = model_identity(model, cfg.model.name)
    layers = _layers(cfg, model)
    names = [layer.name for layer in layers]
    train_ds, heldout_ds = _datasets(cfg, tokenizer, folder)
    s1 = cfg.stage1
    base_weights = None
    if s1.method == "full":
        from .selection import apply_selection
        from .stability import weight_snapshot

        if cfg.lora.include_lm_head and getattr(model.config, "tie_word_embeddings", False):
            raise ConfigError(
                "lora.include_lm_head with stage1.method full: this model ties lm_head to the input embeddings, "
                "so a full update of lm_head would change the inputs too and could not be gated; use LoRA or "
                "leave lm_head out"
            )
        base_weights = weight_snapshot(model, names)  # W_0, for epsilon-stability of W_t - W_0
        peft_model = apply_selection(model, names, method="full")
    else:
        peft_model = attach_lora(model, names, cfg.lora)
    trainable, total = count_parameters(peft_model)
    log.info("stage 1: %s on %d layers (%s trainable of %s parameters)",
             f"LoRA r={cfg.lora.r}" if s1.method == "lora" else "full fine-tuning", len(names),
             f"{trainable:,}", f"{total:,}")

    planned = s1.train.max_steps

    def meta(step: int, fraction: float | None) -> AdapterMeta:
        return AdapterMeta(
            kind="ila.stage1_adapter", layers=names, method=s1.method, include_lm_head=cfg.lora.include_lm_head,
            step=step, planned_steps=planned, fraction=fraction, base_model=identity,
            module_types=cfg.lora.module_types, lora=asdict(cfg.lora), data=cfg.data.name,
            config_sha256=cfg.sha256(), layer_digest=layer_names_digest(names),
        )

    milestones = MilestoneSaver(rd.milestones, s1.milestones, planned, meta)
    stability = StabilityTracker(names, s1.stability_window, s1.stability_epsilon, folder / "stability.jsonl",
                                 s1.stop_when_stable, base_weights=base_weights, criterion=s1.stability_criterion,
                                 fraction=s1.stability_fraction, patience=s1.stability_patience)
    # eval_before: before the first step the model is theta_0 (LoRA B starts at zero)
    plan = plan_for(s1.train, folder, seed=cfg.seed, device=cfg.model.device, callbacks=[milestones, stability],
                    eval_before=True)
    result = train(peft_model, plan, tokenizer, train_ds, heldout_ds if s1.train.eval_heldout else None)
    save_adapter(peft_model, rd.stage1_final, meta(result.steps, result.steps / planned))
    summary = {
        "stage": 1,
        "finished": _now(),
        "steps": result.steps,
        "planned_steps": planned,
        "stopped_when_stable": result.stopped_early and stability.stable_at is not None,
        "stable_at_step": stability.stable_at,
        # What stopping when stable saved against the planned schedule (0 when it ran to the end).
        "steps_saved": planned - result.steps,
        "stability": stability.history,
        "milestones": sorted(p.name for p in rd.milestones.glob("[0-9]*")),
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
        "method": s1.method,
        "base_model": identity,
        "resumed_from": result.resumed_from,
        "config_sha256": cfg.sha256(),
        "stage_sha256": cfg.stage_sha256("stage1"),
    }
    write_json_atomic(rd.summary("stage1"), summary)
    _finish_stage(folder)
    return summary


# -------------------------------------------------------------------------------------------------------
# stage 2


def resolve_stage1_adapter(run_dir: Path, milestone: str | Path) -> Path:
    """The adapter folder that ``stage2.milestone`` names: ``last``, a percentage, or a path (a ``Path`` is
    always a folder); refused unless it holds a whole stage-1 adapter."""
    if isinstance(milestone, Path):
        folder = milestone
    elif milestone == "last":
        folder = RunDir(run_dir).stage1_final
    else:
        try:
            folder = RunDir(run_dir).milestone(float(milestone) / 100)
        except ValueError:
            folder = Path(milestone)
    if not is_adapter_folder(folder):
        available = []
        ms = RunDir(run_dir).milestones
        if ms.is_dir():
            available = sorted(p.name for p in ms.iterdir() if not p.name.startswith("."))
        raise ModelError(
            f"no complete stage-1 adapter at {folder}; run stage 1 first (ila train) or pick another "
            f"stage2.milestone (available milestones: {', '.join(available) or 'none'})"
        )
    return folder


def ranking_path(run_dir: Path, scorer: str) -> Path:
    """Where stage 2 writes the ranking of ``scorer``: ``ranking.json`` for ILA, ``ranking-<scorer>.json`` else."""
    return RunDir(run_dir).ranking(scorer)


def stage2(cfg: RunConfig, run_dir: str | Path, adapter: str | Path | None = None,
           scorer: str | None = None) -> Ranking:
    """Score every layer and write the ranking. With the default scorer ``ila`` this is stage 2 of the
    method: freeze everything and learn one gate per layer."""
    scorer = scorer or cfg.stage2.scorer
    s2 = cfg.stage2
    run_dir = Path(run_dir)
    folder = RunDir(run_dir).stage("stage2")
    adapter_dir = None
    if scorer in NEEDS_ADAPTER:
        adapter_dir = resolve_stage1_adapter(run_dir, s2.milestone if adapter is None else Path(adapter))
    # The adapter is named on the command line, not in the config: its contents guard the resume too.
    _start_stage(cfg, folder, "stage2", {
        "scorer": scorer, "adapter_sha256": None if adapter_dir is None else adapter_digest(adapter_dir),
    })
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model)
    check_model_fits(cfg, model)
    identity = model_identity(model, cfg.model.name)
    meta = AdapterMeta.read(adapter_dir) if adapter_dir is not None else None
    if meta is not None:
        check_adapter_model(meta, identity, adapter_dir)
        layers = _adapter_layers(model, meta, adapter_dir)
        include_lm_head = meta.include_lm_head
    else:
        layers = _layers(cfg, model)
        include_lm_head = cfg.lora.include_lm_head
    names = [layer.name for layer in layers]
    train_ds = _datasets(cfg, tokenizer, folder)[0] if scorer in NEEDS_DATA else None
    deltas = None
    if meta is not None and meta.method == "full":
        deltas = load_full_updates(adapter_dir, model, names)  # Delta_i = W_T - W_0
        scored = model
    else:
        scored = frozen_adapter_model(model, adapter_dir) if adapter_dir is not None else model
    if scorer != "ila":
        scored.to(resolve_device(cfg.model.device))  # the Trainer places the model for ila
    start = time.perf_counter()
    scores, facts = score(scorer, scored, layers, s2=s2, seed=cfg.seed, folder=folder, tokenizer=tokenizer,
                          dataset=train_ds, device=cfg.model.device, resume=True, deltas=deltas)
    seconds = time.perf_counter() - start
    milestone_label = None
    if meta is not None:
        milestone_label = meta.label or adapter_dir.name
    ranking = Ranking(
        scores=scores,
        layers=layers,
        base_model=identity,
        include_lm_head=include_lm_head,
        scorer=scorer,
        milestone=milestone_label,
        config_sha256=cfg.sha256(),
        meta={
            "stage1_adapter": str(adapter_dir) if adapter_dir else None,
            "method": meta.method if meta is not None else None,
            "stage1_step": meta.step if meta is not None else None,
            "data": cfg.data.name if train_ds is not None else None,
            "seconds": seconds,
            **facts,
        },
    )
    path = ranking_path(run_dir, scorer)
    ranking.save(path)
    summary = {
        "stage": 2, "scorer": scorer, "finished": _now(), "seconds": seconds,
        "steps": facts.get("steps"), "train_loss": facts.get("train_loss"),
        "seconds_per_step": facts.get("seconds_per_step"), "peak_memory_mb": facts.get("peak_memory_mb"),
        "trainable_parameters": len(names) if scorer == "ila" else 0,
        "mean_gate": facts.get("mean_gate"), "top10": ranking.order[:10], "ranking": str(path),
        "stage_sha256": cfg.stage_sha256("stage2"),
    }
    # The configured scorer's summary marks stage 2 complete; other scorers' runs sit beside it.
    write_json_atomic(folder / ("summary.json" if scorer == cfg.stage2.scorer else f"summary-{scorer}.json"),
                      summary)
    _finish_stage(folder)
    return ranking


# -------------------------------------------------------------------------------------------------------
# stage 3


def stage3(cfg: RunConfig, run_dir: str | Path) -> dict[str, Any]:
    """A fresh LoRA run from the base model on the selected layers only; writes ``stage3/adapter``."""
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    folder = rd.stage("stage3")
    _start_stage(cfg, folder, "stage3")
    ranking_file = Path(cfg.stage3.ranking) if cfg.stage3.ranking else ranking_path(run_dir, cfg.stage2.scorer)
    if not ranking_file.is_file():
        raise IlaError(f"no ranking at {ranking_file}; run stage 2 first (ila score) or set stage3.ranking")
    ranking = Ranking.load(ranking_file)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model)
    check_model_fits(cfg, model)
    identity = model_identity(model, cfg.model.name)
    layers = adaptable_layers(model, include_lm_head=ranking.include_lm_head,
                              module_types=None if cfg.lora.module_types is None else cfg.lora.module_types)
    ranking.check_matches(layers, identity)
    sel = cfg.stage3.selection
    selected = ranking.select(sel.mode, sel.fraction, sel.layers)
    train_ds, heldout_ds = _datasets(cfg, tokenizer, folder)
    method = cfg.stage3.method
    if method == "full":
        from .selection import apply_selection

        peft_model = apply_selection(model, selected, method="full")
    else:
        peft_model = attach_lora(model, selected, cfg.lora)
    trainable, total = count_parameters(peft_model)
    log.info("stage 3: %s on %d of %d layers (%s trainable parameters)", "LoRA" if method == "lora" else
             "full fine-tuning", len(selected), len(layers), f"{trainable:,}")
    selection = {**ranking.selection_record(selected, mode=sel.mode, fraction=sel.fraction,
                                            ranking_path=ranking_file),
                 "method": method, "lora": asdict(cfg.lora) if method == "lora" else None}
    write_json_atomic(rd.selection, selection)
    plan = plan_for(cfg.stage3.train, folder, seed=cfg.seed, device=cfg.model.device)
    result = train(peft_model, plan, tokenizer, train_ds, heldout_ds if cfg.stage3.train.eval_heldout else None)
    out_meta = AdapterMeta(
        kind="ila.stage3_adapter", layers=selected, method=method, include_lm_head=ranking.include_lm_head,
        step=result.steps, base_model=identity, lora=asdict(cfg.lora) if method == "lora" else None,
        data=cfg.data.name, selection={k: selection[k] for k in ("mode", "fraction")}, config_sha256=cfg.sha256(),
    )
    if method == "full":
        # A plain transformers model folder: every tool loads it with from_pretrained.
        output = rd.stage3_output("full")
        with atomic_dir(output) as tmp:
            peft_model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / ADAPTER_META, out_meta.to_dict())
    else:
        output = rd.stage3_output("lora")
        save_adapter(peft_model, output, out_meta)
    summary = {
        "stage": 3, "finished": _now(), "steps": result.steps, "train_loss": result.train_loss,
        "heldout_loss": result.heldout_loss, "seconds": result.seconds,
        "seconds_per_step": result.seconds_per_step, "peak_memory_mb": result.peak_memory_mb,
        "trainable_parameters": trainable, "total_parameters": total, "num_selected": len(selected),
        "num_layers": len(layers), "method": method,
        ("adapter" if method == "lora" else "model"): str(output), "resumed_from": result.resumed_from,
        "stage_sha256": cfg.stage_sha256("stage3"),
    }
    write_json_atomic(rd.summary("stage3"), summary)
    _finish_stage(folder)
    return summary


# -------------------------------------------------------------------------------------------------------
# all stages


def run_all(cfg: RunConfig, run_dir: str | Path, *, redo: bool = False) -> dict[str, Any]:
    """Stages 1-3 in order. A stage that is complete in ``run_dir`` with the same config is reused, unless
    ``redo``; once a stage runs, every later stage runs again too."""
    run_dir = Path(run_dir)
    stages = STAGES
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
        out[name] = read_json(RunDir(run_dir).summary(name), f"{name} summary")
    return out
