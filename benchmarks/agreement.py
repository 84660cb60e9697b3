"""How much of the layer search can be cut while keeping the ranking: cost against agreement.

    .venv/bin/python benchmarks/agreement.py --run-dir runs/demo  # after `ila run` (bash scripts/demo.sh)

From one finished ila run (stage-1 milestones and the stage-2 ranking), it re-runs stage 2 with the run's
own config but

- on an earlier stage-1 milestone (stage 1 stopped at 25 / 50 / 75 % of its schedule),
- with fewer stage-2 steps (the scores are learnt from fewer batches),
- on a small sample of the data (the same steps, cycling over a few examples),
- with another seed (a different batch order: how far two full searches disagree with each other),
- after a fresh stage 1 that stops by itself (``stage1.stop_when_stable`` with the ``ranking`` criterion,
  window 5: the top 30 % of layers by update norm unchanged within epsilon for 2 windows in a row),

and writes, for each, the Jaccard of its top 10 / 30 % with the run's ranking, the Spearman correlation of
the scores, and its cost: (stage-1 steps x stage-1 step time + stage-2 steps x stage-2 step time) divided by
the cost of the whole stage-1 schedule, i.e. of one full LoRA fine-tuning run. Step times are measured in
this run (median over the steps of each stage-2 re-run; stage 1 from the run's own summary).
Results: ``benchmarks/results/agreement-<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def variants(steps: int, milestones: list[str]) -> list[dict]:
    out = [
        {"label": f"stage 1 stopped at {int(m)} %, stage 2 {steps} steps", "milestone": m, "overrides": []}
        for m in milestones
        if m != "100"
    ]
    for s in sorted({max(1, steps // 6), max(1, steps // 3), max(1, steps // 2)}):
        out.append(
            {
                "label": f"full stage 1, stage 2 {s} steps",
                "milestone": "100",
                "overrides": [f"stage2.steps={s}"],
            }
        )
    out.append(
        {
            "label": f"full stage 1, stage 2 on 40 examples ({steps} steps)",
            "milestone": "100",
            "overrides": ["data.max_examples=42", "data.heldout_fraction=0.05"],
        }
    )
    out.append(
        {"label": "full stage 1, stage 2 with another seed", "milestone": "100", "overrides": ["seed=1"]}
    )
    quarter = next((m for m in milestones if m == "025"), None)
    if quarter:
        s = max(1, steps // 3)
        out.append(
            {
                "label": f"stage 1 stopped at 25 %, stage 2 {s} steps",
                "milestone": quarter,
                "overrides": [f"stage2.steps={s}"],
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/demo", help="a finished ila run (stages 1 and 2)")
    p.add_argument(
        "--out", default=None, help="scratch folder for the re-runs (default: <run-dir>/agreement)"
    )
    p.add_argument("--name", default=None, help="results file name (default: agreement-<model>)")
    p.add_argument("--skip-early-stop", action="store_true", help="skip the fresh early-stopped stage 1")
    args = p.parse_args()

    from ila.overlap import jaccard, spearman, top_count
    from ila.pipeline import prepare_run_dir, stage2
    from ila.ranking import Ranking
    from ila.rundir import run_config

    run_dir = Path(args.run_dir)
    reference = Ranking.load(run_dir / "stage2" / "ranking.json")
    summary1 = json.loads((run_dir / "stage1" / "summary.json").read_text())
    summary2 = json.loads((run_dir / "stage2" / "summary.json").read_text())
    n1 = summary1["planned_steps"]
    s1_step = summary1["seconds_per_step"]
    milestones = sorted(x.name for x in (run_dir / "stage1" / "milestones").iterdir() if x.is_dir())
    base_cfg = run_config(run_dir)
    steps = base_cfg.stage2.steps
    scratch = Path(args.out) if args.out else run_dir / "agreement"

    rows = []
    ref_cost = (n1 * s1_step + summary2["steps"] * summary2["seconds_per_step"]) / (n1 * s1_step)
    rows.append(
        {
            "label": f"reference: full stage 1 ({n1} steps), stage 2 {steps} steps",
            "jaccard_10": 1.0,
            "jaccard_30": 1.0,
            "spearman": 1.0,
            "stage1_steps": n1,
            "stage2_steps": summary2["steps"],
            "stage2_step_s": summary2["seconds_per_step"],
            "cost": ref_cost,
        }
    )
    for i, v in enumerate(variants(steps, milestones)):
        print(f"  {v['label']} ...", file=sys.stderr, flush=True)
        cfg = run_config(run_dir, v["overrides"])
        folder = prepare_run_dir(cfg, scratch / f"v{i}")
        ranking = stage2(cfg, folder, adapter=run_dir / "stage1" / "milestones" / v["milestone"])
        s2 = json.loads((folder / "stage2" / "summary.json").read_text())
        stage1_steps = round(n1 * int(v["milestone"]) / 100)
        k10, k30 = top_count(0.1, reference.num_layers), top_count(0.3, reference.num_layers)
        rows.append(
            {
                "label": v["label"],
                "stage1_steps": stage1_steps,
                "stage2_steps": s2["steps"],
                "stage2_step_s": s2["seconds_per_step"],
                "jaccard_10": jaccard(ranking.order[:k10], reference.order[:k10]),
                "jaccard_30": jaccard(ranking.order[:k30], reference.order[:k30]),
                "spearman": spearman(ranking, reference),
                "cost": (stage1_steps * s1_step + s2["steps"] * s2["seconds_per_step"]) / (n1 * s1_step),
            }
        )
        print(f"    Jaccard@30% {rows[-1]['jaccard_30']:.2f}, cost {rows[-1]['cost']:.2f}", file=sys.stderr)

    if not args.skip_early_stop:
        # A real early-stopped stage 1 (new run dir), then the default stage 2 on its final adapter.
        from ila.pipeline import stage1

        print("  stage 1 stopped by the ranking criterion ...", file=sys.stderr, flush=True)
        cfg = run_config(
            run_dir,
            [
                "stage1.stop_when_stable=true",
                "stage1.stability_criterion=ranking",
                "stage1.stability_window=5",
            ],
        )
        folder = prepare_run_dir(cfg, scratch / "early-stop")
        s1 = stage1(cfg, folder)
        ranking = stage2(cfg, folder)
        s2 = json.loads((folder / "stage2" / "summary.json").read_text())
        k10, k30 = top_count(0.1, reference.num_layers), top_count(0.3, reference.num_layers)
        rows.append(
            {
                "label": f"stage 1 stopped when stable (ranking criterion, at step {s1['steps']}), "
                f"stage 2 {s2['steps']} steps",
                "stage1_steps": s1["steps"],
                "stage2_steps": s2["steps"],
                "stage2_step_s": s2["seconds_per_step"],
                "jaccard_10": jaccard(ranking.order[:k10], reference.order[:k10]),
                "jaccard_30": jaccard(ranking.order[:k30], reference.order[:k30]),
                "spearman": spearman(ranking, reference),
                "cost": (s1["seconds"] + s2["seconds"]) / (n1 * s1_step),
            }
        )

    from results_io import command_line, save
    from results_io import machine as machine_name

    command = command_line("agreement.py")
    machine = machine_name()
    name = args.name or f"agreement-{base_cfg.model.name.replace('/', '_')}"
    doc = {
        "schema_version": 1,
        "command": command,
        "machine": machine,
        "run_dir": str(run_dir),
        "stage1_step_s": s1_step,
        "stage1_planned_steps": n1,
        "rows": rows,
    }
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine}. Stage-1 step {s1_step:.2f} s ({n1} steps planned).",
        "Cost: search time over the time of one full LoRA run (the whole stage-1 schedule).",
        "",
        "| search | stage-1 steps | stage-2 steps | stage-2 step (s) | Jaccard top 10 % | Jaccard top 30 % | "
        "Spearman | cost |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['stage1_steps']} | {r['stage2_steps']} | {r['stage2_step_s']:.2f} | "
            f"{r['jaccard_10']:.2f} | {r['jaccard_30']:.2f} | {r['spearman']:.2f} | {r['cost']:.2f} |"
        )
    save(name, doc, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
