"""Stage 2's gates: all at 1 equal plain peft LoRA, all at 0 equal the base model, only scores train."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model

from ila.gates import LayerGates, attach_gates
from ila.layers import adaptable_layers
from ila.models import attach_lora


def _lora_model(include_lm_head=False, seed=0):
    base = make_model(seed=seed)
    layers = [layer.name for layer in adaptable_layers(base, include_lm_head=include_lm_head)]
    reference = copy.deepcopy(base)
    peft_model = attach_lora(base, layers, _lora_cfg(), dropout=0.0)
    # peft starts B at zero, so the update would be zero: give every layer a non-trivial update.
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    return reference, peft_model, layers


def _lora_cfg():
    from ila.config import LoraConfig

    return LoraConfig(r=4, alpha=8, dropout=0.0)


@pytest.mark.parametrize("include_lm_head", [False, True])
def test_gates_at_one_equal_plain_lora_and_at_zero_equal_base(include_lm_head):
    base, peft_model, layers = _lora_model(include_lm_head)
    peft_model.eval()
    base.eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        plain = peft_model(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    assert not torch.allclose(plain, base_logits, atol=1e-3), "the LoRA update must change the output"

    gates = LayerGates(layers)
    hooks = attach_gates(peft_model, gates)
    with torch.no_grad():
        gates.set_fixed(1.0)
        assert torch.equal(peft_model(input_ids=ids).logits, plain)
        gates.set_fixed(0.0)
        assert torch.equal(peft_model(input_ids=ids).logits, base_logits)
        # The same through the scores themselves: sigmoid saturates to exactly 1 and 0 in fp32.
        gates.set_fixed(None)
        gates.scores.data.fill_(100.0)
        assert torch.equal(peft_model(input_ids=ids).logits, plain)
        gates.scores.data.fill_(-200.0)
        assert torch.equal(peft_model(input_ids=ids).logits, base_logits)
        gates.scores.data.fill_(0.0)
        half = peft_model(input_ids=ids).logits
        assert not torch.allclose(half, plain) and not torch.allclose(half, base_logits)
    hooks.remove()
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, plain)


def test_gate_gradients_reach_only_scores():
    _, peft_model, layers = _lora_model()
    for p in peft_model.parameters():
        p.requires_grad_(False)
    gates = LayerGates(layers, seed=3)
    attach_gates(peft_model, gates)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable == ["ila_gates.scores"]
    ids = torch.randint(0, 256, (2, 12))
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert gates.scores.grad is not None and torch.isfinite(gates.scores.grad).all()
    assert (gates.scores.grad != 0).sum() == len(layers)


def test_a_zero_update_gets_no_gate_gradient():
    _, peft_model, layers = _lora_model()
    for p in peft_model.parameters():
        p.requires_grad_(False)
    zeroed = layers[3]
    module = dict(peft_model.named_modules())["base_model.model." + zeroed]
    module.lora_B["default"].weight.data.zero_()
    gates = LayerGates(layers)
    attach_gates(peft_model, gates)
    ids = torch.randint(0, 256, (2, 12))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert gates.scores.grad[gates.index[zeroed]] == 0


def test_scores_are_seeded_and_budget_penalty_is_hinge():
    names = [f"l{i}" for i in range(10)]
    a, b, c = LayerGates(names, seed=1), LayerGates(names, seed=1), LayerGates(names, seed=2)
    assert torch.equal(a.scores, b.scores) and not torch.equal(a.scores, c.scores)
    a.scores.data.fill_(0.0)  # mean gate 0.5
    assert float(a.budget_penalty(0.5)) == 0.0
    assert float(a.budget_penalty(0.3)) == pytest.approx(0.2)


def test_attach_gates_refuses_layers_without_adapter():
    _, peft_model, layers = _lora_model()
    from ila.errors import ModelError

    with pytest.raises(ModelError, match="carry no LoRA"):
        attach_gates(peft_model, LayerGates(layers + ["model.layers.0.self_attn.rotary"]))


def _scores_with_loss_scaled_by(
    factor: float, normalise: bool, monkeypatch, steps: int = 6
) -> dict[str, float]:
    """Stage 2 on one LoRA model with the training loss multiplied by ``factor`` (a model whose gradients are
    ``factor`` times larger)."""
    from datasets import Dataset
    from tiny import make_tokenizer

    from ila.config import Stage2Config
    from ila.integration import rank_layers
    from ila.training import IlaTrainer

    original = IlaTrainer.compute_loss

    def scaled(self, *args, **kwargs):
        return original(self, *args, **kwargs) * factor

    monkeypatch.setattr(IlaTrainer, "compute_loss", scaled)
    _, model, _ = _lora_model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (8, 16), generator=g).tolist()
    data = Dataset.from_list([{"input_ids": x, "attention_mask": [1] * 16, "labels": x} for x in ids])
    s2 = Stage2Config(
        steps=steps, batch_size=4, learning_rate=0.05 if normalise else 1.0, normalise_step=normalise
    )
    ranking = rank_layers(
        model, scorer="ila", tokenizer=make_tokenizer(), dataset=data, stage2=s2, device="cpu"
    )
    return ranking.scores


def test_the_normalised_step_does_not_depend_on_the_models_gradient_scale(monkeypatch):
    one = _scores_with_loss_scaled_by(1.0, True, monkeypatch)
    many = _scores_with_loss_scaled_by(1000.0, True, monkeypatch)
    assert many == pytest.approx(one, rel=1e-4, abs=1e-6)
    start = LayerGates(list(one)).as_dict()
    first = _scores_with_loss_scaled_by(1000.0, True, monkeypatch, steps=1)
    assert max(abs(first[n] - start[n]) for n in one) == pytest.approx(
        0.05, rel=1e-4
    )  # lr: the largest first move
    # Plain SGD at a fixed learning rate moves 1000 times further on the steeper model.
    plain_one = _scores_with_loss_scaled_by(1.0, False, monkeypatch)
    plain_many = _scores_with_loss_scaled_by(1000.0, False, monkeypatch)
    assert max(abs(plain_many[n] - start[n]) for n in one) > 100 * max(
        abs(plain_one[n] - start[n]) for n in one
    )


def test_score_sgd_divides_by_the_first_gradient_only():
    from ila.gates import ScoreSGD

    s = torch.nn.Parameter(torch.zeros(3))
    opt = ScoreSGD([s], lr=0.1)
    s.grad = torch.tensor([0.0, 0.0, 0.0])  # nothing to measure: nothing moves and no scale is fixed
    opt.step()
    assert torch.equal(s.detach(), torch.zeros(3))
    s.grad = torch.tensor([4.0, -2.0, 0.0])
    opt.step()
    torch.testing.assert_close(s.detach(), torch.tensor([-0.1, 0.05, 0.0]))
    s.grad = torch.tensor(
        [8.0, 0.0, 0.0]
    )  # later steps keep the first scale: a larger gradient moves further
    opt.step()
    torch.testing.assert_close(s.detach(), torch.tensor([-0.3, 0.05, 0.0]))
    state = opt.state_dict()
    again = ScoreSGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    again.load_state_dict(state)  # a resumed stage 2 keeps G
    assert float(next(iter(again.state.values()))["scale"]) == 4.0
