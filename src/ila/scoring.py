"""The scorers' functions and the one way into them (:func:`score`). Which scorers exist, what each needs
and what it costs: :mod:`ila.scorers`. Every scorer returns one finite score per layer (higher = more
important); the callers turn them into the same ranking artefact, so comparison tools accept any of them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random as _random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .batching import PADDED, Batching, PaddingFree, choose_batching
from .callbacks import ScoreTrajectory
from .errors import IlaError
from .gates import LayerGates, ScoreSGD, attach_gates, attach_update_gates
from .layers import Layer, find_blocks, unwrap
from .models import resolve_device
from .progress import progress
from .scorers import NEEDS_ADAPTER, NEEDS_DATA, SCORER_NAMES
from .scorers import scorer as scorer_entry
from .stability import LoraFactors, full_update_norm, update_norms
from .training import plan_for, train

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class ScoringInputs:
    """What a scorer may use. ``model`` carries the stage-1 adapter (frozen, dropout off) for the scorers in
    NEEDS_ADAPTER and is the plain base model otherwise."""

    model: nn.Module
    layers: list[Layer]
    seed: int = 0
    batches: Callable[[], Iterator[dict[str, torch.Tensor]]] | None = None
    """Yields batches (input_ids, attention_mask, labels) on the model's device, for scorers that need
    data."""
    options: dict[str, Any] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] | None = None
    """Full fine-tuning: Delta_i = W_T - W_0 per layer, and the bias updates (see
    :func:`ila.gates.attach_update_gates`); ``model`` then holds W_0 and no adapter."""
    training: dict[str, Any] = field(default_factory=dict)
    """For ``ila``, which trains: tokenizer, dataset, the stage-2 settings, device, output folder, resume."""


def score_layers(scorer: str, inputs: ScoringInputs) -> tuple[dict[str, float], dict[str, Any]]:
    """(score of every layer, facts about the scoring) from the registry's function for ``scorer``."""
    entry = scorer_entry(scorer)
    if entry.needs_data and inputs.batches is None and not inputs.training:
        raise IlaError(f"the {scorer} scorer needs data")
    scores, meta = entry.load()(inputs)
    bad = [n for n, s in scores.items() if not math.isfinite(s)]
    if bad:
        raise IlaError(f"the {scorer} scorer gave non-finite scores for {len(bad)} layers, e.g. {bad[0]}")
    return scores, meta


def ila_scores(inputs: ScoringInputs) -> tuple[dict[str, float], dict[str, Any]]:
    """ILA's own scores: learn the gates (stage 2 of the method, :func:`learn_gates`)."""
    t = inputs.training
    return learn_gates(
        inputs.model,
        inputs.layers,
        tokenizer=t["tokenizer"],
        train_dataset=t["dataset"],
        s2=t["s2"],
        seed=inputs.seed,
        device=t["device"],
        folder=t["folder"],
        resume=t.get("resume", False),
        deltas=inputs.deltas,
        padding_free=t.get("padding_free", "auto"),
    )


def random_scores(inputs: ScoringInputs) -> tuple[dict[str, float], dict[str, Any]]:
    """A seeded random order: the baseline any other scorer must beat."""
    rng = _random.Random(inputs.seed)
    return {layer.name: rng.random() for layer in inputs.layers}, {"seed": inputs.seed}


def position_scores(inputs: ScoringInputs) -> tuple[dict[str, float], dict[str, Any]]:
    """Whole blocks by depth: the last blocks first (``position_from: last``) or the first blocks first.

    Within a block the layers keep model order (ties are broken by it). ``lm_head`` counts as the deepest.
    """
    from_end = inputs.options.get("position_from", "last") == "last"
    depth = 1 + max((layer.block_index or 0) for layer in inputs.layers)
    scores = {}
    for layer in inputs.layers:
        d = depth if layer.block_index is None else layer.block_index
        scores[layer.name] = float(d if from_end else -d)
    return scores, {"position_from": "last" if from_end else "first"}


def update_norm_scores(inputs: ScoringInputs) -> tuple[dict[str, float], dict[str, Any]]:
    """||Delta_i||_F = ||scaling * B_i A_i||_F of the stage-1 update: free once stage 1 ran."""
    if inputs.deltas is not None:
        return {layer.name: full_update_norm(inputs.deltas, layer.name) for layer in inputs.layers}, {}
    factors = LoraFactors.snapshot(inputs.model, [layer.name for layer in inputs.layers])
    return update_norms(factors), {}


def taylor_scores(inputs: ScoringInputs) -> tuple[dict[str, float], dict[str, Any]]:
    """First-order estimate of the loss increase from removing each update:

        L(gamma_i = 0) - L(gamma = 1)  ~  -dL/dgamma_i  at gamma = 1

    averaged over a sample of batches. One forward/backward per batch, gradients for the gates only.
    """
    model = inputs.model
    names = [layer.name for layer in inputs.layers]
    gates = LayerGates(names)
    gates.set_fixed(1.0)
    device = next(model.parameters()).device
    gates.fixed = gates.fixed.to(device).requires_grad_(True)
    hooks = _attach(model, gates, inputs.deltas)
    total = torch.zeros(len(names), device=device)
    n = 0
    try:
        model.eval()
        for batch in inputs.batches():  # type: ignore[misc]
            loss = model(**batch).loss
            (grad,) = torch.autograd.grad(loss, gates.fixed)
            total += grad.detach()
            n += 1
    finally:
        hooks.remove()
        del model._modules["ila_gates"]
    if n == 0:
        raise IlaError("the taylor scorer got no batch of data")
    scores = (-total / n).cpu().tolist()
    return dict(zip(names, scores, strict=True)), {"batches": n}


def snr_scores(inputs: ScoringInputs) -> tuple[dict[str, float], dict[str, Any]]:
    """Data-free weight signal-to-noise ratio in the manner of Spectrum (Hartford et al., 2024).

    The singular values above the Marchenko-Pastur bulk edge ``sigma (1 + sqrt(beta))`` (sigma estimated as
    IQR / 1.349 of the singular values, beta the aspect ratio) are signal, the rest noise; the score is
    (sum of signal / sum of noise) / largest singular value. Spectrum picks the top layers *per module
    type*; this score is global, so compare it within a module type when types differ in shape.
    """
    modules = dict(unwrap(inputs.model).named_modules())
    scores = {}
    for layer in inputs.layers:
        module = modules[layer.name]
        w = getattr(module, "base_layer", module).weight.detach().float()
        if w.ndim != 2:
            raise IlaError(f"{layer.name}: snr needs a 2-D weight, got shape {tuple(w.shape)}")
        s = torch.linalg.svdvals(w)
        sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
        n_rows, n_cols = w.shape
        beta = min(n_rows, n_cols) / max(n_rows, n_cols)
        edge = sigma * (1 + math.sqrt(beta))
        signal = s[s > edge].sum()
        noise = s[s <= edge].sum()
        # No singular value in the bulk: all signal. Cap instead of writing Infinity (strict JSON).
        snr = float(signal / noise) if noise > 0 else 1e6
        scores[layer.name] = snr / float(s[0]) if s[0] > 0 else 0.0
    return scores, {}


def block_influence_scores(inputs: ScoringInputs) -> tuple[dict[str, float], dict[str, Any]]:
    """Block influence (ShortGPT, Men et al., 2024): BI_b = 1 - E_tokens[cos(x_in, x_out)] of block b on the
    base model. Every layer of a block gets the block's score, so this ranks blocks, not layers;
    ``lm_head`` gets the median block score.
    """
    model = inputs.model
    blocks_name, n_blocks = find_blocks(model)
    blocks = dict(unwrap(model).named_modules())[blocks_name]
    sums = torch.zeros(n_blocks, dtype=torch.float64)
    count = 0.0
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(i: int) -> Callable:
        def fn(_mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, (tuple, list)) else out
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (B, T)
            sums[i] += float((cos * mask_holder["mask"]).sum())

        return fn

    handles = [blocks[i].register_forward_hook(hook(i), with_kwargs=True) for i in range(n_blocks)]
    n = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in inputs.batches():  # type: ignore[misc]
                # a padded batch marks its real tokens; a padding-free one has no other
                mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).float()
                mask_holder["mask"] = mask
                count += float(mask.sum())
                model(**{k: v for k, v in batch.items() if k != "labels"})
                n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0 or count == 0:
        raise IlaError("the block-influence scorer got no tokens")
    influence = (1.0 - sums / count).tolist()
    median = sorted(influence)[len(influence) // 2]
    scores = {
        layer.name: influence[layer.block_index] if layer.block_index is not None else median
        for layer in inputs.layers
    }
    return scores, {
        "batches": n,
        "granularity": "block",
        "block_influence": {f"{blocks_name}.{i}": v for i, v in enumerate(influence)},
    }


# ---------------------------------------------------------------------------------------------------------
# stage 2 proper: learning the gates


def _attach(model: nn.Module, gates: LayerGates, deltas: dict[str, torch.Tensor] | None) -> Any:
    """Gates on LoRA updates, or on full-weight updates when ``deltas`` are given."""
    return attach_gates(model, gates) if deltas is None else attach_update_gates(model, gates, deltas)


def learn_gates(
    peft_model: nn.Module,
    layers: list[Layer],
    *,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: datasets.Dataset,
    s2: Any,
    seed: int,
    device: str,
    folder: Path,
    resume: bool = False,
    deltas: dict[str, torch.Tensor] | None = None,
    padding_free: PaddingFree = "auto",
) -> tuple[dict[str, float], dict[str, Any]]:
    """Stage 2 of ILA on a frozen peft model: only the N scores train (ila-method.md, stage 2).

    The loss is the response-token loss plus ``budget_lambda * max(0, mean(sigmoid(s)) - budget_fraction)``.
    """
    for p in peft_model.parameters():
        p.requires_grad_(False)
    names = [layer.name for layer in layers]
    gates = LayerGates(names, init_mean=s2.init_mean, init_std=s2.init_std, seed=seed)
    hooks = _attach(peft_model, gates, deltas)

    def penalty() -> torch.Tensor:
        return s2.budget_lambda * gates.budget_penalty(s2.budget_fraction)

    plan = plan_for(
        s2.as_train_config(),
        folder,
        seed=seed,
        device=device,
        callbacks=[ScoreTrajectory(gates, folder / "scores.jsonl", s2.logging_steps)],
        optimizer="adamw_torch",  # with zero weight decay, AdamW is Adam
        optimizer_cls_and_kwargs=(ScoreSGD, {"lr": s2.learning_rate, "normalise": s2.normalise_step})
        if s2.optimizer == "sgd"
        else None,
        # Checkpoints (scores + optimiser state only) let an interrupted stage 2 resume; rank_layers needs
        # none.
        save_steps=max(1, s2.steps // 4) if resume else 0,
        save_trainable_only=True,
        penalty=penalty if s2.budget_lambda > 0 else None,
        resume=resume,
        deterministic=True,  # stage 2 must see the model it scores, not a dropped-out copy of it
        padding_free=padding_free,
    )
    try:
        result = train(peft_model, plan, tokenizer, train_dataset, None)
    finally:
        hooks.remove()
    scores = gates.as_dict()
    del peft_model._modules["ila_gates"]
    meta = {
        "steps": result.steps,
        "optimizer": s2.optimizer,
        "learning_rate": s2.learning_rate,
        "normalise_step": s2.normalise_step and s2.optimizer == "sgd",
        "budget_fraction": s2.budget_fraction,
        "budget_lambda": s2.budget_lambda,
        "init_mean": s2.init_mean,
        "init_std": s2.init_std,
        "seed": seed,
        "train_loss": result.train_loss,
        "seconds": result.seconds,
        "seconds_per_step": result.seconds_per_step,
        "peak_memory_mb": result.peak_memory_mb,
        "batching": result.batching,
        "mean_gate": float(torch.sigmoid(torch.tensor(list(scores.values()))).mean()),
    }
    return scores, meta


def data_batches(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    max_batches: int,
    device: torch.device,
    seed: int,
    batching: Batching,
) -> Callable[[], Iterator[dict[str, torch.Tensor]]]:
    """A re-iterable sample of ``max_batches`` batches (the same ones every time), padded or padding-free as
    ``batching`` says (the model must then run inside ``batching.attending``)."""
    collate = batching.collator(tokenizer)
    order = list(range(len(dataset)))
    _random.Random(seed).shuffle(order)
    order = order[: batch_size * max_batches]

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        starts = range(0, len(order), batch_size)
        for start in progress(starts, "scoring batches", total=len(starts), unit="batch"):
            rows = [dataset[i] for i in order[start : start + batch_size]]
            batch = collate(rows)
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    return batches


@contextlib.contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Freeze ``model`` and switch LoRA dropout off for scoring; restore both afterwards."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    swapped = []
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for key in list(dropouts.keys()):
                swapped.append((dropouts, key, dropouts[key]))
                dropouts[key] = nn.Identity()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for dropouts, key, original in swapped:
            dropouts[key] = original
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))


def score(
    scorer: str,
    model: nn.Module,
    layers: list[Layer],
    *,
    s2: Any,
    seed: int,
    folder: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dataset: datasets.Dataset | None = None,
    device: str = "auto",
    resume: bool = False,
    deltas: dict[str, torch.Tensor] | None = None,
    padding_free: PaddingFree = "auto",
) -> tuple[dict[str, float], dict[str, Any]]:
    """(score of every layer, facts about the scoring) with ``scorer``: the one way into the scorers, for
    stage 2 (:func:`ila.pipeline.stage2`) and for :func:`ila.integration.rank_layers`.

    ``model`` carries the update to score (a peft LoRA model, or with ``deltas`` the base model of a full
    fine-tuning run) for the scorers in NEEDS_ADAPTER. It is frozen with LoRA dropout off while scoring and
    left as it was; ``ila`` trains the gates in eval mode (no dropout of the base model either) and writes its
    checkpoints and score trajectories into ``folder``.
    """
    entry = scorer_entry(scorer)
    if entry.needs_data and (dataset is None or tokenizer is None):
        raise IlaError(f"the {scorer} scorer needs a dataset and a tokenizer")
    batching = PADDED
    with scoring_mode(model):
        training: dict[str, Any] = {}
        batches = None
        if scorer == "ila":  # it trains through the Trainer, which batches and places the data itself
            training = {
                "tokenizer": tokenizer,
                "dataset": dataset,
                "s2": s2,
                "device": device,
                "folder": folder,
                "resume": resume,
                "padding_free": padding_free,
            }
        elif dataset is not None and tokenizer is not None:
            dev = next(model.parameters()).device if device == "auto" else resolve_device(device)
            batching = choose_batching(model, padding_free)
            batches = data_batches(
                dataset,
                tokenizer,
                batch_size=s2.batch_size,
                max_batches=s2.sample_batches,
                device=dev,
                seed=seed,
                batching=batching,
            )
        inputs = ScoringInputs(
            model=model,
            layers=layers,
            seed=seed,
            batches=batches,
            options={"position_from": s2.position_from},
            deltas=deltas,
            training=training,
        )
        with batching.attending(model):
            return score_layers(scorer, inputs)


__all__ = [
    "SCORER_NAMES",
    "NEEDS_ADAPTER",
    "NEEDS_DATA",
    "ScoringInputs",
    "score",
    "score_layers",
    "learn_gates",
    "data_batches",
    "scoring_mode",
]  # the names of ila.scorers are re-exported for existing imports
