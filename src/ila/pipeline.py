"""The stages of ILA as functions that read and write a run directory (its layout: :mod:`ila.rundir`).

Each stage reads only files written by earlier stages, so any stage can be re-run alone or fed a ranking or
an adapter from another run. A stage whose ``summary.json`` exists is complete and is not redone by ``run``.
Every stage reads as: load the model and data, attach what trains, train, save.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .adapters import (
    ADAPTER_META,
    AdapterMeta,
    adapter_digest,
    adapter_layers,
    check_adapter_model,
    resolve_stage1_adapter,
    save_adapter,
    with_update,
)
from .artifacts import (
    atomic_dir,
    read_json,
    write_json_atomic,
)
from .callbacks import MilestoneSaver, StabilityTracker
from .config import RunConfig
from .errors import ConfigError, IlaError
from .layers import Layer, adaptable_layers, describe_layers, layer_names_digest
from .models import (
    count_parameters,
    make_folder_portable,
    resolve_device,
)
from .ranking import Ranking
from .rundir import STAGES, RunDir, finish_stage, now, prepare_run_dir, stage_done, start_stage
from .scorers import NEEDS_ADAPTER, NEEDS_DATA
from .scoring import score
from .selection import apply_selection
from .shared_base import SharedBase
from .stability import weight_snapshot
from .tokenized import tokenized_datasets
from .training import TrainingResult, plan_for, train

if TYPE_CHECKING:
    import datasets
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------------------
# loading, shared by the stages


def _load(
    cfg: RunConfig, base: SharedBase | None
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, dict[str, Any]]:
    return (base or SharedBase(cfg)).take()


def load_datasets(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, folder: Path, cache: Path | None = None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, held-out or None when the split left none); their statistics go to ``folder/data.json``.
    With ``cache`` (a run's ``data`` folder, :mod:`ila.tokenized`) the examples are tokenized once and read
    back by every later reader with the same data config and tokenizer."""
    train_ds, heldout_ds, stats, cached = tokenized_datasets(cfg.data, tokenizer, cache)
    write_json_atomic(folder / "data.json", {**stats, "from_cache": cached})
    log.info(
        "data: %d train / %d held-out examples (%s, %s template)",
        stats["train_examples"],
        stats["heldout_examples"],
        stats["format"],
        stats["template"],
    )
    return train_ds, (heldout_ds if len(heldout_ds) > 0 else None)


def _layers(cfg: RunConfig, model: nn.Module) -> list[Layer]:
    return adaptable_layers(
        model, include_lm_head=cfg.lora.include_lm_head, module_types=cfg.lora.module_types
    )


def _log_trainable(
    stage: str, model: nn.Module, method: str, r: int, selected: int, layers: int
) -> tuple[int, int]:
    """Log what a stage trains; returns (trainable, total) parameters."""
    trainable, total = count_parameters(model)
    how = f"LoRA r={r}" if method == "lora" else "full fine-tuning"
    log.info(
        "%s: %s on %d of %d layers (%s trainable of %s parameters)",
        stage,
        how,
        selected,
        layers,
        f"{trainable:,}",
        f"{total:,}",
    )
    return trainable, total


def _train_summary(result: TrainingResult) -> dict[str, Any]:
    """What stages 1 and 3 report of their training run."""
    return {
        "steps": result.steps,
        "train_loss": result.train_loss,
        "heldout_loss": result.heldout_loss,
        "heldout": result.heldout,  # with its 95 % interval (ila.heldout)
        "seconds": result.seconds,
        "seconds_per_step": result.seconds_per_step,
        "median_step_seconds": result.median_step_seconds,
        "peak_memory_mb": result.peak_memory_mb,
        "resumed_from": result.resumed_from,
        "best_step": result.best_step,  # early stopping: the step whose weights were kept
    }


# -------------------------------------------------------------------------------------------------------
# stage 1


def _refuse_tied_full_head(cfg: RunConfig, model: PreTrainedModel) -> None:
    if cfg.lora.include_lm_head and getattr(model.config, "tie_word_embeddings", False):
        raise ConfigError(
            "lora.include_lm_head with stage1.method full: this model ties lm_head to the input "
            "embeddings, so a full update of lm_head would change the inputs too and could not be gated; use "
            "LoRA or leave lm_head out"
        )


def _stage1_meta(
    cfg: RunConfig, names: list[str], identity: dict[str, Any], step: int, fraction: float | None
) -> AdapterMeta:
    """What ``ila_adapter.json`` records of a stage-1 milestone (or of the final update)."""
    return AdapterMeta(
        kind="ila.stage1_adapter",
        layers=names,
        method=cfg.stage1.method,
        include_lm_head=cfg.lora.include_lm_head,
        step=step,
        planned_steps=cfg.stage1.train.max_steps,
        fraction=fraction,
        base_model=identity,
        module_types=cfg.lora.module_types,
        lora=asdict(cfg.lora),
        data=cfg.data.name,
        config_sha256=cfg.sha256(),
        layer_digest=layer_names_digest(names),
    )


def _stability_tracker(
    cfg: RunConfig, names: list[str], path: Path, base_weights: dict[str, torch.Tensor] | None
) -> StabilityTracker:
    s1 = cfg.stage1
    return StabilityTracker(
        names,
        s1.stability_window,
        s1.stability_epsilon,
        path,
        s1.stop_when_stable,
        base_weights=base_weights,
        criterion=s1.stability_criterion,
        fraction=s1.stability_fraction,
        patience=s1.stability_patience,
    )


def stage1(cfg: RunConfig, run_dir: str | Path, *, base: SharedBase | None = None) -> dict[str, Any]:
    """LoRA (or full fine-tuning) on every layer, milestones saved, epsilon-stability recorded. ``base``
    shares theta_0 with the other stages of the same process."""
    rd = RunDir(run_dir)
    folder, s1 = rd.stage("stage1"), cfg.stage1
    start_stage(cfg, folder, "stage1")

    tokenizer, model, identity = _load(cfg, base)
    layers = _layers(cfg, model)
    names = [layer.name for layer in layers]
    train_ds, heldout_ds = load_datasets(cfg, tokenizer, folder, rd.data)

    base_weights = None
    if s1.method == "full":
        _refuse_tied_full_head(cfg, model)
        base_weights = weight_snapshot(model, names)  # W_0, for epsilon-stability of W_t - W_0
    torch.manual_seed(cfg.seed)  # LoRA A is initialised randomly when the adapter is attached
    peft_model = apply_selection(model, names, method=s1.method, lora=cfg.lora)
    trainable, total = _log_trainable("stage 1", peft_model, s1.method, cfg.lora.r, len(names), len(names))

    planned = s1.train.max_steps
    meta = functools.partial(_stage1_meta, cfg, names, identity)
    milestones = MilestoneSaver(rd.milestones, s1.milestones, planned, meta)
    stability = _stability_tracker(cfg, names, folder / "stability.jsonl", base_weights)
    # eval_before: before the first step the model is theta_0 (LoRA B starts at zero)
    plan = plan_for(
        s1.train,
        folder,
        seed=cfg.seed,
        device=cfg.model.device,
        callbacks=[milestones, stability],
        eval_before=True,
        padding_free=cfg.data.padding_free,
    )
    result = train(peft_model, plan, tokenizer, train_ds, heldout_ds if s1.train.eval_heldout else None)

    save_adapter(peft_model, rd.stage1_final, meta(result.steps, result.steps / planned))
    if base is not None:
        base.release(tokenizer, peft_model, identity, pristine=s1.method == "lora")
    summary = {
        "stage": 1,
        "finished": now(),
        **_train_summary(result),
        "planned_steps": planned,
        "stopped_when_stable": result.stopped_early and stability.stable_at is not None,
        "stable_at_step": stability.stable_at,
        # What stopping when stable saved against the planned schedule (0 when it ran to the end).
        "steps_saved": planned - result.steps,
        "stability": stability.history,
        "milestones": sorted(p.name for p in rd.milestones.glob("[0-9]*")),
        "base_heldout_loss": result.heldout_loss_before,
        "base_heldout": result.heldout_before,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "layers": describe_layers(layers),
        "include_lm_head": cfg.lora.include_lm_head,
        "method": s1.method,
        "batching": result.batching,
        "base_model": identity,
        "config_sha256": cfg.sha256(),
        "stage_sha256": cfg.stage_sha256("stage1"),
    }
    write_json_atomic(rd.summary("stage1"), summary)
    finish_stage(folder)
    return summary


# -------------------------------------------------------------------------------------------------------
# stage 2


def _stage2_summary(
    cfg: RunConfig, ranking: Ranking, path: Path, seconds: float, facts: dict[str, Any]
) -> dict[str, Any]:
    return {
        "stage": 2,
        "scorer": ranking.scorer,
        "finished": now(),
        "seconds": seconds,
        **{key: facts.get(key) for key in ("steps", "train_loss", "seconds_per_step", "peak_memory_mb")},
        "trainable_parameters": ranking.num_layers if ranking.scorer == "ila" else 0,
        "mean_gate": facts.get("mean_gate"),
        "batching": facts.get("batching"),
        "top10": ranking.order[:10],
        "ranking": str(path),
        "stage_sha256": cfg.stage_sha256("stage2"),
    }


def stage2(
    cfg: RunConfig,
    run_dir: str | Path,
    adapter: str | Path | None = None,
    scorer: str | None = None,
    *,
    base: SharedBase | None = None,
    data: Path | None = None,
) -> Ranking:
    """Score every layer and write the ranking. With the default scorer ``ila`` this is stage 2 of the
    method: freeze everything and learn one gate per layer. ``base`` shares theta_0 with the other stages of
    the same process; ``data`` is where the tokenized examples are kept (default: the run directory's)."""
    scorer = scorer or cfg.stage2.scorer
    rd = RunDir(run_dir)
    folder = rd.stage("stage2")
    adapter_dir = meta = None
    if scorer in NEEDS_ADAPTER:
        adapter_dir = resolve_stage1_adapter(
            rd.root, cfg.stage2.milestone if adapter is None else Path(adapter)
        )
        meta = AdapterMeta.read(adapter_dir)
    # The adapter is named on the command line, not in the config: its contents guard the resume too.
    digest = None if adapter_dir is None else adapter_digest(adapter_dir)
    start_stage(cfg, folder, "stage2", {"scorer": scorer, "adapter_sha256": digest})

    tokenizer, model, identity = _load(cfg, base)
    if meta is not None:
        check_adapter_model(meta, identity, adapter_dir)
        layers = adapter_layers(model, meta, adapter_dir)
        scored, deltas = with_update(model, meta, adapter_dir, layers)
    else:
        layers, scored, deltas = _layers(cfg, model), model, None
    train_ds = load_datasets(cfg, tokenizer, folder, data or rd.data)[0] if scorer in NEEDS_DATA else None
    if scorer != "ila":
        scored.to(resolve_device(cfg.model.device))  # the Trainer places the model for ila

    start = time.perf_counter()
    scores, facts = score(
        scorer,
        scored,
        layers,
        s2=cfg.stage2,
        seed=cfg.seed,
        folder=folder,
        tokenizer=tokenizer,
        dataset=train_ds,
        device=cfg.model.device,
        resume=True,
        deltas=deltas,
        padding_free=cfg.data.padding_free,
    )
    seconds = time.perf_counter() - start
    if base is not None:  # the scores trained on a frozen model: theta_0 is as it was loaded
        base.release(tokenizer, scored, identity, pristine=True)

    ranking = Ranking(
        scores=scores,
        layers=layers,
        base_model=identity,
        include_lm_head=cfg.lora.include_lm_head if meta is None else meta.include_lm_head,
        scorer=scorer,
        milestone=None if meta is None else (meta.label or adapter_dir.name),
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
    path = rd.ranking(scorer)
    ranking.save(path)
    summary = _stage2_summary(cfg, ranking, path, seconds, facts)
    # The configured scorer's summary marks stage 2 complete; other scorers' runs sit beside it.
    name = "summary.json" if scorer == cfg.stage2.scorer else f"summary-{scorer}.json"
    write_json_atomic(folder / name, summary)
    finish_stage(folder)
    return ranking


# -------------------------------------------------------------------------------------------------------
# stage 3


def _save_stage3(rd: RunDir, model: nn.Module, tokenizer: PreTrainedTokenizerBase, meta: AdapterMeta) -> Path:
    """A PEFT adapter folder for LoRA; for full fine-tuning a plain transformers model folder, which every
    tool loads with ``from_pretrained``."""
    output = rd.stage3_output(meta.method)
    if meta.method == "lora":
        save_adapter(model, output, meta)
        return output
    with atomic_dir(output) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        make_folder_portable(tmp)  # readable by transformers 4 as by 5 (ms-swift 3.x pins 4.x)
        write_json_atomic(tmp / ADAPTER_META, meta.to_dict())
    return output


def stage3(
    cfg: RunConfig, run_dir: str | Path, *, base: SharedBase | None = None, data: Path | None = None
) -> dict[str, Any]:
    """A fresh LoRA run (or full fine-tuning) from the base model on the selected layers only. ``base``
    shares theta_0 with the other stages of the same process; ``data`` is where the tokenized examples are
    kept (default: the run directory's ``data`` folder)."""
    rd = RunDir(run_dir)
    folder, s3 = rd.stage("stage3"), cfg.stage3
    start_stage(cfg, folder, "stage3")
    ranking_file = Path(s3.ranking) if s3.ranking else rd.ranking(cfg.stage2.scorer)
    if not ranking_file.is_file():
        raise IlaError(f"no ranking at {ranking_file}; run stage 2 first (ila score) or set stage3.ranking")
    ranking = Ranking.load(ranking_file)

    tokenizer, model, identity = _load(cfg, base)
    layers = adaptable_layers(
        model, include_lm_head=ranking.include_lm_head, module_types=cfg.lora.module_types
    )
    ranking.check_matches(layers, identity)
    sel = s3.selection
    selected = ranking.select(sel.mode, sel.fraction, sel.layers)
    train_ds, heldout_ds = load_datasets(cfg, tokenizer, folder, data or rd.data)

    torch.manual_seed(cfg.seed)  # LoRA A is initialised randomly when the adapter is attached
    peft_model = apply_selection(model, selected, method=s3.method, lora=cfg.lora)
    trainable, total = _log_trainable(
        "stage 3", peft_model, s3.method, cfg.lora.r, len(selected), len(layers)
    )
    lora = asdict(cfg.lora) if s3.method == "lora" else None
    record = ranking.selection_record(
        selected, mode=sel.mode, fraction=sel.fraction, ranking_path=ranking_file
    )
    write_json_atomic(rd.selection, {**record, "method": s3.method, "lora": lora})

    plan = plan_for(
        s3.train, folder, seed=cfg.seed, device=cfg.model.device, padding_free=cfg.data.padding_free
    )
    result = train(peft_model, plan, tokenizer, train_ds, heldout_ds if s3.train.eval_heldout else None)

    out_meta = AdapterMeta(
        kind="ila.stage3_adapter",
        layers=selected,
        method=s3.method,
        include_lm_head=ranking.include_lm_head,
        step=result.steps,
        base_model=identity,
        lora=lora,
        data=cfg.data.name,
        selection={"mode": sel.mode, "fraction": sel.fraction},
        config_sha256=cfg.sha256(),
    )
    output = _save_stage3(rd, peft_model, tokenizer, out_meta)
    summary = {
        "stage": 3,
        "finished": now(),
        **_train_summary(result),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "num_selected": len(selected),
        "num_layers": len(layers),
        "method": s3.method,
        "batching": result.batching,
        ("adapter" if s3.method == "lora" else "model"): str(output),
        "stage_sha256": cfg.stage_sha256("stage3"),
    }
    write_json_atomic(rd.summary("stage3"), summary)
    finish_stage(folder)
    return summary


# -------------------------------------------------------------------------------------------------------
# all stages


def run_all(cfg: RunConfig, run_dir: str | Path, *, redo: bool = False) -> dict[str, Any]:
    """Stages 1-3 in order. A stage that is complete in ``run_dir`` with the same config is reused, unless
    ``redo``; once a stage runs, every later stage runs again too."""
    run_dir = Path(run_dir)
    # Check before writing anything, so a refused run leaves the directory as it was.
    done = {s: (not redo) and stage_done(run_dir, s, cfg) for s in STAGES}
    prepare_run_dir(cfg, run_dir)
    out: dict[str, Any] = {"run_dir": str(run_dir)}
    rerun = False
    base = SharedBase(cfg)  # theta_0 read once for the stages that run
    for name, fn in zip(STAGES, (stage1, stage2, stage3), strict=True):
        if rerun or not done[name]:
            fn(cfg, run_dir, base=base)
            rerun = True
        else:
            log.info("%s already complete in %s; skipping", name.replace("stage", "stage "), run_dir)
        out[name] = read_json(RunDir(run_dir).summary(name), f"{name} summary")
    return out
