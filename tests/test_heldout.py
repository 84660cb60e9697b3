"""The one held-out loss: token-weighted over examples of any length and batching, with an interval that
holds the estimate and narrows with more data."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from datasets import Dataset
from tiny import make_tokenizer

from ila.data import IGNORE_INDEX, tokenize_conversation
from ila.heldout import example_losses, heldout_loss, interval


def _rows(tok, answers):
    convs = [[{"role": "user", "content": "Say it."}, {"role": "assistant", "content": a}] for a in answers]
    return Dataset.from_list([tokenize_conversation(c, tok, max_length=96) for c in convs])


def _reference(model, rows):
    """Each example alone, no padding: (sum of its response-token losses, their count)."""
    out = []
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor(row["labels"][1:])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        out.append((float(loss), int((labels != IGNORE_INDEX).sum())))
    return out


def test_the_loss_is_token_weighted_and_independent_of_the_batching():
    tok = make_tokenizer()
    model = make_model(seed=3).eval()
    rows = _rows(tok, ["red", "blue green sun moon tree cat dog red blue green", "cat dog", "sun " * 12])
    ref = _reference(model, rows)
    token_weighted = sum(s for s, _ in ref) / sum(c for _, c in ref)
    mean_of_means = sum(s / c for s, c in ref) / len(ref)
    assert abs(token_weighted - mean_of_means) > 1e-3  # the two weightings differ on these examples
    for batch_size in (1, 3, 4):
        out = heldout_loss(model, tok, rows, batch_size=batch_size)
        assert out["loss"] == pytest.approx(token_weighted, abs=1e-5)
        assert out["tokens"] == sum(c for _, c in ref) and out["examples"] == len(rows)
    sums, counts = example_losses(model, tok, rows, batch_size=3)
    assert sums.tolist() == pytest.approx([s for s, _ in ref], abs=1e-4)
    assert counts.tolist() == [c for _, c in ref]


def test_the_interval_holds_the_estimate_and_narrows_with_more_examples():
    rng = torch.Generator().manual_seed(0)
    counts = torch.randint(3, 40, (400,), generator=rng).double()
    sums = counts * (2.0 + torch.randn(400, generator=rng).double().abs())
    estimate = float(sums.sum() / counts.sum())
    lo, hi = interval(sums.numpy(), counts.numpy())
    assert lo < estimate < hi
    lo_few, hi_few = interval(sums[:25].numpy(), counts[:25].numpy())
    assert hi_few - lo_few > 2 * (hi - lo)  # about sqrt(16) = 4 times wider with 16 times fewer examples
    assert interval(sums.numpy(), counts.numpy()) == [lo, hi]  # seeded: the same losses, the same interval
    same = interval(counts.numpy() * 2.5, counts.numpy())
    assert same == pytest.approx([2.5, 2.5])  # no spread between examples: a point


@pytest.mark.parametrize("setting, drawn", [(None, False), ("1", True), ("0", False)])
def test_the_progress_bar_shows_only_on_a_terminal_or_when_asked(monkeypatch, capfd, setting, drawn):
    """Under pytest stderr is no terminal: silent by default, drawn with ILA_PROGRESS=1."""
    if setting is None:
        monkeypatch.delenv("ILA_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("ILA_PROGRESS", setting)
    tok = make_tokenizer()
    heldout_loss(make_model(), tok, _rows(tok, ["red", "blue", "green"]), batch_size=1)
    err = capfd.readouterr().err
    assert ("held-out loss" in err) is drawn


def test_the_output_head_on_response_positions_only_gives_the_full_computation(monkeypatch):
    """With logits_to_keep (the head only where a response token follows) and without it, the same losses."""
    import ila.heldout as heldout

    tok = make_tokenizer()
    model = make_model(seed=4).eval()
    rows = _rows(tok, ["red", "blue green sun", "cat dog " * 5])
    assert heldout.supports_response_logits(model)
    fast = heldout.example_losses(model, tok, rows, batch_size=2)
    monkeypatch.setattr(heldout, "supports_response_logits", lambda m: False)
    full = heldout.example_losses(model, tok, rows, batch_size=2)
    assert fast[0] == pytest.approx(full[0], abs=1e-4) and (fast[1] == full[1]).all()
