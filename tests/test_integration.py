"""ila inside the user's own training: the Trainer callback (with trl's SFTTrainer) and the Python API."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from tiny import make_tokenizer

from ila import Ranking, apply_selection, rank_layers, select
from ila.config import LoraConfig, Stage2Config
from ila.errors import RankingError
from ila.layers import adaptable_layers
from ila.models import attach_lora


def test_callback_ranks_layers_inside_an_sft_trainer_run(tmp_path, tiny_model_dir, tiny_data_file):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from ila.integration import IlaCallback

    tok = make_tokenizer()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # The user's own LoRA: on the attention projections only, under an adapter name of their choosing.
    names = [layer.name for layer in adaptable_layers(base) if "self_attn" in layer.name]
    model = attach_lora(base, names, LoraConfig(r=4))
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Say {w}."}],
            "completion": [{"role": "assistant", "content": w}],
        }
        for w in ["red", "blue", "green", "cat"] * 4
    ]
    callback = IlaCallback(tmp_path / "ila", stage2=Stage2Config(steps=3, batch_size=2))
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=4,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        max_length=64,
        logging_steps=2,
        save_strategy="no",
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[callback],
    )
    trainer.train()
    ranking = Ranking.load(tmp_path / "ila" / "ranking.json")
    assert ranking.num_layers == 16 and ranking.scorer == "ila"
    assert sorted(p.name for p in (tmp_path / "ila" / "milestones").iterdir()) == ["025", "050", "075", "100"]
    # A milestone the callback wrote is a stage-1 adapter like any other: `ila score --adapter` scores it.
    from conftest import TINY_OVERRIDES

    from ila.cli import main

    run_dir = tmp_path / "scored"
    overrides = [x for o in TINY_OVERRIDES(tiny_model_dir, tiny_data_file) for x in ("--set", o)]
    assert (
        main(
            [
                "score",
                "--run-dir",
                str(run_dir),
                "--adapter",
                str(tmp_path / "ila" / "milestones" / "050"),
                *overrides,
            ]
        )
        == 0
    )
    scored = Ranking.load(run_dir / "stage2" / "ranking.json")
    assert set(scored.scores) == set(names) and scored.milestone == "50%"
    # The user's model is handed back as it was: LoRA trainable, no gates left behind.
    assert "ila_gates" not in dict(model.named_modules())
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_rank_select_apply_in_python():
    base = make_model()
    names = [layer.name for layer in adaptable_layers(base)]
    model = attach_lora(base, names, LoraConfig(r=4, dropout=0.1))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.2)
    ranking = rank_layers(model, scorer="update-norm")
    assert ranking.num_layers == 28
    top = select(ranking, top=0.25)
    assert top == ranking.order[:7]
    assert select(ranking, drop_bottom=0.25) == ranking.order[:21]
    with pytest.raises(RankingError):
        select(ranking, top=0.2, drop_bottom=0.2)

    fresh = apply_selection(make_model(), top, method="lora", lora=LoraConfig(r=2))
    adapted = {n.removeprefix("base_model.model.") for n, m in fresh.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(top)

    full = apply_selection(make_model(), top, method="full")
    trainable = {n.rsplit(".", 1)[0] for n, p in full.named_parameters() if p.requires_grad}
    assert trainable == set(top)
    with pytest.raises(RankingError, match="not in this model"):
        apply_selection(make_model(), ["model.layers.9.mlp.up_proj"])


def test_rank_layers_ila_leaves_model_untouched():
    from datasets import Dataset

    tok = make_tokenizer()
    base = make_model()
    names = [layer.name for layer in adaptable_layers(base)]
    model = attach_lora(base, names, LoraConfig(r=4, dropout=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = "base_model.model." + names[0]
    dropout = dict(model.named_modules())[first].lora_dropout["default"]
    ids = torch.randint(0, 256, (8, 16)).tolist()
    ds = Dataset.from_list([{"input_ids": x, "attention_mask": [1] * 16, "labels": x} for x in ids])
    ranking = rank_layers(
        model,
        scorer="ila",
        tokenizer=tok,
        dataset=ds,
        stage2=Stage2Config(steps=2, batch_size=4),
        device="cpu",
    )
    assert ranking.num_layers == 28
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n].detach()) for n in before)
    assert all(after[n].requires_grad for n in before if "lora_" in n)
    # scoring switches LoRA dropout off and puts the very same module back
    assert dict(model.named_modules())[first].lora_dropout["default"] is dropout


def test_a_lora_on_lm_head_gets_a_clear_error_before_trl_refuses_it(tmp_path, tiny_model_dir):
    """trl's SFTTrainer rejects a LoRA on lm_head with a ValueError traceback; check_sft_model says so first,
    and passes the same model without the head."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from ila.errors import IlaError
    from ila.integration import check_sft_model

    def lora(include_lm_head):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        names = [layer.name for layer in adaptable_layers(base, include_lm_head=include_lm_head)]
        return attach_lora(base, names, LoraConfig(r=4))

    with_head, without = lora(True), lora(False)
    with pytest.raises(IlaError, match="lm_head carries a LoRA adapter.*include_lm_head"):
        check_sft_model(with_head)
    check_sft_model(without)
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, report_to=[], use_cpu=True)
    data = Dataset.from_list([{"prompt": "Say red.", "completion": " red"}] * 2)
    with pytest.raises(ValueError, match="lm_head"):  # the premise: trl itself refuses this model
        trl.SFTTrainer(model=with_head, args=args, train_dataset=data, processing_class=make_tokenizer())
