"""How noisy are the held-out and forgetting losses of a run, and what do they cost?

    .venv/bin/python benchmarks/noise.py --run-dir runs/demo  # after `ila run` (bash scripts/demo.sh)

For the base model, the stage-1 adapter and the stage-3 result of one finished run, on the run's own
held-out split and on the general text of :mod:`ila.forgetting`: each loss with its 95 % bootstrap interval
over examples, the paired difference of every pair of models on the same examples with its interval, and the
seconds one model's pass takes (under the run's bf16 autocast when the run trains in bf16).
Results: ``benchmarks/results/noise-<run>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
from results_io import command_line, machine, save

from ila.adapters import load_result
from ila.data import build_datasets
from ila.forgetting import general_text_rows
from ila.heldout import example_losses, paired_interval, summarise
from ila.models import load_base_model, load_tokenizer
from ila.rundir import RunDir, run_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True)
    args = p.parse_args()
    rd = RunDir(args.run_dir)
    cfg = run_config(rd.root)
    tok = load_tokenizer(cfg.model)
    texts = {
        "held-out": build_datasets(cfg.data, tok)[1],
        "forgetting": general_text_rows(tok, max_length=cfg.data.max_length),
    }
    models = {"base": None, "stage 1": rd.stage1_final, "stage 3": rd.stage3_result()}
    bf16 = cfg.stage1.train.precision == "bf16"
    losses: dict[str, dict[str, tuple]] = {t: {} for t in texts}
    seconds: dict[str, dict[str, float]] = {t: {} for t in texts}
    for label, folder in models.items():
        model = load_base_model(cfg.model) if folder is None else load_result(cfg.model, folder)
        for text, rows in texts.items():
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            start = time.perf_counter()
            with ctx:
                losses[text][label] = example_losses(model, tok, rows, batch_size=cfg.stage3.train.batch_size)
            seconds[text][label] = time.perf_counter() - start
    doc = {"command": command_line("noise.py"), "machine": machine(), "run": str(rd.root), "texts": {}}
    lines = [f"Command: `{doc['command']}` ({doc['machine']})", ""]
    for text, by_model in losses.items():
        own = {m: summarise(*v) for m, v in by_model.items()}
        pairs = {}
        names = list(by_model)
        for i, a in enumerate(names):
            for b in names[:i]:
                pairs[f"{a} - {b}"] = {
                    "difference": own[a]["loss"] - own[b]["loss"],
                    "ci95": paired_interval(by_model[a], by_model[b]),
                }
        doc["texts"][text] = {"models": own, "paired": pairs, "seconds": seconds[text]}
        first = next(iter(own.values()))
        lines += [f"## {text}: {first['examples']} examples, {first['tokens']} tokens", "",
                  "| model | loss [95 % interval] | seconds |", "| --- | --- | --- |"]  # fmt: skip
        for m, o in own.items():
            lines.append(
                f"| {m} | {o['loss']:.4f} [{o['ci95'][0]:.4f}, {o['ci95'][1]:.4f}] | {seconds[text][m]:.1f} |"
            )
        lines += ["", "| paired difference | [95 % interval] |", "| --- | --- |"]
        for name, d in pairs.items():
            lines.append(f"| {name} | {d['difference']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] |")
        lines.append("")
    print(save(f"noise-{Path(rd.root).name}", doc, "\n".join(lines)).read_text())


if __name__ == "__main__":
    main()
