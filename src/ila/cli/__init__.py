"""The ``ila`` command: a thin wrapper over :mod:`ila.pipeline`.

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
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from ._version import __version__
from .config import RunConfig, load_config
from .errors import IlaError
from .rundir import RunDir
from .scorers import SCORER_NAMES

EXAMPLES = __doc__.split("Examples::", 1)[1]


def _common(p: argparse.ArgumentParser, needs_run_dir: bool = False) -> None:
    p.add_argument(
        "--config",
        "-c",
        help="YAML run config (default: the builtin SmolLM2 defaults, or the run "
        "directory's config.yaml when it has one)",
    )
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, repeatable, e.g. --set stage2.learning_rate=0.1",
    )
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
    p.add_argument(
        "--tasks",
        nargs="*",
        default=[],
        help="lm-eval tasks: ila_mmlu_dev ila_gsm8k_heldout ila_hhh, or "
        "any lm-eval task name with Hub access",
    )
    p.add_argument("--limit", type=int, help="examples per lm-eval task")
    p.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help="also answer the first N MT-Bench questions with every model, side by side",
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
    p.add_argument("--tasks", nargs="*", default=[], help="lm-eval tasks to score every strategy on")
    p.add_argument("--limit", type=int, help="examples per lm-eval task")
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
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help="also answer the first N MT-Bench questions with base, all-layer and ILA models, side by side",
    )

    p = sub.add_parser(
        "study", help="the stability study: rankings across datasets, seeds, milestones, models"
    )
    p.add_argument("--config", "-c", required=True, help="study config (see configs/study.yaml)")
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every run of the study, e.g. --set stage2.steps=10",
    )
    p.add_argument("--out", "-o", required=True, help="study folder (runs/, report.md, study.json, plots/)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")


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


def _selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ranking", metavar="RANKING", help="a ranking.json (e.g. runs/demo/stage2/ranking.json)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--top", type=float, metavar="FRACTION", help="the top FRACTION of layers")
    g.add_argument(
        "--drop-bottom", type=float, metavar="FRACTION", help="every layer but the bottom FRACTION"
    )
    g.add_argument("--layers", nargs="+", metavar="NAME", help="exactly these layers (full module names)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def _selection_of(args: argparse.Namespace) -> tuple[str, float | None, tuple[str, ...]] | None:
    """(mode, fraction, layers) of --top / --drop-bottom / --layers, the same for every command that takes
    them; None when none is given."""
    if getattr(args, "top", None) is not None:
        return "top", args.top, ()
    if getattr(args, "drop_bottom", None) is not None:
        return "drop_bottom", args.drop_bottom, ()
    if getattr(args, "layers", None):
        return "list", None, tuple(args.layers)
    return None


def _resolve(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    overrides = list(args.overrides)
    if getattr(args, "ranking", None):
        overrides.append(f"stage3.ranking={args.ranking}")
    chosen = _selection_of(args)
    if chosen is not None:
        mode, fraction, layers = chosen
        overrides.append(f"stage3.selection.mode={mode}")
        overrides.append("stage3.selection.layers=" + json.dumps(list(layers)))
        if fraction is not None:
            overrides.append(f"stage3.selection.fraction={fraction}")
    run_dir = (
        Path(args.run_dir) if args.run_dir else Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    config = args.config
    if config is None and (run_dir / "config.yaml").is_file():
        config = run_dir / "config.yaml"
    return load_config(config, overrides), run_dir


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.invocation = "ila " + " ".join(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("ila").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    _terminate_like_ctrl_c()
    try:
        return COMMANDS[args.command](args)
    except IlaError as e:
        print(f"ila: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "ila: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr
        )
        return 130
    except OSError as e:
        # A full disk or a read-only folder: every artefact is written atomically, so nothing half-written
        # is left for a later stage to trust.
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(
            f"ila: error: could not read or write a file{where}: {e.strerror or e}. Nothing incomplete was "
            "kept; free space or fix the path and run the same command again to resume",
            file=sys.stderr,
        )
        return 1


# -------------------------------------------------------------------------------------------------------
# one handler per command; the library modules are imported only once the arguments are known to be valid


def _config_command(args: argparse.Namespace) -> int:
    cfg, _ = _resolve(args)
    print(cfg.to_yaml(), end="")
    return 0


def _run_command(args: argparse.Namespace) -> int:
    from .pipeline import run_all

    cfg, run_dir = _resolve(args)
    _print_summary(run_all(cfg, run_dir, redo=args.redo), run_dir)
    return 0


def _train_command(args: argparse.Namespace) -> int:
    from .pipeline import prepare_run_dir, stage1

    cfg, run_dir = _resolve(args)
    prepare_run_dir(cfg, run_dir)
    s = stage1(cfg, run_dir)
    rd = RunDir(run_dir)
    print(f"stage 1: {s['steps']} steps, held-out loss {s['heldout_loss']}")
    print(f"adapters: {rd.milestones} and {rd.stage1_final}")
    return 0


def _score_command(args: argparse.Namespace) -> int:
    from .pipeline import prepare_run_dir, stage2

    cfg, run_dir = _resolve(args)
    prepare_run_dir(cfg, run_dir)
    ranking = stage2(cfg, run_dir, adapter=args.adapter, scorer=args.scorer)
    print("top layers: " + ", ".join(ranking.order[:5]))
    print(f"ranking: {RunDir(run_dir).ranking(ranking.scorer)}")
    return 0


def _finetune_command(args: argparse.Namespace) -> int:
    from .pipeline import prepare_run_dir, stage3

    cfg, run_dir = _resolve(args)
    prepare_run_dir(cfg, run_dir)
    s = stage3(cfg, run_dir)
    print(f"stage 3: {s['num_selected']} of {s['num_layers']} layers, held-out loss {s['heldout_loss']}")
    print(f"{'adapter' if 'adapter' in s else 'model'}: {s.get('adapter') or s.get('model')}")
    return 0


def _study_command(args: argparse.Namespace) -> int:
    from .study import load_study, run_study

    report = run_study(load_study(args.config, args.overrides), args.out, command=args.invocation)
    print(report.read_text())
    print(f"report: {report}")
    return 0


def _compare_strategies_command(args: argparse.Namespace) -> int:
    from .strategies import compare_strategies

    cfg, run_dir = _resolve(args)
    report = compare_strategies(
        cfg,
        run_dir,
        Path(args.out),
        tasks=tuple(args.tasks),
        limit=args.limit,
        isolate=args.isolate,
        scorers=tuple(args.scorers),
        generate=args.generate,
        command=args.invocation,
    )
    print(report.read_text())
    print(f"results: {report.parent}")
    return 0


def _evaluate_command(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_run

    cfg, run_dir = _resolve(args)
    adapters = dict(a.split("=", 1) if "=" in a else (Path(a).name, a) for a in args.adapter)
    out = evaluate_run(
        cfg, run_dir, adapters or None, tasks=args.tasks, limit=args.limit, generate=args.generate
    )
    for label, entry in out["results"].items():
        print(f"{label:>20}: " + ", ".join(f"{k} {v}" for k, v in entry.items() if k != "adapter"))
    if args.generate:
        print(f"generations: {out['generations']}")
    print(f"results: {out['path']}")
    return 0


def _terminate_like_ctrl_c() -> None:
    """SIGTERM (a scheduler stopping the job) ends the run like Ctrl-C: no traceback, a resumable run dir."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):  # noqa: ANN001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _selection_command(args: argparse.Namespace) -> int:
    """``ila select`` and ``ila export``: read a ranking, apply --top / --drop-bottom / --layers."""
    from . import export
    from .ranking import Ranking

    ranking = Ranking.load(args.ranking)
    mode, fraction, layers = _selection_of(args) or ("list", None, ())
    names = ranking.select(mode, fraction, layers)
    what = "explicit list" if mode == "list" else f"{mode.replace('_', '-')} {fraction:g}"
    if args.command == "export":
        out = Path(args.out) if args.out else export.default_export_dir(args.ranking, mode, fraction, names)
        summary = export.export_selection(
            ranking,
            names,
            out,
            r=args.r,
            alpha=args.alpha,
            dropout=args.dropout,
            mode=mode,
            fraction=fraction,
            ranking_path=args.ranking,
        )
        print(export.render_export(summary))
        return 0
    if not args.dry_run:
        print("\n".join(names))
        return 0
    from .config import ModelConfig
    from .models import load_base_model

    name = args.model or ranking.base_model.get("name")
    if not name:
        raise IlaError("the ranking records no base model name; pass --model NAME_OR_PATH")
    # bfloat16 halves the memory of a model that is only counted, never run
    model = load_base_model(ModelConfig(name=str(name), dtype="bfloat16"))
    result = export.dry_run(ranking, names, model, args.method, args.r, model_name=str(name))
    print(export.render_dry_run(result, what))
    return 0


def _compare_command(args: argparse.Namespace) -> int:
    """``ila compare``: overlap statistics, compare.json, compare.md and figures for ranking files
    (:func:`ila.overlap.write_comparison`)."""
    from .overlap import write_comparison  # lazily: it imports torch (through ila.ranking)

    if args.labels and len(args.labels) != len(args.rankings):
        raise IlaError(
            f"{len(args.labels)} --labels for {len(args.rankings)} rankings; give one label per ranking"
        )
    written = write_comparison(
        args.rankings,
        args.out,
        args.labels,
        args.fractions,
        level=args.level,
        mapping=args.mapping,
        buckets=args.buckets,
        plots=not args.no_plots,
        warn=lambda msg: print(f"ila: warning: {msg}", file=sys.stderr),
    )
    if written.result is None:
        print(
            f"one ranking: wrote its heat map {written.out / written.files[0]}; "
            "pass two or more rankings to compare them"
        )
        return 0
    print(written.markdown, end="")
    print()
    print(f"wrote {len(written.files)} files to {written.out}: " + ", ".join(written.files))
    return 0


def _fmt(x: object) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _stability_phrase(s1: dict) -> str:
    """How stage 1 ended with respect to epsilon-stability, in words."""
    if s1.get("stable_at_step") is None:
        return "not epsilon-stable within the planned steps"
    return f"epsilon-stable at step {s1['stable_at_step']}"


def _print_summary(out: dict, run_dir: Path) -> None:
    s1, s2, s3 = out["stage1"], out["stage2"], out["stage3"]
    print()
    print(f"ILA run complete: {run_dir}")
    print(f"  base     held-out loss {_fmt(s1.get('base_heldout_loss'))}")
    print(
        f"  stage 1  {s1['steps']} steps on all {s1['layers']['num_layers']} layers, held-out loss "
        f"{_fmt(s1['heldout_loss'])}, {_stability_phrase(s1)}"
    )
    if s1.get("stopped_when_stable"):
        saved = s1["steps_saved"]
        print(
            f"           stopped when stable: {saved} of {s1['planned_steps']} planned steps saved "
            f"({100 * saved / s1['planned_steps']:.0f} %)"
        )
    print(f"  stage 2  {s2['steps']} steps, top layers: {', '.join(s2['top10'][:3])} ...")
    print(
        f"  stage 3  {s3['num_selected']}/{s3['num_layers']} layers, "
        f"{s3['trainable_parameters']:,} trainable parameters, held-out loss {_fmt(s3['heldout_loss'])}"
    )
    print("outputs:")
    print(f"  config      {run_dir / 'config.yaml'}")
    print(f"  milestones  {run_dir / 'stage1' / 'milestones'}")
    print(f"  ranking     {s2['ranking']}")
    if "adapter" in s3:
        print(f"  adapter     {s3['adapter']}   (PeftModel.from_pretrained(base, this folder))")
    else:
        print(f"  model       {s3['model']}   (AutoModelForCausalLM.from_pretrained(this folder))")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _run_command,
    "train": _train_command,
    "score": _score_command,
    "finetune": _finetune_command,
    "config": _config_command,
    "evaluate": _evaluate_command,
    "compare-strategies": _compare_strategies_command,
    "study": _study_command,
    "select": _selection_command,
    "export": _selection_command,
    "compare": _compare_command,
}


if __name__ == "__main__":
    sys.exit(main())
