"""Evaluation: held-out loss, benchmark accuracy through lm-evaluation-harness, and generations to read.

The held-out loss is :mod:`ila.heldout`'s and the forgetting loss :mod:`ila.forgetting`'s. Benchmarks run
through lm-evaluation-harness itself (``lm_eval.simple_evaluate`` with its ``HFLM`` model, which loads the
base model and a PEFT adapter), on the offline tasks of :mod:`ila.lm_eval_tasks`; with Hub access any
lm-eval task name works as well.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .adapters import lm_eval_source, load_result
from .artifacts import envelope, write_json_atomic, write_text_atomic
from .batching import choose_batching
from .data import mtbench_questions, render_prompt
from .errors import IlaError
from .forgetting import forgetting_loss, general_text_rows
from .heldout import heldout_loss
from .ifeval import (
    DEFAULT_MAX_GEN_TOKS,
    generations_markdown,
    ifeval_chat_template,
    ifeval_rows,
    prompt_text,
    run_ifeval,
)
from .ifeval import TASK as IFEVAL
from .lm_eval_tasks import OFFLINE_TASKS, write_offline_tasks
from .models import cache_root, load_base_model, load_tokenizer, resolve_device, resolve_model_source
from .progress import progress
from .rundir import RunDir
from .tokenized import tokenized_datasets

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .config import RunConfig

log = logging.getLogger(__name__)


@dataclass
class Benchmarks:
    """lm-eval's scores of one model, and the per-document values behind them.

    ``scores[task][metric]``: ``acc/none``, ``prompt_level_strict_acc/none``... (IFEval's with their standard
    errors). ``examples[task][metric]``: one (``sums``, ``counts``) pair per document whose ratio of totals is
    the score (a 1 or 0 and a 1 for an accuracy; instructions followed and instructions given for IFEval's
    instruction level), so that two models scored on the same documents are compared pairwise with
    :func:`ila.heldout.paired_interval`, as held-out losses are. A metric whose score is not that ratio (a
    corpus-level one) has no examples."""

    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    examples: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)


def per_document(
    samples: Sequence[dict[str, Any]], scores: dict[str, float]
) -> dict[str, dict[str, list[float]]]:
    """The (``sums``, ``counts``) of each metric of ``scores`` (``metric/filter``) from lm-eval's logged
    ``samples`` of one task, in document order; kept only where the ratio of their totals is the score."""
    out = {}
    for key, score in scores.items():
        metric, _, flt = key.partition("/")
        rows = sorted(
            (s for s in samples if s.get("filter", "none") == (flt or "none") and metric in s),
            key=lambda s: s["doc_id"],
        )
        sums, counts = [], []
        for s in rows:
            value = s[metric]
            if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float)) for v in value):
                sums.append(float(sum(value)))
                counts.append(float(len(value)))
            elif isinstance(value, (bool, int, float)):
                sums.append(float(value))
                counts.append(1.0)
            else:
                break
        else:
            if len({s["doc_id"] for s in rows}) == len(rows) and sum(counts) > 0:
                if math.isclose(sum(sums) / sum(counts), score, rel_tol=1e-9, abs_tol=1e-9):
                    out[key] = {"sums": sums, "counts": counts}
    return out


def offline_task_folder(tasks: Sequence[str], cache: Path | None = None) -> Path | None:
    """The lm-eval include folder with the offline ``ila_*`` tasks among ``tasks`` written into it (their data
    fetched on first use, HHH's archive included), or None without any. Called before training too, so that
    a task whose data cannot be had fails before hours of fine-tuning, not after them."""
    offline = [t for t in tasks if t in OFFLINE_TASKS]
    if not offline:
        return None
    cache = cache or cache_root()
    return write_offline_tasks(cache / "lm_eval_tasks", offline, cache)


def lm_eval_scores(
    model_path: str,
    tasks: Sequence[str],
    *,
    adapter: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    cache: Path | None = None,
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    chat_template: bool | str | None = None,
    ifeval_samples: Path | None = None,
) -> Benchmarks:
    """Accuracy of the base model (plus a PEFT adapter) on lm-eval tasks; offline ``ila_*`` tasks are written
    first. Scores keep lm-eval's standard errors (``acc_stderr/none``) beside the metrics.

    ``ila_ifeval`` runs in an lm-eval pass of its own, because lm-eval applies a chat template to every task
    of a pass and the other tasks are scored on bare prompts: its prompts go through the chat template
    (``chat_template``, as :func:`ila.ifeval.ifeval_chat_template` gives it; None: the tokenizer's chat
    template when it has one, else the bare prompt) and its answers are capped at ``max_gen_toks`` new
    tokens; ``ifeval_samples`` gets its per-prompt inputs, answers and checks as JSON lines.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise IlaError("benchmarks need lm-evaluation-harness: pip install 'lm-eval==0.4.13'") from None

    cache = cache or cache_root()
    folder = offline_task_folder(tasks, cache)
    lm = HFLM(
        pretrained=model_path,
        peft=str(adapter) if adapter else None,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        trust_remote_code=False,
    )
    # Indexing lm-eval's own task files takes ~8 s; only a task outside ila's offline ones needs them.
    hub = any(t not in OFFLINE_TASKS for t in tasks)
    manager = TaskManager(include_path=str(folder) if folder else None, include_defaults=hub)
    out = Benchmarks()
    others = [t for t in tasks if t != IFEVAL]
    if others:
        run = simple_evaluate(model=lm, tasks=others, task_manager=manager, limit=limit, log_samples=True)
        for task, metrics in run["results"].items():
            out.scores[task] = {
                k.split(",")[0] + ("" if "," not in k else "/" + k.split(",")[1]): float(v)
                for k, v in metrics.items()
                if isinstance(v, (int, float))
                and not isinstance(v, bool)
                and k != "sample_len"
                and math.isfinite(float(v))
            }
            out.examples[task] = per_document(run["samples"].get(task, []), out.scores[task])
    if IFEVAL in tasks:
        if chat_template is None:
            chat_template = bool(getattr(lm.tokenizer, "chat_template", None))
        out.scores[IFEVAL], samples = run_ifeval(
            lm,
            manager,
            cache=cache,
            limit=limit,
            max_gen_toks=max_gen_toks,
            chat_template=chat_template,
            samples_path=ifeval_samples,
        )
        means = {k: v for k, v in out.scores[IFEVAL].items() if "stderr" not in k}
        out.examples[IFEVAL] = per_document(samples, means)
    return out


def benchmark_settings(
    tokenizer: PreTrainedTokenizerBase,
    cfg: RunConfig,
    tasks: Sequence[str],
    limit: int | None,
    max_gen_toks: int,
) -> dict[str, Any]:
    """What a benchmark score depends on besides the model: the tasks, ``limit`` and, for IFEval, the answer
    cap and the template its prompts go through (:func:`ifeval_chat_template`). Recorded beside every
    score."""
    settings: dict[str, Any] = {"tasks": list(tasks), "limit": limit}
    if IFEVAL in tasks:
        settings.update(
            max_gen_toks=max_gen_toks, chat_template=ifeval_chat_template(tokenizer, cfg.data.template)
        )
    return settings


def task_settings(settings: dict[str, Any], task: str) -> dict[str, Any]:
    """The part of ``settings`` (:func:`benchmark_settings`) that one task's score depends on."""
    keys = ("limit", "max_gen_toks", "chat_template") if task == IFEVAL else ("limit",)
    return {k: settings.get(k) for k in keys}


def benchmark_model(
    cfg: RunConfig,
    result: Path | None,
    settings: dict[str, Any],
    *,
    ifeval_samples: Path | None = None,
    batch_size: int = 8,
) -> Benchmarks:
    """lm-eval on the run's base model plus the stage-3 or stage-1 ``result`` folder (an adapter or a full
    model; None: the base model alone) with ``settings`` (:func:`benchmark_settings`), on the run's device
    and dtype. A quantised run's adapter is scored on the unquantised base, as lm-eval loads it."""
    pretrained, peft = lm_eval_source(resolve_model_source(cfg.model), result)
    return lm_eval_scores(
        pretrained,
        settings["tasks"],
        adapter=peft,
        limit=settings["limit"],
        batch_size=batch_size,
        device=str(resolve_device(cfg.model.device)),
        dtype=cfg.model.dtype,
        max_gen_toks=settings.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS),
        chat_template=settings.get("chat_template"),
        ifeval_samples=ifeval_samples,
    )


def fill_benchmarks(
    cfg: RunConfig, record: dict[str, Any], model: Path | None, settings: dict[str, Any], samples: Path
) -> bool:
    """Score ``model`` (a strategy's saved stage-3 result; None: the base model) on each task of
    ``settings`` (:func:`ila.evaluation.benchmark_settings`) that ``record`` holds no score of at those
    settings, into ``record``'s ``benchmarks``, ``benchmark_examples`` and ``benchmark_settings`` (per
    task). A finished run gains benchmarks without being fine-tuned again; one whose model is gone keeps
    none. Returns whether any ran."""
    recorded = record.setdefault("benchmark_settings", {})
    missing = [t for t in settings["tasks"] if recorded.get(t) != task_settings(settings, t)]
    if not missing:
        return False
    if model is not None and not model.is_dir():
        # a result restored without its adapter (results are kept, adapters are not): its cells stay empty
        log.warning(
            "%s has a result but no saved model at %s, so it is not benchmarked; remove its folder to "
            "fine-tune it again",
            record.get("run", model),
            model,
        )
        return False
    bench = benchmark_model(cfg, model, {**settings, "tasks": missing}, ifeval_samples=samples)
    for task in missing:
        record.setdefault("benchmarks", {})[task] = bench.scores.get(task, {})
        record.setdefault("benchmark_examples", {})[task] = bench.examples.get(task, {})
        recorded[task] = task_settings(settings, task)
    return True


# ---------------------------------------------------------------------------------------------------------
# generations


@torch.no_grad()
def complete(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
) -> list[str]:
    """Greedy continuations of ready-made prompt texts (tokenized without added special tokens)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers = []
    for prompt in progress(prompts, "generating", total=len(prompts), unit="answer"):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int = 128,
    template: str = "auto",
) -> list[str]:
    """Greedy answers to the last user turn of each conversation, formatted as in training."""
    prompts = [render_prompt(conv, tokenizer, template) for conv in conversations]
    return complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens)


def write_generations(
    cfg: RunConfig,
    adapters: dict[str, Any],
    n: int,
    path: Path,
    *,
    max_new_tokens: int = 128,
    ifeval: int = 0,
    ifeval_max_new_tokens: int = DEFAULT_MAX_GEN_TOKS,
    cache: Path | None = None,
) -> dict[str, list[str]]:
    """Greedy answers of the base model and of each adapter (``{label: folder}``) to the first turns of the
    first ``n`` MT-Bench questions, written side by side as Markdown so that a person can read them; returns
    those answers. With ``ifeval``, also the first ``ifeval`` IFEval prompts, given as lm-eval gives them
    (:func:`ifeval_chat_template`), each answer marked with lm-eval's strict and loose verdicts."""
    tokenizer = load_tokenizer(cfg.model)
    questions = [[{"role": "user", "content": q["turns"][0]}] for q in mtbench_questions()[:n]]
    rows = ifeval_rows()[:ifeval] if ifeval > 0 else []
    chat = ifeval_chat_template(tokenizer, cfg.data.template)
    ifeval_prompts = [prompt_text(tokenizer, row["prompt"], chat) for row in rows]
    answers: dict[str, list[str]] = {}
    ifeval_answers: dict[str, list[str]] = {}
    for label, folder in [("base", None), *adapters.items()]:
        model = load_base_model(cfg.model) if folder is None else load_result(cfg.model, Path(folder))
        if questions:
            answers[label] = generate(
                model, tokenizer, questions, max_new_tokens=max_new_tokens, template=cfg.data.template
            )
        if rows:
            ifeval_answers[label] = complete(
                model, tokenizer, ifeval_prompts, max_new_tokens=ifeval_max_new_tokens
            )
    md = []
    if questions:
        md += ["# Generations (MT-Bench, first turns, greedy)", ""]
    for i, q in enumerate(questions):
        md += [f"## {i + 1}. {q[0]['content']}", ""]
        md += [f"**{label}**: {ans[i]}\n" for label, ans in answers.items()]
    if rows:
        md += generations_markdown(rows, ifeval_answers, cache or cache_root())
    write_text_atomic(path, "\n".join(md) + "\n")
    return answers


# ---------------------------------------------------------------------------------------------------------
# a run's results


def evaluate_run(
    cfg: RunConfig,
    run_dir: str | Path,
    results: dict[str, str | Path] | None = None,
    *,
    tasks: Sequence[str] = (),
    limit: int | None = None,
    generate: int = 0,
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    generate_ifeval: int = 0,
    forgetting: bool = True,
) -> dict[str, Any]:
    """Held-out loss, forgetting (:mod:`ila.forgetting`; ``forgetting=False`` skips it), and lm-eval scores
    and generations, of the base model and of each result folder.

    ``results`` maps labels to adapter or model folders; by default the run's stage-3 result (adapter or
    model, whichever ``stage3.method`` wrote), else its stage-1 adapter. ``limit`` caps the examples of every
    lm-eval task (IFEval's prompts included), ``max_gen_toks`` the length of IFEval's answers;
    ``generate_ifeval`` adds that many IFEval prompts to the generations. Writes ``eval/evaluation.json``,
    where each entry's ``benchmark_settings`` records these settings, and for IFEval
    ``eval/ifeval-<label>.jsonl`` (every prompt's answer and checks).
    """
    rd = RunDir(run_dir)
    if not results:
        stage3 = rd.stage3_result()
        if stage3 is not None:
            results = {"stage3": stage3}
        elif rd.stage1_final.is_dir():
            results = {"stage1-all-layers": rd.stage1_final}
        else:
            results = {}
    tokenizer = load_tokenizer(cfg.model)
    heldout = tokenized_datasets(cfg.data, tokenizer, rd.data)[1]  # the run's own examples, when they match
    heldout = heldout if len(heldout) > 0 else None
    general = general_text_rows(tokenizer, max_length=cfg.data.max_length) if forgetting else None
    settings = benchmark_settings(tokenizer, cfg, tasks, limit, max_gen_toks)
    out: dict[str, Any] = {}
    for label, path in [("base", None), *results.items()]:
        model = load_base_model(cfg.model) if path is None else load_result(cfg.model, Path(path))
        entry: dict[str, Any] = {"adapter": None if path is None else str(path)}
        batching = choose_batching(model, cfg.data.padding_free)
        if heldout is not None:
            entry["heldout"] = heldout_loss(model, tokenizer, heldout, batching=batching)
        if general is not None:
            entry["forgetting"] = forgetting_loss(model, tokenizer, general, batching=batching)
        if tasks:
            samples = rd.eval / f"ifeval-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.jsonl"
            bench = benchmark_model(
                cfg,
                None if path is None else Path(path),
                settings,
                ifeval_samples=samples if IFEVAL in tasks else None,
            )
            entry["benchmarks"] = bench.scores
            entry["benchmark_examples"] = bench.examples
            entry["benchmark_settings"] = dict(settings)
        out[label] = entry
    path = write_json_atomic(rd.eval / "evaluation.json", {**envelope("ila.evaluation"), "results": out})
    generations = None
    if generate or generate_ifeval:
        generations = rd.eval / "generations.md"
        write_generations(
            cfg,
            results,
            generate,
            generations,
            ifeval=generate_ifeval,
            ifeval_max_new_tokens=max_gen_toks,
        )
    return {"results": out, "path": path, "generations": generations}
