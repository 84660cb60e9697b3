"""The ``ila`` command's parser: one sub-command per stage, measurement and ranking tool.

Examples::

    ila run --config configs/smollm2.yaml --run-dir runs/demo        # stages 1-3
    ila train --config configs/smollm2.yaml --run-dir runs/demo      # stage 1 only
    ila score --run-dir runs/demo --set stage2.milestone=25          # stage 2 on the 25 % milestone
    ila finetune --run-dir runs/demo --top 0.2                       # stage 3 on the top 20 % of layers
    ila run --set model.name=/path/to/model --set data.name=my.jsonl --run-dir runs/mine
    ila select runs/demo/stage2/ranking.json --top 0.2                # the selected layer names, one a line
    ila select runs/demo/stage2/ranking.json --top 0.2 --dry-run      # what would train, per block and type
    ila export runs/demo/stage2/ranking.json --top 0.2                # PEFT, axolotl, LLaMA-Factory, swift
    ila compare runs/a/stage2/ranking.json runs/b/stage2/ranking.json --out cmp   # overlap and plots
    ila report runs/demo                                               # report.md with figures
"""

from __future__ import annotations

import argparse

from .._version import __version__
from ..scorers import SCORER_NAMES

EXAMPLES = __doc__.split("Examples::", 1)[1]


def _overrides_arg(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument(
        "--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=text
    )


def _common(p: argparse.ArgumentParser, needs_run_dir: bool = False) -> None:
    p.add_argument(
        "--config",
        "-c",
        help="YAML run config (default: the builtin SmolLM2 defaults, or the run "
        "directory's config.yaml when it has one)",
    )
    _overrides_arg(p, "dotted override, repeatable, e.g. --set stage2.learning_rate=0.1")
    p.add_argument(
        "--run-dir", "-o", required=needs_run_dir, help="run directory (default for run/train: runs/<time>)"
    )
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ila",
        description="Find the layers of a causal LM that matter for alignment (ILA, arXiv 2410.17875) "
        "and fine-tune only those.",
        epilog="examples:" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ila {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_stage_commands(sub)
    _add_evaluation_commands(sub)
    _add_ranking_commands(sub)
    return parser


def _add_stage_commands(sub: argparse._SubParsersAction) -> None:
    """run, train, score, finetune and config: the commands that work on a run config and directory."""
    p = sub.add_parser("run", help="stage 1, stage 2 and stage 3 in one go")
    _common(p)
    p.add_argument("--redo", action="store_true", help="redo stages that are already complete in the run dir")

    p = sub.add_parser("train", help="stage 1: LoRA on every layer, milestones and epsilon-stability")
    _common(p)

    p = sub.add_parser("score", help="stage 2: learn one gate per layer and write ranking.json")
    _common(p, needs_run_dir=True)
    p.add_argument("--adapter", help="a stage-1 adapter folder to score instead of the run's own milestone")
    p.add_argument(
        "--scorer",
        choices=SCORER_NAMES,
        help="score with this scorer instead of stage2.scorer (written to stage2/ranking-<scorer>.json)",
    )

    p = sub.add_parser("finetune", help="stage 3: LoRA from the base model on the selected layers only")
    _common(p, needs_run_dir=True)
    p.add_argument("--ranking", help="ranking.json to select from (default: the run's stage2/ranking.json)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--top", type=float, metavar="FRACTION", help="tune only the top FRACTION of layers")
    g.add_argument(
        "--drop-bottom", type=float, metavar="FRACTION", help="freeze the bottom FRACTION, tune the rest"
    )
    g.add_argument(
        "--layers", nargs="+", metavar="NAME", help="tune exactly these layers (full module names)"
    )

    p = sub.add_parser("report", help="(re)write RUN_DIR/report.md and its figures from the run's files")
    p.add_argument("run_dir", metavar="RUN_DIR", help="an ila run directory")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")

    p = sub.add_parser("config", help="print the resolved config (defaults, file and overrides) and exit")
    _common(p)


def _add_evaluation_commands(sub: argparse._SubParsersAction) -> None:
    """evaluate, compare-strategies and study: the commands that measure."""
    p = sub.add_parser("evaluate", help="held-out loss and lm-eval benchmarks of the base model and adapters")
    _common(p, needs_run_dir=True)
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="an adapter to evaluate (repeatable); default: the run's stage-3 adapter",
    )
    _measure_args(p, "every model")
    p.add_argument(
        "--generate-ifeval",
        type=int,
        default=0,
        metavar="N",
        help="also answer the first N IFEval prompts with every model, each marked pass or fail",
    )
    p.add_argument(
        "--no-forgetting",
        dest="forgetting",
        action="store_false",
        help="skip the forgetting loss (the loss on general text outside the alignment data)",
    )

    p = sub.add_parser(
        "compare-strategies",
        help="fine-tune with ILA, random, first/last and all layers on the same "
        "budget and compare quality and cost",
    )
    _common(p, needs_run_dir=True)
    p.add_argument(
        "--out", required=True, help="output folder (one sub-folder per strategy; reused when rerun)"
    )
    _measure_args(p, "base, all-layer and ILA models")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="run every strategy with N seeds and report mean, interval and the paired difference with all "
        "(random: at least 3 draws)",
    )
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fine-tune each strategy in its own process so peak memory is its own "
        "(default: on, except on CUDA where the peak counters are reset per run)",
    )
    p.add_argument(
        "--scorers",
        nargs="*",
        default=[],
        metavar="SCORER",
        choices=[n for n in SCORER_NAMES if n != "ila"],
        help="also fine-tune the top 30 %% of these scorers' rankings (computed first where missing)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="STRATEGY",
        help="run and report only these strategies or runs (names or shell patterns, e.g. all ila-top-30 "
        "'random-*' 'all-rank-*' random-30-seed0); the others' finished runs stay in --out for a later call",
    )
    p.add_argument(
        "--equal-time",
        nargs="+",
        default=None,
        metavar="STRATEGY",
        help="run these strategies or runs again with the steps that fill all's training time at the same "
        "seed (from the median step times of the finished runs): quality at equal wall-clock time",
    )

    p = sub.add_parser(
        "study", help="the stability study: rankings across datasets, seeds, milestones, models"
    )
    p.add_argument("--config", "-c", required=True, help="study config (see configs/study.yaml)")
    _overrides_arg(p, "override applied to every run of the study, e.g. --set stage2.steps=10")
    p.add_argument("--out", "-o", required=True, help="study folder (runs/, report.md, study.json, plots/)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def _measure_args(p: argparse.ArgumentParser, models: str) -> None:
    """--tasks, --limit and --generate: what ``evaluate`` and ``compare-strategies`` measure."""
    p.add_argument(
        "--tasks",
        nargs="*",
        default=[],
        help="lm-eval tasks: ila_ifeval ila_mmlu_dev ila_gsm8k_heldout ila_hhh, or any with Hub access",
    )
    p.add_argument("--limit", type=int, help="examples per lm-eval task")
    p.add_argument(
        "--max-gen-toks",
        type=int,
        default=512,
        metavar="N",
        help="the longest IFEval answer, in tokens (default 512; recorded with the results)",
    )
    p.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help=f"also answer the first N MT-Bench questions with {models}, side by side",
    )


def _add_ranking_commands(sub: argparse._SubParsersAction) -> None:
    """select, export and compare: the commands that read ranking files."""
    p = sub.add_parser(
        "select", help="print the layers a selection picks from a ranking; --dry-run: what would train"
    )
    _selection_args(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="load the model, check the ranking is of it, and count what the selection would train",
    )
    p.add_argument(
        "--model",
        metavar="NAME_OR_PATH",
        help="model for the dry run (default: the ranking's base model, e.g. smollm2 or its folder)",
    )
    p.add_argument(
        "--method",
        choices=("lora", "full"),
        default="lora",
        help="count LoRA parameters (default) or the selected modules' weights for full fine-tuning",
    )
    p.add_argument("--r", type=int, default=8, help="LoRA rank for the dry run (default 8)")

    p = sub.add_parser(
        "export", help="write a selection as PEFT, axolotl, LLaMA-Factory and ms-swift configs"
    )
    _selection_args(p)
    p.add_argument(
        "--out", metavar="DIR", help="output folder (default: <ranking dir>/export-<mode>-<fraction>)"
    )
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")

    p = sub.add_parser(
        "compare",
        help="how much rankings agree: top-k overlap (Jaccard) vs chance, rank correlations, heat maps",
    )
    p.add_argument(
        "rankings", nargs="+", metavar="RANKING", help="ranking.json files (one: only its heat map)"
    )
    p.add_argument(
        "--labels",
        nargs="+",
        metavar="LABEL",
        help="a short name per ranking (default: the part of the paths that differs)",
    )
    p.add_argument(
        "--fractions",
        nargs="+",
        type=float,
        metavar="F",
        default=[0.1, 0.2, 0.3, 0.5],
        help="compare the top F of the layers, for each F (default 0.1 0.2 0.3 0.5)",
    )
    p.add_argument(
        "--level",
        choices=("layer", "block"),
        default="layer",
        help="compare layers (default) or blocks ranked by their mean score",
    )
    p.add_argument(
        "--mapping",
        choices=("auto", "name", "depth"),
        default="auto",
        help="match layers by full name, or by (relative depth, module type) across models of "
        "different depth; auto (default): by name when the layer names agree",
    )
    p.add_argument(
        "--buckets",
        type=int,
        metavar="B",
        help="depth buckets for --mapping depth (default: the smaller model's number of blocks)",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: <first ranking's folder>/compare)")
    p.add_argument("--no-plots", action="store_true", help="write compare.json and compare.md only")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")

    p = sub.add_parser(
        "verdict",
        help="the paper's claims against a strategy comparison and a study: agrees, does not, cannot tell",
    )
    p.add_argument(
        "reports",
        nargs="+",
        metavar="REPORT[=REGIME]",
        help="strategies.json or study.json files, each with the regime its numbers come from "
        "(default: its folder's name), e.g. runs/s/strategies.json=converged",
    )
    p.add_argument("--out", metavar="FILE", help="also write the table (Markdown) to FILE")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def _selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ranking", metavar="RANKING", help="a ranking.json (e.g. runs/demo/stage2/ranking.json)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--top", type=float, metavar="FRACTION", help="the top FRACTION of layers")
    g.add_argument(
        "--drop-bottom", type=float, metavar="FRACTION", help="every layer but the bottom FRACTION"
    )
    g.add_argument("--layers", nargs="+", metavar="NAME", help="exactly these layers (full module names)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
