"""LoRA's dropout: the same random variable as nn.Dropout, put on every LoRA layer ila makes."""

import math

import pytest
import torch
from conftest import make_model

from ila.config import LoraConfig
from ila.layers import adaptable_layers
from ila.lora_dropout import LoraDropout
from ila.models import attach_lora


def test_drops_each_element_with_probability_p_and_rescales_the_rest():
    p, n = 0.05, 1_000_000
    torch.manual_seed(0)
    y = LoraDropout(p).train()(torch.ones(n))
    dropped = float((y == 0).float().mean())
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    # unbiased: the expectation of the output is the input
    assert abs(float(y.mean()) - 1.0) < 5 * math.sqrt(p / (1 - p) / n)


def test_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(1)
    x = torch.randn(8, 64, 32, requires_grad=True)
    y = LoraDropout(0.3).train()(x)
    y.sum().backward()
    expected = (y.detach() != 0).float() / 0.7
    assert torch.equal(x.grad, expected)


def test_eval_mode_and_zero_probability_are_the_identity_and_draws_are_seeded():
    x = torch.randn(4, 16)
    assert LoraDropout(0.5).eval()(x) is x
    assert LoraDropout(0.0).train()(x) is x
    torch.manual_seed(3)
    a = LoraDropout(0.5).train()(x)
    b = LoraDropout(0.5).train()(x)
    torch.manual_seed(3)
    assert torch.equal(LoraDropout(0.5).train()(x), a)
    assert not torch.equal(a, b)  # each call draws its own mask
    with pytest.raises(ValueError, match="dropout probability"):
        LoraDropout(1.0)


def test_attach_lora_puts_it_on_every_layer():
    model = make_model()
    names = [layer.name for layer in adaptable_layers(model)]
    peft_model = attach_lora(model, names, LoraConfig(r=4, alpha=8, dropout=0.1))
    dropouts = [m.lora_dropout["default"] for m in peft_model.modules() if hasattr(m, "lora_dropout")]
    assert len(dropouts) == len(names)
    assert all(isinstance(d, LoraDropout) and d.p == 0.1 for d in dropouts)
    assert not any(isinstance(m, torch.nn.Dropout) for m in peft_model.modules() if m is not None)
