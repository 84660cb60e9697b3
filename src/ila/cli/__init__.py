"""The ``ila`` command: one handler per command (:data:`COMMANDS`), each a thin wrapper over the library;
the parser and its examples are in :mod:`ila.cli.parser`."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .. import export
from ..comparison import write_comparison
from ..config import ModelConfig, RunConfig, load_config
from ..errors import IlaError
from ..evaluation import evaluate_run
from ..models import load_base_model
from ..ranking import Ranking
from ..report import write_report
from ..rundir import RunDir
from .parser import build_parser


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
    from ..pipeline import run_all

    cfg, run_dir = _resolve(args)
    out = run_all(cfg, run_dir, redo=args.redo)
    _print_summary(out, run_dir)
    print(f"  report      {write_report(run_dir)}")
    return 0


def _report_command(args: argparse.Namespace) -> int:
    if not RunDir(args.run_dir).config.is_file():
        raise IlaError(f"{args.run_dir} has no config.yaml: is it an ila run directory?")
    print(write_report(args.run_dir))
    return 0


def _train_command(args: argparse.Namespace) -> int:
    from ..pipeline import prepare_run_dir, stage1

    cfg, run_dir = _resolve(args)
    prepare_run_dir(cfg, run_dir)
    s = stage1(cfg, run_dir)
    rd = RunDir(run_dir)
    print(f"stage 1: {s['steps']} steps, held-out loss {_loss(s.get('heldout'), s['heldout_loss'])}")
    print(f"adapters: {rd.milestones} and {rd.stage1_final}")
    return 0


def _score_command(args: argparse.Namespace) -> int:
    from ..pipeline import prepare_run_dir, stage2

    cfg, run_dir = _resolve(args)
    prepare_run_dir(cfg, run_dir)
    ranking = stage2(cfg, run_dir, adapter=args.adapter, scorer=args.scorer)
    print("top layers: " + ", ".join(ranking.order[:5]))
    print(f"ranking: {RunDir(run_dir).ranking(ranking.scorer)}")
    return 0


def _finetune_command(args: argparse.Namespace) -> int:
    from ..pipeline import prepare_run_dir, stage3

    cfg, run_dir = _resolve(args)
    prepare_run_dir(cfg, run_dir)
    s = stage3(cfg, run_dir)
    loss = _loss(s.get("heldout"), s["heldout_loss"])
    print(f"stage 3: {s['num_selected']} of {s['num_layers']} layers, held-out loss {loss}")
    print(f"{'adapter' if 'adapter' in s else 'model'}: {s.get('adapter') or s.get('model')}")
    return 0


def _study_command(args: argparse.Namespace) -> int:
    from ..study import load_study, run_study

    report = run_study(load_study(args.config, args.overrides), args.out, command=args.invocation)
    print(report.read_text())
    print(f"report: {report}")
    return 0


def _compare_strategies_command(args: argparse.Namespace) -> int:
    from ..strategy_report import compare_strategies

    cfg, run_dir = _resolve(args)
    report = compare_strategies(
        cfg,
        run_dir,
        Path(args.out),
        tasks=tuple(args.tasks),
        limit=args.limit,
        max_gen_toks=args.max_gen_toks,
        isolate=args.isolate,
        scorers=tuple(args.scorers),
        generate=args.generate,
        seeds=args.seeds,
        only=args.only,
        equal_time=args.equal_time,
        command=args.invocation,
    )
    print(report.read_text())
    print(f"results: {report.parent}")
    return 0


def _verdict_command(args: argparse.Namespace) -> int:
    from ..artifacts import envelope, read_json, write_json_atomic, write_text_atomic
    from ..verdict import render_verdicts, to_json, verdicts

    reports = []
    for spec in args.reports:
        path, _, regime = spec.partition("=")
        reports.append((read_json(path, "report"), regime or Path(path).parent.name))
    rows = verdicts(reports)
    table = render_verdicts(rows)
    if args.out:
        write_text_atomic(args.out, table)
    if args.json:
        write_json_atomic(
            args.json, {**envelope("ila.verdict"), "reports": args.reports, "rows": to_json(rows)}
        )
    print(table)
    print("How each verdict is decided: python -c 'import ila.verdict; help(ila.verdict)'")
    return 0


def _evaluate_command(args: argparse.Namespace) -> int:

    cfg, run_dir = _resolve(args)
    adapters = dict(a.split("=", 1) if "=" in a else (Path(a).name, a) for a in args.adapter)
    out = evaluate_run(
        cfg,
        run_dir,
        adapters or None,
        tasks=args.tasks,
        limit=args.limit,
        generate=args.generate,
        max_gen_toks=args.max_gen_toks,
        generate_ifeval=args.generate_ifeval,
        forgetting=args.forgetting,
    )
    for label, entry in out["results"].items():
        parts = [f"{name} {_loss(entry[name], entry[name]['loss'])}" for name in ("heldout", "forgetting")
                 if entry.get(name)]  # fmt: skip
        for task, metrics in (entry.get("benchmarks") or {}).items():
            parts += [
                f"{task} {k} {v:.4f}"
                for k, v in metrics.items()
                if isinstance(v, float) and "stderr" not in k
            ]
        print(f"{label:>20}: " + ", ".join(parts))
    if args.generate or args.generate_ifeval:
        print(f"generations: {out['generations']}")
    print(f"results: {out['path']}")
    return 0


def _terminate_like_ctrl_c() -> None:
    """SIGTERM (a scheduler stopping the job) ends the run like Ctrl-C: no traceback, a resumable run dir."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):  # noqa: ANN001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _selection_command(args: argparse.Namespace) -> int:
    """``ila select`` and ``ila export``: read a ranking, apply --top / --drop-bottom / --layers."""
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
    (:func:`ila.comparison.write_comparison`)."""
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


def _loss(entry: dict | None, loss: float | None) -> str:
    """A held-out loss with its 95 % interval, where the stage recorded one."""
    if entry and entry.get("ci95"):
        return f"{entry['loss']:.4f} (95 % interval {entry['ci95'][0]:.4f}-{entry['ci95'][1]:.4f})"
    return _fmt(loss)


def _print_summary(out: dict, run_dir: Path) -> None:
    s1, s2, s3 = out["stage1"], out["stage2"], out["stage3"]
    print()
    print(f"ILA run complete: {run_dir}")
    base = _loss(s1.get("base_heldout"), s1.get("base_heldout_loss"))
    print(f"  base     held-out loss {base}")
    print(
        f"  stage 1  {s1['steps']} steps on all {s1['layers']['num_layers']} layers, held-out loss "
        f"{_loss(s1.get('heldout'), s1['heldout_loss'])}, {_stability_phrase(s1)}"
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
        f"{s3['trainable_parameters']:,} trainable parameters, held-out loss "
        f"{_loss(s3.get('heldout'), s3['heldout_loss'])}"
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
    "verdict": _verdict_command,
    "select": _selection_command,
    "export": _selection_command,
    "compare": _compare_command,
    "report": _report_command,
}


if __name__ == "__main__":
    sys.exit(main())
