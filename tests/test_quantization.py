"""QLoRA: what can be checked without CUDA, and the CUDA path itself where a GPU exists."""

from __future__ import annotations

import pytest
import torch

from ila.config import ModelConfig, load_config
from ila.errors import ConfigError, ModelError
from ila.models import load_base_model, quantization_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 4-bit kernels need CUDA")


def test_qlora_settings():
    q = quantization_config(ModelConfig(quantization="4bit"))
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(ModelConfig(quantization="8bit")).load_in_8bit
    assert quantization_config(ModelConfig()) is None


def test_qlora_config_is_checked():
    with pytest.raises(ConfigError, match="need CUDA"):
        load_config(None, ["model.quantization=4bit", "model.device=cpu"])
    with pytest.raises(ConfigError, match="stage3.method"):
        load_config(None, ["model.quantization=4bit", "model.device=cuda", "stage3.method=full"])
    cfg = load_config(
        None, ["model.quantization=4bit", "model.device=cuda", "stage3.selection.fraction=0.75"]
    )
    assert cfg.model.quantization == "4bit"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_qlora_without_cuda_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ModelError, match="needs CUDA"):
        load_base_model(ModelConfig(name=str(tiny_model_dir), quantization="4bit"))


@pytest.mark.gpu
@needs_cuda
def test_qlora_every_stage_on_cuda(tmp_path, tiny_model_dir, tiny_data_file):
    """QLoRA for real: the base loads as NF4 bitsandbytes layers, gates at 1 give the plain LoRA model and at
    0 the base (4-bit weights, bf16 compute), and every stage runs and trains on it."""
    bnb = pytest.importorskip("bitsandbytes")
    import json

    from conftest import TINY_OVERRIDES
    from safetensors.torch import load_file

    from ila.config import LoraConfig
    from ila.gates import LayerGates, attach_gates
    from ila.layers import adaptable_layers
    from ila.models import attach_lora
    from ila.pipeline import run_all
    from ila.ranking import Ranking

    overrides = [
        o for o in TINY_OVERRIDES(tiny_model_dir, tiny_data_file) if not o.startswith("model.device")
    ]
    cfg = load_config(
        None,
        overrides
        + [
            "model.device=cuda",
            "model.quantization=4bit",
            "model.dtype=bfloat16",
            "stage1.train.precision=bf16",
            "stage2.precision=bf16",
            "stage3.train.precision=bf16",
        ],
    )

    # The base is 4-bit: every adaptable linear layer is a bitsandbytes Linear4bit holding NF4 weights.
    base = load_base_model(cfg.model)
    names = [layer.name for layer in adaptable_layers(base)]
    modules = dict(base.named_modules())
    assert len(names) == 28
    for name in names:
        assert isinstance(modules[name], bnb.nn.Linear4bit), name
        assert modules[name].weight.quant_type == "nf4" and modules[name].compute_dtype == torch.bfloat16

    # Gates at 1 equal the plain LoRA model, gates at 0 the base, on the 4-bit model in bf16.
    model = attach_lora(base, names, LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    model.eval()
    ids = torch.randint(0, 256, (2, 12), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        plain = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
        assert not torch.allclose(plain.float(), base_logits.float(), atol=1e-2), (
            "the LoRA update must change the output"
        )
        gates = LayerGates(names)
        hooks = attach_gates(model, gates)
        gates.set_fixed(1.0)
        assert torch.equal(model(input_ids=ids).logits, plain)
        gates.set_fixed(0.0)
        assert torch.equal(model(input_ids=ids).logits, base_logits)
        hooks.remove()
    del model, base
    torch.cuda.empty_cache()

    # Every stage on the 4-bit base: stage 1 lowers the held-out loss, stage 2 ranks all 28 layers, stage 3
    # adapts exactly the selected layers.
    run_all(cfg, tmp_path)
    s1 = json.loads((tmp_path / "stage1" / "summary.json").read_text())
    assert s1["heldout_loss"] < s1["base_heldout_loss"]
    assert Ranking.load(tmp_path / "stage2" / "ranking.json").num_layers == 28
    selection = json.loads((tmp_path / "stage3" / "selection.json").read_text())["layers"]
    weights = load_file(tmp_path / "stage3" / "adapter" / "adapter_model.safetensors")
    assert {k.split(".lora_")[0].removeprefix("base_model.model.") for k in weights} == set(selection)
