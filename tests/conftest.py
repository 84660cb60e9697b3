"""Fixtures: a tiny random Llama and byte-level tokenizer built in process (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach for the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import make_tokenizer  # noqa: E402


def make_model(num_blocks: int = 4, hidden: int = 64, seed: int = 0, vocab: int = 320):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=256,
        eos_token_id=256,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def write_model_dir(path: Path, num_blocks: int = 4, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    make_model(num_blocks=num_blocks, seed=seed).save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder with a 4-block random Llama (safetensors) and a ChatML byte tokenizer."""
    return write_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_data_file(tmp_path_factory) -> Path:
    """64 short Alpaca records."""
    path = tmp_path_factory.mktemp("tiny-data") / "alpaca.jsonl"
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    with path.open("w") as f:
        for i in range(64):
            a, b = words[i % 8], words[(i * 3 + 1) % 8]
            f.write(
                json.dumps({"instruction": f"Say {a} then {b}.", "input": "", "output": f"{a} {b}"}) + "\n"
            )
    return path


def TINY_OVERRIDES(model_dir: Path, data_file: Path) -> list[str]:  # noqa: N802
    """Overrides for a run of every stage on the tiny model that takes seconds."""
    return [
        f"model.name={model_dir}",
        "model.device=cpu",
        f"data.name={data_file}",
        "data.max_length=64",
        "data.max_examples=null",
        "data.heldout_fraction=0.2",
        "stage1.train.max_steps=8",
        "stage1.train.batch_size=4",
        "stage1.train.logging_steps=2",
        "stage1.stability_window=2",
        "stage2.steps=6",
        "stage2.logging_steps=2",
        "stage3.train.max_steps=4",
        "stage3.train.logging_steps=2",
        "stage3.selection.fraction=0.25",
    ]


@pytest.fixture
def tiny_config(tiny_model_dir, tiny_data_file) -> list[str]:
    return TINY_OVERRIDES(tiny_model_dir, tiny_data_file)


class Interrupted(Exception):
    """Raised by :func:`interrupted_train` in place of a kill."""


def interrupted_train(step: int):
    """``ila.training.train`` that stops the run with :class:`Interrupted` right after ``step``, as a kill
    would (the checkpoints written until then stay); patch it where a stage looks ``train`` up."""
    from transformers import TrainerCallback

    from ila import training

    original = training.train

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Interrupted

    def train(model, plan, *args, **kwargs):
        plan.callbacks = [*plan.callbacks, Stop()]
        return original(model, plan, *args, **kwargs)

    return train
