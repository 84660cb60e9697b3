"""Which optimiser should learn the stage-2 scores? Seed stability and a planted case, measured.

    .venv/bin/python benchmarks/optimizers.py --run-dir runs/demo  # after `ila run` (bash scripts/demo.sh)

Adam normalises each score's step, so without a penalty every layer whose gradient keeps one sign rises at
the same rate and the order among them is left to noise; plain SGD keeps the size of each layer's cumulative
gradient in its score. This script settles the choice on one finished run (its stage-1 adapter and its
config), for each variant below:

- **seed stability**: stage 2 with seeds 0, 1, 2 (gate noise and batch order); mean pairwise Jaccard of the
  top 10 % and 30 % and mean Spearman correlation of the scores;
- **planted case**: the stage-1 adapter with its update kept on a random half of the layers, replaced by
  random noise of the same Frobenius norm on the other half, and set to zero on a few: the kept layers must
  rank on top (precision of the top half, and the AUC of kept against noise), and a zero update must not move
  its gate (the largest ``|s_T - s_0|`` of the zero layers, against the median move of the others).

Results: ``benchmarks/results/optimizers-<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import statistics
import sys
from pathlib import Path

VARIANTS = {
    "adam + budget penalty": [
        "stage2.optimizer=adam",
        "stage2.learning_rate=0.05",
        "stage2.budget_lambda=1.0",
    ],
    "adam, no penalty": ["stage2.optimizer=adam", "stage2.learning_rate=0.05", "stage2.budget_lambda=0"],
    "sgd lr 100, plain": [
        "stage2.optimizer=sgd",
        "stage2.normalise_step=false",
        "stage2.learning_rate=100",
        "stage2.budget_lambda=0",
    ],
    "sgd lr 1, plain": [
        "stage2.optimizer=sgd",
        "stage2.normalise_step=false",
        "stage2.learning_rate=1",
        "stage2.budget_lambda=0",
    ],
    "sgd normalised, lr 0.02": [
        "stage2.optimizer=sgd",
        "stage2.normalise_step=true",
        "stage2.learning_rate=0.02",
        "stage2.budget_lambda=0",
    ],
    "sgd normalised, lr 0.05": [
        "stage2.optimizer=sgd",
        "stage2.normalise_step=true",
        "stage2.learning_rate=0.05",
        "stage2.budget_lambda=0",
    ],
    "sgd normalised, lr 0.2": [
        "stage2.optimizer=sgd",
        "stage2.normalise_step=true",
        "stage2.learning_rate=0.2",
        "stage2.budget_lambda=0",
    ],
    "sgd normalised, lr 0.5": [
        "stage2.optimizer=sgd",
        "stage2.normalise_step=true",
        "stage2.learning_rate=0.5",
        "stage2.budget_lambda=0",
    ],
    "sgd + budget penalty": ["stage2.optimizer=sgd", "stage2.learning_rate=0.05", "stage2.budget_lambda=1.0"],
}


def planted_adapter(source: Path, target: Path, *, seed: int, zero_layers: int) -> dict[str, list[str]]:
    """Copy of a stage-1 LoRA adapter whose update is kept on half of the layers, replaced by noise of the
    same norm on the rest, and zero on ``zero_layers`` of those."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    weights = load_file(str(source / "adapter_model.safetensors"))
    meta = json.loads((source / "ila_adapter.json").read_text())
    names = list(meta["layers"])
    rng = random.Random(seed)
    shuffled = names[:]
    rng.shuffle(shuffled)
    kept = sorted(shuffled[: len(names) // 2])
    zero = sorted(shuffled[len(names) // 2 : len(names) // 2 + zero_layers])
    noise = sorted(shuffled[len(names) // 2 + zero_layers :])
    g = torch.Generator().manual_seed(seed)

    def key(name: str, factor: str) -> str:
        found = [k for k in weights if k.endswith(f"{name}.{factor}.weight")]
        if len(found) != 1:
            raise SystemExit(f"cannot find the {factor} weight of {name} in {source}")
        return found[0]

    for name in zero:
        kb = key(name, "lora_B")
        weights[kb] = torch.zeros_like(weights[kb])
    for name in noise:
        ka, kb = key(name, "lora_A"), key(name, "lora_B")
        a, b = weights[ka].float(), weights[kb].float()
        target_norm = float((b @ a).norm())
        fresh = torch.randn(b.shape, generator=g)
        scale = target_norm / max(float((fresh @ a).norm()), 1e-12)
        weights[kb] = (fresh * scale).to(weights[kb].dtype)  # same ||scaling B A||_F, a direction of no use
    save_file(weights, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"kept": kept, "noise": noise, "zero": zero}


def auc(positive: list[float], negative: list[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting half."""
    wins = sum((p > q) + 0.5 * (p == q) for p in positive for q in negative)
    return wins / (len(positive) * len(negative))


def _stage2_once(cfg, folder: Path, adapter: Path):  # noqa: ANN001, ANN202
    """Stage 2 in ``folder``, or its ranking when an earlier (interrupted) invocation finished it already."""
    from ila.pipeline import prepare_run_dir, stage2, stage_done
    from ila.ranking import Ranking
    from ila.rundir import RunDir

    if stage_done(folder, "stage2", cfg):
        return Ranking.load(RunDir(folder).ranking("ila"))
    return stage2(cfg, prepare_run_dir(cfg, folder), adapter=adapter)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/demo", help="a run whose stage 1 is complete")
    p.add_argument("--out", default=None, help="scratch folder (default: <run-dir>/optimizers)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for every stage-2 run, e.g. --set data.max_length=128",
    )
    p.add_argument("--zero-layers", type=int, default=6)
    p.add_argument("--name", default=None)
    args = p.parse_args()

    from ila.overlap import jaccard, spearman, top_count
    from ila.rundir import run_config

    run_dir = Path(args.run_dir)
    scratch = Path(args.out) if args.out else run_dir / "optimizers"
    adapter = run_dir / "stage1" / "final"
    planted_dir = scratch / "planted-adapter"
    plant = planted_adapter(adapter, planted_dir, seed=1234, zero_layers=args.zero_layers)

    rows = []
    for variant in args.variants:
        overrides = VARIANTS[variant] + args.overrides
        slug = variant.replace(" ", "").replace(",", "-").replace("+", "-")
        rankings = []
        for seed in args.seeds:
            print(f"  {variant}, seed {seed} ...", file=sys.stderr, flush=True)
            cfg = run_config(run_dir, overrides + [f"seed={seed}"])
            rankings.append(_stage2_once(cfg, scratch / f"{slug}-seed{seed}", adapter))
        n = rankings[0].num_layers
        pairs = list(itertools.combinations(rankings, 2))
        j10 = statistics.mean(
            jaccard(a.order[: top_count(0.1, n)], b.order[: top_count(0.1, n)]) for a, b in pairs
        )
        j30 = statistics.mean(
            jaccard(a.order[: top_count(0.3, n)], b.order[: top_count(0.3, n)]) for a, b in pairs
        )
        rho = statistics.mean(spearman(a, b) or 0.0 for a, b in pairs)

        print(f"  {variant}, planted ...", file=sys.stderr, flush=True)
        cfg = run_config(run_dir, overrides + [f"seed={args.seeds[0]}"])
        planted = _stage2_once(cfg, scratch / f"{slug}-planted", planted_dir)
        # s_0 is the seeded initial noise; LayerGates draws it the same way for the same seed and names.
        from ila.gates import LayerGates

        init = LayerGates(
            [layer.name for layer in planted.layers],
            init_mean=cfg.stage2.init_mean,
            init_std=cfg.stage2.init_std,
            seed=cfg.seed,
        ).as_dict()
        moves = {name: abs(planted.scores[name] - init[name]) for name in init}
        kept = set(plant["kept"])
        top_half = planted.order[: len(kept)]
        zero_move = max(moves[name] for name in plant["zero"])
        other_move = statistics.median(moves[name] for name in plant["kept"] + plant["noise"])
        rows.append(
            {
                "variant": variant,
                "overrides": overrides,
                "seed_jaccard_10": j10,
                "seed_jaccard_30": j30,
                "seed_spearman": rho,
                "planted_precision": len(kept & set(top_half)) / len(kept),
                "planted_auc": auc(
                    [planted.scores[x] for x in plant["kept"]], [planted.scores[x] for x in plant["noise"]]
                ),
                "zero_max_move": zero_move,
                "other_median_move": other_move,
                "zero_rank_worst": max(planted.order.index(x) for x in plant["zero"]) + 1,
                "largest_move": max(moves.values()),
                "mean_gate": planted.meta.get("mean_gate"),
                "stage2_seconds": planted.meta.get("seconds"),
            }
        )
        r = rows[-1]
        print(
            f"    seeds J@30 {r['seed_jaccard_30']:.2f}, planted precision {r['planted_precision']:.2f}, "
            f"AUC {r['planted_auc']:.2f}, zero move {r['zero_max_move']:.2g} vs {r['other_median_move']:.2g}",
            file=sys.stderr,
            flush=True,
        )

    base_cfg = run_config(run_dir, args.overrides)
    from results_io import command_line, save
    from results_io import machine as machine_name

    command = command_line("optimizers.py")
    machine = machine_name()
    name = args.name or f"optimizers-{base_cfg.model.name.replace('/', '_')}"
    doc = {
        "schema_version": 1,
        "command": command,
        "machine": machine,
        "run_dir": str(run_dir),
        "stage2_steps": base_cfg.stage2.steps,
        "seeds": args.seeds,
        "planted": {k: len(v) for k, v in plant.items()},
        "rows": rows,
    }
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine}. Stage 2: {base_cfg.stage2.steps} steps of {base_cfg.stage2.batch_size} x "
        f"{base_cfg.data.max_length} tokens on the stage-1 adapter of `{run_dir}`. "
        f"Planted: {len(plant['kept'])} layers keep their update, {len(plant['noise'])} get noise of the "
        f"same norm, {len(plant['zero'])} a zero update.",
        "",
        "| variant | seeds: Jaccard top 10 % | seeds: Jaccard top 30 % | seeds: Spearman "
        "| planted: kept in top half | planted: AUC kept vs noise | zero update: largest score move "
        "| others: median move | largest move |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seed_jaccard_10']:.2f} | {r['seed_jaccard_30']:.2f} | "
            f"{r['seed_spearman']:.2f} | {r['planted_precision']:.2f} | {r['planted_auc']:.2f} | "
            f"{r['zero_max_move']:.2g} | {r['other_median_move']:.2g} | {r['largest_move']:.2g} |"
        )
    save(name, doc, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
