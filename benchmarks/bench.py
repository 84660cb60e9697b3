"""Speed and memory of ila's stages, as ratios measured in one run.

    .venv/bin/python benchmarks/bench.py                      # SmolLM2 on this machine, a few minutes
                                                              # on 2 CPU cores
    .venv/bin/python benchmarks/bench.py --model tiny --quick # a random tiny Llama, seconds (smoke test)
    .venv/bin/python benchmarks/bench.py --growth             # also: how stage times grow with depth
                                                              # and length
    .venv/bin/python benchmarks/bench.py --throughput         # tokens per second on real chat data: ila's
                                                              # stage 1 against the plain Trainer + peft

``--throughput`` trains both on the builtin datasets (``--datasets``, tokenized by ila as a run would, at
``--max-length``) at each ``--batches`` size, on the same examples in the same order, and counts the real
tokens (no padding) of every timed step: tokens per second of each, and their ratio, all in one run. ila
batches padding-free where the model allows (``data.padding_free: auto``), the plain Trainer pads with
``DataCollatorForSeq2Seq`` as its users write it. On a GPU, ``--device cuda --attn flash_attention_2``
gives the varlen kernels.

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
    import torch

    from ila.machine import peak_resident_mb

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_resident_mb()


def step_clock(times: list[float], device: str):
    """A Trainer callback class that appends every optimiser step's seconds to ``times``."""
    import torch
    from transformers import TrainerCallback

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            times.append(time.perf_counter() - self.t)

    return Clock


def worker(spec: dict) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

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
    elif kind in ("lora-path", "gates-wide"):
        # Where stage 2's time over the floor goes. lora-path: the floor with every layer's frozen LoRA path
        # in the forward and backward (no gate); gates-wide: stage 2 with each gate multiplying the layer's
        # whole LoRA output (lora_B's), where ila multiplies the r-wide lora_A output.
        model = attach_lora(model, names, lora, dropout=0.0)
        for p in model.parameters():
            p.requires_grad_(False)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.01)
        if kind == "lora-path":
            scale = torch.nn.Parameter(torch.ones(()))
            model.register_parameter("floor_scale", scale)
            model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out * scale)
        else:
            gates = LayerGates(names)
            modules = dict(model.named_modules())
            for i, name in enumerate(names):
                lora_b = modules["base_model.model." + name].lora_B["default"]
                lora_b.register_forward_hook(lambda _m, _i, out, i=i: out * gates.gate(i).to(out.dtype))
            model.add_module("ila_gates", gates)
            kind = "gates"  # trained as stage 2 is
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
    Clock = step_clock(times, spec["device"])  # noqa: N806

    out_dir = tempfile.mkdtemp()
    common = dict(
        output_dir=out_dir,
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        # stage 2 as configured by default: plain SGD on the scores (no optimiser state)
        learning_rate=100.0 if kind == "gates" else 2e-4,
        optim="sgd" if kind in ("gates", "floor", "lora-path") else "adamw_torch",
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


def throughput_worker(spec: dict) -> dict:
    """Real tokens per second of ila's stage-1 training or of the plain Trainer + peft on builtin data."""
    import peft
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from ila.config import DataConfig, LoraConfig, ModelConfig
    from ila.data import IGNORE_INDEX, build_datasets
    from ila.layers import adaptable_layers
    from ila.models import attach_lora, load_base_model, load_tokenizer
    from ila.training import TrainingPlan, make_trainer

    mcfg = ModelConfig(name=spec["model"], device=spec["device"], attn_implementation=spec.get("attn"))
    tokenizer = load_tokenizer(mcfg)
    steps, batch = spec["steps"], spec["batch"]
    data, _, _ = build_datasets(
        DataConfig(
            name=spec["data"], max_length=spec["max_length"], max_examples=steps * batch, heldout_fraction=0.0
        ),
        tokenizer,
    )
    torch.manual_seed(0)
    model = load_base_model(mcfg)
    names = [layer.name for layer in adaptable_layers(model)]
    real_tokens: list[int] = []  # per batch, in the order the Trainer asks for them

    def counting(collate):
        def wrapped(rows):
            real_tokens.append(sum(len(r["input_ids"]) for r in rows))
            return collate(rows)

        return wrapped

    times: list[float] = []
    Clock = step_clock(times, spec["device"])  # noqa: N806

    out_dir = Path(tempfile.mkdtemp())
    batching = None
    if spec["kind"] == "plain":
        types = sorted({n.rsplit(".", 1)[-1] for n in names})
        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.05, target_modules=types, task_type="CAUSAL_LM"
            ),
        )
        args = TrainingArguments(
            output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-4,
            lr_scheduler_type="constant", optim="adamw_torch", bf16=spec["precision"] == "bf16",
            use_cpu=spec["device"] == "cpu", report_to=[], save_strategy="no", logging_steps=10**6,
            disable_tqdm=True, seed=0, remove_unused_columns=False,
        )  # fmt: skip
        collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=data,
            data_collator=counting(collate),
            callbacks=[Clock()],
        )
        trainer.train()
    else:
        model = attach_lora(model, names, LoraConfig(r=8, alpha=16, dropout=0.05))
        plan = TrainingPlan(
            output_dir=out_dir, metrics_path=out_dir / "metrics.jsonl", max_steps=steps, batch_size=batch,
            learning_rate=2e-4, lr_scheduler="constant", precision=spec["precision"], logging_steps=10**6,
            device=spec["device"], callbacks=[Clock()], padding_free=spec.get("padding_free", "auto"),
        )  # fmt: skip
        from ila.batching import choose_batching

        batching = choose_batching(model, plan.padding_free)
        trainer = make_trainer(model, plan, tokenizer, data, batching)
        trainer.data_collator = counting(trainer.data_collator)
        with batching.attending(model):
            trainer.train()
    warm = spec["warmup"]
    seconds = sum(times[warm:])
    tokens = sum(real_tokens[warm : len(times)])
    return {
        "tokens_per_s": tokens / seconds,
        "median_step_s": statistics.median(times[warm:]),
        "real_tokens_per_step": tokens / max(1, len(times) - warm),
        "steps_timed": len(times) - warm,
        "peak_memory_mb": _peak_mb(spec["device"]),
        "batching": None if batching is None else batching.to_dict(),
    }


def throughput(args: argparse.Namespace) -> list[dict]:
    """Every (dataset, batch) cell: ila's stage 1 and the plain Trainer, interleaved, with their ratio."""
    base = {
        "model": args.model, "steps": args.steps, "warmup": args.warmup, "device": args.device,
        "precision": args.precision, "max_length": args.max_length, "attn": args.attn, "worker": "throughput",
    }  # fmt: skip
    specs = []
    for data in args.datasets:
        for batch in args.batches:
            for kind in ("plain", "ila"):
                who = "plain Trainer + peft" if kind == "plain" else "ila stage 1"
                label = f"{data}, batch {batch}, {who}"
                specs.append({**base, "data": data, "batch": batch, "kind": kind, "label": label})
    rows = run_specs(specs, args.repeats)
    cells = []
    for i in range(0, len(rows), 2):
        plain, ila = rows[i], rows[i + 1]
        cells.append(
            {
                "data": plain["data"],
                "batch": plain["batch"],
                "plain_tokens_per_s": plain["tokens_per_s"],
                "ila_tokens_per_s": ila["tokens_per_s"],
                "ratio": ila["tokens_per_s"] / plain["tokens_per_s"],
                "ratio_runs": [
                    a / b for a, b in zip(ila["tokens_per_s_runs"], plain["tokens_per_s_runs"], strict=True)
                ],
                "real_tokens_per_step": ila["real_tokens_per_step"],
                "plain_peak_mb": plain["peak_memory_mb"],
                "ila_peak_mb": ila["peak_memory_mb"],
                "batching": ila["batching"],
            }
        )
    return cells


def padding_waste(args: argparse.Namespace, data: str, batch: int, batches: int = 200) -> float:
    """Padded tokens over real tokens when ``batch`` examples of ``data`` are padded to the longest of them:
    the work that padding-free batches do not do (random batches of up to 1,000 examples, seed 0)."""
    import random

    from ila.config import DataConfig, ModelConfig
    from ila.data import build_datasets
    from ila.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name=args.model))
    train, _, _ = build_datasets(
        DataConfig(name=data, max_length=args.max_length, max_examples=1000, heldout_fraction=0.0), tokenizer
    )
    lengths = [len(ids) for ids in train["input_ids"]]
    rng = random.Random(0)
    padded = real = 0
    for _ in range(batches):
        chosen = rng.sample(lengths, batch)
        padded += batch * max(chosen)
        real += sum(chosen)
    return padded / real


def throughput_markdown(cells: list[dict], command: str, machine: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine}",
        "",
        "| data | batch | real tokens / step | padded / real | plain Trainer + peft (tokens/s) "
        "| ila stage 1 (tokens/s) | ila / plain | per repeat | peak MB plain / ila | ila batching |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        how = "padding-free" if (c["batching"] or {}).get("padding_free") else "padded"
        runs = ", ".join(f"{r:.2f}" for r in c["ratio_runs"])
        lines.append(
            f"| {c['data']} | {c['batch']} | {c['real_tokens_per_step']:.0f} | {c['padding_waste']:.2f} "
            f"| {c['plain_tokens_per_s']:.0f} "
            f"| {c['ila_tokens_per_s']:.0f} | **{c['ratio']:.2f}** | {runs} "
            f"| {c['plain_peak_mb']:.0f} / {c['ila_peak_mb']:.0f} | {how} |"
        )
    return "\n".join(lines) + "\n"


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
    if "tokens_per_s" in out:
        out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in results)
        out["tokens_per_s_runs"] = [r["tokens_per_s"] for r in results]
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
        {"label": "floor + the frozen LoRA path of every layer (no gate)", "kind": "lora-path"},
        {"label": "stage 2 with each gate on the whole LoRA output (vs the floor)", "kind": "gates-wide"},
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
        floor = by["floor: forward + activation backward, no weight gradient"]["median_step_s"]
        out["stage2_step_over_floor"] = s2 / floor
        path = by.get("floor + the frozen LoRA path of every layer (no gate)")
        wide = by.get("stage 2 with each gate on the whole LoRA output (vs the floor)")
        if path:  # what the LoRA path costs, and what the gates cost on top of it
            out["lora_path_over_floor"] = path["median_step_s"] / floor
            out["stage2_over_lora_path"] = s2 / path["median_step_s"]
        if wide:
            out["gate_on_whole_output_over_floor"] = wide["median_step_s"] / floor
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
    p.add_argument(
        "--throughput", action="store_true", help="tokens/s on real chat data against the plain Trainer"
    )
    p.add_argument("--datasets", nargs="+", default=["sharegpt", "chitchat", "gsm8k"])
    p.add_argument("--batches", nargs="+", type=int, default=[4, 16])
    p.add_argument("--max-length", type=int, default=256, help="tokens per example (--throughput)")
    p.add_argument("--attn", default=None, help="attention implementation, e.g. flash_attention_2 on a GPU")
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        run = throughput_worker if spec.get("worker") == "throughput" else worker
        print(json.dumps(run(spec)))
        return
    if args.throughput:
        return throughput_main(args)
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


def throughput_main(args: argparse.Namespace) -> None:
    import torch
    from results_io import command_line, save
    from results_io import machine as machine_name

    start = time.time()
    cells = throughput(args)
    for c in cells:
        c["padding_waste"] = padding_waste(args, c["data"], c["batch"])
    machine = f"{machine_name()}, torch {torch.__version__}" + (
        f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    )
    command = command_line("bench.py")
    name = args.name or f"throughput-{args.model.replace('/', '_')}-{args.device}-{args.precision}"
    md = throughput_markdown(cells, command, machine)
    save(name, {"command": command, "machine": machine, "seconds": time.time() - start, "cells": cells}, md)
    print(md)


if __name__ == "__main__":
    main()
