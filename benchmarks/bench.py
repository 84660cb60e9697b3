"""Speed and memory of ila's stages, as ratios measured in one run.

    .venv/bin/python benchmarks/bench.py                      # SmolLM2 on this machine, a few minutes
                                                              # on 2 CPU cores
    .venv/bin/python benchmarks/bench.py --model tiny --quick # a random tiny Llama, seconds (smoke test)
    .venv/bin/python benchmarks/bench.py --growth             # also: how stage times grow with depth
                                                              # and length

Every configuration runs in its own subprocess (peak memory is per process: resident set size on the CPU,
``torch.cuda.max_memory_allocated`` on a GPU), trains ``--steps`` optimiser steps on the same batches, and
reports the median step time over the steps after ``--warmup``. The same script runs unchanged on a GPU
(``--device cuda --precision bf16``). Results go to ``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------
# one measurement (runs in a subprocess)


def _model_and_data(spec: dict):
    import torch
    from datasets import Dataset

    from ila.config import ModelConfig
    from ila.models import load_base_model, load_tokenizer

    if spec["model"] == "tiny" or spec["model"].startswith("random:"):
        from transformers import LlamaConfig, LlamaForCausalLM

        blocks = int(spec["model"].split(":")[1]) if ":" in spec["model"] else 4
        hidden = 576 if ":" in spec["model"] else 64
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=49152 if ":" in spec["model"] else 512,
            hidden_size=hidden,
            intermediate_size=1536 if ":" in spec["model"] else 128,
            num_hidden_layers=blocks,
            num_attention_heads=9 if ":" in spec["model"] else 4,
            num_key_value_heads=3 if ":" in spec["model"] else 2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(cfg)
        vocab = cfg.vocab_size
        tokenizer = None
    else:
        mcfg = ModelConfig(name=spec["model"])
        model = load_base_model(mcfg)
        tokenizer = load_tokenizer(mcfg)
        vocab = model.config.vocab_size
    model.config.use_cache = False
    g = torch.Generator().manual_seed(0)
    n = spec["batch"] * (spec["steps"] + 2)
    ids = torch.randint(0, min(vocab, 32000), (n, spec["seq"]), generator=g)
    # Response tokens: the second half of every sequence (the loss mask of a chat example, roughly).
    labels = ids.clone()
    labels[:, : spec["seq"] // 2] = -100
    rows = [
        {"input_ids": a.tolist(), "attention_mask": [1] * spec["seq"], "labels": b.tolist()}
        for a, b in zip(ids, labels, strict=True)
    ]
    return model, tokenizer, Dataset.from_list(rows)


def _collator(tokenizer):
    import torch

    def collate(rows):
        return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}

    return collate


def _peak_mb(device: str) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(spec: dict) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ila.config import LoraConfig, Stage2Config
    from ila.gates import LayerGates, attach_gates
    from ila.layers import adaptable_layers
    from ila.models import attach_lora, count_parameters
    from ila.ranking import Ranking
    from ila.selection import apply_selection

    torch.manual_seed(0)
    model, tokenizer, data = _model_and_data(spec)
    layers = adaptable_layers(model)
    names = [layer.name for layer in layers]
    kind = spec["kind"]
    selected = names
    if spec.get("fraction") is not None:
        if spec.get("ranking") and Path(spec["ranking"]).is_file():
            ranking = Ranking.load(spec["ranking"])
        else:  # a seeded random ranking stands in when no real one is given
            import random

            rng = random.Random(0)
            ranking = Ranking(
                scores={n: rng.random() for n in names}, layers=layers, base_model={}, include_lm_head=False
            )
        selected = (
            ranking.drop_bottom(spec["fraction"]) if spec.get("drop") else ranking.top(spec["fraction"])
        )
    lora = LoraConfig(r=8, alpha=16, dropout=0.05)
    penalty = None
    if kind == "plain":
        # What a user writes without ila: peft's own LoraConfig on the projection names.
        import peft

        types = sorted({n.rsplit(".", 1)[-1] for n in names})
        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.05, target_modules=types, task_type="CAUSAL_LM"
            ),
        )
    elif kind == "lora":
        model = attach_lora(model, selected, lora)
    elif kind == "full":
        model = apply_selection(model, selected, method="full")
    elif kind == "gates":
        model = attach_lora(model, names, lora, dropout=0.0)
        for p in model.parameters():
            p.requires_grad_(False)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.01)  # a trained-looking update
        gates = LayerGates(names)
        attach_gates(model, gates)
        s2 = Stage2Config()
        if s2.budget_lambda > 0:  # as stage 2 does: the penalty only when it is on
            penalty = lambda: s2.budget_lambda * gates.budget_penalty(s2.budget_fraction)  # noqa: E731
    elif kind == "floor":
        # The floor of any gradient-based layer score: one forward pass and the backward pass through every
        # activation, with no weight gradient at all. One scalar on the embeddings' output is the only
        # parameter, so autograd must go all the way down and compute nothing else.
        for p in model.parameters():
            p.requires_grad_(False)
        scale = torch.nn.Parameter(torch.ones(()))
        model.register_parameter("floor_scale", scale)
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out * scale)
    trainable, total = count_parameters(model)

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if spec["device"].startswith("cuda"):
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if spec["device"].startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    out_dir = tempfile.mkdtemp()
    common = dict(
        output_dir=out_dir,
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        # stage 2 as configured by default: plain SGD on the scores (no optimiser state)
        learning_rate=100.0 if kind == "gates" else 2e-4,
        optim="sgd" if kind in ("gates", "floor") else "adamw_torch",
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        use_cpu=spec["device"] == "cpu",
        bf16=spec["precision"] == "bf16",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0 if kind == "gates" else 1.0,
    )
    if spec.get("checkpointing"):
        common.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    if kind == "plain":
        # The same LoRA training written directly with transformers Trainer + peft: the reference.
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=data,
            data_collator=_collator(tokenizer),
            callbacks=[Clock()],
        )
    else:
        from ila.training import IlaTrainer

        callbacks: list = [Clock()]
        if kind == "lora" and spec.get("fraction") is None:
            # Stage 1 as ila runs it: epsilon-stability measured along the way (every 2 steps here, so that
            # the short benchmark pays for it as often as a real run does per window).
            from ila.callbacks import StabilityTracker

            callbacks.append(StabilityTracker(names, 2, 0.1, Path(out_dir) / "stability.jsonl", False))
        trainer = IlaTrainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=data,
            data_collator=_collator(tokenizer),
            callbacks=callbacks,
            penalty=penalty,
            response_logits_only=spec.get("response_logits_only", True),
        )
    trainer.train()
    steady = times[spec["warmup"] :] or times
    checkpoint_mb = None
    if kind in ("lora", "plain"):
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            checkpoint_mb = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file()) / 2**20
    elif kind == "full":
        checkpoint_mb = (
            sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
        )
    return {
        "median_step_s": statistics.median(steady),
        "steps_timed": len(steady),
        "peak_memory_mb": _peak_mb(spec["device"]),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "selected_layers": len(selected),
        "checkpoint_mb": checkpoint_mb,
    }


# ---------------------------------------------------------------------------------------------------------
# the suite


def run_once(spec: dict) -> dict:
    """One subprocess run of one configuration."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"{spec['label']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(results: list[dict]) -> dict:
    """The first run's counts with the median step time and peak memory of all runs."""
    out = dict(results[0])
    out["median_step_s"] = statistics.median(r["median_step_s"] for r in results)
    out["peak_memory_mb"] = statistics.median(r["peak_memory_mb"] for r in results)
    out["step_s_runs"] = [r["median_step_s"] for r in results]
    out["repeats"] = len(results)
    return out


def run_specs(specs: list[dict], repeats: int) -> list[dict]:
    """Median of ``repeats`` runs of every configuration. The repeats are interleaved (all configurations
    once, then again) so that a slow spell of a shared machine falls on every configuration alike and the
    ratios, not the absolute times, are what survive it."""
    runs: list[list[dict]] = [[] for _ in specs]
    for round_ in range(repeats):
        for i, spec in enumerate(specs):
            print(f"  [{round_ + 1}/{repeats}] {spec['label']} ...", file=sys.stderr, flush=True)
            runs[i].append(run_once(spec))
    return [{**spec, **median_of(r)} for spec, r in zip(specs, runs, strict=True)]


def suite(args: argparse.Namespace) -> list[dict]:
    base = {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": args.device,
        "precision": args.precision,
        "ranking": args.ranking,
    }
    specs = [
        {"label": "plain Trainer + peft LoRA, all layers", "kind": "plain"},
        {"label": "stage 1: ila LoRA, all layers", "kind": "lora"},
        {"label": "stage 2: gates only", "kind": "gates"},
        {"label": "floor: forward + activation backward, no weight gradient", "kind": "floor"},
        {"label": "stage 3: LoRA top 10 %", "kind": "lora", "fraction": 0.1},
        {"label": "stage 3: LoRA top 30 %", "kind": "lora", "fraction": 0.3},
        {"label": "stage 3: LoRA freeze bottom 25 %", "kind": "lora", "fraction": 0.25, "drop": True},
    ]
    if not args.quick:
        specs += [
            {
                "label": "stage 1, output head at every position",
                "kind": "lora",
                "response_logits_only": False,
            },
            {
                "label": "stage 2, output head at every position",
                "kind": "gates",
                "response_logits_only": False,
            },
            {"label": "stage 1 + gradient checkpointing", "kind": "lora", "checkpointing": True},
            {
                "label": "stage 1 fp32" if args.precision == "bf16" else "stage 1 bf16",
                "kind": "lora",
                "precision": "fp32" if args.precision == "bf16" else "bf16",
            },
            {"label": "full fine-tuning, all layers", "kind": "full"},
            {"label": "full fine-tuning, top 30 %", "kind": "full", "fraction": 0.3},
        ]
    if args.only:  # the two stages every ratio refers to, and the configurations asked for
        keep = ("stage 1: ila LoRA, all layers", "stage 2: gates only")
        specs = [s for s in specs if s["label"] in keep or any(t in s["label"] for t in args.only)]
    return run_specs([{**base, **spec} for spec in specs], args.repeats)


def growth(args: argparse.Namespace) -> list[dict]:
    """Stage-2 / stage-1 step ratio as the model gets deeper and the sequences longer (random SmolLM2-wide
    models, so no checkpoint is needed)."""
    rows = []
    for blocks, seq in [(4, args.seq), (8, args.seq), (16, args.seq), (8, args.seq // 2), (8, args.seq * 2)]:
        base = {
            "model": f"random:{blocks}",
            "batch": args.batch,
            "seq": seq,
            "steps": args.steps,
            "warmup": args.warmup,
            "device": args.device,
            "precision": args.precision,
        }
        s1, s2 = run_specs(
            [
                {**base, "kind": "lora", "label": f"stage 1, {blocks} blocks, seq {seq}"},
                {**base, "kind": "gates", "label": f"stage 2, {blocks} blocks, seq {seq}"},
            ],
            args.repeats,
        )
        rows.append(
            {
                "blocks": blocks,
                "seq": seq,
                "stage1_step_s": s1["median_step_s"],
                "stage2_step_s": s2["median_step_s"],
                "ratio": s2["median_step_s"] / s1["median_step_s"],
                "stage1_peak_mb": s1["peak_memory_mb"],
                "stage2_peak_mb": s2["peak_memory_mb"],
            }
        )
        print(f"  depth {blocks}, seq {seq}: ratio {rows[-1]['ratio']:.2f}", file=sys.stderr, flush=True)
    return rows


def schedule_ratios(rows: list[dict], run_dir: Path | None) -> dict:
    """Whole-stage ratios: step times from this run times the step counts of a real ila run."""
    by = {r["label"]: r for r in rows}
    s1 = by["stage 1: ila LoRA, all layers"]["median_step_s"]
    s2 = by["stage 2: gates only"]["median_step_s"]
    out: dict = {"stage2_step_over_stage1_step": s2 / s1}
    if "plain Trainer + peft LoRA, all layers" in by:
        out["plain_step_over_ila_stage1_step"] = (
            by["plain Trainer + peft LoRA, all layers"]["median_step_s"] / s1
        )
    if "floor: forward + activation backward, no weight gradient" in by:
        out["stage2_step_over_floor"] = (
            s2 / by["floor: forward + activation backward, no weight gradient"]["median_step_s"]
        )
    for stage, own in (("1", s1), ("2", s2)):
        every = by.get(f"stage {stage}, output head at every position")
        if every:  # what computing the output head only at response positions saves
            out[f"stage{stage}_every_position_over_response_only"] = every["median_step_s"] / own
    if run_dir and (run_dir / "stage1" / "summary.json").is_file():
        summary1 = json.loads((run_dir / "stage1" / "summary.json").read_text())
        summary2 = json.loads((run_dir / "stage2" / "summary.json").read_text())
        n1, n2 = summary1["planned_steps"], summary2["steps"]
        stable = summary1.get("stable_at_step")
        out.update(
            {
                "schedule_from": str(run_dir),
                "stage1_steps": n1,
                "stage2_steps": n2,
                "stable_at_step": stable,
                "whole_stage2_over_whole_stage1": (n2 * s2) / (n1 * s1),
            }
        )
        if stable:
            out["search_over_full_lora_run"] = (stable * s1 + n2 * s2) / (n1 * s1)
        out["search_over_full_lora_run_at_25pct"] = (0.25 * n1 * s1 + n2 * s2) / (n1 * s1)
    return out


def markdown(rows: list[dict], ratios: dict, growth_rows: list[dict], command: str, machine: str) -> str:
    ref = next(r for r in rows if r["label"].startswith("stage 1: ila"))
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine}",
        "",
        "| configuration | step (s) | vs stage 1 | peak memory (MB) | trainable params | checkpoint (MB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ck = f"{r['checkpoint_mb']:.1f}" if r.get("checkpoint_mb") is not None else "-"
        lines.append(
            f"| {r['label']} | {r['median_step_s']:.3f} | {r['median_step_s'] / ref['median_step_s']:.2f} | "
            f"{r['peak_memory_mb']:.0f} | {r['trainable_parameters']:,} | {ck} |"
        )
    lines += ["", "| ratio | value |", "| --- | --- |"]
    for k, v in ratios.items():
        lines.append(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    if growth_rows:
        lines += [
            "",
            "| blocks | seq | stage 1 step (s) | stage 2 step (s) | stage 2 / stage 1 |",
            "| --- | --- | --- | --- | --- |",
        ]
        for g in growth_rows:
            lines.append(
                f"| {g['blocks']} | {g['seq']} | {g['stage1_step_s']:.3f} | {g['stage2_step_s']:.3f} "
                f"| {g['ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2", help="smollm2, tiny, random:<blocks>, a folder or a Hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--repeats", type=int, default=3, help="subprocess runs per configuration (median), interleaved"
    )
    p.add_argument(
        "--ranking",
        default="runs/demo/stage2/ranking.json",
        help="ranking for the selective configurations (a seeded random one if absent)",
    )
    p.add_argument(
        "--schedule", default="runs/demo", help="run dir whose step counts give whole-stage ratios"
    )
    p.add_argument("--quick", action="store_true", help="only the core configurations")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="TEXT",
        help="only the configurations whose label contains one of these texts (stages 1 and 2 always run)",
    )
    p.add_argument("--growth", action="store_true", help="also measure growth with depth and sequence length")
    p.add_argument("--name", default=None, help="results file name (default: model-device-precision)")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    start = time.time()
    rows = suite(args)
    ratios = schedule_ratios(rows, Path(args.schedule) if args.schedule else None)
    growth_rows = growth(args) if args.growth else []
    import torch
    from results_io import command_line, save
    from results_io import machine as machine_name

    machine = f"{machine_name()}, torch {torch.__version__}" + (
        f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    )
    command = command_line("bench.py")
    name = args.name or f"{args.model.replace('/', '_').replace(':', '')}-{args.device}-{args.precision}"
    result = {
        "command": command,
        "machine": machine,
        "seconds": time.time() - start,
        "rows": rows,
        "ratios": ratios,
        "growth": growth_rows,
    }
    md = markdown(rows, ratios, growth_rows, command, machine)
    save(name, result, md)
    print(md)


if __name__ == "__main__":
    main()
