"""Does tuning only the important layers hold up? Fine-tune with several layer selections on the same budget
and compare quality and cost.

    ila compare-strategies --run-dir runs/demo --out runs/strategies

For one base model, dataset and training budget (the run's ``stage3`` settings: same steps, data, seed and
LoRA rank), each strategy is a stage-3 run from theta_0 on a different selection:

- ``all``: every layer (plain LoRA), the reference;
- ``ila-drop-bottom-25``: ILA, the 25 % least important layers frozen (the paper: better than ``all``);
- ``ila-top-10/20/30``: ILA, only the top 10 / 20 / 30 % tuned (the paper: close to ``all`` at a fraction
  of the cost);
- ``random-F``: random selections of the sizes of every ``ila-top-F`` (sweep included), one draw per seed
  (at least three);
- ``first-F`` / ``last-F``: the first or last blocks, the same number of layers;
- ``ila-top-F`` for the sweep fractions (e.g. 50 %, 75 %), for the quality-vs-fraction curve;
- ``all-rank-R``: every layer at the LoRA rank R whose trainable parameter count is nearest ILA's top 30 %
  at the run's rank (the scale alpha / r kept): does choosing layers beat spreading the same budget over
  every layer?
- ``<scorer>-top-30`` for other scorers (``taylor``, ``update-norm``, ``snr``, ``block-influence``...): is the
  learnt ranking better than a cheap one on the same budget?
- ``<strategy>-equal-time`` (``equal_time``): a strategy again with the steps that fill ``all``'s training
  time, measured at the same seed: is a cheaper selection better at equal wall-clock time?

Every strategy runs with ``seeds`` seeds (``--seeds N``: LoRA initialisation and data order change; the
selection does not, except for ``random``). Each run is evaluated on the held-out split (the token-weighted
response loss of :mod:`ila.heldout`, with its interval) and, optionally, lm-eval tasks; each strategy is
reported as the mean over its runs and as the paired difference with ``all`` (same seed, same examples:
:mod:`ila.strategy_summary`).
On the CPU each fine-tune runs in a fresh process (``isolate``) so that its peak resident memory is its own
(:func:`ila.machine.peak_resident_mb`); on a GPU the CUDA peak-memory counters are reset per run instead.
Results: ``strategies.json``, ``strategies.md`` and plots (quality vs fraction, quality vs cost).
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import logging
import multiprocessing
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import strategy_plan
from .adapters import load_result
from .artifacts import envelope, read_json, read_jsonl, write_json_atomic
from .batching import choose_batching
from .config import RunConfig
from .errors import IlaError
from .evaluation import benchmark_settings, fill_benchmarks, offline_task_folder, write_generations
from .forgetting import forgetting_loss, general_text_rows, text_source
from .heldout import example_losses, heldout_loss, summarise
from .ifeval import DEFAULT_MAX_GEN_TOKS
from .machine import describe_machine, peak_resident_mb
from .models import layer_widths, load_base_model, load_tokenizer
from .pipeline import load_datasets, prepare_run_dir, stage3
from .progress import progress
from .ranking import Ranking
from .rundir import RunDir
from .strategy_plan import (
    Strategy,
    equal_time_strategies,
    kept_step_times,
    only_strategies,
    plan_strategies,
    step_timing_path,
)
from .strategy_summary import summarise_strategies

if TYPE_CHECKING:
    from collections.abc import Callable

    import datasets
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def _settings_sha256(cfg: RunConfig, ranking_path: Path) -> str:
    """What a strategy run depends on besides its selection and seed: the stage-3 settings (model, data,
    LoRA, schedule) and the ranking the selections come from."""
    blob = cfg.stage_sha256("stage3") + hashlib.sha256(ranking_path.read_bytes()).hexdigest()
    return hashlib.sha256(blob.encode()).hexdigest()


def _reuse(done: Path, settings: str) -> dict[str, Any]:
    """A finished run's result, if it was fine-tuned with these settings."""
    result = read_json(done, "strategy result")
    if result.get("settings_sha256") != settings:
        raise IlaError(
            f"{done.parent} was fine-tuned with other settings (config or ranking) than this comparison's; "
            "use another --out, or remove that folder to run it again"
        )
    return result


PEAK_RSS_OWN_PROCESS = "peak resident set size of the fine-tune's own process"
"""``peak_memory_kind`` of an isolated CPU run. Records that say "process resident set size" were measured
with ``ru_maxrss``, which also counts the peak of the process that started the fine-tune: an upper bound."""


def _finetune(rc: RunConfig, folder: Path, data: Path, isolated: bool = True) -> dict[str, Any]:
    """Stage 3 for one strategy; without a CUDA peak, the process's peak resident set size stands in."""
    summary = stage3(rc, folder, data=data)
    if summary.get("peak_memory_mb") is None:
        summary["peak_memory_mb"] = peak_resident_mb()
        summary["peak_memory_kind"] = (
            PEAK_RSS_OWN_PROCESS
            if isolated
            else "peak resident set size of the process so far (not isolated)"
        )
    return summary


def _finetune_isolated(rc: RunConfig, folder: Path, data: Path) -> dict[str, Any]:
    return _in_own_process(_finetune, rc, folder, data)


def _in_own_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a fresh process. A stop of this one (Ctrl-C, a SIGTERM sent to it alone) stops that
    process too: leaving the pool would otherwise wait for a whole fine-tune to finish before the stop took
    effect, and the fine-tune would write on in a run dir that a resumed call takes up again."""
    # spawn, not fork: a forked child inherits the parent's resident pages and its peak RSS with them.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        future = pool.submit(fn, *args)
        try:
            return future.result()
        except BaseException:
            # ProcessPoolExecutor has no public way to stop a busy worker before Python 3.14
            terminate = getattr(pool, "terminate_workers", None)
            if terminate is not None:
                terminate()
            else:
                for process in list((pool._processes or {}).values()):
                    process.terminate()
            raise


def _strategy_config(cfg: RunConfig, strat: Strategy, ranking_path: Path) -> RunConfig:
    """The comparison's settings with this strategy's selection, seed, LoRA rank and steps."""
    rc = copy.deepcopy(cfg)
    rc.seed = cfg.seed + strat.seed
    if strat.rank is not None:  # the same scale alpha / r at another rank
        rc.lora.alpha = cfg.lora.alpha * strat.rank / cfg.lora.r
        rc.lora.r = strat.rank
    if strat.steps is not None:
        rc.stage3.train.max_steps = strat.steps
    rc.stage3.ranking = str(ranking_path)
    rc.stage3.selection.mode = "list"
    rc.stage3.selection.layers = list(strat.layers)
    return rc


def _time_steps(
    cfg: RunConfig, strat: Strategy, ranking_path: Path, folder: Path, isolate: bool, data: Path
) -> float:
    """The median seconds of one of ``strat``'s training steps, from
    :data:`ila.strategy_plan.TIMING_STEPS` steps with its settings (its first batches, in its order) in
    ``folder``, which is removed after."""
    rc = _strategy_config(cfg, strat, ranking_path)
    rc.stage3.train.max_steps = strategy_plan.TIMING_STEPS
    rc.stage3.train.eval_heldout = False
    shutil.rmtree(folder, ignore_errors=True)  # a timing cut short: never resumed from its checkpoints
    prepare_run_dir(rc, folder)
    summary = _finetune_isolated(rc, folder, data) if isolate else _finetune(rc, folder, data, isolated=False)
    shutil.rmtree(folder)
    return summary["median_step_seconds"]


def _run_strategy(
    cfg: RunConfig,
    strat: Strategy,
    ranking_path: Path,
    folder: Path,
    tokenizer: PreTrainedTokenizerBase,
    heldout: datasets.Dataset,
    general: datasets.Dataset,
    isolate: bool,
    data: Path,
) -> dict[str, Any]:
    """Fine-tune one strategy in ``folder`` (stage 3 with its selection) and measure it."""
    log.info("strategy %s (seed %d): %d layers", strat.name, strat.seed, len(strat.layers))
    rc = _strategy_config(cfg, strat, ranking_path)
    # the final held-out loss is measured below; during training only where a curve is asked for
    rc.stage3.train.eval_heldout = rc.stage3.train.eval_steps > 0
    prepare_run_dir(rc, folder)
    start = time.perf_counter()
    summary = _finetune_isolated(rc, folder, data) if isolate else _finetune(rc, folder, data, isolated=False)
    seconds = time.perf_counter() - start
    run_dir = RunDir(folder)
    result_dir = run_dir.stage3_output(rc.stage3.method)
    curve_path = run_dir.stage("stage3") / "heldout_curve.jsonl"
    curve = [
        {"step": c["step"], "loss": c["loss"], "ci95": c["ci95"]}
        for c in (read_jsonl(curve_path) if curve_path.is_file() else [])
    ]
    model = load_result(rc.model, result_dir)
    batch = rc.stage3.train.batch_size
    batching = choose_batching(model, rc.data.padding_free)
    sums, counts = example_losses(model, tokenizer, heldout, batch_size=batch, batching=batching)
    quality = summarise(sums, counts)
    f_sums, f_counts = example_losses(model, tokenizer, general, batch_size=batch, batching=batching)
    forgetting = summarise(f_sums, f_counts)
    result = {
        "name": strat.name,
        "run": strat.run,
        "family": strat.family,
        "fraction": strat.fraction,
        "seed": strat.seed,
        "num_layers": len(strat.layers),
        "lora_rank": rc.lora.r,
        "heldout_loss": quality["loss"],
        "heldout_ci95": quality["ci95"],
        "heldout_perplexity": quality["perplexity"],
        # per held-out example: what the paired comparison with `all` resamples
        "heldout_examples": {"sums": sums.tolist(), "counts": counts.tolist()},
        "forgetting_loss": forgetting["loss"],
        "forgetting_ci95": forgetting["ci95"],
        "forgetting_examples": {"sums": f_sums.tolist(), "counts": f_counts.tolist()},
        "benchmarks": {},
        "trainable_parameters": summary["trainable_parameters"],
        "steps": summary["steps"],
        "seconds_per_step": summary["seconds_per_step"],
        "median_step_seconds": summary.get("median_step_seconds"),
        "peak_memory_mb": summary["peak_memory_mb"],
        "peak_memory_kind": summary.get("peak_memory_kind", "CUDA max allocated"),
        "train_seconds": seconds,
        # an equal-time run: the training time of `all` its steps were sized to (all's steps x its step
        # time, timed beside this run's)
        "reference_seconds": strat.reference_seconds,
        "timed_step_seconds": list(strat.timed_step_seconds) if strat.timed_step_seconds else None,
        # step times depend on the machine, and losses can: a report says when its runs span several
        "machine": describe_machine(rc.model.device),
        # the held-out loss during training (stage3.train.eval_steps): where each strategy levels off
        "heldout_curve": curve,
    }
    return result


def run_strategies(
    cfg: RunConfig,
    ranking_path: Path,
    out: Path,
    *,
    tasks: tuple[str, ...] = (),
    limit: int | None = None,
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    strategies: list[Strategy] | None = None,
    isolate: bool | None = None,
    others: dict[str, Ranking] | None = None,
    generate: int = 0,
    seeds: int = 1,
    data: Path | None = None,
    only: list[str] | None = None,
    equal_time: list[str] | None = None,
) -> dict[str, Any]:
    """Fine-tune and evaluate every run (:func:`plan_strategies` with ``seeds``); completed ones (their
    ``result.json``) are reused.

    ``tasks`` (lm-eval, with ``limit`` documents each and IFEval answers of at most ``max_gen_toks`` tokens)
    are scored on every reported run's saved model, finished runs included, and on the base model
    (``out/base/benchmarks.json``); a run trained in this call is scored as soon as it finishes, one finished
    in an earlier call before anything trains, and a score is reused while its settings are the same.

    ``isolate`` (default: on unless the model runs on CUDA) fine-tunes each strategy in its own process so
    that peak memory is measured per strategy. ``data`` holds the tokenized examples (default ``out/data``;
    the run directory's ``data`` folder shares the run's). ``only`` keeps the runs whose strategy or run
    name matches one of these patterns (:func:`only_strategies`); ``equal_time`` (patterns too) runs those of
    the kept runs again with the steps that fill ``all``'s training time (:func:`equal_time_strategies`).
    ``generate`` > 0 also answers the first
    ``generate`` MT-Bench questions with the base model, ``all`` and the ILA selections
    (``generations.md``)."""
    if isolate is None:
        isolate = not (
            cfg.model.device.startswith("cuda") or (cfg.model.device == "auto" and torch.cuda.is_available())
        )
    ranking = Ranking.load(ranking_path)
    if strategies is None:
        widths = layer_widths(cfg.model) if cfg.stage3.method == "lora" else None
        strategies = plan_strategies(ranking, others=others, seeds=seeds, widths=widths, rank=cfg.lora.r)
    if only:
        strategies = only_strategies(strategies, only)
    if equal_time:
        only_strategies(strategies, equal_time)  # a pattern that matches no run fails before any training
    # seed by seed: a comparison cut short has the first seed of every strategy before any second one
    strategies = sorted(strategies, key=lambda s: s.seed)
    out.mkdir(parents=True, exist_ok=True)
    data = data or out / "data"
    results = []
    heldout = general = None
    tokenizer = load_tokenizer(cfg.model)
    settings = _settings_sha256(cfg, ranking_path)
    bench_settings = benchmark_settings(tokenizer, cfg, tasks, limit, max_gen_toks) if tasks else None
    if tasks:
        offline_task_folder(tasks)  # a task without its data fails here, before any training

    def score(result: dict[str, Any]) -> None:
        folder = out / result["run"]
        model = RunDir(folder).stage3_output(cfg.stage3.method)
        if fill_benchmarks(cfg, result, model, bench_settings, folder / "eval" / "ifeval.jsonl"):
            write_json_atomic(folder / "result.json", result)

    def fit(planned: list[Strategy], what: str) -> None:
        nonlocal heldout, general
        for strat in progress(planned, what, total=len(planned), unit="strategy"):
            done = out / strat.run / "result.json"
            if done.is_file():
                results.append(_reuse(done, settings))
                if bench_settings:
                    # scored now, before hours of training that a cut-off could end with its model gone
                    score(results[-1])
                continue
            if heldout is None:
                heldout = load_datasets(cfg, tokenizer, out / ".data", data)[1]
            if general is None:
                general = general_text_rows(tokenizer, max_length=cfg.data.max_length)
            result = _run_strategy(
                cfg, strat, ranking_path, out / strat.run, tokenizer, heldout, general, isolate, data
            )
            result["settings_sha256"] = settings
            write_json_atomic(done, result)
            results.append(result)
            if bench_settings:
                # scored while its adapter is surely there: a comparison cut off later keeps the scores
                score(result)

    fit(strategies, "strategies")
    if equal_time:
        # after the runs they lengthen; `all` may have run in an earlier call
        known = {r["run"]: r for r in results}
        for pattern in ("all-seed*/result.json", "*-equal-time-seed*/result.json"):
            for done in sorted(out.glob(pattern)):
                known.setdefault(done.parent.name, _reuse(done, settings))

        def step_times(strat: Strategy) -> tuple[float, float]:  # the run and `all`, back to back
            ref = Strategy("all", "all", 1.0, tuple(ranking.order), seed=strat.seed)

            def measure() -> tuple[float, float]:
                own, theirs = (_time_steps(cfg, s, ranking_path, out / ".timing" / s.run, isolate, data)
                               for s in (strat, ref))  # fmt: skip
                return own, theirs

            return kept_step_times(step_timing_path(out, strat.run), settings, measure)

        longer = equal_time_strategies(strategies, list(known.values()), equal_time, step_times)
        longer.sort(key=lambda s: s.seed)
        fit(longer, "equal-time strategies")
        strategies += longer
    # the other seeds of these strategies that an earlier call ran (--seeds 3 --only ...), and their
    # equal-time runs (--equal-time): reported too
    planned = {s.run for s in strategies}
    names = list(dict.fromkeys(s.name for s in strategies))
    names += [f"{n}-equal-time" for n in names if not n.endswith("-equal-time")]
    for name in dict.fromkeys(names):
        for done in sorted(out.glob(f"{name}-seed*/result.json")):
            if done.parent.name not in planned and done.parent.name[len(name) + 5 :].isdigit():
                results.append(_reuse(done, settings))
    base_bench: dict[str, Any] = {}
    if bench_settings:
        for result in progress(results, "benchmarks", total=len(results), unit="run"):
            score(result)  # the runs that finished before this call
        base_path = out / "base" / "benchmarks.json"
        base_bench = read_json(base_path, "base benchmarks") if base_path.is_file() else {}
        if fill_benchmarks(cfg, base_bench, None, bench_settings, out / "base" / "ifeval.jsonl"):
            write_json_atomic(base_path, base_bench)
    if generate > 0:
        # The base model, plain LoRA and the ILA selections: enough for a person to read the difference.
        adapters = {
            s.name: RunDir(out / s.run).stage3_output(cfg.stage3.method)
            for s in strategies
            if s.family in ("all", "ila-drop-bottom", "ila-top") and s.seed == 0
        }
        write_generations(cfg, adapters, generate, out / "generations.md")
    if heldout is None:
        heldout = load_datasets(cfg, tokenizer, out / ".data", data)[1]
    # The untuned base model on the same texts: what each strategy's training bought, and what it forgot.
    base_model = load_base_model(cfg.model)
    batch = cfg.stage3.train.batch_size
    batching = choose_batching(base_model, cfg.data.padding_free)
    base = heldout_loss(base_model, tokenizer, heldout, batch_size=batch, batching=batching)
    general = general if general is not None else general_text_rows(tokenizer, max_length=cfg.data.max_length)
    base_forgetting = forgetting_loss(base_model, tokenizer, general, batch_size=batch, batching=batching)
    return {
        **envelope("ila.strategies", schema_version=2),
        "ranking": str(ranking_path),
        "base_heldout_loss": base["loss"],
        "base_heldout_ci95": base["ci95"],
        "base_forgetting_loss": base_forgetting["loss"],
        "base_forgetting_ci95": base_forgetting["ci95"],
        "forgetting_text": text_source(),
        "base_benchmarks": base_bench,
        "results": results,
        "strategies": summarise_strategies(results),
    }
