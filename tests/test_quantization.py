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
    cfg = load_config(None, ["model.quantization=4bit", "model.device=cuda", "stage3.selection.fraction=0.75"])
    assert cfg.model.quantization == "4bit"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_qlora_without_cuda_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ModelError, match="needs CUDA"):
        load_base_model(ModelConfig(name=str(tiny_model_dir), quantization="4bit"))


@pytest.mark.gpu
@needs_cuda
def test_qlora_every_stage_on_cuda(tmp_path, tiny_model_dir, tiny_data_file):
    pytest.importorskip("bitsandbytes")
    from conftest import TINY_OVERRIDES

    from ila.pipeline import run_all
    from ila.ranking import Ranking

    overrides = [o for o in TINY_OVERRIDES(tiny_model_dir, tiny_data_file) if not o.startswith("model.device")]
    cfg = load_config(None, overrides + ["model.device=cuda", "model.quantization=4bit", "model.dtype=bfloat16",
                                         "stage1.train.precision=bf16", "stage2.precision=bf16",
                                         "stage3.train.precision=bf16"])
    run_all(cfg, tmp_path)
    assert Ranking.load(tmp_path / "stage2" / "ranking.json").num_layers == 28
    assert (tmp_path / "stage3" / "adapter" / "adapter_model.safetensors").is_file()
