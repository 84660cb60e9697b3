"""Forgetting: the held-out loss's own function on general text where every token counts."""

from __future__ import annotations

import pytest
from conftest import make_model
from tiny import make_tokenizer

from ila import forgetting
from ila.heldout import heldout_loss


def test_the_forgetting_loss_is_the_heldout_loss_on_general_text(monkeypatch):
    tok = make_tokenizer()
    model = make_model(seed=1)
    rows = forgetting.general_text_rows(tok, max_length=32, max_examples=6)
    assert len(rows) == 6 and all(r["labels"] == r["input_ids"] and len(r["input_ids"]) == 32 for r in rows)
    assert "assert" in forgetting.general_text() and "statement" in forgetting.general_text()
    out = forgetting.forgetting_loss(model, tok, rows, batch_size=4)
    ref = heldout_loss(model, tok, rows, batch_size=2)
    assert out["loss"] == pytest.approx(ref["loss"], abs=1e-6) and out["ci95"] == pytest.approx(ref["ci95"])
    assert out["python"] and len(out["sha256"]) == 64  # what it was measured on, to compare like with like
    calls = []
    monkeypatch.setattr(forgetting, "heldout_loss", lambda *a, **k: calls.append(a) or ref)
    forgetting.forgetting_loss(model, tok, rows)
    assert len(calls) == 1  # one function for both, not a copy of it


def test_the_windows_are_the_start_of_the_text_in_order():
    tok = make_tokenizer()
    rows = forgetting.general_text_rows(tok, max_length=16, max_examples=3)
    ids = tok(forgetting.general_text(), add_special_tokens=False).input_ids
    assert [t for r in rows for t in r["input_ids"]] == ids[:48]
