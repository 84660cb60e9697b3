"""The stability study: do the important layers agree across datasets, seeds, milestones and models?

    ila study --config study --out runs/study

Runs stage 1 for every (model, dataset, seed) the study names, stage 2 on each chosen stage-1 milestone,
then compares the rankings with :mod:`ila.overlap` (Jaccard of the top-k with random baselines and p-values,
Spearman and Kendall) and writes ``report.md``, ``study.json`` and plots. The paper's findings it checks
(Shi et al., arXiv 2410.17875): ~90 % overlap across alignment datasets, 86 % across reasoning datasets,
agreement across seeds and from 25 % of training, weaker transfer across models. Every run directory is
reused when complete, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import envelope, write_json_atomic, write_text_atomic
from .config import load_config, resolve_config
from .errors import ConfigError
from .overlap import compare_rankings
from .pipeline import SharedBase, prepare_run_dir, stage1, stage2, stage_done
from .plots import PlotsUnavailable, new_figure, plot_jaccard_matrix, plot_overlap_curve, plot_ranking_heatmap
from .ranking import Ranking
from .rundir import RunDir, milestone_name
from .scorers import SCORER_NAMES
from .strict import from_dict, read_yaml_mapping

log = logging.getLogger(__name__)

# What the paper reports for each kind of comparison (Shi et al., arXiv 2410.17875), shown beside ours.
PAPER = {
    "datasets": "~0.90 (Alpaca-GPT4, LIMA, No Robots; LLaMA-2-7B)",
    "reasoning": "0.86 (LIMO, s1.1)",
    "seeds": "stable across seeds",
    "milestone": "25 % of training already agrees",
    "models": "weaker across models (~0.7 in one summary)",
    "code": "not in the paper (an open question: do alignment rankings transfer to code?)",
}


@dataclass
class StudyConfig:
    """What the study runs. Run settings come from ``base`` plus ``overrides`` (and per-model overrides)."""

    base: str = "smollm2"
    overrides: list[str] = field(default_factory=list)
    models: dict[str, list[str]] = field(default_factory=lambda: {"smollm2": []})
    """Model name -> extra overrides for that model (e.g. a smaller batch)."""
    alignment: list[str] = field(default_factory=lambda: ["sharegpt", "chitchat", "mtbench"])
    reasoning: list[str] = field(default_factory=lambda: ["gsm8k"])
    code: list[str] = field(default_factory=list)
    """Code datasets (``humaneval``): a third domain, each compared with the alignment seed dataset."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed_dataset: str = "sharegpt"
    """Dataset on which every seed is run (the other datasets use the first seed)."""
    milestones: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    """Stage-1 milestones that stage 2 ranks (the last one is the reference)."""
    cross_model_datasets: list[str] = field(default_factory=lambda: ["sharegpt", "gsm8k"])
    """Datasets run on every model besides the first, for the cross-model comparison."""
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5])
    scorers: list[str] = field(default_factory=list)
    """Other scorers (``taylor``, ``update-norm``, ``snr``, ``block-influence``...) run on every run's last
    milestone beside the ILA gates: their rankings are compared across datasets and seeds like ILA's, and
    with ILA's."""

    def validate(self) -> StudyConfig:
        if not self.models:
            raise ConfigError("models: name at least one model")
        if not self.seeds:
            raise ConfigError("seeds: name at least one seed")
        if not self.milestones or any(not 0 < m <= 1 for m in self.milestones):
            raise ConfigError("milestones: fractions in (0, 1]")
        if self.seed_dataset not in self.alignment + self.reasoning + self.code:
            raise ConfigError(f"seed_dataset: {self.seed_dataset} is not among the datasets")

        for scorer in self.scorers:
            if scorer not in SCORER_NAMES or scorer == "ila":
                others = ", ".join(n for n in SCORER_NAMES if n != "ila")
                raise ConfigError(
                    f"scorers: unknown scorer {scorer!r} (choose from {others}; ila always runs)"
                )
        return self


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """The study config at ``path`` (or a builtin by name: ``study``). Its ``base`` run config is a path, a
    path beside the study file, or a builtin name."""
    p = resolve_config(path, "study config")
    cfg = from_dict(StudyConfig, read_yaml_mapping(p, "study config")).validate()
    cfg.overrides = cfg.overrides + list(overrides or [])
    beside = p.parent / cfg.base
    if not Path(cfg.base).is_file() and beside.is_file():
        cfg.base = str(beside)
    cfg.base = str(resolve_config(cfg.base, "study base config"))
    return cfg


@dataclass(frozen=True)
class StudyRun:
    model: str
    dataset: str
    seed: int

    @property
    def key(self) -> str:
        return f"{_slug(self.model)}/{_slug(self.dataset)}/seed{self.seed}"


def _slug(name: str) -> str:
    """A folder-safe label for a model or dataset given by name or by path."""
    base = Path(name).name if ("/" in name or "." in name) else name
    base = base.rsplit(".", 1)[0] if base.endswith((".json", ".jsonl")) else base
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in base) or "x"


def planned_runs(cfg: StudyConfig) -> list[StudyRun]:
    models = list(cfg.models)
    first = models[0]
    runs = [StudyRun(first, d, cfg.seeds[0]) for d in cfg.alignment + cfg.reasoning + cfg.code]
    runs += [StudyRun(first, cfg.seed_dataset, s) for s in cfg.seeds[1:]]
    for m in models[1:]:
        runs += [StudyRun(m, d, cfg.seeds[0]) for d in cfg.cross_model_datasets]
    return runs


def _run_config(cfg: StudyConfig, run: StudyRun) -> Any:
    overrides = (
        cfg.overrides
        + cfg.models[run.model]
        + [
            f"model.name={run.model}",
            f"data.name={run.dataset}",
            f"seed={run.seed}",
            f"data.seed={run.seed}",
            "stage1.milestones=[" + ", ".join(f"{m:g}" for m in sorted(set(cfg.milestones) | {1.0})) + "]",
        ]
    )
    return load_config(cfg.base, overrides)


def ranking_file(out: Path, run: StudyRun, milestone: float, scorer: str = "ila") -> Path:
    name = "ranking.json" if scorer == "ila" else f"ranking-{scorer}.json"
    return out / "runs" / run.key / f"rank-{milestone_name(milestone)}" / "stage2" / name


def _targets(cfg: StudyConfig, out: Path, run: StudyRun) -> dict[str, Path]:
    """Every ranking file of one run: one per milestone, and the cheap scorers' at the last."""
    last = max(cfg.milestones)
    targets = {milestone_name(m): ranking_file(out, run, m) for m in cfg.milestones}
    return targets | {f"{milestone_name(last)}:{s}": ranking_file(out, run, last, s) for s in cfg.scorers}


def execute(cfg: StudyConfig, out: Path) -> dict[str, dict[str, Path]]:
    """Stage 1 and the milestone stage-2 runs of every planned run; complete ones are reused, and a run
    whose every ranking is there needs no stage 1 (the rankings are what a results folder keeps, and a
    fresh checkout restores, without the adapters). A ranking made with other settings than its run's
    (the study config changed since) is refused, not reused."""
    done: dict[str, dict[str, Path]] = {}
    last = max(cfg.milestones)
    for run in planned_runs(cfg):
        targets = _targets(cfg, out, run)
        rc = _run_config(cfg, run)
        for t in targets.values():
            if t.is_file() and Ranking.load(t).config_sha256 not in (None, rc.sha256()):
                raise ConfigError(
                    f"{t} was made with other settings than the study's run {run.key} has now; remove "
                    f"{out / 'runs' / run.key} to make it again, or use another --out"
                )
        if all(t.is_file() for t in targets.values()):
            done[run.key] = targets
            continue
        run_dir = out / "runs" / run.key
        base = SharedBase(rc)  # theta_0 read once for the run's stage 1 and all its stage-2 runs
        data = RunDir(run_dir).data  # and the examples tokenized once
        if not stage_done(run_dir, "stage1", rc):
            log.info("study: stage 1 of %s", run.key)
            prepare_run_dir(rc, run_dir)
            stage1(rc, run_dir, base=base)
        done[run.key] = {}
        for m in cfg.milestones:
            target = ranking_file(out, run, m)
            if not target.is_file():
                log.info("study: stage 2 of %s at %s%%", run.key, milestone_name(m))
                sub = target.parent.parent
                prepare_run_dir(rc, sub)
                stage2(rc, sub, adapter=RunDir(run_dir).milestone(m), base=base, data=data)
            done[run.key][milestone_name(m)] = target
        for scorer in cfg.scorers:
            target = ranking_file(out, run, last, scorer)
            if not target.is_file():
                log.info("study: %s scores of %s", scorer, run.key)
                adapter = RunDir(run_dir).milestone(last)
                stage2(rc, target.parent.parent, adapter=adapter, scorer=scorer, base=base, data=data)
            done[run.key][f"{milestone_name(last)}:{scorer}"] = target
    return done


# ---------------------------------------------------------------------------------------------------------
# analysis


def _summarise(result: dict[str, Any], fraction: float) -> dict[str, Any]:
    """Mean Jaccard, mean random expectation and the largest p-value over the pairs, at one fraction."""
    js, es, ps = [], [], []
    for pair in result["pairs"]:
        o = next(x for x in pair["fractions"] if abs(x["fraction"] - fraction) < 1e-9)
        js.append(o["jaccard"])
        es.append(o["expected_random"])
        ps.append(o["p_value"])
    rho = [p["spearman"] for p in result["pairs"] if p["spearman"] is not None]
    return {
        "pairs": len(js),
        "mean_jaccard": sum(js) / len(js),
        "mean_random": sum(es) / len(es),
        "max_p_value": max(ps),
        "mean_spearman": sum(rho) / len(rho) if rho else None,
    }


def analyse(cfg: StudyConfig, files: dict[str, dict[str, Path]], out: Path) -> dict[str, Any]:
    """Every comparison group of the study: one per claim of the paper (datasets, reasoning, seeds,
    milestones, models) and one per extra scorer, each with the paper's figure beside it. Long because it
    is a list of declarations, one ``add`` per group in report order, not because of its logic."""
    last = milestone_name(max(cfg.milestones))
    first_model = list(cfg.models)[0]
    seed0 = cfg.seeds[0]

    def load(model: str, dataset: str, seed: int, milestone: str = last) -> Ranking:
        return Ranking.load(files[StudyRun(model, dataset, seed).key][milestone])

    groups: dict[str, dict[str, Any]] = {}
    paper: dict[str, str] = {}

    def add(name: str, rankings: list[Ranking], labels: list[str], figure: str = "", **kw: Any) -> None:
        if len(rankings) >= 2:
            groups[name] = compare_rankings(rankings, labels, cfg.fractions, **kw)
            paper[name] = figure

    align = cfg.alignment
    add(
        "alignment datasets",
        [load(first_model, d, seed0) for d in align],
        [_slug(d) for d in align],
        PAPER["datasets"],
    )
    if len(cfg.reasoning) >= 2:
        add(
            "reasoning datasets",
            [load(first_model, d, seed0) for d in cfg.reasoning],
            [_slug(d) for d in cfg.reasoning],
            PAPER["reasoning"],
        )
    if cfg.reasoning:
        add(
            "alignment vs reasoning",
            [load(first_model, cfg.seed_dataset, seed0), load(first_model, cfg.reasoning[0], seed0)],
            [_slug(cfg.seed_dataset), _slug(cfg.reasoning[0])],
        )
    for d in cfg.code:
        add(
            f"alignment vs code ({_slug(d)})",
            [load(first_model, cfg.seed_dataset, seed0), load(first_model, d, seed0)],
            [_slug(cfg.seed_dataset), _slug(d)],
            PAPER["code"],
        )
    add(
        "seeds",
        [load(first_model, cfg.seed_dataset, s) for s in cfg.seeds],
        [f"seed{s}" for s in cfg.seeds],
        PAPER["seeds"],
    )
    for m in cfg.milestones:
        if milestone_name(m) != last:
            add(
                f"milestone {milestone_name(m)}% vs {last}%",
                [
                    load(first_model, cfg.seed_dataset, seed0, milestone_name(m)),
                    load(first_model, cfg.seed_dataset, seed0),
                ],
                [f"{milestone_name(m)}%", f"{last}%"],
                PAPER["milestone"],
            )
    for other in list(cfg.models)[1:]:
        for d in cfg.cross_model_datasets:
            add(
                f"{_slug(first_model)} vs {_slug(other)} on {_slug(d)}",
                [load(first_model, d, seed0), load(other, d, seed0)],
                [_slug(first_model), _slug(other)],
                PAPER["models"],
                mapping="depth",
            )
        if len(cfg.cross_model_datasets) >= 2:
            a, b = cfg.cross_model_datasets[:2]
            add(
                f"{_slug(other)}: {_slug(a)} vs {_slug(b)}",
                [load(other, a, seed0), load(other, b, seed0)],
                [_slug(a), _slug(b)],
            )
    for scorer in cfg.scorers:
        key = f"{last}:{scorer}"
        add(
            f"{scorer}: alignment datasets",
            [load(first_model, d, seed0, key) for d in align],
            [_slug(d) for d in align],
        )
        add(
            f"{scorer}: seeds",
            [load(first_model, cfg.seed_dataset, s, key) for s in cfg.seeds],
            [f"seed{s}" for s in cfg.seeds],
        )
        add(
            f"ila vs {scorer} on {_slug(cfg.seed_dataset)}",
            [load(first_model, cfg.seed_dataset, seed0), load(first_model, cfg.seed_dataset, seed0, key)],
            ["ila", scorer],
        )
    block_level = {}
    if "alignment datasets" in groups:
        block_level["alignment datasets"] = compare_rankings(
            [load(first_model, d, seed0) for d in cfg.alignment],
            [_slug(d) for d in cfg.alignment],
            cfg.fractions,
            level="block",
        )
    return {"groups": groups, "paper": paper, "block_level": block_level}


def render_report(
    cfg: StudyConfig, analysis: dict[str, Any], seconds: float, command: str, reused: int = 0
) -> str:
    lines = [
        "# Stability of the important layers",
        "",
        f"Command: `{command}`",
        "",
        f"Models: {', '.join(cfg.models)}. Alignment data: {', '.join(cfg.alignment)}. Reasoning data: "
        f"{', '.join(cfg.reasoning)}. Code data: {', '.join(cfg.code) or 'none'}. "
        f"Seeds: {', '.join(map(str, cfg.seeds))} (on {cfg.seed_dataset}). "
        f"Milestones ranked: {', '.join(f'{m:.0%}' for m in cfg.milestones)}. "
        f"Run settings: `{cfg.base}` with `{' '.join(cfg.overrides) or 'no overrides'}`. "
        f"Wall time {seconds / 60:.0f} min"
        + (
            f" in this call, which reused {reused} of the {len(planned_runs(cfg))} runs from earlier calls."
            if reused
            else "."
        ),  # fmt: skip
        "",
        "Jaccard of the top-k layer sets (mean over the pairs of each group), "
        "beside the Jaccard expected of random "
        "sets of the same sizes and the largest one-sided p-value of the pairs (hypergeometric, exact).",
        "",
    ]
    # The paper reports its overlaps for about the top 30 %; its figures go beside that table (or the first).
    paper_at = min(cfg.fractions, key=lambda f: abs(f - 0.3))
    for f in cfg.fractions:
        lines += [
            f"### top {f:.0%}",
            "",
            "| comparison | pairs | Jaccard | random | max p | Spearman | paper |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, result in analysis["groups"].items():
            s = _summarise(result, f)
            rho = f"{s['mean_spearman']:.2f}" if s["mean_spearman"] is not None else "-"
            lines.append(
                f"| {name} | {s['pairs']} | {s['mean_jaccard']:.2f} | {s['mean_random']:.2f} | "
                f"{s['max_p_value']:.1e} | {rho} | "
                f"{analysis['paper'].get(name, '') if f == paper_at else ''} |"
            )
        lines.append("")
    for name, result in analysis["block_level"].items():
        lines += [
            f"Block level ({name}): "
            + ", ".join(
                f"top {f:.0%} Jaccard {_summarise(result, f)['mean_jaccard']:.2f} "
                f"(random {_summarise(result, f)['mean_random']:.2f})"
                for f in cfg.fractions
            ),
            "",
        ]
    return "\n".join(lines) + "\n"


def run_study(cfg: StudyConfig, out: str | Path, command: str = "ila study") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    runs = planned_runs(cfg)
    # the wall time below is this call's: runs finished by an earlier call are in it only as reused
    reused = sum(all(t.is_file() for t in _targets(cfg, out, run).values()) for run in runs)
    files = execute(cfg, out)
    analysis = analyse(cfg, files, out)
    seconds = time.time() - start
    write_json_atomic(
        out / "study.json",
        {
            **envelope("ila.study"),
            "seconds": seconds,
            "runs_reused": reused,  # of len(runs): made by an earlier call, so not in `seconds`
            "runs": {k: {m: str(p) for m, p in v.items()} for k, v in files.items()},
            **analysis,
        },
    )
    _plots(cfg, files, analysis, out)
    report = render_report(cfg, analysis, seconds, command, reused=reused)
    write_text_atomic(out / "report.md", report)
    return out / "report.md"


def _plots(cfg: StudyConfig, files: dict[str, dict[str, Path]], analysis: dict[str, Any], out: Path) -> None:
    try:
        new_figure(1, 1)
    except PlotsUnavailable:  # the study's numbers stand without its figures
        return
    plots = out / "plots"
    last = milestone_name(max(cfg.milestones))
    for key, by_m in files.items():
        plot_ranking_heatmap(
            Ranking.load(by_m[last]), plots / f"heatmap-{key.replace('/', '-')}.png", label=key
        )
    for name, result in analysis["groups"].items():
        slug = "".join(c if c.isalnum() else "-" for c in name)
        plot_overlap_curve(result, plots / f"overlap-{slug}.png")
        if len(result["rankings"]) > 2:
            plot_jaccard_matrix(result, 0.3, plots / f"jaccard-{slug}.png")


__all__ = ["StudyConfig", "load_study", "planned_runs", "run_study", "execute", "analyse"]
