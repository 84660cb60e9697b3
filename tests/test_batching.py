"""Padding-free batches compute what padded batches compute: the loss, every gradient, the held-out loss and
the stage-2 scores, on tiny models built here; and the check that decides when they are used."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from tiny import make_tokenizer

from ila import batching
from ila.batching import PADDED, SEGMENTED_SDPA, choose_batching, flattening_collator, padded_collator
from ila.config import LoraConfig, Stage2Config
from ila.data import IGNORE_INDEX
from ila.errors import ConfigError
from ila.heldout import example_losses
from ila.layers import adaptable_layers
from ila.models import attach_lora
from ila.response_logits import response_logits_kwargs
from ila.scoring import learn_gates

LENGTHS = (23, 9, 31, 14)


def rows(lengths=LENGTHS, vocab=250, seed=0):
    """Examples of different lengths with a prompt (IGNORE_INDEX) and a response."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]
        out.append({"input_ids": ids, "attention_mask": [1] * n, "labels": labels})
    return out


def lora_model(attn="sdpa", **kw):
    model = make_model(**kw)
    model.set_attn_implementation(attn)
    names = [layer.name for layer in adaptable_layers(model)]
    torch.manual_seed(1)
    peft_model = attach_lora(model, names, LoraConfig(r=4, alpha=8, dropout=0.0))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # a trained-looking update, so that every gradient is non-zero
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    return peft_model


def loss_and_grads(model, batch, choice):
    model.zero_grad(set_to_none=True)
    inputs = {**batch, **response_logits_kwargs(batch["labels"])}
    with choice.attending(model):
        loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("lengths", [LENGTHS, (16, 16, 16)], ids=["ragged", "equal"])
def test_padding_free_loss_and_every_gradient_equal_padded(lengths):
    model = lora_model()
    choice = choose_batching(model, "auto")
    assert choice.padding_free and choice.attention == SEGMENTED_SDPA
    examples = rows(lengths)
    padded = padded_collator(make_tokenizer())(examples)
    flat = flattening_collator()(examples)
    assert flat["input_ids"].shape == (1, sum(lengths))  # no padding token at all
    loss_p, grads_p = loss_and_grads(model, padded, PADDED)
    loss_f, grads_f = loss_and_grads(model, flat, choice)
    assert torch.allclose(loss_p, loss_f, rtol=1e-5, atol=1e-6)
    assert grads_p.keys() == grads_f.keys() and len(grads_p) == 2 * 28
    for name, g in grads_p.items():
        assert torch.allclose(g, grads_f[name], rtol=1e-4, atol=1e-6), name
    # the model runs with its own attention again afterwards
    assert model.base_model.model.config._attn_implementation == "sdpa"


def test_auto_flattens_the_batches_that_padding_would_swell():
    tok = make_tokenizer()
    ragged, even = rows((23, 9, 31, 14)), rows((32, 32, 31, 32))
    auto = choose_batching(lora_model(), "auto").collator(tok)
    assert "position_ids" in auto(ragged)  # 128 padded tokens for 77 real ones: flattened
    assert "attention_mask" in auto(even) and "position_ids" not in auto(even)  # 1 % padding: padded
    on = choose_batching(lora_model(), "on").collator(tok)
    assert all("position_ids" in on(batch) for batch in (ragged, even))


def test_attention_that_crosses_examples_is_caught(monkeypatch):
    """Without the per-example attention the concatenated row is one sequence: the probe sees it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def crossing(module, q, k, v, mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        return sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)

    monkeypatch.setattr(batching, "_segmented_sdpa", crossing)
    model = lora_model()
    choice = choose_batching(model, "auto")
    assert not choice.padding_free and "crosses examples" in choice.reason
    with pytest.raises(ConfigError, match="padding_free: on"):
        choose_batching(model, "on")


def test_the_check_decides_and_the_option_overrides():
    assert not choose_batching(lora_model(), "off").padding_free
    eager = lora_model(attn="eager")
    decision = choose_batching(eager, "auto")
    assert not decision.padding_free and "eager" in decision.reason
    with pytest.raises(ConfigError, match="eager"):
        choose_batching(eager, "on")


def test_sliding_window_is_kept_inside_each_example():
    """A Mistral with a 4-token window: each example sees only its last 4 tokens, padded or not."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, max_position_embeddings=128, attn_implementation="sdpa",
    )  # fmt: skip
    model = MistralForCausalLM(cfg).eval()
    examples = rows(lengths=(12, 7, 16))
    choice = choose_batching(model, "auto")
    assert choice.padding_free
    with torch.no_grad():
        padded = padded_collator(make_tokenizer())(examples)
        logits_p = model(**{k: padded[k] for k in ("input_ids", "attention_mask")}).logits
        flat = flattening_collator()(examples)
        with choice.attending(model):
            logits_f = model(**{k: v for k, v in flat.items() if k != "labels"}).logits
    start = 0
    for i, n in enumerate((12, 7, 16)):
        assert torch.allclose(logits_p[i, :n], logits_f[0, start : start + n], atol=1e-5), i
        start += n


def test_heldout_loss_is_the_same_padded_or_not():
    model = lora_model()
    from datasets import Dataset

    data = Dataset.from_list(rows(lengths=(23, 9, 31, 14, 5, 40, 17)))
    tok = make_tokenizer()
    sums_p, counts_p = example_losses(model, tok, data, batch_size=3, batching=PADDED)
    sums_f, counts_f = example_losses(model, tok, data, batch_size=3, batching=choose_batching(model))
    assert (counts_p == counts_f).all() and counts_p.min() > 0
    assert abs(sums_p - sums_f).max() < 1e-4 * abs(sums_p).max()


def test_stage2_scores_are_the_same_padded_or_not(tmp_path):
    from datasets import Dataset

    data = Dataset.from_list(rows(lengths=(23, 9, 31, 14, 5, 40, 17, 26) * 2))
    s2 = Stage2Config(steps=4, batch_size=4, logging_steps=2, precision="fp32")
    scores = {}
    for setting in ("off", "on"):
        model = lora_model()
        for p in model.parameters():
            p.requires_grad_(False)
        layers = adaptable_layers(model.base_model.model)
        scores[setting], facts = learn_gates(
            model, layers, tokenizer=make_tokenizer(), train_dataset=data, s2=s2, seed=0, device="cpu",
            folder=tmp_path / setting, padding_free=setting,
        )  # fmt: skip
        assert facts["batching"]["padding_free"] == (setting == "on")
    off, on = scores["off"], scores["on"]
    assert max(abs(off[n] - on[n]) for n in off) < 1e-4
    assert len(set(off.values())) > 1  # the scores moved: the comparison is not of two initial values
